#include "devgate/detail/crypto.hpp"

#include <catch2/catch.hpp>

#include <string>

using namespace devgate::detail;

TEST_CASE("SHA-1 and base64 give the RFC 6455 section 1.3 accept key", "[core][crypto]") {
  const auto digest = sha1("dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
  REQUIRE(base64_encode(digest) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

TEST_CASE("SHA-256 one-shot and incremental agree with the FIPS 180-2 vector", "[core][crypto]") {
  const std::string abc = "abc";
  const auto bytes = std::as_bytes(std::span<const char>(abc.data(), abc.size()));
  const auto expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
  REQUIRE(hex_encode(sha256(bytes)) == expected);

  sha256_hasher hasher;
  hasher.update(bytes.first(1));
  hasher.update(bytes.subspan(1));
  REQUIRE(hex_encode(hasher.finish()) == expected);
}

TEST_CASE("base64 pads short inputs", "[core][crypto]") {
  const std::uint8_t one[] = {'f'};
  const std::uint8_t two[] = {'f', 'o'};
  REQUIRE(base64_encode(one) == "Zg==");
  REQUIRE(base64_encode(two) == "Zm8=");
  REQUIRE(base64_encode(std::span<const std::uint8_t>{}).empty());
}
