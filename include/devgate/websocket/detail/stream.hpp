#pragma once

#include <sys/socket.h>  // recv, sendmsg, shutdown
#include <sys/types.h>   // ssize_t
#include <sys/uio.h>     // iovec
#include <unistd.h>      // close

#include <cerrno>    // EAGAIN and friends
#include <concepts>  // byte_stream
#include <cstddef>   // std::byte, std::size_t
#include <cstdint>   // io_status
#include <span>      // buffers, iovecs
#include <utility>   // std::exchange

namespace devgate::websocket::detail {

/// What one read or write on a byte stream did.
enum class io_status : std::uint8_t {
  ok,  ///< `bytes` were read (at least one), or taken for writing (maybe fewer than offered).
  would_block,  ///< Nothing now: wait for the next readiness edge.
  eof,          ///< Read only: the peer closed its side.
  error,        ///< The connection failed (a reset, ...): close it.
};

/// The result of `read` and `write` on a byte stream.
struct io_result {
  io_status status = io_status::ok;  ///< What happened.
  std::size_t bytes = 0;             ///< Bytes read or taken (0 unless `ok`).
};

/// The byte-stream layer under a session: everything the session does with its connection, so
/// that a TLS stream (OpenSSL over the same socket) can take the place of `tcp_stream` without
/// touching framing, the HTTP phase or the outbound queue. Requirements, all non-blocking and
/// called on the session's thread:
/// - `read(buffer)`: bytes into `buffer` (ok), or would_block, eof or error;
/// - `write(iovecs)`: one gather write; ok with the bytes taken, would_block, or error;
/// - `write_pending()`: bytes `write` took still wait inside the stream (a TLS record the
///   socket did not take); `flush()` sends them: ok once none wait, would_block, or error;
/// - `shutdown_write()`: half-close (the peer reads EOF after what was written);
/// - `close()`: end the connection now (idempotent); `is_open()` until then;
/// - `native_handle()`: the descriptor whose readiness the worker's epoll set watches.
template <class S>
concept byte_stream = std::movable<S> &&
    requires(S& s, const S& cs, std::span<std::byte> in, std::span<const ::iovec> out) {
  { s.read(in) } -> std::same_as<io_result>;
  { s.write(out) } -> std::same_as<io_result>;
  { s.flush() } -> std::same_as<io_result>;
  { cs.write_pending() } -> std::same_as<bool>;
  s.shutdown_write();
  s.close();
  { cs.is_open() } -> std::same_as<bool>;
  { cs.native_handle() } -> std::same_as<int>;
};

/// A connected non-blocking TCP socket, owned: closed when the stream is closed or destroyed
/// (an accepted socket that no worker adopted, for example when the server stops first).
class tcp_stream {
 public:
  /// No connection.
  tcp_stream() noexcept = default;
  /// Owns the connected non-blocking socket `fd`.
  explicit tcp_stream(int fd) noexcept : fd_(fd) {}
  tcp_stream(tcp_stream&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  tcp_stream& operator=(tcp_stream&& o) noexcept {
    if (this != &o) {
      close();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  tcp_stream(const tcp_stream&) = delete;
  tcp_stream& operator=(const tcp_stream&) = delete;
  ~tcp_stream() { close(); }

  /// One recv into `buffer` (not empty).
  io_result read(std::span<std::byte> buffer) noexcept {
    for (;;) {
      const ::ssize_t got = ::recv(fd_, buffer.data(), buffer.size(), 0);
      if (got > 0) return {io_status::ok, static_cast<std::size_t>(got)};
      if (got == 0) return {io_status::eof, 0};
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return {io_status::would_block, 0};
      return {io_status::error, 0};
    }
  }

  /// One sendmsg of `iov` (no SIGPIPE: a peer that went away is an error result).
  io_result write(std::span<const ::iovec> iov) noexcept {
    ::msghdr m{};
    m.msg_iov = const_cast<::iovec*>(iov.data());  // not const-correct; only read
    m.msg_iovlen = iov.size();
    for (;;) {
      const ::ssize_t n = ::sendmsg(fd_, &m, MSG_NOSIGNAL);
      if (n >= 0) return {io_status::ok, static_cast<std::size_t>(n)};
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return {io_status::would_block, 0};
      return {io_status::error, 0};
    }
  }

  /// Nothing waits inside a TCP stream: what sendmsg took is the kernel's.
  io_result flush() noexcept { return {io_status::ok, 0}; }
  /// Always false (see flush).
  [[nodiscard]] bool write_pending() const noexcept { return false; }

  /// Half-close: a FIN after what was written; reading goes on.
  void shutdown_write() noexcept { ::shutdown(fd_, SHUT_WR); }

  /// Ends the connection in both directions and closes the socket (which also leaves any epoll
  /// set it was in).
  void close() noexcept {
    if (fd_ < 0) return;
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    fd_ = -1;
  }

  /// True until close().
  [[nodiscard]] bool is_open() const noexcept { return fd_ >= 0; }
  /// The socket, or -1 once closed.
  [[nodiscard]] int native_handle() const noexcept { return fd_; }

 private:
  int fd_ = -1;
};

static_assert(byte_stream<tcp_stream>, "tcp_stream must satisfy byte_stream");

}  // namespace devgate::websocket::detail
