#pragma once

#include <atomic>        // gateway instance numbers
#include <concepts>      // std::copy_constructible
#include <cstddef>       // std::size_t
#include <cstdint>       // gateway instance numbers
#include <functional>    // session hooks
#include <memory>        // per-thread lanes
#include <mutex>         // the lane list
#include <span>          // batches
#include <string>        // Prometheus text
#include <system_error>  // results
#include <thread>        // std::thread::id
#include <type_traits>   // std::is_invocable_r_v
#include <utility>       // std::move
#include <vector>        // handed-back messages, staging

#include "devgate/core/error.hpp"
#include "devgate/pipeline/detail/network_thread.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/metrics.hpp"
#include "devgate/pipeline/pipeline.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/transport/reply_channel.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate {

/// A gateway's intake: `batch_result intake(std::span<inbound_message>)`, called on transport
/// threads. It may move from the messages it takes and leaves the refused ones as they were.
template <class F>
concept intake_handler = std::copy_constructible<F> &&
    std::is_invocable_r_v<batch_result, F&, std::span<inbound_message>>;

/// What a gateway's owner runs when the transport's sessions open and close (both optional;
/// they run on transport threads, like the intake).
struct session_hooks {
  /// A session opened (before any of its messages reaches the intake).
  std::function<void(const session_info&)> on_open;
  /// A session closed, with the code that closed it.
  std::function<void(session_id, close_code)> on_close;
};

/// The composition root: a transport feeding a pipeline. By default every batch of device
/// messages the transport delivers is pushed into the pipeline, and a push's error
/// (`errc::queue_full`, `errc::closed`) goes back to the device; a richer layer (the device
/// hub) starts it with its own intake and session hooks instead, and pushes what its intake
/// accepts with `push`. Sinks reply through the transport via `dispatch_context::reply`.
///
///     devgate::in_process_transport transport;
///     devgate::gateway gw(transport, devgate::callback_sink([](const devgate::message& m,
///                                                              devgate::dispatch_context&) {}));
///     gw.start();
///
/// Lifecycle, for every layer built on it: `start` installs the transport handlers, starts the
/// workers, then the transport; `stop` closes intake, drains the pipeline through the sinks
/// (which may still reply), then stops the transport.
template <class Transport, class Sink, class Traits = pipeline_traits>
class gateway {
  static_assert(devgate::transport<Transport>,
                "devgate::gateway: Transport must satisfy devgate::transport (see "
                "transport/transport.hpp for what it must provide)");

 public:
  /// The pipeline the gateway feeds.
  using pipeline_type = pipeline<Sink, Traits>;

  /// Wires `t` (referenced: it must outlive the gateway) to a pipeline dispatching to `s`.
  gateway(Transport& t, Sink s, pipeline_options options = {})
      : transport_(t), pipeline_(std::move(s), std::move(options)) {
    channel_ = reply_channel::to(transport_);
    pipeline_.set_reply_channel(&channel_);
  }
  gateway(const gateway&) = delete;
  gateway& operator=(const gateway&) = delete;
  /// Stops (draining) if still running.
  ~gateway() { stop(); }

  /// Starts with the default intake: what the transport delivers is pushed into the pipeline.
  std::error_code start() {
    return start([this](std::span<inbound_message> batch) { return push_inbound(batch); });
  }
  /// Starts with `intake` taking what the transport delivers and `hooks` told of sessions
  /// opening and closing: installs the transport handlers, starts the workers, then the
  /// transport. A transport that delivers on network threads (`handlers_on_network_threads`)
  /// refuses the `block` overflow policy with `errc::would_block`, before anything starts: a
  /// push that waited there would stall every session of the thread. Its intake runs with the
  /// thread marked as a network thread, where a `drop_oldest` push never waits either.
  template <intake_handler Intake>
  std::error_code start(Intake intake, session_hooks hooks = {}) {
    transport_handlers handlers;
    if constexpr (handlers_on_network_threads<Transport>) {
      if (pipeline_.options().overflow == overflow_policy::block) return errc::would_block;
      handlers.on_messages = [intake =
                                  std::move(intake)](std::span<inbound_message> batch) mutable {
        const detail::network_thread_scope network_thread;
        return intake(batch);
      };
    } else {
      handlers.on_messages = std::move(intake);
    }
    handlers.on_open = std::move(hooks.on_open);
    handlers.on_close = std::move(hooks.on_close);
    transport_.set_handlers(std::move(handlers));
    if (auto ec = pipeline_.start(); ec) return ec;
    started_ = true;
    return transport_.start();
  }

  /// Stops intake (devices get `errc::closed`), drains every message through the sinks (which
  /// may still reply), then stops the transport.
  void stop() {
    pipeline_.stop();
    stop_transport();
  }
  /// Like `stop()`, but returns what was not dispatched by `deadline`.
  [[nodiscard]] std::vector<message> stop(clock::time_point deadline) {
    auto left = pipeline_.stop(deadline);
    stop_transport();
    return left;
  }

