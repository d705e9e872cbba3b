#pragma once

#include <cstddef>      // std::size_t
#include <optional>     // identify result
#include <string>       // device ids
#include <string_view>  // request targets

#include "devgate/websocket/http.hpp"

namespace devgate::device {

/// Longest device id accepted.
inline constexpr std::size_t max_device_id_length = 128;

/// The URL path prefix under which devices connect: `/ws/<device_id>`.
inline constexpr std::string_view device_path_prefix = "/ws/";

/// True when `id` is 1 to 128 characters of [A-Za-z0-9._-] (safe in URLs, logs and file names).
[[nodiscard]] constexpr bool is_valid_device_id(std::string_view id) noexcept {
  if (id.empty() || id.size() > max_device_id_length) return false;
  for (const char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

/// The device id in a request target `/ws/<device_id>` (a query string is ignored), or
/// std::nullopt when the path is not of that form or the id is invalid.
[[nodiscard]] inline std::optional<std::string> device_id_from_target(std::string_view target) {
  if (const auto q = target.find('?'); q != std::string_view::npos) target = target.substr(0, q);
  if (!target.starts_with(device_path_prefix)) return std::nullopt;
  const auto id = target.substr(device_path_prefix.size());
  if (!is_valid_device_id(id)) return std::nullopt;
  return std::string(id);
}

/// `websocket::server_options::identify` for devices: upgrades at `/ws/<device_id>` only;
/// anything else is refused with 400 before the upgrade.
[[nodiscard]] inline std::optional<std::string> identify_device(
    const websocket::http_request& request) {
  return device_id_from_target(request.target);
}

}  // namespace devgate::device
