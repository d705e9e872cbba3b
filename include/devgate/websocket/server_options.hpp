#pragma once

#include <chrono>        // timeouts
#include <cstddef>       // body sizes
#include <cstdint>       // port
#include <functional>    // callbacks
#include <optional>      // identify result, admission reply
#include <string>        // address, texts
#include <system_error>  // error replies

#include "devgate/auth/authenticator.hpp"
#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/transport/transport.hpp"
#include "devgate/websocket/http.hpp"
#include "devgate/websocket/reader.hpp"
#include "devgate/websocket/tls.hpp"

namespace devgate::websocket {

/// The answer to a plain (non-upgrade) HTTP request, produced by `server_options::route` (or
/// by `server_options::admit` before the route runs).
struct http_reply {
  int status = 200;                                        ///< HTTP status code.
  std::string content_type = "text/plain; charset=utf-8";  ///< Content-Type value.
  shared_bytes body;                                       ///< Body, shared (never copied).
  /// Extra header lines, each ending in CRLF (e.g. "Cache-Control: no-cache\r\n").
  std::string extra_headers;
};

/// What `server_options::admit` decides about a plain request from its header section alone,
/// before any body byte is read.
struct http_admission {
  /// Most body bytes this request may carry (its route's bound, capped by
  /// `http_limits::max_body_bytes`); a larger Content-Length is answered 413 unread.
  std::size_t max_body = 0;
  /// When set, the answer sent instead of reading the body and calling `route` (401, 403,
  /// 405, 409, ...); a request that announced a body then closes its connection.
  std::optional<http_reply> reply;
};

/// The text frame a device receives when `on_messages` refuses its message:
/// `{"type":"error","code":"<errc name>","message":"<what to do>"}`. The device hub answers
/// protocol errors itself (`device::make_error`, docs/PROTOCOL.md section 8) and returns an
/// error here only for a session it does not know (`errc::unknown_session`).
inline std::string default_error_text(const std::error_code& ec) {
  std::string name = "error";
  if (ec.category() == devgate::error_category()) {
    switch (static_cast<errc>(ec.value())) {
      case errc::queue_full:
        name = "queue_full";
        break;
      case errc::closed:
        name = "closed";
        break;
      case errc::timeout:
        name = "timeout";
        break;
      case errc::unknown_session:
        name = "unknown_session";
        break;
      case errc::backpressure:
        name = "backpressure";
        break;
      case errc::invalid_argument:
        name = "invalid_argument";
        break;
      case errc::message_too_big:
        name = "message_too_big";
        break;
      case errc::protocol_error:
        name = "protocol_error";
        break;
      case errc::already_running:
        name = "already_running";
        break;
      case errc::handler_threw:
        name = "handler_threw";
        break;
      case errc::would_block:
        name = "would_block";
        break;
    }
  }
  std::string out = R"({"type":"error","code":")" + name + R"(","message":")";
  for (const char c : ec.message()) {
    if (c == '"' || c == '\\') out.push_back('\\');
    if (static_cast<unsigned char>(c) >= 0x20) out.push_back(c);
  }
  out += "\"}";
  return out;
}

