#pragma once

#include <openssl/bn.h>      // r and s of an ECDSA signature
#include <openssl/crypto.h>  // CRYPTO_memcmp
#include <openssl/ec.h>      // ECDSA_SIG (raw r||s to DER)
#include <openssl/evp.h>     // EVP_DigestVerify
#include <openssl/hmac.h>    // HMAC-SHA256

#include <nlohmann/json.hpp>  // header and claims

#include <cstddef>      // std::size_t
#include <cstdint>      // bytes
#include <memory>       // key ownership
#include <optional>     // parse results
#include <string>       // decoded parts
#include <string_view>  // the token
#include <vector>       // signature bytes

#include "devgate/detail/crypto.hpp"

namespace devgate::auth::detail {

/// RFC 7515 section 2 / RFC 4648 section 5: base64url without padding, strictly (no '=', no
/// whitespace, no standard-alphabet characters, no length that leaves 6 spare bits). Decoding is
/// OpenSSL's, after mapping to the standard alphabet.
inline std::optional<std::string> base64url_decode(std::string_view text) {
  if (text.size() % 4 == 1) return std::nullopt;
  std::string standard;
  standard.reserve(text.size() + 3);
  for (const char c : text) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')) {
      standard.push_back(c);
    } else if (c == '-') {
      standard.push_back('+');
    } else if (c == '_') {
      standard.push_back('/');
    } else {
      return std::nullopt;
    }
  }
  while (standard.size() % 4 != 0) standard.push_back('=');
  auto bytes = devgate::detail::base64_decode(standard);
  if (!bytes) return std::nullopt;
  return std::string(bytes->begin(), bytes->end());
}

/// A JWS in compact serialization (RFC 7515 section 7.1), split and decoded; the payload is kept
/// as bytes and parsed only after the signature is verified.
struct compact_jws {
  std::string_view signing_input;  ///< "header.payload" as sent: what the signature covers.
  nlohmann::json header;           ///< The JOSE header (an object).
  std::string payload;             ///< The decoded payload bytes.
  std::string signature;           ///< The decoded signature bytes.
  std::string alg;                 ///< The header's "alg".
  std::string kid;                 ///< The header's "kid" ("" without one).
};

/// Splits and decodes `token` (three base64url parts joined by '.'); nullopt when it is not a
/// compact JWS whose header is a JSON object with a string "alg", an optional string "kid" and
/// no "crit" (RFC 7515 4.1.11: extensions a verifier does not know must be refused).
inline std::optional<compact_jws> parse_compact(std::string_view token) {
  const std::size_t first = token.find('.');
  if (first == std::string_view::npos) return std::nullopt;
  const std::size_t second = token.find('.', first + 1);
  if (second == std::string_view::npos) return std::nullopt;
  if (token.find('.', second + 1) != std::string_view::npos) return std::nullopt;
  compact_jws out;
  out.signing_input = token.substr(0, second);
  auto header = base64url_decode(token.substr(0, first));
  auto payload = base64url_decode(token.substr(first + 1, second - first - 1));
  auto signature = base64url_decode(token.substr(second + 1));
  if (!header || !payload || !signature) return std::nullopt;
  out.header = nlohmann::json::parse(*header, nullptr, false);
  if (!out.header.is_object()) return std::nullopt;
  const auto alg = out.header.find("alg");
  if (alg == out.header.end() || !alg->is_string()) return std::nullopt;
  out.alg = alg->get<std::string>();
  if (const auto kid = out.header.find("kid"); kid != out.header.end()) {
    if (!kid->is_string()) return std::nullopt;
    out.kid = kid->get<std::string>();
  }
  if (out.header.contains("crit")) return std::nullopt;
  out.payload = std::move(*payload);
  out.signature = std::move(*signature);
  return out;
}

/// HS256 (RFC 7518 3.2): HMAC-SHA256 of `input` under `secret` equals `signature`, compared in
/// constant time.
inline bool verify_hs256(std::string_view secret, std::string_view input,
                         std::string_view signature) {
  if (signature.size() != 32) return false;
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
           reinterpret_cast<const unsigned char*>(input.data()), input.size(), mac,
           &len) == nullptr ||
      len != 32) {
    return false;
  }
  return CRYPTO_memcmp(mac, signature.data(), 32) == 0;
}

/// ES256 (RFC 7518 3.4): `signature` is R || S, 32 bytes each, big-endian; converted to the DER
/// ECDSA-Sig-Value OpenSSL verifies, then checked over SHA-256 of `input` with `key` (P-256).
inline bool verify_es256(EVP_PKEY* key, std::string_view input, std::string_view signature) {
  if (signature.size() != 64) return false;
  const auto* raw = reinterpret_cast<const unsigned char*>(signature.data());
  ECDSA_SIG* sig = ECDSA_SIG_new();
  if (sig == nullptr) return false;
  BIGNUM* r = BN_bin2bn(raw, 32, nullptr);
  BIGNUM* s = BN_bin2bn(raw + 32, 32, nullptr);
  if (r == nullptr || s == nullptr || ECDSA_SIG_set0(sig, r, s) != 1) {
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(sig);
    return false;
  }
  unsigned char* der = nullptr;
  const int der_len = i2d_ECDSA_SIG(sig, &der);
  ECDSA_SIG_free(sig);
  if (der_len <= 0) return false;
  bool ok = false;
  if (EVP_MD_CTX* ctx = EVP_MD_CTX_new()) {
    ok = EVP_DigestVerifyInit(ctx, nullptr, EVP_sha256(), nullptr, key) == 1 &&
         EVP_DigestVerify(ctx, der, static_cast<std::size_t>(der_len),
                          reinterpret_cast<const unsigned char*>(input.data()), input.size()) == 1;
    EVP_MD_CTX_free(ctx);
  }
  OPENSSL_free(der);
  return ok;
}

}  // namespace devgate::auth::detail
