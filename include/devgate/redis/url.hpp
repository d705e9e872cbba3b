#pragma once

#include <charconv>     // std::from_chars
#include <cstdint>      // the port
#include <string>       // host, credentials, the error text
#include <string_view>  // the URL

namespace devgate::redis {

/// Where a Redis server is and how to log in: what a `redis://` URL names.
struct endpoint {
  std::string host = "127.0.0.1";  ///< Host name or IP address (IPv6 in brackets in a URL).
  std::uint16_t port = 6379;       ///< TCP port.
  int db = 0;                      ///< Database number selected on connect (`SELECT`, when not 0).
  std::string username;            ///< ACL user for `AUTH user password` (empty: `AUTH password`).
  std::string password;            ///< Sent with `AUTH` on connect when not empty.
};

/// The result of `parse_url`: the endpoint, or a sentence saying what is wrong with the URL.
struct parsed_url {
  endpoint value;     ///< The endpoint (meaningful only when `error` is empty).
  std::string error;  ///< Empty on success, else what is wrong and what was expected.
  /// True when the URL parsed.
  explicit operator bool() const noexcept { return error.empty(); }
};

/// Parses `redis://[[user]:password@]host[:port][/db]` (port 6379 and db 0 by default; an IPv6
/// host in brackets). Never throws: a malformed URL comes back with `error` set.
inline parsed_url parse_url(std::string_view url) {
  parsed_url out;
  const auto fail = [&](std::string why) {
    out.error = "bad redis URL '" + std::string(url) + "': " + std::move(why) +
                " (expected redis://[[user]:password@]host[:port][/db])";
    return out;
  };
  constexpr std::string_view scheme = "redis://";
  if (url.substr(0, scheme.size()) != scheme) return fail("it must start with redis://");
  std::string_view rest = url.substr(scheme.size());
  std::string_view path;
  if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
    path = rest.substr(slash + 1);
    rest = rest.substr(0, slash);
  }
  if (const auto at = rest.rfind('@'); at != std::string_view::npos) {
    const std::string_view userinfo = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const auto colon = userinfo.find(':');
    if (colon == std::string_view::npos) {
      return fail("credentials must be user:password or :password");
    }
    out.value.username = std::string(userinfo.substr(0, colon));
    out.value.password = std::string(userinfo.substr(colon + 1));
  }
  std::string_view port;
  if (!rest.empty() && rest.front() == '[') {
    const auto close = rest.find(']');
    if (close == std::string_view::npos) return fail("an IPv6 host needs its closing ']'");
    out.value.host = std::string(rest.substr(1, close - 1));
    rest = rest.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return fail("unexpected text after the IPv6 host");
      port = rest.substr(1);
      if (port.empty()) return fail("empty port");
    }
  } else {
    const auto colon = rest.find(':');
    out.value.host = std::string(rest.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = rest.substr(colon + 1);
      if (port.empty()) return fail("empty port");
    }
  }
  if (out.value.host.empty()) return fail("no host");
  if (!port.empty()) {
    unsigned value = 0;
    const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
    if (ec != std::errc{} || end != port.data() + port.size() || value == 0 || value > 65535) {
      return fail("port '" + std::string(port) + "' is not a number from 1 to 65535");
    }
    out.value.port = static_cast<std::uint16_t>(value);
  }
  if (!path.empty()) {
    int db = 0;
    const auto [end, ec] = std::from_chars(path.data(), path.data() + path.size(), db);
    if (ec != std::errc{} || end != path.data() + path.size() || db < 0) {
      return fail("database '" + std::string(path) + "' is not a number from 0 up");
    }
    out.value.db = db;
  }
  return out;
}

}  // namespace devgate::redis
