#pragma once

#include <algorithm>      // std::find, std::max
#include <cstddef>        // std::size_t
#include <cstdint>        // rollout ids
#include <deque>          // waiting devices
#include <mutex>          // slots
#include <optional>       // next device
#include <string>         // device ids
#include <unordered_set>  // active devices
#include <utility>        // std::move
#include <vector>         // active devices, for the stall check

namespace devgate::firmware {

/// A snapshot of the slots: what a fleet-wide lease needs to know of one node.
struct slot_usage {
  std::size_t active = 0;   ///< Transfers running.
  std::size_t waiting = 0;  ///< Devices waiting for a slot.
  std::size_t limit = 0;    ///< The limit now.
};

/// At most N devices transferring at once; the rest wait in arrival order. Thread-safe; the
/// peak is kept so tests and operators can check the limit held.
///
/// The limit may change (`set_limit`): a node of a fleet holds a lease of the fleet's slots.
///
/// The slots belong to one rollout at a time (`reset` starts a new one): a request or a release
/// naming another rollout is refused, so a thread that read the previous rollout just before a
/// new one was published can neither take a slot of the new one nor free somebody else's.
class transfer_slots {
 public:
  /// What `acquire` did.
  enum class grant : std::uint8_t {
    acquired,  ///< A free slot is the device's now: the caller starts the transfer.
    held,      ///< The device already had a slot (given while it was not ready to start).
    queued,    ///< The device waits (or already waited) for a slot.
    stale,     ///< The slots belong to another rollout: nothing done.
  };

  /// A limit of `max_active` transfers (at least 1).
  explicit transfer_slots(std::size_t max_active) : max_(max_active == 0 ? 1 : max_active) {}

  /// Takes a slot of rollout `rollout` for `device`, or queues it. A device already active or
  /// queued keeps its place.
  grant acquire(const std::string& device, std::uint32_t rollout) {
    std::lock_guard lock(mutex_);
    if (rollout != rollout_) return grant::stale;
    if (active_.count(device) != 0) return grant::held;
    if (std::find(waiting_.begin(), waiting_.end(), device) != waiting_.end()) {
      return grant::queued;
    }
    if (active_.size() < max_) {
      active_.insert(device);
      peak_ = std::max(peak_, active_.size());
      return grant::acquired;
    }
    waiting_.push_back(device);
    return grant::queued;
  }
  /// Frees `device`'s slot of rollout `rollout` (or takes it off the queue) and hands the slot
  /// to the next waiting device, which is returned (the caller starts it). Nothing if no slot
  /// was freed, or if the slots belong to another rollout.
  std::optional<std::string> release(const std::string& device, std::uint32_t rollout) {
    std::lock_guard lock(mutex_);
    if (rollout != rollout_) return std::nullopt;
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
  /// Gives the slots to rollout `rollout`, empty; returns the devices that held one (the
  /// caller stops their transfers). The peak is kept.
  std::vector<std::string> reset(std::uint32_t rollout) {
    std::lock_guard lock(mutex_);
    std::vector<std::string> held(active_.begin(), active_.end());
    active_.clear();
    waiting_.clear();
    rollout_ = rollout;
    return held;
  }
  /// Whether `device` holds a slot of rollout `rollout`.
  [[nodiscard]] bool holds(const std::string& device, std::uint32_t rollout) const {
    std::lock_guard lock(mutex_);
    return rollout == rollout_ && active_.count(device) != 0;
  }
  /// The devices holding a slot now (at most the limit; for the stall check).
  [[nodiscard]] std::vector<std::string> holders() const {
    std::lock_guard lock(mutex_);
    return {active_.begin(), active_.end()};
  }
  /// The rollout the slots belong to (0: none yet).
  [[nodiscard]] std::uint32_t rollout() const {
    std::lock_guard lock(mutex_);
    return rollout_;
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
  /// Active, waiting and the limit, read together.
  [[nodiscard]] slot_usage usage() const {
    std::lock_guard lock(mutex_);
    return {active_.size(), waiting_.size(), max_};
  }
  /// The limit now.
  [[nodiscard]] std::size_t limit() const {
    std::lock_guard lock(mutex_);
    return max_;
  }
  /// Changes the limit to `max_active` (0 allowed: a node whose fleet-wide lease is empty) and
  /// returns the waiting devices that a raised limit gave a slot to (the caller starts them). A
  /// lowered limit takes no slot back: transfers running go on, and no new one starts until the
  /// active ones are below it.
  std::vector<std::string> set_limit(std::size_t max_active) {
    std::lock_guard lock(mutex_);
    max_ = max_active;
    std::vector<std::string> promoted;
    while (active_.size() < max_ && !waiting_.empty()) {
      promoted.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
      active_.insert(promoted.back());
    }
    peak_ = std::max(peak_, active_.size());
    return promoted;
  }

 private:
  std::size_t max_;
  mutable std::mutex mutex_;
  std::uint32_t rollout_ = 0;
  std::unordered_set<std::string> active_;
  std::deque<std::string> waiting_;
  std::size_t peak_ = 0;
};

}  // namespace devgate::firmware
