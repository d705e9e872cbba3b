#pragma once

#include <openssl/bio.h>  // reading a PEM key from memory
#include <openssl/evp.h>  // EVP_PKEY
#include <openssl/pem.h>  // PEM_read_bio_PUBKEY

#include <nlohmann/json.hpp>  // claims

#include <chrono>         // leeway, the clock
#include <cstdint>        // algorithm
#include <map>            // the key ring
#include <memory>         // shared keys
#include <mutex>          // writers of the ring and deny-list
#include <optional>       // token lookup
#include <set>            // retired key ids
#include <shared_mutex>   // readers of the ring and deny-list
#include <stdexcept>      // set-up errors
#include <string>         // key ids, secrets
#include <string_view>    // tokens, headers
#include <unordered_set>  // the jti deny-list
#include <utility>        // std::move

#include "devgate/auth/authenticator.hpp"
#include "devgate/auth/detail/jwt.hpp"
#include "devgate/websocket/http.hpp"

namespace devgate::auth {

/// The signature algorithms a key can verify (RFC 7518 section 3.1).
enum class algorithm : std::uint8_t {
  hs256,  ///< HMAC-SHA256 with a shared secret.
  es256,  ///< ECDSA over P-256 with SHA-256, checked with the public key.
};

/// A key of the ring, bound to one algorithm: a token whose header names another one is refused,
/// so an HS256 token can never be checked with an ES256 public key taken as an HMAC secret.
class signing_key {
 public:
  /// An HS256 key: the shared secret's bytes, at least 32 (RFC 7518 3.2 asks for a key as long
  /// as the hash); shorter ones throw std::invalid_argument.
  [[nodiscard]] static signing_key hs256(std::string secret) {
    if (secret.size() < 32) {
      throw std::invalid_argument(
          "auth::signing_key::hs256: the secret must be at least 32 bytes (RFC 7518 3.2); "
          "generate one with `openssl rand -base64 48`");
    }
    signing_key k;
    k.alg_ = algorithm::hs256;
    k.secret_ = std::move(secret);
    return k;
  }
  /// An ES256 key from a PEM public key ("-----BEGIN PUBLIC KEY-----", e.g. from `openssl ec
  /// -pubout`); throws std::invalid_argument unless it is an EC key on P-256.
  [[nodiscard]] static signing_key es256_from_pem(std::string_view pem) {
    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    if (bio == nullptr) throw std::invalid_argument("auth::signing_key: out of memory");
    EVP_PKEY* raw = PEM_read_bio_PUBKEY(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    if (raw == nullptr) {
      throw std::invalid_argument(
          "auth::signing_key::es256_from_pem: not a PEM public key (-----BEGIN PUBLIC KEY-----)");
    }
    std::shared_ptr<EVP_PKEY> key(raw, EVP_PKEY_free);
    char group[64] = {};
    std::size_t len = 0;
    if (EVP_PKEY_is_a(raw, "EC") != 1 ||
        EVP_PKEY_get_group_name(raw, group, sizeof group, &len) != 1 ||
        (std::string_view(group, len) != "prime256v1" && std::string_view(group, len) != "P-256")) {
      throw std::invalid_argument(
          "auth::signing_key::es256_from_pem: ES256 needs an EC key on P-256 (prime256v1)");
    }
    signing_key k;
    k.alg_ = algorithm::es256;
    k.public_key_ = std::move(key);
    return k;
  }

  /// The one algorithm this key verifies.
  [[nodiscard]] algorithm alg() const noexcept { return alg_; }
  /// The JWS "alg" name of that algorithm.
  [[nodiscard]] std::string_view alg_name() const noexcept {
    return alg_ == algorithm::hs256 ? "HS256" : "ES256";
  }
  /// True when `signature` signs `input` under this key with its algorithm.
  [[nodiscard]] bool verify(std::string_view input, std::string_view signature) const {
    if (alg_ == algorithm::hs256) return detail::verify_hs256(secret_, input, signature);
    return detail::verify_es256(public_key_.get(), input, signature);
  }

 private:
  signing_key() = default;
  algorithm alg_ = algorithm::hs256;
  std::string secret_;
  std::shared_ptr<EVP_PKEY> public_key_;
};

/// Settings of `token_authenticator`.
struct token_options {
  /// Clock skew tolerated on `exp` and `nbf`: a device whose clock runs a little ahead or
  /// behind still connects; a larger leeway keeps an expired token usable for longer.
  std::chrono::seconds leeway{30};
  /// Required `aud` ("" checks none): set it when the same keys sign tokens for other services,
  /// so that their tokens do not open this one.
  std::string audience;
  /// Refuse tokens without `exp` (a token that never expires can only be revoked by its jti or
  /// by retiring its key).
  bool require_expiry = true;
  /// The subprotocol a browser offers beside its token in Sec-WebSocket-Protocol; the 101
  /// echoes it (RFC 6455 4.2.2), never the token.
  std::string subprotocol = "devgate.v1";
};

/// Sec-WebSocket-Protocol values that carry a token start with this (the rest is the JWT).
inline constexpr std::string_view bearer_protocol_prefix = "devgate.bearer.";

/// Authenticates devices by JSON Web Token (RFC 7519, compact JWS), signed HS256 or ES256 and
/// verified with OpenSSL. The token comes from `Authorization: Bearer <jwt>`, or, for browsers
/// (which cannot set headers on a WebSocket), from Sec-WebSocket-Protocol as the value
/// `devgate.bearer.<jwt>` offered beside `devgate.v1` (docs/PROTOCOL.md section 1).
///
/// A token is accepted when its `kid` names a key of the ring (no `kid`: the key added under
/// ""), its `alg` is that key's algorithm, its signature verifies, `exp` and `nbf` hold within
/// the leeway, `sub` is the device id of the path, `aud` matches when one is required, and its
/// `jti` is not revoked. Refusals: 401 for a missing or bad token (the reason says which check
/// failed: malformed token, unknown key, key retired, algorithm not allowed, bad signature,
/// expired, not yet valid, no expiry, wrong audience, revoked), 403 for a valid token of another
/// device (wrong subject). Keys and the deny-list change at run time from any thread.
class token_authenticator {
 public:
  /// An authenticator with no keys yet (every token is refused until `add_key`).
  explicit token_authenticator(token_options options = {}) : options_(std::move(options)) {}

