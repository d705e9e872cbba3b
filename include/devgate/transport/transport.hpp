#pragma once

#include <chrono>        // timestamps
#include <concepts>      // std::same_as
#include <cstddef>       // std::size_t
#include <cstdint>       // ids and codes
#include <functional>    // handlers
#include <span>          // broadcast recipients, message batches
#include <string>        // device ids
#include <string_view>   // reasons
#include <system_error>  // results

#include "devgate/core/bytes.hpp"

namespace devgate {

/// Identifies one live connection for as long as it lives. Once the session closed, its transport
/// may give the id to a later session, though not soon: websocket::server only after 2^32 - 1
/// later sessions used the same registry slot; in_process_transport counts up in 64 bits.
using session_id = std::uint64_t;

/// The clock every devgate timestamp uses.
using clock = std::chrono::steady_clock;

/// Whether a payload is UTF-8 text or opaque binary (WebSocket opcodes 0x1 and 0x2).
enum class payload_kind : std::uint8_t { text, binary };

/// Why a session closes; the values are the RFC 6455 section 7.4.1 status codes, which every
/// transport uses so that close reasons mean the same thing whatever carries them.
enum class close_code : std::uint16_t {
  normal = 1000,            ///< Orderly close.
  going_away = 1001,        ///< The server is shutting down (or the peer is going away).
  protocol_error = 1002,    ///< The peer broke the protocol.
  unsupported_data = 1003,  ///< A kind of data the endpoint does not accept.
  no_status = 1005,         ///< A close frame without a status (never sent on the wire).
  abnormal = 1006,          ///< The connection dropped without a close frame (never sent).
  invalid_payload = 1007,   ///< Text that is not UTF-8, or a payload that does not parse.
  policy_violation = 1008,  ///< The peer broke a policy (for example a slow consumer).
  message_too_big = 1009,   ///< A message over the configured maximum size.
  internal_error = 1011,    ///< The server hit an unexpected condition.
  try_again_later = 1013,   ///< Overloaded: reconnect later.
};

/// What a transport does when a session's outbound buffer passes its byte limit.
enum class overflow_action : std::uint8_t {
  close_policy_violation,  ///< Close the session with 1008.
  close_try_again_later,   ///< Close the session with 1013.
  drop_oldest,             ///< Drop the oldest droppable queued messages until under the limit.
};

/// Per-session back-pressure settings every transport honours.
struct backpressure_options {
  /// Most bytes a session may have queued for sending before `on_overflow` applies.
  std::size_t max_buffered_bytes = 4u << 20;
  /// What happens past the limit.
  overflow_action on_overflow = overflow_action::close_try_again_later;
};

/// A session that opened: its id and the device identity the transport established.
struct session_info {
  session_id id = 0;      ///< The session's id.
  std::string device_id;  ///< Who the device is (WebSocket: `server_options::identify`'s answer).
  /// True when an authenticator vouched for `device_id` (WebSocket: `server_options::authenticate`
  /// accepted a credential for it); false for transports and servers without one.
  bool authenticated = false;
  /// What the credential said (a token's claims as JSON text), "" when none.
  std::string claims;
};

/// One message a device sent, handed by the transport to the engine.
struct inbound_message {
  session_id session = 0;  ///< The session it arrived on.
  /// The device identity, shared with the session (no allocation per message).
  shared_bytes device_id;
  /// Per-session message number assigned by the transport, starting at 1.
  std::uint64_t sequence = 0;
  payload_kind kind = payload_kind::text;  ///< Text or binary.
  shared_bytes payload;                    ///< The whole message (reassembled from fragments).
  clock::time_point received{};            ///< When the last byte of the message arrived.
};

/// What `transport_handlers::on_messages` did with a batch: the first `accepted` messages were
/// taken, in order; each of the others is refused with `error`, which the transport reports to
/// its device (for WebSocket: one text error reply per refused message).
struct batch_result {
  std::size_t accepted = 0;  ///< How many messages, from the first, were taken.
  std::error_code error;     ///< Why the others were refused (set when any was).
};

/// Callbacks a transport invokes; set before `start()`. They may run on any transport thread.
struct transport_handlers {
  /// A session opened.
  std::function<void(const session_info&)> on_open;
  /// Messages of one session arrived together: all that one read decoded (WebSocket), or one
  /// push (in-process), in order. The messages are the transport's and live until the call
  /// returns; move out what you keep. Refusals (`errc::queue_full`, `errc::closed`, ...) go
  /// back to the device as errors.
  std::function<batch_result(std::span<inbound_message>)> on_messages;
  /// A session closed, with the code that closed it.
  std::function<void(session_id, close_code)> on_close;
};

/// Whether transport `T` runs its handlers on network threads that each serve many sessions (a
/// reactor's), where a push that waits stalls every session of the thread. Every transport is
/// taken to, unless it declares `static constexpr bool handlers_on_caller_threads = true;`: its
/// handlers run on the thread of the host call that delivered (in_process_transport).
template <class T>
inline constexpr bool handlers_on_network_threads = !requires {
  requires T::handlers_on_caller_threads;
};

/// What the engine requires of a transport. Requirements:
/// - `set_handlers(h)` before `start()`; `start()` returns an error or starts delivering;
///   `stop()` closes every session with 1001 and returns when no handler runs any more.
/// - `send(s, kind, bytes)` queues one message to one session from any thread; returns
///   `errc::unknown_session` or `errc::backpressure` rather than blocking.
/// - `broadcast(sessions, kind, bytes)` queues one payload to many sessions, sharing that one
///   buffer (never a copy per recipient); returns how many sessions it was queued to.
/// - `close(s, code, reason)` starts closing one session.
/// - `buffered_bytes(s)` reports the bytes queued to one session and not yet written.
/// A gateway given a type that does not fit stops the build with: "devgate::gateway: Transport
/// must satisfy devgate::transport (see transport/transport.hpp for what it must provide)".
template <class T>
concept transport = requires(T& t, const T& ct, transport_handlers h, session_id s, payload_kind k,
                             shared_bytes b, std::span<const session_id> many, close_code c,
                             std::string_view reason) {
  t.set_handlers(std::move(h));
  { t.start() } -> std::same_as<std::error_code>;
  t.stop();
  { t.send(s, k, b) } -> std::same_as<std::error_code>;
  { t.broadcast(many, k, b) } -> std::same_as<std::size_t>;
  t.close(s, c, reason);
  { ct.buffered_bytes(s) } -> std::same_as<std::size_t>;
};

}  // namespace devgate
