#pragma once

#include <openssl/bio.h>  // the socket BIO
#include <openssl/err.h>  // OpenSSL's per-thread error queue
#include <openssl/ssl.h>  // SSL_read_ex, SSL_write_ex
#include <sys/socket.h>   // recv, send, shutdown
#include <sys/types.h>    // ssize_t
#include <sys/uio.h>      // iovec

#include <algorithm>  // std::min
#include <cerrno>     // EAGAIN and friends
#include <cstddef>    // std::byte, std::size_t
#include <cstring>    // staging copies
#include <memory>     // the staging buffer
#include <span>       // buffers, iovecs
#include <vector>     // ciphertext the socket did not take

#include "devgate/websocket/detail/stream.hpp"

namespace devgate::websocket::detail {

/// TLS over a connected non-blocking socket (RFC 8446, RFC 5246): OpenSSL reads and writes the
/// socket through a BIO of devgate's, driven by the worker's edge-triggered epoll set; nothing
/// ever blocks. The socket stays owned by the `tcp_stream` beside it (session_stream.hpp).
///
/// Reads: `read` runs the handshake, then decrypts records until the buffer is full or the
/// socket is drained (a short result means drained, as with `tcp_stream`). The first byte of a
/// connection must start a TLS handshake record (0x16): anything else (a plain-HTTP request, a
/// scanner) fails the connection at once instead of waiting for a full record header.
///
/// Writes: `write` coalesces the gathered frames into records of up to 16 KiB (one record for a
/// burst of small frames) and encrypts them with SSL_write_ex. The BIO sends each record at
/// once; what the socket does not take waits here (`write_pending`) and the stream encrypts no
/// further until `flush` has sent it, so at most one record waits per connection. OpenSSL never
/// sees a full socket, so no write is ever retried with other bytes.
///
/// With SSL_MODE_RELEASE_BUFFERS (tls_context.hpp) an idle connection holds no OpenSSL read or
/// write buffer and no pending record.
class tls_stream {
 public:
  static constexpr std::size_t record_size = 16u * 1024u;  // most plaintext in one record

