#pragma once

#include <openssl/types.h>  // X509 (the TLS peer certificate)

#include <algorithm>    // std::find
#include <cstddef>      // std::byte, std::size_t
#include <cstdint>      // offsets
#include <cstring>      // std::memchr
#include <span>         // input bytes, header list
#include <string>       // the parser's buffer
#include <string_view>  // views into the buffer
#include <utility>      // std::move
#include <vector>       // header list

namespace devgate::websocket {

/// Bounds on what an HTTP request may occupy before it is rejected with 431.
struct http_limits {
  /// Most bytes in the request line (method, target, version; CRLF not counted). Targets carry
  /// device ids and query strings, so 8 KiB is generous while keeping a slow-loris peer cheap.
  std::size_t max_request_line = 8192;
  /// Most bytes in the header section (every header line with its CRLF; the final empty line
  /// not counted). Browsers send well under 4 KiB; cookies are what pushes real requests up.
  std::size_t max_header_bytes = 16384;
  /// Most header fields. Each costs one `http_header` (two views) while the request lives.
  std::size_t max_headers = 64;
  /// Most body bytes any request may carry: the ceiling of every route's own maximum, and so
  /// of what one connection holds before its request is answered (the body is buffered whole,
  /// so that the route sees it in one piece). A larger Content-Length is answered 413 before
  /// any body byte is read. 0 (the default) means no request carries a body, as for a server
  /// that only serves GETs and upgrades.
  std::size_t max_body_bytes = 0;
};

/// One header field as it arrived: `value` has its surrounding whitespace removed.
struct http_header {
  std::string_view name;   ///< Field name, case as sent.
  std::string_view value;  ///< Field value without leading/trailing SP/HTAB.
};

namespace detail_http {

/// ASCII lower-casing for case-insensitive comparisons (RFC 9110 5.1: field names are
/// case-insensitive; so are the tokens we look for in Connection/Upgrade).
constexpr char to_lower(char c) noexcept {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
}

/// Case-insensitive ASCII equality.
constexpr bool iequals(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (to_lower(a[i]) != to_lower(b[i])) return false;
  }
  return true;
}

/// RFC 9110 5.6.2 tchar: the characters of a token (method, field name).
constexpr bool is_tchar(unsigned char c) noexcept {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
      return true;
    default:
      return false;
  }
}

