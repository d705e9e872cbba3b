#pragma once

#include <atomic>         // counters
#include <cstddef>        // std::size_t
#include <cstdint>        // counters
#include <functional>     // std::hash, std::equal_to<> for lookups by string_view
#include <list>           // offline records, least recently seen first
#include <memory>         // records are shared
#include <mutex>          // the device's mutex
#include <shared_mutex>   // device and session tables
#include <string>         // device ids
#include <string_view>    // lookups
#include <unordered_map>  // device and session tables
#include <utility>        // std::move
#include <vector>         // snapshots

#include "devgate/device/record.hpp"
#include "devgate/store/state_store.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// The devices the hub holds in memory and their live sessions: one record per device id, at
/// most one live session per device (a newer one takes over).
///
/// Bounded: records of offline devices are kept in the order they went offline (least recently
/// seen first), and `trim` evicts from the front of that order while more than `max_devices`
/// records are held. A record is evicted only when nobody else holds it (no thread is working
/// on it), its device is offline and its outbox is idle; what the store keeps of it comes back
/// when the device returns (`get_or_create` loads it again).
///
/// Locking: the device table and the session table each sit under a shared mutex, taken only
/// inside these methods; `attach`, `detach` and `trim` also take a device's own mutex, always
/// after the table's (never the other way round). No other lock is held meanwhile, and the
/// registry calls nothing outside itself but the `load` function of `get_or_create`, with no
/// lock held, and the callbacks of `trim`, with the device table's lock held.
class registry {
 public:
  /// A device's record, shared with whoever is working on it.
  using record_ptr = std::shared_ptr<device_record>;

  /// Holds at most `max_devices` records (more only while every offline one is in use).
  explicit registry(std::size_t max_devices = 0) : max_devices_(max_devices) {}
  registry(const registry&) = delete;
  registry& operator=(const registry&) = delete;

  /// The record of `id` (nullptr: never seen).
  [[nodiscard]] record_ptr find(std::string_view id) const {
    std::shared_lock lock(devices_mutex_);
    auto it = devices_.find(id);
    return it == devices_.end() ? nullptr : it->second;
  }
  /// What `get_or_create` does with the rest of a loaded state by default: nothing.
  struct ignore_rest {
    /// Does nothing.
    void operator()(device_record&, store::device_state&) const noexcept {}
  };
  /// The record of `id`, made the first time from `load()` (a `store::device_state`), after
  /// `rest(device_record&, store::device_state&)` put in what the registry does not know of
  /// (replay, dispatch window, rollout part; the record is not shared yet).
  /// A new record starts offline (evictable) until a session attaches.
  template <class Load, class Rest = ignore_rest>
  record_ptr get_or_create(const std::string& id, Load&& load, Rest&& rest = Rest{}) {
    if (auto rec = find(id)) return rec;
    store::device_state st = load();
    auto fresh =
        std::make_shared<device_record>(id, st.messages_sent, st.firmware_version, st.last_seen_ms);
    fresh->delivery.next_seq = st.last_seq + 1;  // numbering continues where it stopped
    {
      std::lock_guard lock(fresh->mutex);  // not shared yet; the `*_locked` callees expect it
      rest(*fresh, st);
    }
    return insert(id, std::move(fresh)).first;  // another thread's record if it got there first
  }
  /// The record of `id`, made the first time empty with `load.pending` set, for a caller that
  /// loads its stored state off this thread (`fill`). The second member says it was made now.
  std::pair<record_ptr, bool> get_or_create_unloaded(const std::string& id) {
    if (auto rec = find(id)) return {std::move(rec), false};
    auto fresh = std::make_shared<device_record>(id, 0, std::string{}, 0);
    fresh->load.pending = true;
    fresh->load.state_in.store(false, std::memory_order_relaxed);  // not shared yet
    return insert(id, std::move(fresh));
  }
  /// Puts the stored state `st` into a record made by `get_or_create_unloaded`. The caller
  /// holds `rec.mutex`.
  static void fill_locked(device_record& rec, const store::device_state& st) {
    rec.messages_sent += st.messages_sent;
    if (rec.firmware_version.empty()) rec.firmware_version = st.firmware_version;
    if (st.last_seen_ms > rec.last_seen_ms) rec.last_seen_ms = st.last_seen_ms;
    // Numbering continues above what the store had (and above what was assigned meanwhile).
    if (st.last_seq + 1 > rec.delivery.next_seq) rec.delivery.next_seq = st.last_seq + 1;
    if (!st.epoch.empty()) rec.epoch = st.epoch;
  }
  /// Every record now (for fleet-wide work: a rollout). O(records held): never on a network
  /// thread.
  [[nodiscard]] std::vector<record_ptr> snapshot() const {
    std::shared_lock lock(devices_mutex_);
    std::vector<record_ptr> out;
    out.reserve(devices_.size());
    for (const auto& [id, rec] : devices_) out.push_back(rec);
    return out;
  }
  /// Records held in memory now (a counter: no lock).
  [[nodiscard]] std::size_t devices() const noexcept {
    return held_.load(std::memory_order_relaxed);
  }
  /// The bound on records held (0: none).
  [[nodiscard]] std::size_t max_devices() const noexcept { return max_devices_; }