  /// TLS as the server on the connected socket `fd` (not owned), with `ssl` (owned).
  tls_stream(SSL* ssl, int fd) noexcept : ssl_(ssl), fd_(fd) {
    BIO* bio = BIO_new(socket_method());
    if (bio) {
      BIO_set_data(bio, this);
      BIO_set_init(bio, 1);
      SSL_set_bio(ssl_, bio, bio);  // one BIO both ways: SSL_free frees it
    }
    SSL_set_accept_state(ssl_);
  }
  tls_stream(const tls_stream&) = delete;
  tls_stream& operator=(const tls_stream&) = delete;
  ~tls_stream() {
    // A connection that ended without a TLS failure (a device that dropped its TCP connection,
    // a timeout) keeps its session resumable: OpenSSL would otherwise drop it from the cache.
    if (!failed_ && SSL_is_init_finished(ssl_)) {
      SSL_set_shutdown(ssl_, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    }
    SSL_free(ssl_);
  }

  /// True when the connection object is usable (its BIO could be made).
  [[nodiscard]] bool valid() const noexcept { return SSL_get_rbio(ssl_) != nullptr; }

  /// Handshake, then plaintext into `buffer` until it is full or the socket is drained.
  io_result read(std::span<std::byte> buffer) noexcept {
    std::size_t total = 0;
    // SSL_get_error reads the thread's error queue: empty it of what other code on this thread
    // left (a failed signature check, say). Once per call: a failure below ends the loop.
    ERR_clear_error();
    while (total < buffer.size()) {
      std::size_t got = 0;
      const int rc = SSL_read_ex(ssl_, buffer.data() + total, buffer.size() - total, &got);
      if (rc == 1) {
        total += got;
        continue;
      }
      io_status status = io_status::error;
      switch (SSL_get_error(ssl_, rc)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
          status = io_status::would_block;
          break;
        case SSL_ERROR_ZERO_RETURN:  // close_notify, or EOF (SSL_OP_IGNORE_UNEXPECTED_EOF)
          status = io_status::eof;
          break;
        default:  // a failed handshake, a bad record, a reset: the next read says so again
          ERR_clear_error();
          failed_ = true;
          break;
      }
      if (total > 0) break;
      return {status, 0};
    }
    return {io_status::ok, total};
  }

  /// Encrypts the gathered bytes of `iov` as records and sends them; ok with the bytes taken
  /// (all of them, or fewer when the socket filled up: then `write_pending`), would_block when
  /// an earlier record still waits for the socket, error when the connection failed.
  io_result write(std::span<const ::iovec> iov) noexcept {
    if (const io_result f = flush(); f.status != io_status::ok) return f;
    std::size_t taken = 0;
    std::size_t i = 0;
    std::size_t off = 0;  // into iov[i]
    std::byte* const staging = staging_buffer();
    ERR_clear_error();  // as in read: once per call, a failure below ends the loop
    while (i < iov.size()) {
      const std::size_t rest = iov[i].iov_len - off;
      if (rest == 0) {
        ++i, off = 0;
        continue;
      }
      const std::byte* record = staging;
      std::size_t size = 0;
      if (rest >= record_size || !staging) {
        // A large piece (a message's payload) is encrypted where it lies.
        record = static_cast<const std::byte*>(iov[i].iov_base) + off;
        size = std::min(record_size, rest);
        off += size;
        if (off == iov[i].iov_len) ++i, off = 0;
      } else {
        // Small pieces (headers, short frames) are coalesced into one record.
        while (i < iov.size() && size < record_size) {
          const std::size_t n = std::min(record_size - size, iov[i].iov_len - off);
          std::memcpy(staging + size, static_cast<const std::byte*>(iov[i].iov_base) + off, n);
          size += n;
          off += n;
          if (off == iov[i].iov_len) ++i, off = 0;
        }
      }
      std::size_t written = 0;
      if (SSL_write_ex(ssl_, record, size, &written) != 1) {
        const int e = SSL_get_error(ssl_, 0);
        ERR_clear_error();
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
          return {taken > 0 ? io_status::ok : io_status::would_block, taken};
        }
        failed_ = true;
        return {io_status::error, 0};
      }
      taken += written;
      if (!pending_.empty()) break;  // the socket is full: the rest waits for writability
    }
    return {io_status::ok, taken};
  }

