#pragma once

#include <cstddef>      // std::size_t
#include <string_view>  // text

namespace devgate::detail {

/// The longest prefix of `text` of at most `max` bytes that does not end inside a UTF-8
/// character: a cut that falls on a continuation byte (10xxxxxx) backs off to the start of its
/// character, so valid UTF-8 stays valid.
[[nodiscard]] constexpr std::string_view utf8_prefix(std::string_view text,
                                                     std::size_t max) noexcept {
  if (text.size() <= max) return text;
  std::size_t cut = max;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0u) == 0x80u) --cut;
  return text.substr(0, cut);
}

}  // namespace devgate::detail
