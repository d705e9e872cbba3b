#pragma once

#include <cstdint>      // key bytes
#include <string>       // responses
#include <string_view>  // header values, reasons

#include "devgate/detail/crypto.hpp"
#include "devgate/websocket/http.hpp"

namespace devgate::websocket {

/// RFC 6455 1.3 / 4.2.2: the GUID appended to Sec-WebSocket-Key before hashing.
inline constexpr std::string_view websocket_guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// True when the request asks for a WebSocket upgrade ("Upgrade: websocket" token), so it is
/// routed to the handshake (and judged by `check_upgrade`) rather than to a plain GET handler.
[[nodiscard]] inline bool is_websocket_upgrade(const http_request& request) noexcept {
  return request.header_has_token("Upgrade", "websocket");
}

/// The verdict on an upgrade request: 101 to accept, otherwise the HTTP status to answer with
/// and a short reason suitable as the response body.
struct upgrade_result {
  int status = 101;         ///< 101, or 400 (malformed), 405 (not GET), 426 (wrong version).
  std::string_view reason;  ///< Why it was refused (static text; empty on 101).
};

/// RFC 6455 4.2.1: checks the client's opening handshake. 405 for a method other than GET
/// (answer with "Allow: GET"); 400 unless HTTP/1.1, Host, "Connection: upgrade",
/// "Upgrade: websocket" and one Sec-WebSocket-Key that is base64 of 16 bytes; 426 when
/// Sec-WebSocket-Version is not 13 (answer with "Sec-WebSocket-Version: 13", RFC 6455 4.4).
[[nodiscard]] inline upgrade_result check_upgrade(const http_request& request) noexcept {
  if (request.method != "GET") return {405, "WebSocket upgrade requires GET"};
  if (request.version_minor < 1) return {400, "WebSocket upgrade requires HTTP/1.1"};
  if (request.header("Host").empty()) return {400, "missing Host header"};
  if (!request.header_has_token("Upgrade", "websocket")) {
    return {400, "missing \"Upgrade: websocket\""};
  }
  if (!request.header_has_token("Connection", "upgrade")) {
    return {400, "missing \"Connection: Upgrade\""};
  }
  std::size_t versions = 0, keys = 0;
  std::string_view version, key;
  for (const http_header& h : request.headers) {
    if (detail_http::iequals(h.name, "Sec-WebSocket-Version")) {
      ++versions;
      version = h.value;
    } else if (detail_http::iequals(h.name, "Sec-WebSocket-Key")) {
      ++keys;
      key = h.value;
    }
  }
  if (versions == 0) return {400, "missing Sec-WebSocket-Version"};
  if (versions > 1 || version != "13") return {426, "unsupported Sec-WebSocket-Version; use 13"};
  if (keys != 1) return {400, "need exactly one Sec-WebSocket-Key"};
  // 4.2.1 item 5: a base64-encoded 16-byte value, i.e. 22 characters and "==".
  if (key.size() != 24) return {400, "Sec-WebSocket-Key must be base64 of 16 bytes"};
  try {
    const auto decoded = devgate::detail::base64_decode(key);
    if (!decoded || decoded->size() != 16) {
      return {400, "Sec-WebSocket-Key must be base64 of 16 bytes"};
    }
  } catch (...) {  // allocation failure of 18 bytes: treat as a refusal, keep noexcept
    return {400, "Sec-WebSocket-Key could not be checked"};
  }
  return {101, {}};
}

/// RFC 6455 4.2.2 item 5.4: Sec-WebSocket-Accept = base64(SHA-1(key + GUID)).
[[nodiscard]] inline std::string accept_key(std::string_view client_key) {
  std::string input;
  input.reserve(client_key.size() + websocket_guid.size());
  input.append(client_key).append(websocket_guid);
  return devgate::detail::base64_encode(devgate::detail::sha1(input));
}

/// RFC 6455 4.2.2: the server's 101 response accepting the upgrade, with no extensions (RSV bits
/// stay reserved) and `protocol` as Sec-WebSocket-Protocol when not empty (one of the values the
/// client offered: the authenticator chooses it, see auth::token_authenticator).
[[nodiscard]] inline std::string upgrade_response(std::string_view client_key,
                                                  std::string_view protocol = {}) {
  std::string out;
  out.reserve(160);
  out.append(
      "HTTP/1.1 101 Switching Protocols\r\n"
      "Upgrade: websocket\r\n"
      "Connection: Upgrade\r\n"
      "Sec-WebSocket-Accept: ");
  out.append(accept_key(client_key));
  if (!protocol.empty()) out.append("\r\nSec-WebSocket-Protocol: ").append(protocol);
  out.append("\r\n\r\n");
  return out;
}

/// The reason phrase of the HTTP statuses devgate answers with ("" for others).
[[nodiscard]] inline std::string_view status_reason(int status) noexcept {
  switch (status) {
    case 101:
      return "Switching Protocols";
    case 200:
      return "OK";
    case 202:
      return "Accepted";
    case 204:
      return "No Content";
    case 301:
      return "Moved Permanently";
    case 304:
      return "Not Modified";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 409:
      return "Conflict";
    case 411:
      return "Length Required";
    case 413:
      return "Content Too Large";
    case 414:
      return "URI Too Long";
    case 426:
      return "Upgrade Required";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "";
  }
}

/// A complete HTTP/1.1 response with a body: status line, Content-Type, Content-Length,
/// "Connection: close" (or keep-alive), "Sec-WebSocket-Version: 13" when status is 426
/// (RFC 6455 4.4), then `extra_headers` verbatim — whole lines, each ending in CRLF, e.g.
/// "Allow: GET\r\n" for a 405.
[[nodiscard]] inline std::string http_response(
    int status, std::string_view body, bool keep_alive = false,
    std::string_view content_type = "text/plain; charset=utf-8",
    std::string_view extra_headers = {}) {
  std::string out;
  out.reserve(128 + content_type.size() + extra_headers.size() + body.size());
  out.append("HTTP/1.1 ");
  out.append(std::to_string(status));
  out.push_back(' ');
  out.append(status_reason(status));
  out.append("\r\nContent-Type: ");
  out.append(content_type);
  out.append("\r\nContent-Length: ");
  out.append(std::to_string(body.size()));
  out.append(keep_alive ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n");
  if (status == 426) out.append("Sec-WebSocket-Version: 13\r\n");
  out.append(extra_headers);
  out.append("\r\n");
  out.append(body);
  return out;
}

}  // namespace devgate::websocket
