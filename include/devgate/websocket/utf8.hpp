#pragma once

#include <cstddef>  // std::byte
#include <cstdint>  // validator state, ASCII words
#include <cstring>  // std::memcpy (unaligned word loads)
#include <span>     // input bytes

namespace devgate::websocket {

/// Incremental UTF-8 validator (RFC 3629 section 4) for text messages that arrive in pieces:
/// rejects overlong forms, surrogates (U+D800..U+DFFF) and code points above U+10FFFF as soon
/// as the offending byte arrives, so a bad text frame fails before the rest is received
/// (RFC 6455 8.1). Four bytes of state; runs of ASCII are checked 8 bytes at a time.
class utf8_validator {
 public:
  /// Feeds the next bytes. Returns false once the input so far cannot start any valid UTF-8
  /// text (and from then on until `reset()`).
  bool feed(std::span<const std::byte> data) noexcept {
    if (failed_) return false;
    const auto* p = reinterpret_cast<const unsigned char*>(data.data());
    const auto* const end = p + data.size();
    std::uint8_t need = need_, lo = lo_, hi = hi_;
    while (p != end) {
      if (need == 0) {
        // Fast path: whole words of ASCII (no byte with the top bit set).
        while (end - p >= 16) {
          std::uint64_t a, b;
          std::memcpy(&a, p, 8);
          std::memcpy(&b, p + 8, 8);
          if ((a | b) & 0x8080808080808080u) break;
          p += 16;
        }
        if (end - p >= 8) {
          std::uint64_t a;
          std::memcpy(&a, p, 8);
          if ((a & 0x8080808080808080u) == 0) {
            p += 8;
            continue;
          }
        }
        if (p == end) break;
        const unsigned char c = *p++;
        if (c < 0x80) continue;
        // RFC 3629 section 4 (UTF8-2, UTF8-3, UTF8-4): the lead byte fixes how many continuation
        // bytes follow and narrows the range of the first one, which is what excludes overlongs
        // (E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and > U+10FFFF (F4 90..BF, F5..FF).
        lo = 0x80;
        hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
          need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
          need = 2;
          if (c == 0xE0) lo = 0xA0;
          if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
          need = 3;
          if (c == 0xF0) lo = 0x90;
          if (c == 0xF4) hi = 0x8F;
        } else {
          return fail();  // C0, C1 (overlong 2-byte), F5..FF, or a stray continuation byte
        }
        if (end - p >= need) {
          // The whole sequence is here: check it in one go rather than byte by byte.
          if (p[0] < lo || p[0] > hi) return fail();
          for (std::uint8_t i = 1; i < need; ++i) {
            if ((p[i] & 0xC0) != 0x80) return fail();
          }
          p += need;
          need = 0;
          lo = 0x80;
          hi = 0xBF;
        }
      } else {
        const unsigned char c = *p++;
        if (c < lo || c > hi) return fail();
        --need;
        lo = 0x80;
        hi = 0xBF;
      }
    }
    need_ = need;
    lo_ = lo;
    hi_ = hi;
    return true;
  }

  /// True when the input so far is valid and does not end inside a multi-byte sequence.
  [[nodiscard]] bool complete() const noexcept { return !failed_ && need_ == 0; }

  /// Forgets everything fed so far (next message).
  void reset() noexcept { *this = utf8_validator{}; }

 private:
  bool fail() noexcept {
    failed_ = true;
    return false;
  }

  std::uint8_t need_ = 0;   // continuation bytes still expected
  std::uint8_t lo_ = 0x80;  // allowed range of the next continuation byte
  std::uint8_t hi_ = 0xBF;
  bool failed_ = false;
};

/// True when `data` is complete, valid UTF-8 (RFC 3629).
[[nodiscard]] inline bool is_valid_utf8(std::span<const std::byte> data) noexcept {
  utf8_validator v;
  return v.feed(data) && v.complete();
}

}  // namespace devgate::websocket
