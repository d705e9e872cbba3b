#pragma once

#include <algorithm>      // std::find, std::min
#include <cstddef>        // std::size_t
#include <cstdint>        // rollout ids, offsets
#include <cstring>        // std::memcpy
#include <deque>          // waiting devices
#include <memory>         // images are shared
#include <mutex>          // slots
#include <optional>       // next device
#include <span>           // image bytes
#include <stdexcept>      // set-up errors
#include <string>         // versions, device ids
#include <unordered_set>  // active devices
#include <vector>         // started devices

#include "devgate/core/bytes.hpp"
#include "devgate/detail/crypto.hpp"
#include "devgate/device/protocol.hpp"

namespace devgate::firmware {

/// A firmware image held once in memory, already cut into wire chunks: one buffer holds every
/// chunk's 16-byte header followed by its data, so sending a chunk to any number of devices is
/// a `slice` of that buffer (no copy per device, no header built per send).
class image {
 public:
  /// Cuts `bytes` (copied once) into chunks of `chunk_size` for rollout `rollout`.
  /// Throws std::invalid_argument for an empty image, chunk_size 0 or an image over
  /// `device::max_firmware_size` (4 GiB - 1).
  image(std::uint32_t rollout, std::string version, std::span<const std::byte> bytes,
        std::size_t chunk_size)
      : rollout_(rollout), version_(std::move(version)), size_(bytes.size()), chunk_(chunk_size) {
    if (bytes.empty()) throw std::invalid_argument("firmware image: the image is empty");
    if (chunk_size == 0) throw std::invalid_argument("firmware image: chunk_size must be > 0");
    if (bytes.size() > device::max_firmware_size) {
      throw std::invalid_argument("firmware image: images over 4 GiB cannot be addressed");
    }
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

/// At most N devices transferring at once; the rest wait in arrival order. Thread-safe; the
/// peak is kept so tests and operators can check the limit held.
class transfer_slots {
 public:
  /// A limit of `max_active` transfers (at least 1).
  explicit transfer_slots(std::size_t max_active) : max_(max_active == 0 ? 1 : max_active) {}

  /// Takes a slot for `device` (true: start now) or queues it (false). A device already
  /// active or queued keeps its place (returns whether it is active).
  bool acquire(const std::string& device) {
    std::lock_guard lock(mutex_);
    if (active_.count(device) != 0) return true;
    if (std::find(waiting_.begin(), waiting_.end(), device) != waiting_.end()) return false;
    if (active_.size() < max_) {
      active_.insert(device);
      peak_ = std::max(peak_, active_.size());
      return true;
    }
    waiting_.push_back(device);
    return false;
  }
  /// Frees `device`'s slot (or takes it off the queue) and hands the slot to the next waiting
  /// device, which is returned (the caller starts it). Nothing if no slot was freed.
  std::optional<std::string> release(const std::string& device) {
    std::lock_guard lock(mutex_);
    if (active_.erase(device) == 0) {
      if (auto it = std::find(waiting_.begin(), waiting_.end(), device); it != waiting_.end()) {
        waiting_.erase(it);
      }
      return std::nullopt;
    }
    if (waiting_.empty()) return std::nullopt;
    std::string next = std::move(waiting_.front());
    waiting_.pop_front();
    active_.insert(next);
    peak_ = std::max(peak_, active_.size());
    return next;
  }
  /// Forgets everything (a new rollout); the peak is kept.
  void clear() {
    std::lock_guard lock(mutex_);
    active_.clear();
    waiting_.clear();
  }
  /// Transfers running now.
  [[nodiscard]] std::size_t active() const {
    std::lock_guard lock(mutex_);
    return active_.size();
  }
  /// Devices waiting for a slot.
  [[nodiscard]] std::size_t waiting() const {
    std::lock_guard lock(mutex_);
    return waiting_.size();
  }
  /// The most transfers ever running at once.
  [[nodiscard]] std::size_t peak() const {
    std::lock_guard lock(mutex_);
    return peak_;
  }
  /// The limit.
  [[nodiscard]] std::size_t limit() const noexcept { return max_; }

 private:
  const std::size_t max_;
  mutable std::mutex mutex_;
  std::unordered_set<std::string> active_;
  std::deque<std::string> waiting_;
  std::size_t peak_ = 0;
};

/// Fleet totals of a rollout.
struct rollout_totals {
  std::uint32_t rollout = 0;          ///< Current rollout id (0: none published).
  std::string version;                ///< Its version.
  std::size_t size = 0;               ///< Image bytes.
  std::size_t pending = 0;            ///< Devices waiting (connected or not).
  std::size_t transferring = 0;       ///< Devices receiving chunks now.
  std::size_t verified = 0;           ///< Devices that confirmed the SHA-256.
  std::size_t failed = 0;             ///< Devices that reported a failure.
  std::size_t skipped = 0;            ///< Devices already on the version.
  std::uint64_t bytes_acked = 0;      ///< Sum of acknowledged bytes over the fleet.
  std::size_t peak_transferring = 0;  ///< Most devices ever transferring at once.
};

}  // namespace devgate::firmware
