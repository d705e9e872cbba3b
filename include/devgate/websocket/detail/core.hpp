#pragma once

#include <atomic>   // live sessions, stopping flag
#include <chrono>   // tick period, millisecond stamps
#include <cstddef>  // std::size_t
#include <cstdint>  // 32-bit stamps

#include "devgate/transport/transport.hpp"
#include "devgate/websocket/detail/tls_context.hpp"
#include "devgate/websocket/server_options.hpp"

namespace devgate::websocket::detail {

/// What the sessions of one server share: its options, the engine's handlers, the TLS context,
/// the timer period and the counters stop() waits on. Lives in the server; every worker thread
/// reads it.
struct server_core {
  server_options options;
  transport_handlers handlers;
  clock::duration tick{};                  // the workers' timer period
  clock::time_point epoch = clock::now();  // sessions keep 32-bit millisecond stamps from here
  std::atomic<std::size_t> live{0};        // sessions not yet finished, for stop()
  std::atomic<bool> stopping{false};
  tls_context tls;  // enabled when options.tls is set

  /// Milliseconds since `epoch`, wrapping after 49 days: compare with `reached`, never with <.
  [[nodiscard]] std::uint32_t now_ms() const noexcept { return stamp(clock::now()); }
  /// `t` as milliseconds since `epoch` (wrapping like now_ms).
  [[nodiscard]] std::uint32_t stamp(clock::time_point t) const noexcept {
    return static_cast<std::uint32_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(t - epoch).count());
  }
  /// True when `deadline` is not in the future (valid for spans under 24 days).
  [[nodiscard]] static bool reached(std::uint32_t now, std::uint32_t deadline) noexcept {
    return static_cast<std::int32_t>(now - deadline) >= 0;
  }
  /// A duration in the sessions' millisecond stamps.
  [[nodiscard]] static std::uint32_t ms(std::chrono::milliseconds d) noexcept {
    return static_cast<std::uint32_t>(d.count());
  }
};

}  // namespace devgate::websocket::detail
