#pragma once

#include <atomic>         // takeover count
#include <cstddef>        // std::size_t
#include <cstdint>        // counters
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

/// The devices the hub knows and their live sessions: one record per device id, at most one
/// live session per device (a newer one takes over).
///
/// Locking: the device table and the session table each sit under a shared mutex, taken only
/// inside these methods; `attach` and `detach` also take the device's own mutex. No other lock
/// is held meanwhile, and the registry calls nothing outside itself but the `load` function of
/// `get_or_create`, with no lock held.
class registry {
 public:
  /// A device's record, shared with whoever is working on it.
  using record_ptr = std::shared_ptr<device_record>;

  /// The record of `id` (nullptr: never seen).
  [[nodiscard]] record_ptr find(std::string_view id) const {
    std::shared_lock lock(devices_mutex_);
    auto it = devices_.find(std::string(id));
    return it == devices_.end() ? nullptr : it->second;
  }
  /// The record of `id`, made the first time from `load()` (a `store::device_state`).
  template <class Load>
  record_ptr get_or_create(const std::string& id, Load&& load) {
    if (auto rec = find(id)) return rec;
    const store::device_state st = load();
    auto fresh = std::make_shared<device_record>(id, st.messages_sent, st.firmware_version);
    std::unique_lock lock(devices_mutex_);
    auto [it, inserted] = devices_.emplace(id, std::move(fresh));
    return it->second;  // another thread's record if it got there first
  }
  /// Every record now (for fleet-wide work: a rollout, totals).
  [[nodiscard]] std::vector<record_ptr> snapshot() const {
    std::shared_lock lock(devices_mutex_);
    std::vector<record_ptr> out;
    out.reserve(devices_.size());
    for (const auto& [id, rec] : devices_) out.push_back(rec);
    return out;
  }
  /// Devices seen since start.
  [[nodiscard]] std::size_t devices() const {
    std::shared_lock lock(devices_mutex_);
    return devices_.size();
  }

  /// Makes `s` the device's live session, before hello and with no errors counted. Returns the
  /// session it replaces (0: none), which the caller closes: a takeover.
  session_id attach(const record_ptr& rec, session_id s) {
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
    std::lock_guard lock(rec->mutex);
    if (rec->session.id != s) return nullptr;
    rec->session = {};
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
  mutable std::shared_mutex devices_mutex_;
  std::unordered_map<std::string, record_ptr> devices_;
  mutable std::shared_mutex sessions_mutex_;
  std::unordered_map<session_id, record_ptr> sessions_;
  std::atomic<std::uint64_t> takeovers_{0};
};

}  // namespace devgate::device
