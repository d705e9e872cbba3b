#pragma once

#include <algorithm>  // std::max
#include <cstddef>    // std::byte, std::size_t
#include <memory>     // chunks
#include <mutex>      // the session pool's lock
#include <new>        // ::operator new for oversized blocks
#include <vector>     // chunks

namespace devgate::websocket::detail {

/// Fixed-size blocks carved from 8 KiB chunks, so what every idle session keeps (its session
/// object) costs its exact size rather than a heap block with a header and rounding, and
/// long-lived blocks do not interleave with short-lived ones. The block size is the first
/// size asked for; larger requests go to operator new.
/// Not thread-safe; the memory returns when the pool dies (it keeps its peak size until then).
class block_pool {
 public:
  block_pool() = default;
  block_pool(const block_pool&) = delete;
  block_pool& operator=(const block_pool&) = delete;

  /// A block of at least `size` bytes, 16-byte aligned.
  void* allocate(std::size_t size) {
    if (block_ == 0) block_ = (std::max(size, sizeof(node)) + 15) & ~std::size_t{15};
    if (size > block_) return ::operator new(size);
    if (!free_) grow();
    node* n = free_;
    free_ = n->next;
    return n;
  }
  /// Returns a block `allocate(size)` gave.
  void deallocate(void* p, std::size_t size) noexcept {
    if (size > block_) {
      ::operator delete(p);
      return;
    }
    auto* n = static_cast<node*>(p);
    n->next = free_;
    free_ = n;
  }

 private:
  struct node {
    node* next;
  };
  void grow() {
    constexpr std::size_t chunk_bytes = 8192;
    const std::size_t count = chunk_bytes / block_;
    chunks_.push_back(std::make_unique<std::byte[]>(count * block_));
    std::byte* base = chunks_.back().get();
    for (std::size_t i = 0; i < count; ++i) {
      auto* n = reinterpret_cast<node*>(base + i * block_);
      n->next = free_;
      free_ = n;
    }
  }
  node* free_ = nullptr;
  std::size_t block_ = 0;
  std::vector<std::unique_ptr<std::byte[]>> chunks_;
};

/// The session allocator: a block pool behind a lock, since the last reference to a session
/// may be dropped on any thread (allocation and release happen once per connection).
class session_pool {
 public:
  /// A block for one session.
  void* allocate(std::size_t size) {
    std::lock_guard lock(mutex_);
    return pool_.allocate(size);
  }
  /// Returns a session's block.
  void deallocate(void* p, std::size_t size) noexcept {
    std::lock_guard lock(mutex_);
    pool_.deallocate(p, size);
  }

 private:
  std::mutex mutex_;
  block_pool pool_;
};

/// The process-wide session pool. Never destroyed: a session may be released while its
/// io_context is being destroyed, and a server may itself be a static object.
inline session_pool& session_memory() {
  static auto* pool = new session_pool;
  return *pool;
}

}  // namespace devgate::websocket::detail
