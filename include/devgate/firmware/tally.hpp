#pragma once

#include <array>    // one counter per status
#include <atomic>   // counters read without a lock
#include <cstddef>  // std::size_t
#include <cstdint>  // counters

#include "devgate/store/state_store.hpp"  // transfer_status

namespace devgate::firmware {

/// One rollout's fleet figures, kept up to date at every change of a device's transfer so that
/// the totals are read in constant time, with no scan over the devices. The rollout engine
/// changes a device's part under that device's mutex and the counters here at the same time;
/// they are atomics, so reading them takes no lock (a read racing a change may see one device
/// counted in neither of two statuses, or in both, for an instant).
class tally {
 public:
  /// A device joins the rollout with status `s`.
  void enter(store::transfer_status s) noexcept { add(s, 1); }
  /// A device of the rollout goes from status `from` to `to`.
  void move(store::transfer_status from, store::transfer_status to) noexcept {
    if (from == to) return;
    add(from, -1);
    add(to, 1);
  }
  /// A device's acknowledged bytes changed by `delta` (negative when a transfer restarts).
  void add_acked(std::int64_t delta) noexcept {
    acked_.fetch_add(delta, std::memory_order_relaxed);
  }
  /// A device's transfer failed for making no progress (called before its move to `failed`).
  // Release here and in `add`, acquire in the reads: a reader that reads count(failed) and then
  // timed_out() finds every timed-out failure it counted.
  void count_timed_out() noexcept { timed_out_.fetch_add(1, std::memory_order_release); }
  /// A stalled transfer was taken back to be retried later.
  void count_retry() noexcept { retries_.fetch_add(1, std::memory_order_relaxed); }

  /// Devices of the rollout with status `s` now.
  [[nodiscard]] std::size_t count(store::transfer_status s) const noexcept {
    const auto n = by_status_[static_cast<std::size_t>(s)].load(std::memory_order_acquire);
    return n < 0 ? 0 : static_cast<std::size_t>(n);
  }
  /// Bytes acknowledged over the fleet.
  [[nodiscard]] std::uint64_t bytes_acked() const noexcept {
    const auto n = acked_.load(std::memory_order_relaxed);
    return n < 0 ? 0 : static_cast<std::uint64_t>(n);
  }
  /// Devices whose transfer failed with reason `timed_out`.
  [[nodiscard]] std::size_t timed_out() const noexcept {
    return static_cast<std::size_t>(timed_out_.load(std::memory_order_acquire));
  }
  /// Stalled transfers taken back to be retried.
  [[nodiscard]] std::uint64_t retries() const noexcept {
    return retries_.load(std::memory_order_relaxed);
  }

 private:
  void add(store::transfer_status s, std::int64_t n) noexcept {
    if (s == store::transfer_status::none) return;
    by_status_[static_cast<std::size_t>(s)].fetch_add(n, std::memory_order_release);
  }

  std::array<std::atomic<std::int64_t>, 6> by_status_{};  // indexed by transfer_status
  std::atomic<std::int64_t> acked_{0};
  std::atomic<std::int64_t> timed_out_{0};
  std::atomic<std::uint64_t> retries_{0};
};

}  // namespace devgate::firmware
