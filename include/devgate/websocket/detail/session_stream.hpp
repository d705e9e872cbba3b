#pragma once

#include <openssl/ssl.h>  // SSL, X509
#include <sys/uio.h>      // iovec

#include <cstddef>  // std::byte
#include <memory>   // the TLS layer
#include <new>      // std::nothrow
#include <span>     // buffers, iovecs
#include <utility>  // std::move

#include "devgate/websocket/detail/stream.hpp"
#include "devgate/websocket/detail/tls_stream.hpp"

namespace devgate::websocket::detail {

/// The byte stream a session reads and writes: its TCP socket, with TLS over it when the
/// server has TLS on. Plain connections pay one pointer in the session and one predictable
/// branch per read, write or flush call: no allocation, indirection or copy.
class session_stream {
 public:
  /// No connection.
  session_stream() noexcept = default;
  /// Plain TCP on `tcp`.
  explicit session_stream(tcp_stream tcp) noexcept : tls_(), tcp_(std::move(tcp)) {}

  /// Speaks TLS with `ssl` (owned) from the first byte on; false (and `ssl` freed) when out of
  /// memory.
  [[nodiscard]] bool start_tls(SSL* ssl) noexcept {
    tls_.reset(new (std::nothrow) tls_stream(ssl, tcp_.native_handle()));
    if (!tls_) {
      SSL_free(ssl);
      return false;
    }
    if (!tls_->valid()) {
      tls_.reset();
      return false;
    }
    return true;
  }

  /// See byte_stream (stream.hpp).
  io_result read(std::span<std::byte> buffer) noexcept {
    if (tls_) return tls_->read(buffer);
    return tcp_.read(buffer);
  }
  /// See byte_stream.
  io_result write(std::span<const ::iovec> iov) noexcept {
    if (tls_) return tls_->write(iov);
    return tcp_.write(iov);
  }
  /// See byte_stream.
  io_result flush() noexcept {
    if (tls_) return tls_->flush();
    return {io_status::ok, 0};
  }
  /// See byte_stream.
  [[nodiscard]] bool write_pending() const noexcept { return tls_ && tls_->write_pending(); }
  /// See byte_stream: with TLS, close_notify first.
  void shutdown_write() noexcept {
    if (tls_) {
      tls_->shutdown_write();
    } else {
      tcp_.shutdown_write();
    }
  }
  /// Ends the connection now (no close_notify) and frees the TLS state.
  void close() noexcept {
    tls_.reset();
    tcp_.close();
  }
  /// See byte_stream.
  [[nodiscard]] bool is_open() const noexcept { return tcp_.is_open(); }
  /// See byte_stream.
  [[nodiscard]] int native_handle() const noexcept { return tcp_.native_handle(); }

  /// True when the connection speaks TLS.
  [[nodiscard]] bool secure() const noexcept { return tls_ != nullptr; }
  /// The verified client certificate (mutual TLS), or null. Borrowed: valid while the
  /// connection is open.
  [[nodiscard]] X509* peer_certificate() const noexcept {
    return tls_ ? tls_->peer_certificate() : nullptr;
  }

 private:
  // The pointer first: the descriptor then ends the object, and a session that declares its
  // stream [[no_unique_address]] packs its small fields into the padding after it.
  std::unique_ptr<tls_stream> tls_;
  tcp_stream tcp_;
};

static_assert(byte_stream<session_stream>, "session_stream must satisfy byte_stream");

}  // namespace devgate::websocket::detail
