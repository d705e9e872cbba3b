#pragma once

#include <openssl/err.h>  // clearing OpenSSL's error queue
#include <openssl/pem.h>  // reading the private key
#include <openssl/ssl.h>  // SSL_CTX

#include <atomic>        // enabled, read by the workers
#include <cstring>       // ALPN matching
#include <mutex>         // swapping the context on reload
#include <string>        // file names
#include <system_error>  // load results

#include "devgate/websocket/tls.hpp"

namespace devgate::websocket::detail {

/// The server's TLS configuration as an OpenSSL context, reloadable while connections run: each
/// new connection takes the current context (its SSL object holds a reference to it), so a
/// reload changes the certificate of later connections and leaves open ones as they are.
class tls_context {
 public:
  tls_context() = default;
  tls_context(const tls_context&) = delete;
  tls_context& operator=(const tls_context&) = delete;
  ~tls_context() { SSL_CTX_free(ctx_); }

  /// True once a configuration is loaded: the server speaks TLS.
  [[nodiscard]] bool enabled() const noexcept { return enabled_.load(std::memory_order_relaxed); }

  /// Builds a context from `o` and makes it current; on error the current one stays. Not
  /// called on a network thread (server::start, server::reload_tls).
  std::error_code load(const tls_options& o) {
    SSL_CTX* fresh = nullptr;
    const std::error_code ec = make(o, fresh);
    ERR_clear_error();
    if (ec) return ec;
    std::lock_guard lock(mutex_);
    SSL_CTX_free(ctx_);  // connections that use it keep it alive
    ctx_ = fresh;
    enabled_.store(true, std::memory_order_relaxed);
    return {};
  }

  /// A connection object for a new connection, on the current context (null when out of
  /// memory). One short lock per TLS connection, never per message.
  [[nodiscard]] SSL* new_connection() {
    std::lock_guard lock(mutex_);
    return ctx_ ? SSL_new(ctx_) : nullptr;
  }

 private:
  // RFC 7301: the protocol spoken after the handshake is HTTP/1.1 (then the WebSocket upgrade).
  // A client that offers ALPN without http/1.1 gets no ALPN answer, not a failed handshake.
  static int select_alpn(SSL*, const unsigned char** out, unsigned char* out_len,
                         const unsigned char* in, unsigned int in_len, void*) {
    static constexpr unsigned char http11[] = {'h', 't', 't', 'p', '/', '1', '.', '1'};
    for (unsigned int i = 0; i < in_len;) {
      const unsigned int len = in[i];
      if (i + 1 + len > in_len) break;
      if (len == sizeof http11 && std::memcmp(in + i + 1, http11, len) == 0) {
        *out = in + i + 1;
        *out_len = static_cast<unsigned char>(len);
        return SSL_TLSEXT_ERR_OK;
      }
      i += 1 + len;
    }
    return SSL_TLSEXT_ERR_NOACK;
  }

  static EVP_PKEY* read_key(const std::string& file) {
    BIO* in = BIO_new_file(file.c_str(), "r");
    if (!in) return nullptr;
    EVP_PKEY* key = PEM_read_bio_PrivateKey(in, nullptr, nullptr, nullptr);
    BIO_free(in);
    return key;
  }

  static std::error_code make(const tls_options& o, SSL_CTX*& out) {
    SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) return tls_errc::context;
    struct guard {
      SSL_CTX*& c;
      ~guard() { SSL_CTX_free(c); }
    } free_on_error{ctx};
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    // No renegotiation (a client-triggered CPU cost and a history of bugs); the server's cipher
    // order; a client that closes without close_notify is an ordinary end of stream (the
    // WebSocket close handshake says whether the session ended cleanly).
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
    // Idle connections hold no read or write buffer (about 34 KiB each otherwise); the write
    // path hands OpenSSL a per-thread staging buffer, whose address may differ on a retry.
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    // Resumption: TLS 1.2 session ids from the server cache, and stateless tickets (one per
    // full handshake for TLS 1.3, which is what a reconnecting device needs).
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    static constexpr unsigned char sid_context[] = {'d', 'e', 'v', 'g', 'a', 't', 'e'};
    SSL_CTX_set_session_id_context(ctx, sid_context, sizeof sid_context);
    SSL_CTX_set_num_tickets(ctx, 1);
    SSL_CTX_set_alpn_select_cb(ctx, &tls_context::select_alpn, nullptr);

    if (SSL_CTX_use_certificate_chain_file(ctx, o.certificate_chain_file.c_str()) != 1) {
      return tls_errc::certificate_chain;
    }
    EVP_PKEY* key = read_key(o.private_key_file);
    if (!key) return tls_errc::private_key;
    const int used = SSL_CTX_use_PrivateKey(ctx, key);  // checks it against the certificate
    EVP_PKEY_free(key);
    if (used != 1 || SSL_CTX_check_private_key(ctx) != 1) return tls_errc::key_mismatch;
    if (!o.client_ca_file.empty()) {
      if (SSL_CTX_load_verify_locations(ctx, o.client_ca_file.c_str(), nullptr) != 1) {
        return tls_errc::client_ca;
      }
      // The CA names sent in the CertificateRequest, so a client picks the right certificate.
      STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(o.client_ca_file.c_str());
      if (!names) return tls_errc::client_ca;
      SSL_CTX_set_client_CA_list(ctx, names);
      SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    }
    out = ctx;
    ctx = nullptr;  // kept: the guard frees nothing
    return {};
  }

  mutable std::mutex mutex_;
  SSL_CTX* ctx_ = nullptr;
  std::atomic<bool> enabled_{false};
};

}  // namespace devgate::websocket::detail
