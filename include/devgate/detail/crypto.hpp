#pragma once

#include <openssl/evp.h>  // EVP digests and base64

#include <array>        // digests
#include <cstddef>      // std::byte
#include <cstdint>      // std::uint8_t
#include <optional>     // base64_decode result
#include <span>         // inputs
#include <string>       // encoded output
#include <string_view>  // inputs
#include <vector>       // decoded output

namespace devgate::detail {

/// A SHA-1 digest (20 bytes).
using sha1_digest = std::array<std::uint8_t, 20>;
/// A SHA-256 digest (32 bytes).
using sha256_digest = std::array<std::uint8_t, 32>;

/// Incremental SHA-256 over OpenSSL's EVP interface (for large images fed in pieces).
class sha256_hasher {
 public:
  /// Starts a new digest.
  sha256_hasher() : ctx_(EVP_MD_CTX_new()) { EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr); }
  sha256_hasher(const sha256_hasher&) = delete;
  sha256_hasher& operator=(const sha256_hasher&) = delete;
  ~sha256_hasher() { EVP_MD_CTX_free(ctx_); }
  /// Feeds more bytes.
  void update(std::span<const std::byte> data) { EVP_DigestUpdate(ctx_, data.data(), data.size()); }
  /// Finishes and returns the digest; the hasher must not be fed afterwards.
  sha256_digest finish() {
    sha256_digest out{};
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx_, out.data(), &len);
    return out;
  }

 private:
  EVP_MD_CTX* ctx_;
};

/// SHA-1 of `data` (RFC 6455 section 4.2.2 uses it for Sec-WebSocket-Accept).
inline sha1_digest sha1(std::string_view data) {
  sha1_digest out{};
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha1(), nullptr);
  return out;
}

/// SHA-256 of `data`.
inline sha256_digest sha256(std::span<const std::byte> data) {
  sha256_digest out{};
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out.data(), &len, EVP_sha256(), nullptr);
  return out;
}

/// Standard base64 (with padding) of `data`.
inline std::string base64_encode(std::span<const std::uint8_t> data) {
  std::string out(4 * ((data.size() + 2) / 3), '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), data.data(),
                                static_cast<int>(data.size()));
  out.resize(static_cast<std::size_t>(n));
  return out;
}

/// Strict standard base64 decode (padding required, no whitespace); nullopt if `text` is not
/// canonical-alphabet base64. Used to check that a Sec-WebSocket-Key is 16 bytes (RFC 6455 4.2.1).
inline std::optional<std::vector<std::uint8_t>> base64_decode(std::string_view text) {
  if (text.size() % 4 != 0) return std::nullopt;
  std::size_t pad = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    const bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                       c == '+' || c == '/';
    // '=' only as the last one or two characters; EVP_DecodeBlock would skip whitespace, so
    // anything outside the alphabet is rejected here first.
    if (c == '=' && i + 2 >= text.size() &&
        (pad > 0 || i + 1 == text.size() || text[i + 1] == '=')) {
      ++pad;
    } else if (!alpha || pad > 0) {
      return std::nullopt;
    }
  }
  std::vector<std::uint8_t> out(text.size() / 4 * 3);
  if (text.empty()) return out;
  const int n = EVP_DecodeBlock(out.data(), reinterpret_cast<const unsigned char*>(text.data()),
                                static_cast<int>(text.size()));
  if (n < 0) return std::nullopt;
  // EVP_DecodeBlock counts the padding as zero bytes.
  out.resize(static_cast<std::size_t>(n) - pad);
  return out;
}

/// Lower-case hexadecimal of `data`.
inline std::string hex_encode(std::span<const std::uint8_t> data) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(data.size() * 2);
  for (const std::uint8_t b : data) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 0xF]);
  }
  return out;
}

}  // namespace devgate::detail
