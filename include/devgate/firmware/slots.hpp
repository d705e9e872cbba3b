#pragma once

#include <algorithm>      // std::find, std::max
#include <cstddef>        // std::size_t
#include <deque>          // waiting devices
#include <mutex>          // slots
#include <optional>       // next device
#include <string>         // device ids
#include <unordered_set>  // active devices
#include <utility>        // std::move

namespace devgate::firmware {

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

}  // namespace devgate::firmware
