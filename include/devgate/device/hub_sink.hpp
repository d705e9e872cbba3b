#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>     // std::copy
#include <charconv>      // std::to_chars
#include <chrono>        // dispatch times
#include <cstddef>       // std::size_t
#include <cstdint>       // sequence numbers
#include <string_view>   // device ids
#include <system_error>  // results
#include <utility>       // std::move

#include "devgate/device/device_id.hpp"
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
      const auto latency =
          std::chrono::duration_cast<std::chrono::microseconds>(now - m.received).count();
      bus_->publish(topics::server, server_log_event(m.device_id.view(), m.sequence, ctx.worker_id,
                                                     ctx.partition, wall, latency));
    }
    return ec;
  }
  /// The user's sink.
  Sink& user() noexcept { return user_; }

  /// The server-log event of one dispatched message, encoded in one buffer:
  /// `{"type":"event","topic":"server","data":{"device":..,"latency_us":..,"partition":..,
  /// "seq":..,"time_ms":..,"worker":..}}`.
  static shared_bytes server_log_event(std::string_view device, std::uint64_t seq,
                                       std::size_t worker, std::size_t partition,
                                       std::int64_t time_ms, std::int64_t latency_us) {
    if (!is_valid_device_id(device)) [[unlikely]] {  // host code may push any id: escape it
      nlohmann::json data{{"device", device},   {"seq", seq},
                          {"worker", worker},   {"partition", partition},
                          {"time_ms", time_ms}, {"latency_us", latency_us}};
      return make_envelope("event", 0, topics::server,
                           data.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
    // A device id is 1 to 128 of [A-Za-z0-9._-]: no escaping needed.
    constexpr std::string_view head = R"({"type":"event","topic":"server","data":{"device":")";
    constexpr std::size_t numbers = 5 * 20;  // five numbers of at most 20 characters
    char buf[head.size() + max_device_id_length + numbers + 64];
    char* p = std::copy(head.begin(), head.end(), buf);
    p = std::copy(device.begin(), device.end(), p);
    auto field = [&p](std::string_view name, auto value) {
      p = std::copy(name.begin(), name.end(), p);
      p = std::to_chars(p, p + 20, value).ptr;
    };
    field(R"(","latency_us":)", latency_us);
    field(R"(,"partition":)", partition);
    field(R"(,"seq":)", seq);
    field(R"(,"time_ms":)", time_ms);
    field(R"(,"worker":)", worker);
    *p++ = '}';
    *p++ = '}';
    return shared_bytes::copy_of(std::string_view(buf, static_cast<std::size_t>(p - buf)));
  }

 private:
  Sink user_;
  pubsub* bus_;
};

}  // namespace devgate::device
