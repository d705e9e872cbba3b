#pragma once

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <cstdint>    // rollout ids
#include <cstring>    // std::memcpy
#include <span>       // image bytes
#include <stdexcept>  // set-up errors
#include <string>     // versions
#include <utility>    // std::move
#include <vector>     // bytes()

#include "devgate/core/bytes.hpp"
#include "devgate/detail/crypto.hpp"
#include "devgate/device/protocol.hpp"  // the chunk header's wire layout

namespace devgate::firmware {

/// A firmware image held once in memory, already cut into wire chunks: one buffer holds every
/// chunk's 16-byte header followed by its data, so sending a chunk to any number of devices is
/// a `slice` of that buffer (no copy per device, no header built per send).
class image {
 public:
  /// Throws std::invalid_argument for bytes no image can hold: empty, or over
  /// `device::max_firmware_size` (4 GiB - 1).
  static void check(std::span<const std::byte> bytes) {
    if (bytes.empty()) throw std::invalid_argument("firmware image: the image is empty");
    if (bytes.size() > device::max_firmware_size) {
      throw std::invalid_argument("firmware image: images over 4 GiB cannot be addressed");
    }
  }
  /// Cuts `bytes` (copied once) into chunks of `chunk_size` for rollout `rollout`.
  /// Throws std::invalid_argument for an empty image, chunk_size 0 or an image over
  /// `device::max_firmware_size` (4 GiB - 1).
  image(std::uint32_t rollout, std::string version, std::span<const std::byte> bytes,
        std::size_t chunk_size)
      : rollout_(rollout), version_(std::move(version)), size_(bytes.size()), chunk_(chunk_size) {
    check(bytes);
    if (chunk_size == 0) throw std::invalid_argument("firmware image: chunk_size must be > 0");
    sha256_ = detail::hex_encode(detail::sha256(bytes));
    chunks_ = (size_ + chunk_ - 1) / chunk_;
    const std::size_t total = size_ + chunks_ * device::chunk_header_size;
    framed_ = shared_bytes::build(total, [&](std::span<std::byte> out) {
      std::byte* p = out.data();
      for (std::size_t i = 0; i < chunks_; ++i) {
        const std::size_t off = i * chunk_;
        const std::size_t len = std::min(chunk_, size_ - off);
        device::chunk_header h;
        h.rollout = rollout_;
        h.offset = static_cast<std::uint32_t>(off);
        h.length = static_cast<std::uint32_t>(len);
        h.last = i + 1 == chunks_;
        device::encode_chunk_header(std::span<std::byte, device::chunk_header_size>(p, 16), h);
        std::memcpy(p + device::chunk_header_size, bytes.data() + off, len);
        p += device::chunk_header_size + len;
      }
    });
  }

  /// The rollout this image belongs to.
  [[nodiscard]] std::uint32_t rollout() const noexcept { return rollout_; }
  /// The version string devices report once they run it.
  [[nodiscard]] const std::string& version() const noexcept { return version_; }
  /// Image size in bytes (without chunk headers).
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// Lower-case hex SHA-256 of the image.
  [[nodiscard]] const std::string& sha256() const noexcept { return sha256_; }
  /// Data bytes per chunk (the last chunk may be shorter).
  [[nodiscard]] std::size_t chunk_size() const noexcept { return chunk_; }
  /// Number of chunks.
  [[nodiscard]] std::size_t chunk_count() const noexcept { return chunks_; }
  /// The chunk starting at image offset `offset` (a multiple of chunk_size), header included,
  /// as a slice of the one buffer.
  [[nodiscard]] shared_bytes chunk_at(std::size_t offset) const noexcept {
    const std::size_t i = offset / chunk_;
    const std::size_t len = std::min(chunk_, size_ - i * chunk_);
    return framed_.slice(i * (chunk_ + device::chunk_header_size), device::chunk_header_size + len);
  }
  /// The image's bytes, without the chunk headers (a copy: for a store that keeps it).
  [[nodiscard]] std::vector<std::byte> bytes() const {
    std::vector<std::byte> out(size_);
    const auto* framed = framed_.data();
    for (std::size_t i = 0; i < chunks_; ++i) {
      const std::size_t off = i * chunk_;
      const std::size_t len = std::min(chunk_, size_ - off);
      std::memcpy(out.data() + off,
                  framed + i * (chunk_ + device::chunk_header_size) + device::chunk_header_size,
                  len);
    }
    return out;
  }
  /// Bytes held for this image (data plus chunk headers), whatever the fleet size.
  [[nodiscard]] std::size_t memory_bytes() const noexcept { return framed_.size(); }
  /// How many holders share the buffer (the image plus chunks in flight; for tests).
  [[nodiscard]] long buffer_use_count() const noexcept { return framed_.use_count(); }

 private:
  std::uint32_t rollout_;
  std::string version_;
  std::size_t size_;
  std::size_t chunk_;
  std::size_t chunks_ = 0;
  std::string sha256_;
  shared_bytes framed_;
};

}  // namespace devgate::firmware
