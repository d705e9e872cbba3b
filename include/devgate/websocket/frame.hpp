#pragma once

#include <algorithm>    // std::min
#include <array>        // mask keys, header buffers
#include <cstddef>      // std::byte, std::size_t
#include <cstdint>      // lengths, codes
#include <cstring>      // std::memcpy
#include <span>         // payloads
#include <string_view>  // close reasons
#include <vector>       // client frames, close payloads

#include "devgate/core/bytes.hpp"
#include "devgate/detail/utf8_prefix.hpp"   // close reasons cut on a character boundary
#include "devgate/transport/transport.hpp"  // close_code

namespace devgate::websocket {

/// RFC 6455 5.2 / 11.8: frame opcodes. Other values (0x3-0x7, 0xB-0xF) are reserved and may
/// appear in a decoded `frame_header`; `is_known_opcode` tells them apart.
enum class opcode : std::uint8_t {
  continuation = 0x0,  ///< A later fragment of a text or binary message.
  text = 0x1,          ///< UTF-8 text message (first or only fragment).
  binary = 0x2,        ///< Binary message (first or only fragment).
  close = 0x8,         ///< Close control frame (5.5.1).
  ping = 0x9,          ///< Ping control frame (5.5.2).
  pong = 0xA,          ///< Pong control frame (5.5.3).
};

/// Largest frame header: 2 bytes + 8-byte extended length + 4-byte mask key (RFC 6455 5.2).
inline constexpr std::size_t max_frame_header_size = 14;
/// Largest control frame payload (RFC 6455 5.5).
inline constexpr std::size_t max_control_payload = 125;

/// True for opcodes RFC 6455 defines (everything else is reserved: 5.2, fail with 1002).
[[nodiscard]] constexpr bool is_known_opcode(opcode op) noexcept {
  const auto v = static_cast<std::uint8_t>(op);
  return v <= 0x2 || (v >= 0x8 && v <= 0xA);
}

/// True for control opcodes (RFC 6455 5.5: the most significant opcode bit is set).
[[nodiscard]] constexpr bool is_control(opcode op) noexcept {
  return (static_cast<std::uint8_t>(op) & 0x8) != 0;
}

/// A decoded frame header, exactly as it arrived (not yet checked against the protocol rules).
struct frame_header {
  bool fin = false;                     ///< Final fragment of its message.
  std::uint8_t rsv = 0;                 ///< RSV1..RSV3 as bits 2..0 (must be 0 without extensions).
  opcode op = opcode::continuation;     ///< Opcode (may be a reserved value).
  bool masked = false;                  ///< Mask bit (set on every client-to-server frame).
  std::uint64_t payload_length = 0;     ///< Payload length (64-bit form may have its top bit set).
  std::array<std::byte, 4> mask_key{};  ///< Masking key (zero when not masked).
};

//  RFC 6455 5.2 Base Framing Protocol
//
//   0                   1                   2                   3
//   0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//  +-+-+-+-+-------+-+-------------+-------------------------------+
//  |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//  |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//  |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//  | |1|2|3|       |K|             |                               |
//  +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//  |     Extended payload length continued, if payload len == 127  |
//  + - - - - - - - - - - - - - - - +-------------------------------+
//  |                               |Masking-key, if MASK set to 1  |
//  +-------------------------------+-------------------------------+
//  | Masking-key (continued)       |          Payload Data         |
//  +-------------------------------- - - - - - - - - - - - - - - - +
//  :                     Payload Data continued ...                :
//  + - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - +
//  |                     Payload Data continued ...                |
//  +---------------------------------------------------------------+

/// Decodes the frame header at the start of `in` into `out`. Returns the header's size (2 to
/// 14 bytes), or 0 when `in` holds only part of it (never more than 14 bytes are needed).
/// Non-minimal length encodings are accepted (the minimal-length rule binds senders).
[[nodiscard]] inline std::size_t decode_frame_header(std::span<const std::byte> in,
                                                     frame_header& out) noexcept {
  if (in.size() < 2) return 0;
  const auto b0 = static_cast<std::uint8_t>(in[0]);
  const auto b1 = static_cast<std::uint8_t>(in[1]);
  const std::uint8_t len7 = b1 & 0x7F;
  const std::size_t ext = len7 == 126 ? 2 : (len7 == 127 ? 8 : 0);
  const bool masked = (b1 & 0x80) != 0;
  const std::size_t size = 2 + ext + (masked ? 4 : 0);
  if (in.size() < size) return 0;
  out.fin = (b0 & 0x80) != 0;
  out.rsv = static_cast<std::uint8_t>((b0 >> 4) & 0x7);
  out.op = static_cast<opcode>(b0 & 0x0F);
  out.masked = masked;
  std::uint64_t len = len7;
  if (ext != 0) {
    len = 0;  // network byte order (RFC 6455 5.2)
    for (std::size_t i = 0; i < ext; ++i) len = (len << 8) | static_cast<std::uint8_t>(in[2 + i]);
  }
  out.payload_length = len;
  out.mask_key = {};
  if (masked) std::memcpy(out.mask_key.data(), in.data() + 2 + ext, 4);
  return size;
}

/// Writes an unmasked server frame header into `out` (2, 4 or 10 bytes, RFC 6455 5.2: the
/// shortest length form) and returns its length.
inline std::size_t encode_frame_header(std::span<std::byte, 10> out, opcode op, bool fin,
                                       std::uint64_t payload_length) noexcept {
  out[0] = static_cast<std::byte>((fin ? 0x80 : 0x00) | static_cast<std::uint8_t>(op));
  if (payload_length <= 125) {
    out[1] = static_cast<std::byte>(payload_length);
    return 2;
  }
  if (payload_length <= 0xFFFF) {
    out[1] = std::byte{126};
    out[2] = static_cast<std::byte>(payload_length >> 8);
    out[3] = static_cast<std::byte>(payload_length);
    return 4;
  }
  out[1] = std::byte{127};
  for (std::size_t i = 0; i < 8; ++i) {
    out[2 + i] = static_cast<std::byte>(payload_length >> (56 - 8 * i));
  }
  return 10;
}

/// One buffer holding header + payload of an unmasked, final server frame: a broadcast encodes
/// once and every session writes the same shared buffer.
[[nodiscard]] inline shared_bytes encode_frame(opcode op, std::span<const std::byte> payload) {
  std::array<std::byte, 10> header;
  const std::size_t n = encode_frame_header(header, op, true, payload.size());
  return shared_bytes::build(n + payload.size(), [&](std::span<std::byte> out) {
    std::memcpy(out.data(), header.data(), n);
    if (!payload.empty()) std::memcpy(out.data() + n, payload.data(), payload.size());
  });
}

/// RFC 6455 5.3: XOR-masks `data` in place with `key`, where `offset` is the position of
/// data[0] within the frame payload (so a payload split across reads unmasks correctly).
/// Works a 64-bit word at a time; the compiler vectorises the word loop.
inline void apply_mask(std::span<std::byte> data, std::array<std::byte, 4> key,
                       std::size_t offset) noexcept {
  // Rotate the key so that rotated[0] applies to data[0].
  std::array<std::uint8_t, 8> k8;
  for (std::size_t i = 0; i < 8; ++i) k8[i] = static_cast<std::uint8_t>(key[(offset + i) & 3]);
  std::uint64_t k64;
  std::memcpy(&k64, k8.data(), 8);
  std::byte* p = data.data();
  std::size_t n = data.size();
  while (n >= 32) {
    std::uint64_t w[4];
    std::memcpy(w, p, 32);
    w[0] ^= k64;
    w[1] ^= k64;
    w[2] ^= k64;
    w[3] ^= k64;
    std::memcpy(p, w, 32);
    p += 32;
    n -= 32;
  }
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= k64;
    std::memcpy(p, &w, 8);
    p += 8;
    n -= 8;
  }
  for (std::size_t i = 0; i < n; ++i) p[i] ^= static_cast<std::byte>(k8[i]);
}

