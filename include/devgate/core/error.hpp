#pragma once

#include <string>        // messages
#include <system_error>  // std::error_code, std::error_category

namespace devgate {

/// Errors devgate reports through `std::error_code` on hot paths (no exceptions there).
enum class errc {
  queue_full = 1,    ///< The queue is at capacity and the overflow policy rejected the message.
  closed,            ///< The gateway or session no longer accepts work (stopping or stopped).
  timeout,           ///< A bounded wait ran out (for sinks; a timed-out push reports queue_full).
  unknown_session,   ///< No live session has that id.
  backpressure,      ///< The session's outbound buffer is over its limit.
  invalid_argument,  ///< A caller passed a value outside what the API accepts.
  message_too_big,   ///< A message is larger than the configured maximum.
  protocol_error,    ///< A peer broke the wire protocol.
  already_running,   ///< start() was called on something already started.
  handler_threw,     ///< A host handler (a sink) threw: that attempt failed.
  would_block,       ///< A set-up would make a network thread wait (the `block` overflow policy).
};

namespace detail {

/// The category behind `devgate::errc`, with messages that say what to do.
class error_category_impl final : public std::error_category {
 public:
  [[nodiscard]] const char* name() const noexcept override { return "devgate"; }
  [[nodiscard]] std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::queue_full:
        return "queue full: the gateway is at capacity, retry later or raise queue capacity";
      case errc::closed:
        return "closed: the gateway is stopping or stopped and takes no new work";
      case errc::timeout:
        return "timed out waiting; the operation did not complete within its deadline";
      case errc::unknown_session:
        return "unknown session: no live session has that id (it may have disconnected)";
      case errc::backpressure:
        return "back-pressure: the session's outbound buffer is over its limit";
      case errc::invalid_argument:
        return "invalid argument: a value is outside what the API accepts";
      case errc::message_too_big:
        return "message too big: it exceeds the configured maximum message size";
      case errc::protocol_error:
        return "protocol error: the peer broke the wire protocol";
      case errc::already_running:
        return "already running: start() was called twice";
      case errc::handler_threw:
        return "handler threw: a sink threw an exception; return a std::error_code instead, "
               "the attempt was retried or dead-lettered";
      case errc::would_block:
        return "would block: this transport pushes from network threads, where the block "
               "overflow policy would stall every session of the thread; use reject or "
               "drop_oldest";
    }
    return "unknown devgate error";
  }
};

}  // namespace detail

/// The error category of every `devgate::errc`.
inline const std::error_category& error_category() noexcept {
  static const detail::error_category_impl instance;
  return instance;
}

/// Makes a `std::error_code` from a `devgate::errc` (found by ADL).
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

}  // namespace devgate

/// Lets `devgate::errc` convert to `std::error_code` implicitly.
template <>
struct std::is_error_code_enum<devgate::errc> : std::true_type {};
