#pragma once

#include <string>        // messages
#include <system_error>  // std::error_code, std::error_category

namespace devgate::redis {

/// Errors of the Redis client and the Redis Streams sink.
enum class errc {
  not_connected = 1,  ///< No connection to Redis at the time (connecting, or in reconnect backoff).
  disconnected,       ///< The connection dropped with the command in flight: it may or may not
                      ///< have been applied.
  error_reply,       ///< Redis answered the command with an error reply (its text is in the reply).
  timeout,           ///< No reply within the caller's deadline (the command may still apply).
  stopped,           ///< The connection was stopped (`connection::stop`) or destroyed.
  bad_url,           ///< A `redis://` URL could not be parsed.
  too_many_workers,  ///< A sink was called by a worker id past its `max_workers`.
  not_owner,         ///< A state store write for a device this node does not own (now).
  routed_full,       ///< Too many messages already wait for the device's node to take them.
};

namespace detail {

/// The category behind `devgate::redis::errc`, with messages that say what to do.
class error_category_impl final : public std::error_category {
 public:
  [[nodiscard]] const char* name() const noexcept override { return "devgate.redis"; }
  [[nodiscard]] std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::not_connected:
        return "redis: not connected (the server is down or unreachable; the client reconnects "
               "with backoff, retry later)";
      case errc::disconnected:
        return "redis: the connection dropped before the reply (the command may or may not have "
               "been applied; retry)";
      case errc::error_reply:
        return "redis: the server answered with an error reply";
      case errc::timeout:
        return "redis: no reply within the deadline (the server is slow or stalled; the command "
               "may still apply)";
      case errc::stopped:
        return "redis: the connection was stopped";
      case errc::bad_url:
        return "redis: bad URL, expected redis://[[user]:password@]host[:port][/db]";
      case errc::too_many_workers:
        return "redis: a pipeline worker id is past the sink's max_workers; raise max_workers";
      case errc::not_owner:
        return "redis: this node does not own the device (another node took it over, or its "
               "state was never loaded here); the write was not applied";
      case errc::routed_full:
        return "redis: too many messages wait for the device's node to take them "
               "(state_store_options::max_routed); the message was not taken, retry later";
    }
    return "redis: unknown error";
  }
};

}  // namespace detail

/// The error category of every `devgate::redis::errc`.
inline const std::error_category& error_category() noexcept {
  static const detail::error_category_impl instance;
  return instance;
}

/// Makes a `std::error_code` from a `devgate::redis::errc` (found by ADL).
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

}  // namespace devgate::redis

/// Lets `devgate::redis::errc` convert to `std::error_code` implicitly.
template <>
struct std::is_error_code_enum<devgate::redis::errc> : std::true_type {};
