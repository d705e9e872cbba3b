#pragma once

#include <cstddef>       // std::size_t
#include <span>          // broadcast recipients
#include <string>        // Prometheus text
#include <system_error>  // results
#include <utility>       // std::move
#include <vector>        // handed-back messages

#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/pipeline.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate {

/// A transport feeding a pipeline: every device message the transport delivers is pushed into
/// the pipeline, and the push's error (`errc::queue_full`, `errc::closed`) goes back to the
/// device. Sinks reply through the transport via `dispatch_context::reply`.
///
///     devgate::in_process_transport transport;
///     devgate::gateway gw(transport, devgate::callback_sink([](const devgate::message& m,
///                                                              devgate::dispatch_context&) {}));
///     gw.start();
template <class Transport, class Sink, class Traits = pipeline_traits>
class gateway {
  static_assert(devgate::transport<Transport>,
                "devgate::gateway: Transport must satisfy devgate::transport (see "
                "transport/transport.hpp for what it must provide)");

 public:
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

  /// Installs the transport handlers, starts the workers, then the transport.
  std::error_code start() {
    transport_handlers handlers;
    handlers.on_message = [this](inbound_message&& in) {
      return pipeline_.push(message::from(std::move(in)));
    };
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
  /// The metrics of the pipeline.
  [[nodiscard]] pipeline_metrics metrics() const { return pipeline_.metrics(); }
  /// Appends the metrics in Prometheus text format.
  void render_prometheus(std::string& out) const { pipeline_.render_prometheus(out); }
  /// The pipeline.
  [[nodiscard]] pipeline<Sink, Traits>& engine() noexcept { return pipeline_; }
  /// The transport.
  [[nodiscard]] Transport& get_transport() noexcept { return transport_; }

 private:
  void stop_transport() {
    if (started_) {
      started_ = false;
      transport_.stop();
    }
  }

  Transport& transport_;
  reply_channel channel_;
  pipeline<Sink, Traits> pipeline_;
  bool started_ = false;
};

/// Deduces transport and sink: `devgate::gateway gw(transport, sink);`.
template <class Transport, class Sink>
gateway(Transport&, Sink, pipeline_options = {}) -> gateway<Transport, Sink>;

}  // namespace devgate
