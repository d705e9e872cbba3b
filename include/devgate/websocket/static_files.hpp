#pragma once

#include <cstddef>      // std::size_t
#include <filesystem>   // the document root
#include <functional>   // the route callback
#include <memory>       // the file cache, shared by copies of the route
#include <optional>     // decoding results
#include <string>       // paths
#include <string_view>  // extensions, targets

#include "devgate/core/bytes.hpp"
#include "devgate/websocket/detail/file_cache.hpp"
#include "devgate/websocket/http.hpp"
#include "devgate/websocket/server_options.hpp"

namespace devgate::websocket {

/// The Content-Type for a file name, by extension (application/octet-stream when unknown).
[[nodiscard]] inline std::string_view content_type_for(std::string_view filename) noexcept {
  const std::size_t dot = filename.rfind('.');
  if (dot == std::string_view::npos) return "application/octet-stream";
  std::string_view ext = filename.substr(dot + 1);
  struct entry {
    std::string_view ext, type;
  };
  static constexpr entry types[] = {
      {"html", "text/html; charset=utf-8"},
      {"htm", "text/html; charset=utf-8"},
      {"js", "text/javascript; charset=utf-8"},
      {"mjs", "text/javascript; charset=utf-8"},
      {"css", "text/css; charset=utf-8"},
      {"json", "application/json"},
      {"map", "application/json"},
      {"txt", "text/plain; charset=utf-8"},
      {"svg", "image/svg+xml"},
      {"png", "image/png"},
      {"jpg", "image/jpeg"},
      {"jpeg", "image/jpeg"},
      {"gif", "image/gif"},
      {"ico", "image/x-icon"},
      {"webp", "image/webp"},
      {"wasm", "application/wasm"},
      {"woff2", "font/woff2"},
  };
  for (const entry& e : types) {
    if (detail_http::iequals(ext, e.ext)) return e.type;
  }
  return "application/octet-stream";
}

/// Decodes the path of a request target for file lookup: drops the query, percent-decodes, and
/// refuses (std::nullopt) anything that could leave the document root: a "." or ".." segment
/// (also when percent-encoded), a backslash, a NUL, an empty segment, or a bad escape.
[[nodiscard]] inline std::optional<std::string> static_file_path(std::string_view target) {
  if (const std::size_t q = target.find('?'); q != std::string_view::npos) {
    target = target.substr(0, q);
  }
  if (target.empty() || target.front() != '/') return std::nullopt;
  std::string path;
  path.reserve(target.size());
  for (std::size_t i = 0; i < target.size(); ++i) {
    char c = target[i];
    if (c == '%') {
      auto hex = [](char h) -> int {
        if (h >= '0' && h <= '9') return h - '0';
        if (h >= 'a' && h <= 'f') return h - 'a' + 10;
        if (h >= 'A' && h <= 'F') return h - 'A' + 10;
        return -1;
      };
      if (i + 2 >= target.size()) return std::nullopt;
      const int hi = hex(target[i + 1]), lo = hex(target[i + 2]);
      if (hi < 0 || lo < 0) return std::nullopt;
      c = static_cast<char>(hi * 16 + lo);
      i += 2;
    }
    if (c == '\0' || c == '\\') return std::nullopt;
    path.push_back(c);
  }
  // Check every segment after decoding, so "%2e%2e" is caught like "..".
  std::size_t start = 1;
  while (start <= path.size()) {
    std::size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    const std::string_view seg(path.data() + start, end - start);
    if (seg == "." || seg == "..") return std::nullopt;
    if (seg.empty() && end != path.size()) return std::nullopt;  // "//": no empty segments
    start = end + 1;
  }
  if (path.back() == '/') path += "index.html";
  return path;
}

/// A `server_options::route` that serves the files under `root` (GET and HEAD): index.html for
/// directories, content types by extension, 404 for anything missing or outside the root (a
/// symlink is followed only when it resolves inside the root). Files up to 256 KiB are kept in
/// memory and read again when their size or modification time changes (detail/file_cache.hpp).
[[nodiscard]] inline std::function<http_reply(const http_request&)> static_files(
    std::filesystem::path root) {
  auto files = std::make_shared<detail::file_cache>(std::move(root));
  return [files = std::move(files)](const http_request& req) {
    http_reply reply;
    const auto rel = static_file_path(req.target);
    auto found = rel ? files->get(*rel) : std::nullopt;
    if (!found) {
      reply.status = 404;
      reply.content_type = "text/plain; charset=utf-8";
      reply.body = shared_bytes::copy_of(std::string_view("not found\n"));
      return reply;
    }
    const std::string_view path = found->path;
    reply.content_type = std::string(content_type_for(path.substr(path.rfind('/') + 1)));
    reply.body = std::move(found->body);
    reply.extra_headers = "X-Content-Type-Options: nosniff\r\n";
    return reply;
  };
}

}  // namespace devgate::websocket