  /// Pushes a message directly (host code, tests), as if a transport had delivered it.
  std::error_code push(message&& m) { return pipeline_.push(std::move(m)); }
  /// Pushes a batch with `pipeline::push_bulk`, in order, through the calling thread's own
  /// producer (made on the thread's first batch, kept until the gateway goes: meant for the
  /// few long-lived threads of a transport and its intake). A prefix is taken (moved from).
  batch_result push(std::span<message> batch) {
    const auto r = pipeline_.push_bulk(batch, lane().producer);
    return {r.accepted, r.error};
  }

  /// The metrics of the pipeline.
  [[nodiscard]] pipeline_metrics metrics() const { return pipeline_.metrics(); }
  /// Appends the metrics in Prometheus text format.
  void render_prometheus(std::string& out) const { pipeline_.render_prometheus(out); }
  /// The pipeline.
  [[nodiscard]] pipeline_type& engine() noexcept { return pipeline_; }
  /// The pipeline (metrics).
  [[nodiscard]] const pipeline_type& engine() const noexcept { return pipeline_; }
  /// The transport.
  [[nodiscard]] Transport& get_transport() noexcept { return transport_; }
  /// The way back to the transport's sessions (what sinks reply through).
  [[nodiscard]] const reply_channel& channel() const noexcept { return channel_; }

 private:
  // What one thread needs to push batches: its producer, and a reusable batch of messages.
  struct thread_lane {
    explicit thread_lane(pipeline_type& p) : producer(p.make_producer()) {}
    std::thread::id thread = std::this_thread::get_id();
    typename pipeline_type::producer producer;
    std::vector<message> staging;
    bool busy = false;  // a push of this lane's staging is under way on this thread
  };

  // The default intake: the batch becomes messages, pushed in one push_bulk. The refused rest
  // is handed back as it came, for the transport to answer.
  batch_result push_inbound(std::span<inbound_message> batch) {
    thread_lane& l = lane();
    if (l.busy) return push_inbound_one_by_one(batch);  // a handler of the push pushed again
    // Whatever leaves this call (an allocation failure too), the lane is free and empty after.
    struct lane_use {
      thread_lane& lane;
      explicit lane_use(thread_lane& l) noexcept : lane(l) { lane.busy = true; }
      ~lane_use() {
        lane.staging.clear();
        lane.busy = false;
      }
      lane_use(const lane_use&) = delete;
      lane_use& operator=(const lane_use&) = delete;
    } use(l);
    auto& staged = l.staging;
    for (auto& in : batch) staged.push_back(message::from(std::move(in)));
    const auto r = pipeline_.push_bulk(std::span<message>(staged), l.producer);
    for (std::size_t i = r.accepted; i < batch.size(); ++i) give_back(staged[i], batch[i]);
    return {r.accepted, r.error};
  }
  batch_result push_inbound_one_by_one(std::span<inbound_message> batch) {
    for (std::size_t i = 0; i < batch.size(); ++i) {
      auto m = message::from(std::move(batch[i]));
      if (auto ec = pipeline_.push(std::move(m)); ec) {
        give_back(m, batch[i]);
        return {i, ec};
      }
    }
    return {batch.size(), {}};
  }
  static void give_back(message& m, inbound_message& in) noexcept {
    in.device_id = std::move(m.device_id);
    in.payload = std::move(m.payload);
  }

  // The calling thread's lane: one lookup under the lock per thread and gateway, then a
  // thread-local hit for as long as the thread keeps pushing into the same gateway.
  thread_lane& lane() {
    struct last_used {
      std::uint64_t gateway = 0;
      thread_lane* lane = nullptr;
    };
    thread_local last_used cache;
    if (cache.gateway == instance_) return *cache.lane;
    std::lock_guard lock(lanes_mutex_);
    const auto me = std::this_thread::get_id();
    thread_lane* found = nullptr;
    for (auto& l : lanes_) {
      // A thread id comes back only after its thread ended, so its lane is free again.
      if (l->thread == me) found = l.get();
    }
    if (found == nullptr)
      found = lanes_.emplace_back(std::make_unique<thread_lane>(pipeline_)).get();
    cache = {instance_, found};
    return *found;
  }
  // Numbers gateways for the thread-local lane cache: a number is never given twice, so a
  // cache entry left by a gateway that is gone never matches a new one.
  static std::uint64_t next_instance() noexcept {
    static std::atomic<std::uint64_t> count{0};
    return count.fetch_add(1, std::memory_order_relaxed) + 1;
  }

  void stop_transport() {
    if (started_) {
      started_ = false;
      transport_.stop();
    }
  }

  Transport& transport_;
  reply_channel channel_;
  const std::uint64_t instance_ = next_instance();
  pipeline_type pipeline_;
  std::mutex lanes_mutex_;
  // After the pipeline: producers go before the queues they were made for.
  std::vector<std::unique_ptr<thread_lane>> lanes_;
  bool started_ = false;
};

/// Deduces transport and sink: `devgate::gateway gw(transport, sink);`.
template <class Transport, class Sink>
gateway(Transport&, Sink, pipeline_options = {}) -> gateway<Transport, Sink>;

}  // namespace devgate
