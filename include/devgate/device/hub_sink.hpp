#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>     // std::copy
#include <charconv>      // std::to_chars
#include <chrono>        // dispatch times
#include <cstddef>       // std::size_t
#include <cstdint>       // sequence numbers
#include <functional>    // the dispatched-batch handler
#include <span>          // batches
#include <string_view>   // device ids
#include <system_error>  // results
#include <utility>       // std::move
#include <vector>        // the batch's dispatched messages

#include "devgate/device/device_id.hpp"
#include "devgate/device/protocol.hpp"  // topics, envelopes
#include "devgate/device/pubsub.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/sink.hpp"

namespace devgate::device {

/// What a hub does with the device messages a worker's batch got into the sink (ack policy
/// on_dispatch: record them in the store, which answers their sends); called after the batch.
using dispatched_batch = std::function<void(std::span<const message>)>;

/// The pipeline sink of a hub: the user's sink, then (on success) one line on the server topic
/// per dispatched message, encoded once for every subscriber; and, when given `on_dispatched`,
/// the batch's device messages the user's sink took, handed over after the batch.
template <class Sink>
class hub_sink {
 public:
  /// Wraps `user`; `bus` receives the server log; `on_dispatched` (may be empty) the device
  /// messages of each batch that the user's sink took.
  hub_sink(Sink user, pubsub* bus, dispatched_batch on_dispatched = {})
      : user_(std::move(user)), bus_(bus), on_dispatched_(std::move(on_dispatched)) {}
  /// Dispatches to the user's sink, then logs: one `event` per message to the server log's
  /// subscribers, and one line of the batch's `events` frame for its batched subscribers.
  std::error_code consume(const message& m, dispatch_context& ctx) {
    auto ec = user_.consume(m, ctx);
    if (!ec) took(m, ctx);
    return ec;
  }
  /// With a batch sink: hands it the share whole, then logs each message it took (as `consume`).
  void consume_batch(message_batch batch, dispatch_context& ctx,
                     std::span<std::error_code> results) requires batch_sink<Sink> {
    user_.consume_batch(batch, ctx, results);
    const auto first = ctx.partition;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (results[i]) continue;
      ctx.partition = batch.partition(i);
      took(batch[i], ctx);
    }
    ctx.partition = first;
  }
  /// The end of a worker's dispatch batch: its lines go to the batched subscribers in one frame.
  void end_batch(dispatch_context& ctx) {
    if constexpr (requires { user_.end_batch(ctx); }) user_.end_batch(ctx);
    // After the user's end_batch: a sink that commits its batch there has committed it.
    if (auto& t = taken(); !t.empty()) {
      try {
        on_dispatched_(std::span<const message>(t));
      } catch (...) {
        t.clear();
        throw;  // counted by the pipeline as a handler exception
      }
      t.clear();
    }
    std::string& lines = batch_lines();
    if (lines.empty()) return;
    lines.append("]}");
    const auto frame = shared_bytes::copy_of(std::string_view(lines));
    lines.clear();
    bus_->publish(topics::server_batched, frame);
  }
  /// The user's sink.
  Sink& user() noexcept { return user_; }

  /// One line of the server log.
  struct line {
    std::string_view device;  ///< The device.
    std::uint64_t seq;        ///< Its message number.
    std::size_t worker;       ///< The worker that dispatched it.
    std::size_t partition;    ///< The partition it came from.
    std::int64_t time_ms;     ///< Unix ms when the sink returned.
    std::int64_t latency_us;  ///< From receipt to the sink's return.
  };
  /// Appends `l` as JSON, `{"device":..,"latency_us":..,"partition":..,"seq":..,"time_ms":..,
  /// "worker":..}`, to `out`.
  static void append_line(std::string& out, const line& l) {
    if (!is_valid_device_id(l.device)) [[unlikely]] {  // host code may push any id: escape it
      nlohmann::json data{{"device", l.device},   {"seq", l.seq},
                          {"worker", l.worker},   {"partition", l.partition},
                          {"time_ms", l.time_ms}, {"latency_us", l.latency_us}};
      out.append(data.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
      return;
    }
    // A device id is 1 to 128 of [A-Za-z0-9._-]: no escaping needed.
    char buf[max_device_id_length + 5 * 20 + 80];  // the id, five numbers, the names
    char* p = buf;
    auto text = [&p](std::string_view t) { p = std::copy(t.begin(), t.end(), p); };
    auto number = [&p](auto v) { p = std::to_chars(p, p + 20, v).ptr; };
    text(R"({"device":")");
    text(l.device);
    text(R"(","latency_us":)");
    number(l.latency_us);
    text(R"(,"partition":)");
    number(l.partition);
    text(R"(,"seq":)");
    number(l.seq);
    text(R"(,"time_ms":)");
    number(l.time_ms);
    text(R"(,"worker":)");
    number(l.worker);
    *p++ = '}';
    out.append(buf, static_cast<std::size_t>(p - buf));
  }

 private:
  // After the user's sink took `m`: keeps it for on_dispatched, and logs one `event` to the
  // server log's subscribers and one line of the batch's `events` frame for the batched ones.
  void took(const message& m, const dispatch_context& ctx) {
    if (on_dispatched_ && m.session != 0) taken().push_back(m);  // two shared references
    const bool single = bus_->has_subscribers(topics::server);
    const bool batched = bus_->has_subscribers(topics::server_batched);
    if (!single && !batched) return;
    const auto now = clock::now();
    const auto wall = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
    const auto latency =
        std::chrono::duration_cast<std::chrono::microseconds>(now - m.received).count();
    const line l{m.device_id.view(), m.sequence, ctx.worker_id, ctx.partition, wall, latency};
    if (single) {
      std::string& out = scratch();
      out.assign(R"({"type":"event","topic":"server","data":)");
      append_line(out, l);
      out.push_back('}');
      bus_->publish(topics::server, shared_bytes::copy_of(std::string_view(out)));
    }
    if (batched) {
      std::string& lines = batch_lines();
      if (lines.empty())
        lines.assign(R"({"type":"events","topic":"server","data":[)");
      else
        lines.push_back(',');
      append_line(lines, l);
    }
  }

  // The calling worker's encoding buffer (a worker thread serves one pipeline).
  static std::string& scratch() {
    thread_local std::string s;
    return s;
  }
  // The device messages of the calling worker's current batch that the user's sink took.
  static std::vector<message>& taken() {
    thread_local std::vector<message> t;
    return t;
  }
  // The lines of the calling worker's current batch; emptied by end_batch.
  static std::string& batch_lines() {
    thread_local std::string s;
    return s;
  }

  Sink user_;
  pubsub* bus_;
  dispatched_batch on_dispatched_;
};

}  // namespace devgate::device