  /// Evicts offline records, least recently seen first, while more than `max_devices` are held;
  /// a record goes only when `durable(const device_record&)` says the store has everything
  /// written about it (called with its mutex held): `evict(device_record&)`
  /// runs for each (with its mutex held, to release what it holds elsewhere, e.g. its replay).
  /// Then, while `over_budget()` holds, `trim(device_record&)` runs (mutex held) for offline
  /// records with queued replay, least recently seen first, which drops their replay. Looks at
  /// a bounded number of records per call, so the cost per call is O(1). Returns how many
  /// records were evicted.
  template <class Durable, class Evict, class OverBudget, class Trim>
  std::size_t trim(Durable&& durable, Evict&& evict, OverBudget&& over_budget, Trim&& trim_one) {
    constexpr int max_looks = 64;
    const bool over_count =
        max_devices_ != 0 && held_.load(std::memory_order_relaxed) > max_devices_;
    if (!over_count && !over_budget()) return 0;  // the usual case: no lock taken
    std::size_t evicted = 0;
    std::unique_lock lock(devices_mutex_);
    int looks = 0;
    if (max_devices_ != 0 && devices_.size() > max_devices_) {
      auto it = offline_.begin();
      while (devices_.size() > max_devices_ && it != offline_.end() && looks++ < max_looks) {
        device_record* rec = *it;
        auto found = devices_.find(rec->id);
        if (found == devices_.end() || found->second.use_count() != 1) {  // in use: keep
          ++it;
          continue;
        }
        {
          std::lock_guard rl(rec->mutex);
          if (rec->session.id != 0 || rec->load.pending || rec->delivery.draining ||
              !rec->delivery.outbox.empty() ||
              (rec->dispatch && !rec->dispatch->in_flight.empty()) ||
              !durable(static_cast<const device_record&>(*rec))) {
            ++it;
            continue;
          }
          evict(*rec);
        }
        it = offline_.erase(it);
        rec->offline.listed = false;
        devices_.erase(found);
        ++evicted;
      }
      held_.store(devices_.size(), std::memory_order_relaxed);
    }
    for (auto it = offline_.begin(); it != offline_.end() && looks++ < max_looks && over_budget();
         ++it) {
      std::lock_guard rl((*it)->mutex);
      if ((*it)->session.id == 0 && !(*it)->delivery.replay.empty()) trim_one(**it);
    }
    evicted_.fetch_add(evicted, std::memory_order_relaxed);
    return evicted;
  }
  /// Removes the record of `id` if its device is offline and nobody else holds it. False if it
  /// is online, in use or not held.
  template <class Evict>
  bool remove(std::string_view id, Evict&& evict) {
    std::unique_lock lock(devices_mutex_);
    auto found = devices_.find(id);
    if (found == devices_.end() || found->second.use_count() != 1) return false;
    device_record& rec = *found->second;
    {
      std::lock_guard rl(rec.mutex);
      if (rec.session.id != 0 || rec.load.pending) return false;
      evict(rec);
    }
    unlist_locked(rec);
    devices_.erase(found);
    held_.store(devices_.size(), std::memory_order_relaxed);
    return true;
  }
  /// Takes the record of `id` out of the table, whatever its state, so that the device's next
  /// session starts a new record and loads its state from the store again (a shared store
  /// where another node took the device over). Returns it (nullptr: not held) for the caller
  /// to close its session; whoever still holds it finishes with it, and it is never listed
  /// for eviction again.
  record_ptr release(std::string_view id) {
    std::unique_lock lock(devices_mutex_);
    auto found = devices_.find(id);
    if (found == devices_.end()) return nullptr;
    record_ptr rec = std::move(found->second);
    devices_.erase(found);
    unlist_locked(*rec);
    rec->offline.released.store(true, std::memory_order_relaxed);
    held_.store(devices_.size(), std::memory_order_relaxed);
    released_.fetch_add(1, std::memory_order_relaxed);
    return rec;
  }
  /// Records let go by `release` since start.
  [[nodiscard]] std::uint64_t released() const noexcept {
    return released_.load(std::memory_order_relaxed);
  }
  /// Records evicted since start.
  [[nodiscard]] std::uint64_t evicted() const noexcept {
    return evicted_.load(std::memory_order_relaxed);
  }
  /// Records created since start (first sightings and returns after eviction).
  [[nodiscard]] std::uint64_t loaded() const noexcept {
    return loaded_.load(std::memory_order_relaxed);
  }

