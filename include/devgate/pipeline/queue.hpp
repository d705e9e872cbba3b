#pragma once

#include <concepts>  // queue_policy
#include <cstddef>   // std::size_t
#include <cstdint>   // std::uint8_t, tickets
#include <deque>     // locked_queue storage
#include <mutex>     // locked_queue
#include <utility>   // std::move, std::declval

#include <concurrentqueue/concurrentqueue.h>

#include "devgate/pipeline/message.hpp"

namespace devgate {

/// What `push` does when the pipeline holds `capacity` messages. Nothing is ever lost silently:
/// each rejected or dropped message is counted (`devgate_rejected_total`, `devgate_dropped_total`).
enum class overflow_policy : std::uint8_t {
  /// `push` returns `errc::queue_full` at once; the transport turns it into a reply to the device.
  reject,
  /// The oldest queued message of the same partition (else of another partition) is dropped to
  /// make room; the new message is accepted.
  drop_oldest,
  /// `push` waits up to `block_timeout` for room, then rejects like `reject`.
  block,
};

/// A container the pipeline can keep items of type T in (the requirements of `queue_policy`).
template <class Container, class T>
concept queue_container = std::default_initializable<Container> &&
    std::constructible_from<typename Container::producer_token, Container&> &&
    requires(Container& q, typename Container::producer_token& token, T* out, std::size_t max) {
  { q.push(std::declval<T>()) } -> std::same_as<bool>;
  { q.push(token, std::declval<T>()) } -> std::same_as<bool>;
  { q.pop_bulk(out, max) } -> std::same_as<std::size_t>;
};

/// A queue policy names a multi-producer, multi-consumer FIFO-per-producer container template,
/// checked with the type the pipeline stores in it, `queued_message`. Requirements on
/// `Q::queue<T>`:
/// - default-constructible (one per partition);
/// - a nested `producer_token` constructible from `queue<T>&`, usable by one thread at a time;
/// - `q.push(T&&)` and `q.push(producer_token&, T&&)`: thread-safe, return false only when
///   memory runs out;
/// - `q.pop_bulk(T* out, std::size_t max)`: thread-safe, move-assigns up to `max` items into
///   `out`, returns how many.
/// Order between producers is not required: the pipeline orders each partition with tickets.
/// Optional: `q.push_bulk(producer_token&, It first, std::size_t n)` enqueuing `n` items read
/// through the input iterator `first` (each `*first` a T prvalue, noexcept), in order; the
/// pipeline's `push_bulk` uses it when present (see `bulk_queue`) and otherwise pushes one by one.
/// A `Traits::queue_type` that does not fit stops the build with: "devgate::pipeline:
/// Traits::queue_type must be a queue policy such as devgate::lockfree_queue or
/// devgate::locked_queue (requirements in queue.hpp)".
template <class Q>
concept queue_policy = queue_container<typename Q::template queue<queued_message>, queued_message>;

/// A queue container with the optional bulk enqueue (one reservation of slots for many items).
template <class Container, class T>
concept bulk_queue = requires(Container& q, typename Container::producer_token& token, T* items,
                              std::size_t n) {
  { q.push_bulk(token, items, n) } -> std::same_as<bool>;
};

/// The default queue: moodycamel::ConcurrentQueue (lock-free), with producer tokens for
/// producers that push often and bulk dequeue for workers.
struct lockfree_queue {
  /// The container for items of type T.
  template <class T>
  class queue {
   public:
    /// A producer's private sub-queue: the fastest way in, for one thread at a time.
    class producer_token {
     public:
      /// A token bound to `q`.
      explicit producer_token(queue& q) : token_(q.impl_) {}

     private:
      friend class queue;
      moodycamel::ProducerToken token_;
    };

    /// Enqueues through the calling thread's implicit producer.
    bool push(T&& item) { return impl_.enqueue(std::move(item)); }
    /// Enqueues through an explicit producer token.
    bool push(producer_token& token, T&& item) {
      return impl_.enqueue(token.token_, std::move(item));
    }
    /// Enqueues `n` items read through `first` with one reservation of slots (all or nothing).
    template <class It>
    bool push_bulk(producer_token& token, It first, std::size_t n) {
      // A token whose producer could not be allocated is out of memory, as `push` reports it
      // (moodycamel's bulk enqueue does not check; its single enqueue does). The check also
      // shows GCC that the producer is not null, which its -O3 -Wstringop-overflow misses.
      if (!token.token_.valid()) return false;
      return impl_.enqueue_bulk(token.token_, first, n);
    }
    /// Dequeues up to `max` items into `out`.
    std::size_t pop_bulk(T* out, std::size_t max) { return impl_.try_dequeue_bulk(out, max); }

   private:
    moodycamel::ConcurrentQueue<T> impl_;
  };
};

/// The plain baseline: a mutex around a std::deque. Slower under contention, simple to reason
/// about, and a reference the benchmarks compare against.
struct locked_queue {
  /// The container for items of type T.
  template <class T>
  class queue {
   public:
    /// No per-producer state: the mutex serialises everything.
    class producer_token {
     public:
      /// A token for `q` (carries nothing).
      explicit producer_token(queue&) noexcept {}
    };

    /// Enqueues under the mutex.
    bool push(T&& item) {
      std::lock_guard lock(mutex_);
      items_.push_back(std::move(item));
      return true;
    }
    /// Same as `push(item)`: the token carries nothing.
    bool push(producer_token&, T&& item) { return push(std::move(item)); }
    /// Enqueues `n` items read through `first` under one lock.
    template <class It>
    bool push_bulk(producer_token&, It first, std::size_t n) {
      std::lock_guard lock(mutex_);
      for (std::size_t i = 0; i < n; ++i, ++first) items_.push_back(*first);
      return true;
    }
    /// Dequeues up to `max` items into `out` under one lock.
    std::size_t pop_bulk(T* out, std::size_t max) {
      std::lock_guard lock(mutex_);
      std::size_t n = 0;
      while (n < max && !items_.empty()) {
        out[n++] = std::move(items_.front());
        items_.pop_front();
      }
      return n;
    }

   private:
    std::mutex mutex_;
    std::deque<T> items_;
  };
};

static_assert(queue_policy<lockfree_queue>);
static_assert(queue_policy<locked_queue>);
static_assert(bulk_queue<lockfree_queue::queue<queued_message>, queued_message>);
static_assert(bulk_queue<locked_queue::queue<queued_message>, queued_message>);

}  // namespace devgate
