// libFuzzer target: token parsing and verification (include/devgate/auth/token_authenticator.hpp)
// on arbitrary bytes. Nothing may crash, read out of bounds or be accepted: the keys are made
// here at random, so no input can carry a valid signature. Each input also goes through the
// base64url decoder alone, which must agree with its own re-encoding.
//
// Input layout: the whole input is the token; the key ring holds an HS256 key under "" and an
// ES256 key under "es", so inputs reach both verifiers and the claims checks behind them.
#include <openssl/ec.h>    // a fresh P-256 key
#include <openssl/evp.h>   // EVP_PKEY
#include <openssl/pem.h>   // its public PEM
#include <openssl/rand.h>  // a fresh HS256 secret

#include <cstddef>      // std::size_t
#include <cstdint>      // fuzzer entry point
#include <cstdlib>      // std::abort
#include <memory>       // the authenticator
#include <string>       // keys
#include <string_view>  // the token

#include "devgate/auth/detail/jwt.hpp"
#include "devgate/auth/token_authenticator.hpp"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

std::string public_pem_of_fresh_key() {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  check(key != nullptr);
  BIO* bio = BIO_new(BIO_s_mem());
  check(PEM_write_bio_PUBKEY(bio, key) == 1);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<std::size_t>(n));
  BIO_free(bio);
  EVP_PKEY_free(key);
  return pem;
}

const devgate::auth::token_authenticator& ring() {
  static const auto tokens = [] {
    auto t = std::make_unique<devgate::auth::token_authenticator>();
    std::string secret(32, '\0');
    check(RAND_bytes(reinterpret_cast<unsigned char*>(secret.data()), 32) == 1);
    t->add_key("", devgate::auth::signing_key::hs256(secret));
    t->add_key("es", devgate::auth::signing_key::es256_from_pem(public_pem_of_fresh_key()));
    t->revoke("r");
    return t;
  }();
  return *tokens;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view token(reinterpret_cast<const char*>(data), size);
  const auto verdict = ring().verify(token, "pump-7");
  check(!verdict.accepted());
  check(verdict.status == 401 || verdict.status == 403);
  check(!verdict.reason.empty());
  // The reason never repeats the token (short inputs may be words of a fixed reason).
  check(token.size() < 16 || verdict.reason.find(token) == std::string::npos);
  if (const auto jws = devgate::auth::detail::parse_compact(token)) {
    check(jws->header.is_object());
    check(jws->signing_input.size() < token.size());
  }
  if (const auto bytes = devgate::auth::detail::base64url_decode(token)) {
    check(bytes->size() <= token.size());
  }
  return 0;
}
