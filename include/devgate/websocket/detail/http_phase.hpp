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
/// admits plain requests and their bodies through `server_options::admit`, answers them through
/// `server_options::route`, refuses what it must refuse, and accepts an upgrade. It only decides;
/// the session writes what it is given and changes phase. Holds a parser from the first bytes until
/// drop(); trivially destructible, so that it can share storage with the frame reader of the
/// WebSocket phase: call drop() before switching.
class http_phase {
 public:
  /// What the session does after `feed`.
  enum class next : std::uint8_t {
    read_more,  ///< No complete request (none answered): keep reading.
    answered,   ///< Keep-alive requests were answered: keep reading.
    paused,     ///< The responses queued are at the limit: read nothing more until written.
    linger,     ///< A response that ends the connection is queued: half-close after writing it.
    upgrade,    ///< The 101 is queued: switch to the WebSocket phase as `device_id`.
    /// An upgrade for `device_id` waits for `server_options::authenticate`: read nothing more,
    /// then answer with `accept()` or a refusal (the request stays held until drop()).
    authenticate,
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
  /// empty span to go on). A request that announces a body is admitted (or answered) as soon as
  /// its header section is in; its body is then buffered in the parser as it arrives, up to the
  /// admitted length, and the request is answered once it is whole. Handlers (`admit`, `route`,
  /// `identify`) may throw; the parser stays valid for drop(). `peer` is the connection's
  /// verified TLS client certificate (or null), which every request it answers carries.
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
      if (s == st::body_announced) {
        // Decided before any of the body is read. An upgrade carries none and a server without
        // `admit` takes none: a bound of 0, so the parser answers 413 as it did before bodies.
        const websocket::http_request& req = parser_->request();
        websocket::http_admission a;
        if (core.options.admit && !websocket::is_websocket_upgrade(req)) {
          a = core.options.admit(req);
        }
        if (a.reply) {
          write_reply(req, *a.reply, false, respond);  // the unread body ends the connection
          return {next::linger, {}};
        }
        // RFC 9110 10.1.1: a client that asked to be told waits for this before sending the
        // body (curl does for uploads over 1 KiB); one that is refused got the refusal above.
        const bool expects =
            req.version_minor >= 1 && req.header_has_token("Expect", "100-continue");
        s = parser_->accept_body(a.max_body);
        if (s == st::incomplete && expects) {
          respond(shared_bytes::copy_of(std::string_view("HTTP/1.1 100 Continue\r\n\r\n")));
        }
        continue;
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

  /// The request an `authenticate` result holds (until drop()).
  [[nodiscard]] const websocket::http_request& request() const noexcept {
    return parser_->request();
  }

  /// The 101 accepting the request an `authenticate` result holds, echoing `protocol` if any.
  [[nodiscard]] shared_bytes accept(std::string_view protocol) const {
    return shared_bytes::copy_of(std::string_view(
        websocket::upgrade_response(parser_->request().header("Sec-WebSocket-Key"), protocol)));
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
      if (o.authenticate) return {next::authenticate, std::move(*device)};
      respond(shared_bytes::copy_of(
          std::string_view(websocket::upgrade_response(req.header("Sec-WebSocket-Key")))));
      return {next::upgrade, std::move(*device)};
    }
    // A plain request: the route handler (static files for the demo page), keep-alive allowed.
    // Without `admit` only GET and HEAD reach it; with it, `admit` lets in what it wants (a
    // request with a body was admitted when its header section came in, see feed).
    websocket::http_reply reply;
    bool admitted = true;
    if (!o.admit) {
      if (req.method != "GET" && req.method != "HEAD") {
        respond(error_response(405, "only GET and HEAD are served", "Allow: GET, HEAD\r\n"));
        return {next::linger, {}};
      }
    } else if (req.content_length == 0) {
      websocket::http_admission a = o.admit(req);
      if (a.reply) {
        reply = std::move(*a.reply);
        admitted = false;
      }
    }
    if (admitted) {
      if (o.route) {
        reply = o.route(req);
      } else {
        reply.status = 404;
        reply.body = shared_bytes::copy_of(std::string_view("not found"));
      }
    }
    const bool keep = req.keep_alive() && !core.stopping.load(std::memory_order_relaxed);
    write_reply(req, reply, keep, respond);
    return {keep ? next::answered : next::linger, {}};
  }

  // Writes `reply` to `req` (no body for HEAD); `keep` says whether the connection persists.
  template <class Respond>
  static void write_reply(const websocket::http_request& req, websocket::http_reply& reply,
                          bool keep, Respond& respond) {
    std::string head;
    head.reserve(160 + reply.content_type.size() + reply.extra_headers.size());
    head.append("HTTP/1.1 ").append(std::to_string(reply.status)).append(" ");
    head.append(websocket::status_reason(reply.status));
    head.append("\r\nContent-Type: ").append(reply.content_type);
    head.append("\r\nContent-Length: ").append(std::to_string(reply.body.size()));
    head.append(keep ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n");
    head.append(reply.extra_headers).append("\r\n");
    respond(shared_bytes::copy_of(std::string_view(head)));
    if (req.method != "HEAD" && !reply.body.empty()) respond(std::move(reply.body));
  }

  websocket::http_request_parser* parser_ = nullptr;
};

}  // namespace devgate::websocket::detail
