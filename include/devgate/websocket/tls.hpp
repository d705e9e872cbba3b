#pragma once

#include <openssl/x509.h>  // the peer certificate

#include <cstddef>       // std::byte
#include <string>        // file names, messages
#include <system_error>  // tls_errc as an error_code
#include <type_traits>   // is_error_code_enum
#include <vector>        // DER bytes

namespace devgate::websocket {

/// TLS for `websocket::server` (wss and https on the same port), on OpenSSL 3: TLS 1.2 and 1.3,
/// renegotiation off, session resumption (a server session cache and tickets), ALPN `http/1.1`.
/// Set `server_options::tls` to turn it on; `server::reload_tls()` reads the files again (new
/// connections get the new certificate, open ones keep theirs).
struct tls_options {
  /// PEM file with the server certificate first, then its intermediates (the chain a client
  /// needs to reach its trusted root).
  std::string certificate_chain_file;
  /// PEM file with the private key of that certificate (ECDSA P-256 or RSA), unencrypted.
  std::string private_key_file;
  /// PEM file of the CAs that sign client certificates. Empty: no client certificate is asked
  /// for. Set: mutual TLS, every client must present a certificate that chains to one of these
  /// CAs (the handshake fails otherwise); the verified certificate is available to the upgrade.
  std::string client_ca_file;
};

/// Why a TLS configuration could not be loaded (`server::start`, `server::reload_tls`).
enum class tls_errc {
  certificate_chain = 1,  ///< The certificate chain file is missing or not PEM.
  private_key,            ///< The private key file is missing, not PEM, or encrypted.
  key_mismatch,           ///< The private key does not belong to the certificate.
  client_ca,              ///< The client CA file is missing or not PEM.
  context,                ///< OpenSSL could not make a TLS context (out of memory).
  not_enabled,            ///< reload_tls() on a server started without TLS.
};

/// The error category of `tls_errc`.
inline const std::error_category& tls_category() noexcept {
  struct category final : std::error_category {
    [[nodiscard]] const char* name() const noexcept override { return "devgate.tls"; }
    [[nodiscard]] std::string message(int value) const override {
      switch (static_cast<tls_errc>(value)) {
        case tls_errc::certificate_chain:
          return "cannot read the TLS certificate chain: check that "
                 "tls_options::certificate_chain_file names a readable PEM file";
        case tls_errc::private_key:
          return "cannot read the TLS private key: check that tls_options::private_key_file "
                 "names a readable, unencrypted PEM key";
        case tls_errc::key_mismatch:
          return "the TLS private key does not match the certificate: pass the key of the "
                 "chain's first certificate";
        case tls_errc::client_ca:
          return "cannot read the client CA file: check that tls_options::client_ca_file "
                 "names a readable PEM file of CA certificates";
        case tls_errc::context:
          return "OpenSSL could not create a TLS context (out of memory?)";
        case tls_errc::not_enabled:
          return "the server was started without TLS: set server_options::tls before start()";
      }
      return "unknown TLS error";
    }
  };
  static const category instance;
  return instance;
}

/// `tls_errc` as a `std::error_code`.
inline std::error_code make_error_code(tls_errc e) noexcept {
  return {static_cast<int>(e), tls_category()};
}

/// The DER encoding of `certificate` (empty for null): the bytes to hash, pin or store.
inline std::vector<std::byte> certificate_der(const X509* certificate) {
  if (!certificate) return {};
  const int size = i2d_X509(certificate, nullptr);
  if (size <= 0) return {};
  std::vector<std::byte> out(static_cast<std::size_t>(size));
  auto* p = reinterpret_cast<unsigned char*>(out.data());
  i2d_X509(certificate, &p);
  return out;
}

}  // namespace devgate::websocket

/// Lets `tls_errc` values convert to `std::error_code`.
template <>
struct std::is_error_code_enum<devgate::websocket::tls_errc> : std::true_type {};
