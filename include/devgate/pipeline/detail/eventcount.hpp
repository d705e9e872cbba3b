#pragma once

#include <atomic>              // the waiter count and epoch
#include <chrono>              // deadlines
#include <condition_variable>  // the sleep itself
#include <cstdint>             // epochs
#include <mutex>               // pairs with the condition variable

namespace devgate::detail {

/// An eventcount: a notifier pays one fence and one load when nobody sleeps, and only takes the
/// mutex (and a futex wake) when a waiter exists. A waiter announces itself, re-checks its
/// condition, then sleeps until the epoch moves; a notify between the announce and the sleep moves
/// the epoch, so no wake-up is lost and there is no polling interval.
class eventcount {
 public:
  /// Step 1 of waiting: announce; the caller then re-checks its condition.
  [[nodiscard]] std::uint64_t prepare_wait() noexcept {
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    return epoch_.load(std::memory_order_seq_cst);
  }
  /// The condition became true after `prepare_wait`: do not sleep.
  void cancel_wait() noexcept { waiters_.fetch_sub(1, std::memory_order_seq_cst); }
  /// Step 2: sleep until notified after `prepare_wait` returned `key`, or until `deadline`.
  /// Returns false on timeout.
  template <class TimePoint>
  bool wait_until(std::uint64_t key, TimePoint deadline) {
    bool notified;
    {
      std::unique_lock lock(mutex_);
      notified = cv_.wait_until(lock, deadline,
                                [&] { return epoch_.load(std::memory_order_relaxed) != key; });
    }
    waiters_.fetch_sub(1, std::memory_order_seq_cst);
    return notified;
  }
  /// Step 2 without a deadline.
  void wait(std::uint64_t key) {
    {
      std::unique_lock lock(mutex_);
      cv_.wait(lock, [&] { return epoch_.load(std::memory_order_relaxed) != key; });
    }
    waiters_.fetch_sub(1, std::memory_order_seq_cst);
  }
  /// A hint, no ordering: true if someone was announced as waiting. For callers that wake
  /// sleepers as an optimisation (to spread work), not for correctness.
  [[nodiscard]] bool has_waiters() const noexcept {
    return waiters_.load(std::memory_order_relaxed) != 0;
  }
  /// Wakes one waiter, if any (call after making the condition true).
  void notify_one() noexcept { notify(false); }
  /// Wakes every waiter, if any.
  void notify_all() noexcept { notify(true); }
  /// Like `notify_one`, without the fence, for a caller whose condition change was a seq_cst
  /// read-modify-write that waiters re-check with seq_cst loads (after `prepare_wait`): the
  /// single total order of seq_cst operations already pairs the two sides, so either the
  /// waiter's re-check sees the change or this load sees the waiter. On x86 that RMW is the
  /// fence, so the hot path saves a second full barrier per notify.
  void notify_one_after_sc_rmw() noexcept { notify_unfenced(false); }
  /// `notify_all` under the same contract as `notify_one_after_sc_rmw`.
  void notify_all_after_sc_rmw() noexcept { notify_unfenced(true); }

 private:
  void notify_unfenced(bool all) noexcept {
    if (waiters_.load(std::memory_order_seq_cst) == 0) return;
    wake(all);
  }

  void notify(bool all) noexcept {
    // Pairs with the seq_cst increment in prepare_wait: either the waiter's re-check sees our
    // change, or we see its announcement here.
#if defined(__SANITIZE_THREAD__)
    // TSan does not model fences (and GCC refuses them under -fsanitize=thread): an RMW on the
    // waiter count gives the same ordering, at the price of a locked instruction.
    if (waiters_.fetch_add(0, std::memory_order_seq_cst) == 0) return;
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (waiters_.load(std::memory_order_relaxed) == 0) return;
#endif
    wake(all);
  }

  void wake(bool all) noexcept {
    {
      std::lock_guard lock(mutex_);
      epoch_.fetch_add(1, std::memory_order_relaxed);
    }
    if (all) {
      cv_.notify_all();
    } else {
      cv_.notify_one();
    }
  }

  std::atomic<std::uint32_t> waiters_{0};
  std::atomic<std::uint64_t> epoch_{0};
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace devgate::detail
