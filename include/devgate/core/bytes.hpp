#pragma once

#include <cstddef>      // std::byte, std::size_t
#include <cstdint>      // free-list counts
#include <cstring>      // std::memcpy
#include <memory>       // std::shared_ptr, std::allocate_shared_for_overwrite
#include <new>          // ::operator new
#include <span>         // views
#include <string_view>  // text views
#include <utility>      // std::move, std::exchange

namespace devgate {

namespace detail {

#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool small_block_cache_enabled = false;  // let ASan see every use after free
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool small_block_cache_enabled = false;
#else
inline constexpr bool small_block_cache_enabled = true;
#endif
#else
inline constexpr bool small_block_cache_enabled = true;
#endif

/// Per-thread free lists of the small blocks behind shared_bytes (64, 128 and 256 bytes with
/// the reference counts), so the buffer of a small message is taken from and returned to the
/// thread's own list instead of malloc's, which holds only 7 blocks per size per thread (a read
/// batch of 16 messages overflows it). A block goes back to the list of the thread that frees
/// it; each list holds a bounded number and frees the rest; a thread's lists are freed when the
/// thread ends.
class small_blocks {
 public:
  /// The largest block kept; larger requests go to ::operator new.
  static constexpr std::size_t max_block = 256;

  /// `bytes` of storage (at most max_block from the thread's list).
  static void* allocate(std::size_t bytes) {
    if (!small_block_cache_enabled || bytes > max_block) return ::operator new(bytes);
    lists& l = local();
    const std::size_t c = class_of(bytes);
    if (node* n = l.head[c]) {
      l.head[c] = n->next;
      --l.count[c];
      return n;
    }
    return ::operator new(block_size(c));
  }
  /// Returns what allocate(`bytes`) gave.
  static void deallocate(void* p, std::size_t bytes) noexcept {
    if (!small_block_cache_enabled || bytes > max_block) {
      ::operator delete(p);
      return;
    }
    lists& l = local();
    const std::size_t c = class_of(bytes);
    if (l.closed || l.count[c] >= limit(c)) {
      ::operator delete(p);
      return;
    }
    if (!l.armed) arm(l);
    auto* n = static_cast<node*>(p);
    n->next = l.head[c];
    l.head[c] = n;
    ++l.count[c];
  }

 private:
  struct node {
    node* next;
  };
  static constexpr std::size_t classes = 3;
  struct lists {
    node* head[classes];
    std::uint32_t count[classes];
    bool armed;   // the reaper that frees the lists at thread exit is registered
    bool closed;  // the thread is ending: no more caching
  };
  static constexpr std::size_t class_of(std::size_t bytes) noexcept {
    return bytes <= 64 ? 0 : bytes <= 128 ? 1 : 2;
  }
  static constexpr std::size_t block_size(std::size_t c) noexcept { return std::size_t{64} << c; }
  static constexpr std::uint32_t limit(std::size_t c) noexcept { return c == 2 ? 128 : 256; }
  // Trivially destructible, so it stays usable while other thread_local objects are destroyed.
  static lists& local() noexcept {
    thread_local constinit lists l{};
    return l;
  }
  struct reaper {
    reaper() = default;
    reaper(const reaper&) = delete;
    reaper& operator=(const reaper&) = delete;
    ~reaper() {
      lists& l = local();
      l.closed = true;
      for (std::size_t c = 0; c < classes; ++c) {
        while (node* n = l.head[c]) {
          l.head[c] = n->next;
          ::operator delete(n);
        }
        l.count[c] = 0;
      }
    }
  };
  static void arm(lists& l) {
    thread_local reaper r;  // constructed here once per thread; destroyed at thread exit
    (void)r;
    l.armed = true;
  }
};

/// The allocator of shared_bytes storage (see small_blocks).
template <class T>
struct small_block_allocator {
  using value_type = T;
  small_block_allocator() noexcept = default;
  template <class U>
  small_block_allocator(const small_block_allocator<U>&) noexcept {}
  T* allocate(std::size_t n) { return static_cast<T*>(small_blocks::allocate(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) noexcept { small_blocks::deallocate(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const small_block_allocator<U>&) const noexcept {
    return true;
  }
};

}  // namespace detail

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
    auto storage = allocate(data.size());
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
    auto storage = allocate(size);
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
  // One allocation for the bytes and the reference counts; small ones from the thread's cache.
  static std::shared_ptr<std::byte[]> allocate(std::size_t size) {
    return std::allocate_shared_for_overwrite<std::byte[]>(
        detail::small_block_allocator<std::byte>{}, size);
  }

  std::shared_ptr<const std::byte[]> storage_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace devgate