  /// Adds (or replaces) the key named `kid`; tokens whose header has no `kid` use the key "".
  void add_key(std::string kid, signing_key key) {
    std::unique_lock lock(mutex_);
    retired_.erase(kid);
    keys_.insert_or_assign(std::move(kid), std::make_shared<const signing_key>(std::move(key)));
  }
  /// Retires the key `kid`: every token signed with it is refused from now on ("key retired").
  void retire_key(std::string_view kid) {
    std::unique_lock lock(mutex_);
    if (const auto it = keys_.find(kid); it != keys_.end()) keys_.erase(it);
    retired_.emplace(kid);
  }
  /// Revokes the token whose `jti` is `jti` ("revoked"); keep it listed until the token expires.
  void revoke(std::string jti) {
    std::unique_lock lock(mutex_);
    revoked_.insert(std::move(jti));
  }

  /// Judges `r` now (see the class comment).
  [[nodiscard]] result check(const request& r) const {
    std::string_view protocol_token;
    const auto token = token_of(r, protocol_token);
    if (!token) return result::reject(401, "missing token");
    result out = verify(*token, r.device_id);
    if (out.accepted() && !protocol_token.empty()) out.subprotocol = options_.subprotocol;
    if (!protocol_token.empty() && out.accepted() &&
        !offers(r, options_.subprotocol)) {  // a browser needs a protocol it offered echoed
      return result::reject(401, "offer " + options_.subprotocol + " beside the token protocol");
    }
    return out;
  }

  /// The authenticator concept: answers at once (the check is local).
  void authenticate(const request& r, completion done) const { done(check(r)); }

