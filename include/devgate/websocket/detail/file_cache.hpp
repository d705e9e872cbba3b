#pragma once

#include <fcntl.h>     // open with O_NOFOLLOW
#include <sys/stat.h>  // fstat: type, size, modification time
#include <unistd.h>    // read, close

#include <cerrno>         // EINTR
#include <climits>        // PATH_MAX
#include <cstddef>        // std::size_t
#include <cstdint>        // stamps
#include <cstdlib>        // realpath
#include <filesystem>     // the document root
#include <mutex>          // the table, shared by the worker threads
#include <optional>       // lookups
#include <span>           // file contents
#include <string>         // paths
#include <string_view>    // request paths
#include <unordered_map>  // the table

#include "devgate/core/bytes.hpp"

namespace devgate::websocket::detail {

/// The files `static_files` serves from one root: never one outside it, and small ones from
/// memory.
///
/// - A request path is resolved with realpath (every symlink followed) and served only when the
///   result lies under the root's own real path; the final open refuses a symlink (O_NOFOLLOW),
///   so a link swapped in after the check is not followed either.
/// - Files up to `max_file` bytes are kept, up to `max_total` in all (past it the table starts
///   over); every request checks the file (fstat of the opened file) and reads it again when its
///   size, modification time or inode changed.
/// Used by every worker thread: one mutex guards the table; files are read outside it.
class file_cache {
 public:
  /// Largest file kept in memory; larger ones are read on each request.
  static constexpr std::size_t max_file = 256u << 10;
  /// Bytes kept in all.
  static constexpr std::size_t max_total = 8u << 20;

  /// A file to serve: its contents and its real path (for the content type).
  struct file {
    shared_bytes body;  ///< The contents, shared with the table when kept.
    std::string path;   ///< The resolved path.
  };

  /// Files under `root` (resolved on first use if it does not exist yet).
  explicit file_cache(std::filesystem::path root) : root_(std::move(root)) {}

  /// The file at `rel` (a decoded path starting with '/', see `static_file_path`), index.html
  /// for a directory; nullopt when missing, unreadable, not a regular file, or outside the root.
  [[nodiscard]] std::optional<file> get(std::string_view rel) {
    const std::string root = real_root();
    if (root.empty()) return std::nullopt;
    std::string path = resolve(root + std::string(rel), root);
    if (path.empty()) return std::nullopt;
    struct ::stat st {};
    if (::stat(path.c_str(), &st) != 0) return std::nullopt;
    if (S_ISDIR(st.st_mode)) {
      path = resolve(path + "/index.html", root);
      if (path.empty()) return std::nullopt;
    }
    const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return std::nullopt;
    struct closer {
      int fd;
      ~closer() { ::close(fd); }
    } close_it{fd};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
    const stamp now{
        static_cast<std::size_t>(st.st_size),
        static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec,
        static_cast<std::uint64_t>(st.st_ino)};
    {
      std::lock_guard lock(mutex_);
      if (auto it = files_.find(path); it != files_.end() && it->second.when == now) {
        return file{it->second.body, std::move(path)};
      }
    }
    bool ok = true;
    shared_bytes body = shared_bytes::build(now.size, [&](std::span<std::byte> out) {
      std::size_t got = 0;
      while (got < out.size()) {
        const ::ssize_t n = ::read(fd, out.data() + got, out.size() - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          ok = false;  // shorter than fstat said: changed while read
          return;
        }
        got += static_cast<std::size_t>(n);
      }
    });
    if (!ok) return std::nullopt;
    if (now.size <= max_file) keep(path, body, now);
    return file{std::move(body), std::move(path)};
  }

 private:
  struct stamp {
    std::size_t size = 0;
    std::int64_t mtime_ns = 0;
    std::uint64_t inode = 0;
    bool operator==(const stamp&) const = default;
  };
  struct entry {
    shared_bytes body;
    stamp when;
  };

  // The root's real path, or empty while it cannot be resolved.
  std::string real_root() {
    std::lock_guard lock(mutex_);
    if (real_root_.empty()) {
      char buf[PATH_MAX];
      if (::realpath(root_.c_str(), buf) != nullptr) real_root_ = buf;
    }
    return real_root_;
  }

  // `path` with every symlink resolved, or empty when it does not exist or leaves `root`.
  static std::string resolve(const std::string& path, const std::string& root) {
    char buf[PATH_MAX];
    if (::realpath(path.c_str(), buf) == nullptr) return {};
    const std::string_view real(buf);
    const bool inside = real == root || (real.size() > root.size() && real.starts_with(root) &&
                                         (root.back() == '/' || real[root.size()] == '/'));
    return inside ? std::string(real) : std::string();
  }

  void keep(const std::string& path, const shared_bytes& body, const stamp& when) {
    std::lock_guard lock(mutex_);
    auto it = files_.find(path);
    if (it != files_.end()) {
      total_ -= it->second.body.size();
      files_.erase(it);
    }
    if (total_ + body.size() > max_total) {
      files_.clear();
      total_ = 0;
    }
    files_.emplace(path, entry{body, when});
    total_ += body.size();
  }

  std::filesystem::path root_;
  std::mutex mutex_;
  std::string real_root_;  // guarded by mutex_
  std::unordered_map<std::string, entry> files_;
  std::size_t total_ = 0;
};

}  // namespace devgate::websocket::detail
