#pragma once

#include <atomic>       // the server's stopping flag
#include <cstddef>      // std::byte
#include <cstdint>      // next
#include <optional>     // identify results
#include <span>         // request bytes
#include <string>       // device ids, response heads
#include <string_view>  // bodies, header lines
#include <utility>      // std::exchange, std::move

#include "devgate/core/bytes.hpp"
#include "devgate/websocket/detail/core.hpp"
#include "devgate/websocket/handshake.hpp"
#include "devgate/websocket/http.hpp"
#include "devgate/websocket/server_options.hpp"

namespace devgate::websocket::detail {

/// A connection before its upgrade (RFC 9112; RFC 6455 section 4.2): parses its requests,
/// answers plain GETs through `server_options::route`, refuses what it must refuse, and accepts
/// an upgrade. It only decides; the session writes what it is given and changes phase.
/// Holds a parser from the first bytes until drop(); trivially destructible, so that it can
/// share storage with the frame reader of the WebSocket phase: call drop() before switching.
class http_phase {
 public:
  /// What the session does after `feed`.
  enum class next : std::uint8_t {
    read_more,  ///< No complete request (none answered): keep reading.
    answered,   ///< Keep-alive requests were answered: keep reading.
    paused,     ///< The responses queued are at the limit: read nothing more until written.
    linger,     ///< A response that ends the connection is queued: half-close after writing it.
    upgrade,    ///< The 101 is queued: switch to the WebSocket phase as `device_id`.
  };
  /// The outcome of `feed`.
  struct result {
    next what = next::read_more;  ///< What to do.
    std::string device_id;        ///< Who the device is (upgrade only).
  };

  /// Parses `bytes` and answers every complete request in order (a keep-alive connection may
  /// pipeline several), handing each response's bytes to `respond(shared_bytes)`. Stops at an
  /// upgrade, at a response that ends the connection, or when `room()` says the responses
  /// queued reached the limit (`paused`: the requests not answered stay in the parser; feed an
  /// empty span to go on). Handlers (`route`, `identify`) may throw; the parser stays valid for
  /// drop(). `peer` is the connection's verified TLS client certificate (or null), which every
  /// request it answers carries.
  template <class Respond, class Room>
  result feed(std::span<const std::byte> bytes, const server_core& core, Respond&& respond,
              Room&& room, const X509* peer = nullptr) {
    if (!parser_) parser_ = new websocket::http_request_parser(core.options.http);
    using st = websocket::http_request_parser::status;
    st s = parser_->feed(bytes);
    next outcome = next::read_more;
    for (;;) {
      if (s == st::incomplete) return {outcome, {}};
      if (s == st::error) {
        const int status = parser_->error_status();
        respond(error_response(status, websocket::status_reason(status)));
        return {next::linger, {}};
      }
      if (!room()) return {next::paused, {}};
      websocket::http_request request = parser_->request();
      request.peer_certificate = peer;
      result r = handle(request, core, respond);
      if (r.what != next::answered) return r;
      outcome = next::answered;
      parser_->reset();
      s = parser_->state();
    }
  }

  /// The bytes that followed the upgrade request: the client's first frames (RFC 6455 4.1 lets
  /// a client send at once). Valid after an `upgrade` result, until drop().
  [[nodiscard]] std::span<const std::byte> leftover() const noexcept {
    return parser_ ? parser_->leftover() : std::span<const std::byte>{};
  }

  /// Frees the parser.
  void drop() noexcept { delete std::exchange(parser_, nullptr); }

  /// A complete `status` response with a text body that closes the connection; `extra` holds
  /// header lines, each ending in CRLF.
  [[nodiscard]] static shared_bytes error_response(int status, std::string_view body,
                                                   std::string_view extra = {}) {
    return shared_bytes::copy_of(std::string_view(
        websocket::http_response(status, body, false, "text/plain; charset=utf-8", extra)));
  }

 private:
  template <class Respond>
  result handle(const websocket::http_request& req, const server_core& core, Respond& respond) {
    const auto& o = core.options;
    if (websocket::is_websocket_upgrade(req)) {
      const auto verdict = websocket::check_upgrade(req);
      if (verdict.status != 101) {
        respond(error_response(verdict.status, verdict.reason,
                               verdict.status == 405 ? "Allow: GET\r\n" : ""));
        return {next::linger, {}};
      }
      std::optional<std::string> device;
      if (o.identify) {
        device = o.identify(req);
      } else {
        device = std::string(req.target);
      }
      if (!device) {
        respond(error_response(400, "unknown device"));
        return {next::linger, {}};
      }
      if (core.stopping.load(std::memory_order_acquire)) {
        respond(error_response(503, "shutting down"));
        return {next::linger, {}};
      }
      respond(shared_bytes::copy_of(
          std::string_view(websocket::upgrade_response(req.header("Sec-WebSocket-Key")))));
      return {next::upgrade, std::move(*device)};
    }
    // A plain request: the route handler (static files for the demo page), keep-alive allowed.
    if (req.method != "GET" && req.method != "HEAD") {
      respond(error_response(405, "only GET and HEAD are served", "Allow: GET, HEAD\r\n"));
      return {next::linger, {}};
    }
    websocket::http_reply reply;
    if (o.route) {
      reply = o.route(req);
    } else {
      reply.status = 404;
      reply.body = shared_bytes::copy_of(std::string_view("not found"));
    }
    const bool keep = req.keep_alive() && !core.stopping.load(std::memory_order_relaxed);
    std::string head;
    head.reserve(160 + reply.content_type.size() + reply.extra_headers.size());
    head.append("HTTP/1.1 ").append(std::to_string(reply.status)).append(" ");
    head.append(websocket::status_reason(reply.status));
    head.append("\r\nContent-Type: ").append(reply.content_type);
    head.append("\r\nContent-Length: ").append(std::to_string(reply.body.size()));
    head.append(keep ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n");
    head.append(reply.extra_headers).append("\r\n");
    respond(shared_bytes::copy_of(std::string_view(head)));
    if (req.method == "GET" && !reply.body.empty()) respond(std::move(reply.body));
    return {keep ? next::answered : next::linger, {}};
  }

  websocket::http_request_parser* parser_ = nullptr;
};

}  // namespace devgate::websocket::detail
