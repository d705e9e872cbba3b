#pragma once

#include <array>          // shards
#include <cstddef>        // std::size_t
#include <cstdint>        // counters
#include <functional>     // std::hash
#include <memory>         // shards live on the heap so the store can move into the hub
#include <mutex>          // per-shard lock
#include <string>         // device ids
#include <system_error>   // results
#include <unordered_map>  // device table

#include "devgate/store/state_store.hpp"

namespace devgate::store {

/// The default state store: device states in memory, in 16 independently locked shards so that
/// devices on different transport threads rarely contend. Lost when the process exits.
class memory_state_store {
 public:
  /// Every call is a short shard lock and no I/O: the hub calls it inline.
  static constexpr bool nonblocking = true;

  /// The device's state, or a default one if it was never stored.
  [[nodiscard]] load_result load(const std::string& id) const {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    auto it = s.states.find(id);
    return {it == s.states.end() ? device_state{} : it->second, {}};
  }
  /// Adds `n` to the device's message count.
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n) {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    s.states[id].messages_sent += n;
    return {};
  }
  /// Records activity at `unix_ms`.
  std::error_code touch(const std::string& id, std::int64_t unix_ms) {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    s.states[id].last_seen_ms = unix_ms;
    return {};
  }
  /// Records the firmware version the device runs.
  std::error_code set_firmware_version(const std::string& id, const std::string& version) {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    s.states[id].firmware_version = version;
    return {};
  }
  /// Records the device's firmware transfer.
  std::error_code set_transfer(const std::string& id, const transfer_state& t) {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    s.states[id].transfer = t;
    return {};
  }
  /// Records the last sequence number assigned to the device.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq) {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    s.states[id].last_seq = seq;
    return {};
  }
  /// Forgets the device.
  std::error_code forget(const std::string& id) {
    auto& s = shard(id);
    std::lock_guard lock(s.mutex);
    s.states.erase(id);
    return {};
  }
  /// Devices stored.
  [[nodiscard]] std::size_t size() const {
    std::size_t n = 0;
    for (const auto& s : *shards_) {
      std::lock_guard lock(s.mutex);
      n += s.states.size();
    }
    return n;
  }

 private:
  struct shard_t {
    mutable std::mutex mutex;
    std::unordered_map<std::string, device_state> states;
  };
  shard_t& shard(const std::string& id) const {
    return (*shards_)[std::hash<std::string>{}(id) % shards_->size()];
  }
  std::unique_ptr<std::array<shard_t, 16>> shards_ = std::make_unique<std::array<shard_t, 16>>();
};

static_assert(state_store<memory_state_store>,
              "memory_state_store must satisfy devgate::store::state_store");
static_assert(is_nonblocking_store<memory_state_store>);

}  // namespace devgate::store