/// A masked client frame (RFC 6455 5.3): for tests, fuzz seeds and C++ device clients.
/// `rsv` sets RSV1..RSV3 (bits 2..0) for tests of the rule that they must be 0.
[[nodiscard]] inline std::vector<std::byte> encode_client_frame(opcode op, bool fin,
                                                                std::span<const std::byte> payload,
                                                                std::array<std::byte, 4> key,
                                                                std::uint8_t rsv = 0) {
  std::array<std::byte, 10> header;
  const std::size_t n = encode_frame_header(header, op, fin, payload.size());
  header[0] |= static_cast<std::byte>((rsv & 0x7) << 4);
  header[1] |= std::byte{0x80};  // MASK
  std::vector<std::byte> out(n + 4 + payload.size());
  std::memcpy(out.data(), header.data(), n);
  std::memcpy(out.data() + n, key.data(), 4);
  if (!payload.empty()) std::memcpy(out.data() + n + 4, payload.data(), payload.size());
  apply_mask(std::span<std::byte>(out).subspan(n + 4), key, 0);
  return out;
}

/// RFC 6455 7.4: may this status code appear in a close frame received from a peer?
/// 1000-1003 and 1007-1011 (7.4.1), 1012-1014 (IANA registry, 7.4.2: devgate itself sends
/// 1013), and 3000-4999 (libraries/applications). 1004, 1005, 1006 and 1015 never go on the wire.
[[nodiscard]] constexpr bool is_valid_close_code(std::uint16_t code) noexcept {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
         (code >= 3000 && code <= 4999);
}

/// Close frame payload (RFC 6455 5.5.1): the 2-byte status code in network order, then the
/// reason, truncated to fit 125 bytes without splitting a UTF-8 sequence.
[[nodiscard]] inline std::vector<std::byte> encode_close_payload(close_code code,
                                                                 std::string_view reason) {
  reason = devgate::detail::utf8_prefix(reason, max_control_payload - 2);
  // At most 123 bytes; the min says so where GCC 12 at -O3 cannot see it through the inlined
  // prefix (it warned of a memcpy bound of SIZE_MAX, -Wstringop-overflow).
  const std::size_t n = std::min(reason.size(), max_control_payload - 2);
  const auto v = static_cast<std::uint16_t>(code);
  std::vector<std::byte> out(2 + n);
  out[0] = static_cast<std::byte>(v >> 8);
  out[1] = static_cast<std::byte>(v & 0xFF);
  if (n != 0) std::memcpy(out.data() + 2, reason.data(), n);
  return out;
}

}  // namespace devgate::websocket