  /// Verifies `token` for `device_id` at the current time (see the class comment).
  [[nodiscard]] result verify(std::string_view token, std::string_view device_id) const {
    const auto jws = detail::parse_compact(token);
    if (!jws) return result::reject(401, "malformed token");
    std::shared_ptr<const signing_key> key;
    {
      std::shared_lock lock(mutex_);
      if (const auto it = keys_.find(jws->kid); it != keys_.end()) {
        key = it->second;
      } else if (retired_.contains(jws->kid)) {
        return result::reject(401, "key retired");
      }
    }
    if (!key) return result::reject(401, "unknown key");
    // The key decides the algorithm; the token's header only has to agree ("none" never does).
    if (jws->alg != key->alg_name()) return result::reject(401, "algorithm not allowed");
    if (!key->verify(jws->signing_input, jws->signature)) {
      return result::reject(401, "bad signature");
    }
    const auto claims = nlohmann::json::parse(jws->payload, nullptr, false);
    if (!claims.is_object()) return result::reject(401, "malformed token");
    const double now =
        std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    const auto leeway = static_cast<double>(options_.leeway.count());
    if (const auto exp = claims.find("exp"); exp != claims.end()) {
      if (!exp->is_number()) return result::reject(401, "malformed token");
      if (now >= exp->get<double>() + leeway) return result::reject(401, "expired");
    } else if (options_.require_expiry) {
      return result::reject(401, "no expiry");
    }
    if (const auto nbf = claims.find("nbf"); nbf != claims.end()) {
      if (!nbf->is_number()) return result::reject(401, "malformed token");
      if (now + leeway < nbf->get<double>()) return result::reject(401, "not yet valid");
    }
    if (!options_.audience.empty() && !has_audience(claims)) {
      return result::reject(401, "wrong audience");
    }
    if (const auto jti = claims.find("jti"); jti != claims.end()) {
      if (!jti->is_string()) return result::reject(401, "malformed token");
      std::shared_lock lock(mutex_);
      if (revoked_.contains(jti->get_ref<const std::string&>())) {
        return result::reject(401, "revoked");
      }
    }
    const auto sub = claims.find("sub");
    if (sub == claims.end() || !sub->is_string()) return result::reject(401, "no subject");
    if (sub->get_ref<const std::string&>() != device_id) {
      return result::reject(403, "wrong subject");
    }
    return result::accept(std::string(device_id), jws->payload);
  }

 private:
  // The token of `r`: Authorization's bearer credential first, then a Sec-WebSocket-Protocol
  // value with the bearer prefix (`protocol_token` then views it too).
  static std::optional<std::string_view> token_of(const request& r,
                                                  std::string_view& protocol_token) {
    const std::string_view authz = r.header("Authorization");
    if (authz.size() > 7 && websocket::detail_http::iequals(authz.substr(0, 7), "Bearer ")) {
      return websocket::detail_http::trim_ows(authz.substr(7));
    }
    if (r.http == nullptr) return std::nullopt;
    for (const auto& h : r.http->headers) {
      if (!websocket::detail_http::iequals(h.name, "Sec-WebSocket-Protocol")) continue;
      std::string_view list = h.value;
      while (!list.empty()) {
        const std::size_t comma = list.find(',');
        const auto item = websocket::detail_http::trim_ows(list.substr(0, comma));
        if (item.starts_with(bearer_protocol_prefix)) {
          protocol_token = item.substr(bearer_protocol_prefix.size());
          return protocol_token;
        }
        if (comma == std::string_view::npos) break;
        list.remove_prefix(comma + 1);
      }
    }
    return std::nullopt;
  }
  static bool offers(const request& r, std::string_view protocol) {
    return r.http != nullptr && r.http->header_has_token("Sec-WebSocket-Protocol", protocol);
  }
  bool has_audience(const nlohmann::json& claims) const {
    const auto aud = claims.find("aud");
    if (aud == claims.end()) return false;
    if (aud->is_string()) return aud->get_ref<const std::string&>() == options_.audience;
    if (!aud->is_array()) return false;
    for (const auto& a : *aud) {
      if (a.is_string() && a.get_ref<const std::string&>() == options_.audience) return true;
    }
    return false;
  }

  token_options options_;
  mutable std::shared_mutex mutex_;  // keys_, retired_, revoked_
  std::map<std::string, std::shared_ptr<const signing_key>, std::less<>> keys_;
  std::set<std::string, std::less<>> retired_;
  std::unordered_set<std::string> revoked_;
};

}  // namespace devgate::auth
