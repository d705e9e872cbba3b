#pragma once

#include <cstddef>      // std::byte, std::size_t
#include <cstring>      // std::memcpy
#include <memory>       // std::shared_ptr, std::make_shared_for_overwrite
#include <span>         // views
#include <string_view>  // text views
#include <utility>      // std::move, std::exchange

namespace devgate {

/// Immutable, reference-counted bytes: stages and recipients share one buffer, never copy it.
///
/// Copying a `shared_bytes` copies a pointer and bumps a reference count. `slice` returns a view
/// of part of the buffer that keeps the whole buffer alive, so a firmware image can be sent in
/// chunks that all point into the one image held in memory.
class shared_bytes {
 public:
  /// An empty buffer (no allocation).
  shared_bytes() noexcept = default;
  /// Shares `other`'s buffer.
  shared_bytes(const shared_bytes& other) noexcept = default;
  /// Shares `other`'s buffer.
  shared_bytes& operator=(const shared_bytes& other) noexcept = default;
  /// Takes `other`'s share; `other` is left empty.
  shared_bytes(shared_bytes&& other) noexcept
      : storage_(std::move(other.storage_)),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)) {}
  /// Takes `other`'s share; `other` is left empty.
  shared_bytes& operator=(shared_bytes&& other) noexcept {
    storage_ = std::move(other.storage_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }
  ~shared_bytes() = default;

  /// Copies `data` into a new buffer: the one copy made when bytes enter devgate.
  static shared_bytes copy_of(std::span<const std::byte> data) {
    shared_bytes out;
    if (data.empty()) return out;
    auto storage = std::make_shared_for_overwrite<std::byte[]>(data.size());
    std::memcpy(storage.get(), data.data(), data.size());
    out.data_ = storage.get();
    out.size_ = data.size();
    out.storage_ = std::move(storage);
    return out;
  }

  /// Copies the characters of `text` into a new buffer.
  static shared_bytes copy_of(std::string_view text) {
    return copy_of(std::as_bytes(std::span<const char>(text.data(), text.size())));
  }

  /// Allocates `size` bytes and lets `fill` write them once before the buffer becomes immutable.
  template <class Fill>
  static shared_bytes build(std::size_t size, Fill&& fill) {
    shared_bytes out;
    if (size == 0) return out;
    auto storage = std::make_shared_for_overwrite<std::byte[]>(size);
    std::forward<Fill>(fill)(std::span<std::byte>(storage.get(), size));
    out.data_ = storage.get();
    out.size_ = size;
    out.storage_ = std::move(storage);
    return out;
  }

  /// Pointer to the first byte (null when empty).
  [[nodiscard]] const std::byte* data() const noexcept { return data_; }
  /// Number of bytes.
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// True when there are no bytes.
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  /// The bytes as a span.
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  /// The bytes as characters (for text payloads).
  [[nodiscard]] std::string_view view() const noexcept {
    return {reinterpret_cast<const char*>(data_), size_};
  }
  /// A view of `count` bytes from `offset` that shares ownership of the whole buffer.
  /// `offset` and `count` are clamped to the buffer.
  [[nodiscard]] shared_bytes slice(std::size_t offset, std::size_t count) const noexcept {
    shared_bytes out;
    if (offset >= size_) return out;
    if (count > size_ - offset) count = size_ - offset;
    out.storage_ = storage_;
    out.data_ = data_ + offset;
    out.size_ = count;
    return out;
  }
  /// How many `shared_bytes` share this buffer (for tests and diagnostics).
  [[nodiscard]] long use_count() const noexcept { return storage_.use_count(); }

 private:
  std::shared_ptr<const std::byte[]> storage_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace devgate
