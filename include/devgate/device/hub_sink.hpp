#pragma once

#include <nlohmann/json.hpp>

#include <chrono>        // dispatch times
#include <system_error>  // results
#include <utility>       // std::move

#include "devgate/device/protocol.hpp"  // topics, envelopes
#include "devgate/device/pubsub.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/sink.hpp"

namespace devgate::device {

/// The pipeline sink of a hub: the user's sink, then (on success) one line on the server topic
/// per dispatched message, encoded once for every subscriber.
template <class Sink>
class hub_sink {
 public:
  /// Wraps `user`; `bus` receives the server log.
  hub_sink(Sink user, pubsub* bus) : user_(std::move(user)), bus_(bus) {}
  /// Dispatches to the user's sink, then logs.
  std::error_code consume(const message& m, dispatch_context& ctx) {
    auto ec = user_.consume(m, ctx);
    if (!ec && bus_->has_subscribers(topics::server)) {
      const auto now = clock::now();
      const auto wall = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
      nlohmann::json data{
          {"device", m.device_id.view()},
          {"seq", m.sequence},
          {"worker", ctx.worker_id},
          {"partition", ctx.partition},
          {"time_ms", wall},
          {"latency_us",
           std::chrono::duration_cast<std::chrono::microseconds>(now - m.received).count()}};
      bus_->publish(topics::server, make_envelope("event", 0, topics::server, data.dump()));
    }
    return ec;
  }
  /// The user's sink.
  Sink& user() noexcept { return user_; }

 private:
  Sink user_;
  pubsub* bus_;
};

}  // namespace devgate::device