/// True when `s` is a non-empty RFC 9110 token.
constexpr bool is_token(std::string_view s) noexcept {
  if (s.empty()) return false;
  for (const char c : s) {
    if (!is_tchar(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

/// Strips RFC 9110 5.6.3 OWS (SP / HTAB) from both ends.
constexpr std::string_view trim_ows(std::string_view s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

/// True when `list` (an RFC 9110 5.6.1 comma-separated list) holds `token`, case-insensitively.
constexpr bool list_has_token(std::string_view list, std::string_view token) noexcept {
  while (!list.empty()) {
    const std::size_t comma = list.find(',');
    const std::string_view item = trim_ows(list.substr(0, comma));
    if (iequals(item, token)) return true;
    if (comma == std::string_view::npos) break;
    list.remove_prefix(comma + 1);
  }
  return false;
}

}  // namespace detail_http

/// A parsed HTTP/1.x request. Its views point into the parser that produced it and stay valid
/// until that parser's `reset()` or destruction.
struct http_request {
  std::string_view method;  ///< Request method token, e.g. "GET" (case-sensitive, RFC 9110 9.1).
  std::string_view target;  ///< Request target as sent, e.g. "/devices/abc?x=1".
  int version_minor = 1;    ///< The x of HTTP/1.x (0 or 1).
  std::span<const http_header> headers;  ///< Every header field, in arrival order.
  std::size_t content_length = 0;        ///< The body's length as announced (0 without one).
  std::string_view body;                 ///< The body; empty until the request is complete.
  /// The client certificate the TLS handshake verified (mutual TLS, `tls_options::client_ca_file`),
  /// or null. Borrowed: valid during the call it is passed to (copy it with `certificate_der`).
  const X509* peer_certificate = nullptr;

  /// Value of the first header named `name` (case-insensitive), or "" if absent.
  [[nodiscard]] std::string_view header(std::string_view name) const noexcept {
    for (const http_header& h : headers) {
      if (detail_http::iequals(h.name, name)) return h.value;
    }
    return {};
  }

  /// True when any header named `name` carries `token` in its comma-separated list
  /// (case-insensitive), e.g. `header_has_token("Connection", "upgrade")`.
  [[nodiscard]] bool header_has_token(std::string_view name,
                                      std::string_view token) const noexcept {
    for (const http_header& h : headers) {
      if (detail_http::iequals(h.name, name) && detail_http::list_has_token(h.value, token)) {
        return true;
      }
    }
    return false;
  }

  /// Whether the connection persists after the response (RFC 9112 9.3): HTTP/1.1 unless
  /// "Connection: close"; HTTP/1.0 only with "Connection: keep-alive".
  [[nodiscard]] bool keep_alive() const noexcept {
    if (header_has_token("Connection", "close")) return false;
    if (version_minor >= 1) return true;
    return header_has_token("Connection", "keep-alive");
  }
};

/// Strict, bounded, incremental HTTP/1.1 request parser (RFC 9112) for the upgrade request and
/// the plain requests devgate serves. Bodies are taken only with a Content-Length (RFC 9112
/// 6.2), never with a transfer coding (501: the sender must know the length up front, which is
/// what lets a route refuse an oversized body before reading it).
///
/// Bytes are copied into the parser's own buffer, which never holds more than the limits allow
/// for the request itself (431 is reported as soon as a line passes its limit, before more is
/// buffered; a body is read only once `accept_body` allowed its length); bytes that arrive after
/// the request in the same `feed` are kept as `leftover()`.
class http_request_parser {
 public:
  /// Result of `feed`.
  enum class status {
    incomplete,  ///< Not a whole request yet: feed more bytes.
    complete,    ///< A whole request (with its body): `request()` is valid.
    error,       ///< Refused: answer with `error_status()` and close.
    /// The header section announced a body within `http_limits::max_body_bytes`: `request()`
    /// has the method, target, headers and `content_length` (no body yet). Call
    /// `accept_body(max)` to read it, or answer without reading it and close the connection.
    body_announced,
  };

  /// A parser with the given limits.
  explicit http_request_parser(http_limits limits = {}) : limits_(limits) {}

  // The request's views point into buf_: a copy would point into the original, so copying is
  // out; a move re-points them at the moved buffer.
  http_request_parser(const http_request_parser&) = delete;
  http_request_parser& operator=(const http_request_parser&) = delete;
  /// Moves the parser; the request's views follow the buffer.
  http_request_parser(http_request_parser&& other) noexcept { *this = std::move(other); }
  /// Moves the parser; the request's views follow the buffer.
  http_request_parser& operator=(http_request_parser&& other) noexcept {
    if (this == &other) return *this;
    limits_ = other.limits_;
    buf_ = std::move(other.buf_);
    fields_ = std::move(other.fields_);
    headers_ = std::move(other.headers_);
    request_ = other.request_;
    method_ = other.method_;
    target_ = other.target_;
    state_ = other.state_;
    error_status_ = other.error_status_;
    in_request_line_ = other.in_request_line_;
    in_body_ = other.in_body_;
    line_start_ = other.line_start_;
    header_bytes_ = other.header_bytes_;
    head_end_ = other.head_end_;
    request_end_ = other.request_end_;
    // std::string's small buffer moves with it; a body being read keeps its header views.
    if (state_ == status::complete || state_ == status::body_announced || in_body_) bind_views();
    other.reset_state();
    return *this;
  }

  /// Appends `data` and parses. Errors (see `error_status()`): 431 when the request line or
  /// header section passes its limit or there are too many headers; 400 when malformed (bad
  /// method token, bad target, bare CR or LF, header without colon or with whitespace before
  /// it, obs-fold, control characters, bad or conflicting Content-Length, missing or repeated
  /// Host in HTTP/1.1); 505 for versions other than HTTP/1.0 and HTTP/1.1; 501 for any
  /// Transfer-Encoding (chunked included); 413 for a Content-Length above
  /// `http_limits::max_body_bytes`. After `complete` (and `body_announced`), further bytes are
  /// kept for later (`leftover()`, the body); after `error`, ignored.
  status feed(std::span<const std::byte> data) {
    const char* in = reinterpret_cast<const char*>(data.data());
    std::size_t n = data.size();
    if (state_ == status::complete || state_ == status::body_announced) {
      buf_.append(in, n);
      bind_views();
      return state_;
    }
    if (state_ == status::error) return state_;
    if (in_body_) return feed_body(in, n);

    while (n > 0) {
      // RFC 9112 2.2: lines end at LF (CR is checked when the line is parsed); never buffer a
      // byte beyond what the current line may still take.
      const void* nl = std::memchr(in, '\n', n);
      const std::size_t take =
          nl ? static_cast<std::size_t>(static_cast<const char*>(nl) - in) + 1 : n;
      // Bytes of the current line once this piece is appended, CR included, LF excluded.
      const std::size_t content = buf_.size() - line_start_ + take - (nl ? 1 : 0);
      if (in_request_line_) {
        // Measured from the start of the request, so leading empty lines (RFC 9112 2.2) count.
        const std::size_t total = buf_.size() + take - (nl ? 1 : 0);
        if (total > limits_.max_request_line + 1) return fail(431);  // +1: its CR
      } else if (content > 1 && header_bytes_ + content + 1 > limits_.max_header_bytes) {
        return fail(431);  // this line (with its LF) cannot fit any more; the final CRLF is free
      }
      buf_.append(in, take);
      in += take;
      n -= take;
      if (!nl) break;
      if (parse_line() != status::incomplete) {
        if (state_ == status::complete || state_ == status::body_announced) {
          buf_.append(in, n);  // pipelined request or early WebSocket frames
          bind_views();
        }
        return state_;
      }
    }
    return state_;
  }

  /// The request; valid after `feed` returned `complete` (or `body_announced`, without its
  /// body), until `reset()`.
  [[nodiscard]] const http_request& request() const noexcept { return request_; }

  /// After `body_announced`: reads the body if its length is at most `max_body` (the route's
  /// own bound), else fails with 413 without reading it. Bytes already received after the
  /// header section are parsed at once, so check the result as after `feed`.
  status accept_body(std::size_t max_body) {
    if (state_ != status::body_announced) return state_;
    if (request_.content_length > max_body) return fail(413);
    state_ = status::incomplete;
    in_body_ = true;
    return body_taken();
  }

  /// The HTTP status to answer with after `feed` (or `accept_body`) returned `error` (400, 413,
  /// 431, 501, 505).
  [[nodiscard]] int error_status() const noexcept { return error_status_; }

  /// The parser's current state (the last `feed` result, or the state after `reset()`).
  [[nodiscard]] status state() const noexcept { return state_; }

  /// Bytes received after the end of the request: a pipelined request or early WebSocket frames.
  [[nodiscard]] std::span<const std::byte> leftover() const noexcept {
    if (state_ != status::complete) return {};
    return std::as_bytes(std::span<const char>(buf_).subspan(request_end_));
  }

  /// Starts the next request on a keep-alive connection. The leftover is parsed at once as the
  /// start of the next request: check `state()` (or call `feed({})`) before waiting for more
  /// bytes, since a pipelined request may already be complete.
  void reset() {
    std::string rest;
    if (state_ == status::complete) rest.assign(buf_, request_end_);
    reset_state();
    if (!rest.empty()) feed(std::as_bytes(std::span<const char>(rest)));
  }

 private:
  // Field positions as offsets into buf_, turned into views once the buffer stops moving.
  struct field_pos {
    std::uint32_t name_off, name_len, value_off, value_len;
  };

  void reset_state() noexcept {
    buf_.clear();
    fields_.clear();
    headers_.clear();
    request_ = {};
    state_ = status::incomplete;
    error_status_ = 0;
    in_request_line_ = true;
    line_start_ = 0;
    header_bytes_ = 0;
    head_end_ = 0;
    request_end_ = 0;
    in_body_ = false;
  }

  status fail(int http_status) {
    state_ = status::error;
    error_status_ = http_status;
    in_body_ = false;
    return state_;
  }

  // Takes body bytes; what follows the announced length is the leftover (a pipelined request).
  status feed_body(const char* in, std::size_t n) {
    buf_.append(in, n);
    return body_taken();
  }

  // Completes the request once the buffer holds the whole body.
  status body_taken() {
    const std::size_t end = head_end_ + request_.content_length;
    if (buf_.size() < end) return state_;
    in_body_ = false;
    request_end_ = end;
    state_ = status::complete;
    bind_views();
    return state_;
  }

  // Parses the line ending at buf_.back() (an LF). Returns incomplete to continue.
  status parse_line() {
    const std::size_t begin = line_start_;
    const std::size_t lf = buf_.size() - 1;
    line_start_ = buf_.size();
    // RFC 9112 2.2: a bare LF is not accepted as a line terminator here (strict: it is how
    // request smuggling through lenient proxies starts), and a CR must be followed by LF.
    if (lf == begin || buf_[lf - 1] != '\r') return fail(400);
    const std::string_view line(buf_.data() + begin, lf - 1 - begin);
    if (line.find('\r') != std::string_view::npos) return fail(400);

    if (in_request_line_) {
      if (line.empty()) {
        // RFC 9112 2.2: ignore at least one empty line before the request line.
        return status::incomplete;
      }
      if (parse_request_line(line, begin) != status::incomplete) return state_;
      in_request_line_ = false;
      return status::incomplete;
    }
    header_bytes_ += line.size() + 2;
    if (line.empty()) return finish();
    return parse_field_line(line, begin);
  }

  // RFC 9112 3: request-line = method SP request-target SP HTTP-version
  status parse_request_line(std::string_view line, std::size_t begin) {
    const std::size_t sp1 = line.find(' ');
    if (sp1 == std::string_view::npos) return fail(400);
    const std::size_t sp2 = line.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos) return fail(400);
    const std::string_view method = line.substr(0, sp1);
    const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    const std::string_view version = line.substr(sp2 + 1);
    if (!detail_http::is_token(method)) return fail(400);
    if (!valid_target(method, target)) return fail(400);
    // RFC 9112 2.3: HTTP-version = "HTTP" "/" DIGIT "." DIGIT (case-sensitive).
    if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || version[6] != '.' ||
        version[5] < '0' || version[5] > '9' || version[7] < '0' || version[7] > '9') {
      return fail(400);
    }
    if (version[5] != '1' || (version[7] != '0' && version[7] != '1')) return fail(505);
    request_.version_minor = version[7] - '0';
    method_ = {static_cast<std::uint32_t>(begin), static_cast<std::uint32_t>(sp1), 0, 0};
    target_ = {static_cast<std::uint32_t>(begin + sp1 + 1),
               static_cast<std::uint32_t>(target.size()), 0, 0};
    return status::incomplete;
  }

  // RFC 9112 3.2: origin-form, absolute-form, authority-form (CONNECT), asterisk-form (OPTIONS).
  static bool valid_target(std::string_view method, std::string_view target) noexcept {
    if (target.empty()) return false;
    for (const char ch : target) {
      const auto c = static_cast<unsigned char>(ch);
      // Visible ASCII only; '#' (a fragment) is never part of a request-target.
      if (c <= 0x20 || c >= 0x7F || c == '#') return false;
    }
    if (target.front() == '/') return true;
    if (target == "*") return method == "OPTIONS";
    if (method == "CONNECT") return true;  // authority-form: host:port
    // absolute-form: scheme ":" ..., scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
    const std::size_t colon = target.find(':');
    if (colon == std::string_view::npos || colon == 0) return false;
    for (std::size_t i = 0; i < colon; ++i) {
      const char c = target[i];
      const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
      if (!alpha && (i == 0 || !((c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.'))) {
        return false;
      }
    }
    return true;
  }

  // RFC 9112 5: field-line = field-name ":" OWS field-value OWS
  status parse_field_line(std::string_view line, std::size_t begin) {
    // RFC 9112 5.2: obs-fold is rejected with 400.
    if (line.front() == ' ' || line.front() == '\t') return fail(400);
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos) return fail(400);
    // RFC 9112 5.1: no whitespace between name and colon (400); the name must be a token.
    if (!detail_http::is_token(line.substr(0, colon))) return fail(400);
    std::string_view value = line.substr(colon + 1);
    for (const char ch : value) {
      const auto c = static_cast<unsigned char>(ch);
      // RFC 9110 5.5: field-vchar / SP / HTAB / obs-text; NUL and other controls are rejected.
      if ((c < 0x20 && c != '\t') || c == 0x7F) return fail(400);
    }
    const std::size_t first = value.find_first_not_of(" \t");
    const std::size_t lead = first == std::string_view::npos ? value.size() : first;
    value = detail_http::trim_ows(value);
    if (fields_.size() >= limits_.max_headers) return fail(431);
    fields_.push_back(field_pos{static_cast<std::uint32_t>(begin),
                                static_cast<std::uint32_t>(colon),
                                static_cast<std::uint32_t>(begin + colon + 1 + lead),
                                static_cast<std::uint32_t>(value.size())});
    return status::incomplete;
  }

  // The header section ended: apply the message-level rules.
  status finish() {
    head_end_ = buf_.size();
    request_end_ = head_end_;
    bind_views();
    const http_request& r = request_;
    std::size_t hosts = 0;
    std::string_view content_length;
    bool has_content_length = false;
    for (const http_header& h : r.headers) {
      if (detail_http::iequals(h.name, "Host")) {
        ++hosts;
      } else if (detail_http::iequals(h.name, "Transfer-Encoding")) {
        return fail(501);  // RFC 9112 6.1: we implement no transfer codings (not even chunked)
      } else if (detail_http::iequals(h.name, "Content-Length")) {
        // RFC 9112 6.3: differing or invalid Content-Length values are unrecoverable.
        if (has_content_length && content_length != h.value) return fail(400);
        content_length = h.value;
        has_content_length = true;
      }
    }
    // RFC 9112 3.2: HTTP/1.1 requires exactly one Host; more than one is a 400 in any version.
    if (hosts > 1 || (r.version_minor >= 1 && hosts == 0)) return fail(400);
    if (has_content_length) {
      // RFC 9112 6.3: Content-Length = 1*DIGIT. A value past the ceiling is 413 whatever its
      // size, so the digits are read only while they stay at or below it.
      if (content_length.empty()) return fail(400);
      std::size_t length = 0;
      bool too_large = false;
      for (const char c : content_length) {
        if (c < '0' || c > '9') return fail(400);
        const auto digit = static_cast<std::size_t>(c - '0');
        const std::size_t max = limits_.max_body_bytes;
        if (too_large || length > max / 10 || digit > max - length * 10) {
          too_large = true;
        } else {
          length = length * 10 + digit;
        }
      }
      if (too_large) return fail(413);
      request_.content_length = length;
      if (length > 0) {
        state_ = status::body_announced;
        return state_;
      }
    }
    state_ = status::complete;
    return state_;
  }

  // Points request_ at buf_'s current storage (called whenever buf_ may have moved).
  void bind_views() {
    const char* base = buf_.data();
    request_.method = {base + method_.name_off, method_.name_len};
    request_.target = {base + target_.name_off, target_.name_len};
    headers_.resize(fields_.size());
    for (std::size_t i = 0; i < fields_.size(); ++i) {
      const field_pos& f = fields_[i];
      headers_[i] = {{base + f.name_off, f.name_len}, {base + f.value_off, f.value_len}};
    }
    request_.headers = headers_;
    request_.body = state_ == status::complete && !in_body_
                        ? std::string_view(base + head_end_, request_end_ - head_end_)
                        : std::string_view();
  }

  http_limits limits_;
  std::string buf_;                   // the request bytes, then any leftover
  std::vector<field_pos> fields_;     // header positions in buf_
  std::vector<http_header> headers_;  // views behind request_.headers
  http_request request_;
  field_pos method_{}, target_{};  // name_off/name_len used
  status state_ = status::incomplete;
  int error_status_ = 0;
  bool in_request_line_ = true;
  std::size_t line_start_ = 0;    // offset in buf_ of the line being received
  std::size_t header_bytes_ = 0;  // header-section bytes so far (lines with CRLF)
  std::size_t head_end_ = 0;      // offset in buf_ just past the header section's final CRLF
  std::size_t request_end_ = 0;   // offset in buf_ just past the body (the next request's start)
  bool in_body_ = false;          // reading an accepted body
};

}  // namespace devgate::websocket