  /// Sends what the socket did not take before: ok when nothing waits any more, would_block
  /// when some still does, error when the connection failed.
  io_result flush() noexcept {
    while (pending_off_ < pending_.size()) {
      const ::ssize_t n =
          ::send(fd_, pending_.data() + pending_off_, pending_.size() - pending_off_, MSG_NOSIGNAL);
      if (n > 0) {
        pending_off_ += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return {io_status::would_block, 0};
      return {io_status::error, 0};
    }
    if (!pending_.empty()) {
      std::vector<std::byte>().swap(pending_);  // idle connections keep no buffer
      pending_off_ = 0;
    }
    if (shutdown_after_flush_) {
      shutdown_after_flush_ = false;
      ::shutdown(fd_, SHUT_WR);
    }
    return {io_status::ok, 0};
  }

  /// True while bytes taken by `write` (or a half-close) wait for the socket.
  [[nodiscard]] bool write_pending() const noexcept {
    return !pending_.empty() || shutdown_after_flush_;
  }

  /// close_notify (RFC 8446 6.1), then the TCP half-close once it is sent.
  void shutdown_write() noexcept {
    if (SSL_is_init_finished(ssl_)) {
      ERR_clear_error();
      SSL_shutdown(ssl_);
      ERR_clear_error();
    }
    if (pending_.empty()) {
      ::shutdown(fd_, SHUT_WR);
    } else {
      shutdown_after_flush_ = true;
    }
  }

  /// The client's certificate, verified against the client CA file (mutual TLS), or null.
  /// Borrowed: valid as long as the connection.
  [[nodiscard]] X509* peer_certificate() const noexcept {
    if (SSL_get_verify_result(ssl_) != X509_V_OK) return nullptr;
    return SSL_get0_peer_certificate(ssl_);
  }

  /// The connection object, for what this class does not wrap.
  [[nodiscard]] SSL* native() const noexcept { return ssl_; }

 private:
  // The BIO's read: one recv. The first bytes must start a handshake record (content type 22).
  static int bio_read(BIO* b, char* out, int len) {
    auto& s = *static_cast<tls_stream*>(BIO_get_data(b));
    BIO_clear_retry_flags(b);
    for (;;) {
      const ::ssize_t got = ::recv(s.fd_, out, static_cast<std::size_t>(len), 0);
      if (got > 0) {
        if (!s.first_byte_seen_) {
          s.first_byte_seen_ = true;
          if (static_cast<unsigned char>(out[0]) != 0x16) return -1;  // not TLS: fail at once
        }
        return static_cast<int>(got);
      }
      if (got == 0) {
        s.eof_ = true;  // BIO_CTRL_EOF: an end of stream, not a failure (see bio_ctrl)
        return 0;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_read(b);
      return -1;
    }
  }

  // The BIO's write: sent at once; what the socket does not take is kept in order behind what
  // already waits, and the write counts as done (the stream stops encrypting until flushed).
  static int bio_write(BIO* b, const char* in, int len) {
    auto& s = *static_cast<tls_stream*>(BIO_get_data(b));
    BIO_clear_retry_flags(b);
    const auto* data = reinterpret_cast<const std::byte*>(in);
    auto size = static_cast<std::size_t>(len);
    std::size_t sent = 0;
    while (s.pending_.empty() && sent < size) {
      const ::ssize_t n = ::send(s.fd_, data + sent, size - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return -1;  // the connection failed
    }
    if (sent < size) s.pending_.insert(s.pending_.end(), data + sent, data + size);
    return len;
  }

  // Flush: nothing is buffered in the BIO. EOF: OpenSSL asks after a read of 0 bytes, and with
  // SSL_OP_IGNORE_UNEXPECTED_EOF reads a peer's plain TCP close as the end of the stream.
  static long bio_ctrl(BIO* b, int cmd, long, void*) {
    if (cmd == BIO_CTRL_FLUSH) return 1;
    if (cmd == BIO_CTRL_EOF) return static_cast<tls_stream*>(BIO_get_data(b))->eof_ ? 1 : 0;
    return 0;
  }

  static BIO_METHOD* socket_method() {
    static BIO_METHOD* const method = [] {
      BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "devgate socket");
      if (m) {
        BIO_meth_set_read(m, &tls_stream::bio_read);
        BIO_meth_set_write(m, &tls_stream::bio_write);
        BIO_meth_set_ctrl(m, &tls_stream::bio_ctrl);
      }
      return m;
    }();
    return method;
  }

  // The record being assembled from small pieces: one per thread, allocated by its first TLS
  // write (a session writes synchronously, so one serves every session of a worker).
  static std::byte* staging_buffer() noexcept {
    static thread_local std::unique_ptr<std::byte[]> buffer;
    if (!buffer) buffer.reset(new (std::nothrow) std::byte[record_size]);
    return buffer.get();
  }

  SSL* ssl_;
  int fd_;
  std::vector<std::byte> pending_;  // ciphertext the socket did not take
  std::size_t pending_off_ = 0;     // of it, already sent
  bool first_byte_seen_ = false;
  bool eof_ = false;     // the peer closed its side
  bool failed_ = false;  // a TLS error ended the connection: its session is not resumed
  bool shutdown_after_flush_ = false;  // shutdown_write() waits for pending_ to go out
};

}  // namespace devgate::websocket::detail