  /// Makes `s` the device's live session, before hello and with no errors counted. Returns the
  /// session it replaces (0: none), which the caller closes: a takeover.
  session_id attach(const record_ptr& rec, session_id s) {
    {
      std::unique_lock lock(devices_mutex_);
      unlist_locked(*rec);
    }
    session_id old = 0;
    {
      std::lock_guard lock(rec->mutex);
      old = rec->session.id;
      rec->session = {s, false, 0};
    }
    {
      std::unique_lock lock(sessions_mutex_);
      sessions_[s] = rec;
    }
    if (old != 0) takeovers_.fetch_add(1, std::memory_order_relaxed);
    return old;
  }
  /// The device session `s` belongs to (nullptr: unknown or closed). A session that was
  /// replaced still names its device until it closes; the record's `session.id` says which
  /// session is live.
  [[nodiscard]] record_ptr find_session(session_id s) const {
    std::shared_lock lock(sessions_mutex_);
    auto it = sessions_.find(s);
    return it == sessions_.end() ? nullptr : it->second;
  }
  /// Forgets session `s`. Returns its device if `s` was its live session (the device is now
  /// offline), nullptr otherwise (unknown, or already replaced).
  record_ptr detach(session_id s) {
    record_ptr rec;
    {
      std::unique_lock lock(sessions_mutex_);
      auto it = sessions_.find(s);
      if (it == sessions_.end()) return nullptr;
      rec = std::move(it->second);
      sessions_.erase(it);
    }
    std::unique_lock table(devices_mutex_);
    std::lock_guard lock(rec->mutex);
    if (rec->session.id != s) return nullptr;
    rec->session = {};
    unlist_locked(*rec);
    list_locked(*rec);  // most recently seen: the back of the offline order
    return rec;
  }
  /// Sessions open now (a replaced session counts until it closes).
  [[nodiscard]] std::size_t connected() const {
    std::shared_lock lock(sessions_mutex_);
    return sessions_.size();
  }
  /// Sessions replaced by a newer one since start.
  [[nodiscard]] std::uint64_t takeovers() const noexcept {
    return takeovers_.load(std::memory_order_relaxed);
  }

 private:
  std::pair<record_ptr, bool> insert(const std::string& id, record_ptr fresh) {
    std::unique_lock lock(devices_mutex_);
    auto [it, inserted] = devices_.emplace(id, std::move(fresh));
    if (inserted) {
      list_locked(*it->second);
      loaded_.fetch_add(1, std::memory_order_relaxed);
      held_.store(devices_.size(), std::memory_order_relaxed);
    }
    return {it->second, inserted};
  }
  // The offline order; the caller holds the device table's lock.
  void list_locked(device_record& rec) {
    if (rec.offline.listed || rec.offline.released.load(std::memory_order_relaxed)) return;
    rec.offline.position = offline_.insert(offline_.end(), &rec);
    rec.offline.listed = true;
  }
  void unlist_locked(device_record& rec) {
    if (!rec.offline.listed) return;
    offline_.erase(rec.offline.position);
    rec.offline.listed = false;
  }

  const std::size_t max_devices_;
  mutable std::shared_mutex devices_mutex_;
  // Searched by string_view without building a string (heterogeneous lookup).
  struct id_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };
  std::unordered_map<std::string, record_ptr, id_hash, std::equal_to<>> devices_;
  std::list<device_record*> offline_;  // least recently seen first
  std::atomic<std::size_t> held_{0};   // devices_.size(), readable without the lock
  std::atomic<std::uint64_t> evicted_{0};
  std::atomic<std::uint64_t> released_{0};
  std::atomic<std::uint64_t> loaded_{0};
  mutable std::shared_mutex sessions_mutex_;
  std::unordered_map<session_id, record_ptr> sessions_;
  std::atomic<std::uint64_t> takeovers_{0};
};

}  // namespace devgate::device
