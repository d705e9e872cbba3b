#pragma once

#include <algorithm>    // std::find
#include <optional>     // parse results
#include <stdexcept>    // set-up errors
#include <string>       // normalized origins
#include <string_view>  // header values
#include <vector>       // the list

#include "devgate/auth/authenticator.hpp"

namespace devgate::auth {

/// The browser origins allowed to open WebSockets (RFC 6454; RFC 6455 10.2): a page of another
/// site can open a WebSocket to any server its user reaches, and the browser says which page
/// did in `Origin`, which that page cannot change. Origins match exactly on scheme, host and
/// port (the scheme's default port when none is written); the path never belongs to one.
/// An empty list checks nothing. Requests without Origin come from non-browser clients
/// (devices) and are accepted unless `strict`.
class origin_allow_list {
 public:
  /// Adds `origin` ("https://fleet.example.com", "http://127.0.0.1:8080"); throws
  /// std::invalid_argument for anything else (a path, a missing scheme, a bad port).
  void add(std::string_view origin) {
    auto normal = normalize(origin);
    if (!normal) {
      throw std::invalid_argument("auth::origin_allow_list: \"" + std::string(origin) +
                                  "\" is not an origin (scheme://host[:port], no path)");
    }
    if (std::find(origins_.begin(), origins_.end(), *normal) == origins_.end()) {
      origins_.push_back(std::move(*normal));
    }
  }
  /// Refuse requests without Origin too (a gateway that serves browsers only).
  void set_strict(bool strict) noexcept { strict_ = strict; }
  /// True when requests without Origin are refused.
  [[nodiscard]] bool strict() const noexcept { return strict_; }
  /// True when nothing is checked (no origin added, not strict).
  [[nodiscard]] bool empty() const noexcept { return origins_.empty() && !strict_; }

  /// True when `r` may upgrade: it has no Origin (unless strict), or exactly one, on the list.
  [[nodiscard]] bool allows(const request& r) const {
    if (empty()) return true;
    std::size_t count = 0;
    std::string_view value;
    if (r.http != nullptr) {
      for (const auto& h : r.http->headers) {
        if (websocket::detail_http::iequals(h.name, "Origin")) {
          ++count;
          value = h.value;
        }
      }
    }
    if (count == 0) return !strict_;
    if (count > 1) return false;
    const auto normal = normalize(value);
    return normal && std::find(origins_.begin(), origins_.end(), *normal) != origins_.end();
  }

  /// `origin` as "scheme://host:port" in lower case with the port always written, or nullopt
  /// when it is not scheme://host[:port] ("null" is not an origin that can be allowed).
  [[nodiscard]] static std::optional<std::string> normalize(std::string_view origin) {
    const std::size_t sep = origin.find("://");
    if (sep == std::string_view::npos || sep == 0) return std::nullopt;
    std::string out;
    for (const char c : origin.substr(0, sep)) {
      const char l = websocket::detail_http::to_lower(c);
      if (!((l >= 'a' && l <= 'z') || (l >= '0' && l <= '9') || l == '+' || l == '-' || l == '.')) {
        return std::nullopt;
      }
      out.push_back(l);
    }
    const std::string scheme = out;
    std::string_view rest = origin.substr(sep + 3);
    std::string_view host, port;
    if (rest.starts_with('[')) {  // an IPv6 literal
      const std::size_t close = rest.find(']');
      if (close == std::string_view::npos) return std::nullopt;
      host = rest.substr(0, close + 1);
      rest.remove_prefix(close + 1);
      if (!rest.empty()) {
        if (rest.front() != ':') return std::nullopt;
        port = rest.substr(1);
      }
    } else {
      const std::size_t colon = rest.find(':');
      host = rest.substr(0, colon);
      if (colon != std::string_view::npos) port = rest.substr(colon + 1);
    }
    if (host.empty()) return std::nullopt;
    out.append("://");
    for (const char c : host) {
      if (c == '/' || c == '?' || c == '#' || c == '@' || c == ' ' ||
          static_cast<unsigned char>(c) < 0x21) {
        return std::nullopt;
      }
      out.push_back(websocket::detail_http::to_lower(c));
    }
    if (port.empty()) {
      if (scheme == "http" || scheme == "ws") {
        port = "80";
      } else if (scheme == "https" || scheme == "wss") {
        port = "443";
      } else {
        return std::nullopt;
      }
    }
    if (port.size() > 5) return std::nullopt;
    unsigned value = 0;
    for (const char c : port) {
      if (c < '0' || c > '9') return std::nullopt;
      value = value * 10 + static_cast<unsigned>(c - '0');
    }
    if (value == 0 || value > 65535) return std::nullopt;
    out.push_back(':');
    out.append(std::to_string(value));
    return out;
  }

 private:
  std::vector<std::string> origins_;
  bool strict_ = false;
};

}  // namespace devgate::auth