/// Settings of `websocket::server`. Every knob has a default that suits a device gateway.
/// Timeouts are checked by one timer per worker thread that ticks at a quarter of the shortest
/// timeout (between 5 ms and 250 ms), so they fire up to one tick late; each must be at most
/// 20 days (start() refuses more).
struct server_options {
  /// Address to listen on: "0.0.0.0" (all IPv4), "::" (all IPv6) or one interface's address.
  std::string address = "0.0.0.0";
  /// TCP port; 0 picks a free ephemeral port, read back with `server::local_port()`.
  std::uint16_t port = 0;
  /// Worker threads, each with its own io_context; sessions stay on the thread that accepted
  /// them, so per-session state needs no lock. 0 means std::thread::hardware_concurrency().
  /// At most 256 (the worker index lives in the low byte of every session id).
  unsigned threads = 0;
  /// listen() backlog: connections the kernel queues before accept.
  int backlog = 1024;
  /// Accept a connection only once its first bytes (the HTTP request) have arrived (Linux
  /// TCP_DEFER_ACCEPT, 1 s): the session reads the request at once instead of
  /// waiting for it, and a connection that sends nothing costs the server nothing for that
  /// second (the kernel then hands it over anyway, and `handshake_timeout` applies).
  bool defer_accept = true;
  /// TLS (wss and https on this port) when set; see `tls_options`. The TLS handshake counts
  /// as part of the HTTP request: it must complete within `handshake_timeout` too.
  std::optional<tls_options> tls;
  /// Limits of the HTTP request before the upgrade (431 past them, 400 when malformed).
  http_limits http{};
  /// Limits of incoming WebSocket messages (1009 past max_message_size).
  reader_limits reader{};
  /// Time a connection may take to complete its HTTP request (and, on keep-alive connections,
  /// to send the next one); then the server closes it.
  std::chrono::milliseconds handshake_timeout{5000};
  /// Silence after which the server pings a session (0 disables idle pings). Any byte from the
  /// peer resets it, so busy sessions are never pinged.
  std::chrono::milliseconds idle_timeout{30000};
  /// Time to wait for any byte (normally the pong) after an idle ping before dropping the TCP
  /// connection and reporting 1006.
  std::chrono::milliseconds pong_timeout{10000};
  /// Time the close handshake may take (waiting for the peer's close frame, then its FIN)
  /// before the server drops the TCP connection.
  std::chrono::milliseconds close_timeout{5000};
  /// Per-session outbound limit and what happens past it. Queued bytes count the frames' bytes
  /// (header and payload) not yet written to the socket; a message larger than the limit is
  /// always refused with errc::backpressure. With drop_oldest, the oldest queued messages that
  /// no write has started are dropped (the newest stays); control frames are never dropped, and
  /// a session never holds more than twice the limit while drops catch up with senders on other
  /// threads. At most 1 GiB (sessions count their bytes in 32 bits; start() refuses more).
  backpressure_options backpressure{};
  /// Answers plain requests (see `static_files`), with their body in `http_request::body`;
  /// unset means 404 for every path. Without `admit` it sees only GET and HEAD (other methods
  /// are answered 405) and no bodies. Runs on a worker thread; keep it quick.
  std::function<http_reply(const http_request&)> route;
  /// Admits plain requests of any method before `route` sees them: called once per request when
  /// its header section is in, it says how many body bytes the request may carry or answers it
  /// at once (so an unauthorised or misdirected upload is refused before its body is read).
  /// A client that sent `Expect: 100-continue` gets `100 Continue` once admitted.
  /// Unset: GET and HEAD only, no bodies. Bodies are read as they arrive, on the session's
  /// worker thread without blocking it, within `handshake_timeout` for the whole request; set
  /// `http.max_body_bytes` to let any body through. Runs on a worker thread; keep it quick.
  std::function<http_admission(const http_request&)> admit;
  /// Maps an upgrade request to the device id, or std::nullopt to refuse it with 400.
  /// Unset: every path is accepted and the device id is the request target.
  std::function<std::optional<std::string>(const http_request&)> identify;
  /// Judges each upgrade after `identify`, before the 101 (auth/gate.hpp makes one from an
  /// authenticator and an Origin allow-list): a refusal is answered with its status (401, 403,
  /// ...) and reason, and the connection never reaches the handlers. The check may answer later
  /// from any thread; the connection reads nothing meanwhile, and `handshake_timeout` still
  /// applies. Unset: every upgrade is accepted (session_info::authenticated false).
  auth::upgrade_check authenticate;
  /// Checks in progress per worker thread; an upgrade past it is answered 503 (a slow remote
  /// check cannot make the server hold connections without bound).
  std::size_t max_pending_authentications = 1024;
  /// The text sent back (as a text frame) when `on_messages` refuses a message;
  /// unset means `default_error_text`.
  std::function<std::string(const std::error_code&)> error_text;
};

}  // namespace devgate::websocket
