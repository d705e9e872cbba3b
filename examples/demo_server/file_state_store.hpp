#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>        // counters
#include <cstdio>         // std::rename
#include <filesystem>     // the state file
#include <fstream>        // reading and writing it
#include <memory>         // the store moves into the hub; its state stays put
#include <mutex>          // one lock: a demo's traffic, not a fleet's
#include <stdexcept>      // a corrupt file is a set-up error
#include <string>         // device ids
#include <system_error>   // flush results
#include <unordered_map>  // device table

#include "devgate/store/state_store.hpp"

namespace devgate_demo {

/// A `devgate::store::state_store` that keeps device states in memory and persists them to a
/// JSON file, so that a restarted demo server still knows each device's message count and
/// firmware version. Writes are batched: mutations mark the store dirty and `flush()` (called
/// by the demo a few times a second and at shutdown) replaces the file atomically (write to a
/// temporary file, then rename), so a crash loses at most the last interval and never leaves a
/// half-written file. Transfer states are not persisted: the image is not either. A flush holds
/// the store's lock while it streams every device to the file, so the store does not say it is
/// non-blocking: the hub calls its writes from its store thread, off the network threads.
class file_state_store {
 public:
  /// Loads `file` if it exists. Throws std::runtime_error when it exists but cannot be read.
  explicit file_state_store(std::filesystem::path file) : s_(std::make_unique<shared>()) {
    s_->file = std::move(file);
    std::error_code ec;
    if (!std::filesystem::exists(s_->file, ec)) return;
    std::ifstream in(s_->file);
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) {
      throw std::runtime_error("state file " + s_->file.string() +
                               " is not valid JSON; delete it or pass another --state-file");
    }
    s_->releases = j.value("releases", std::uint64_t{0});
    if (const auto it = j.find("devices"); it != j.end() && it->is_object()) {
      for (const auto& [id, d] : it->items()) {
        devgate::store::device_state st;
        st.messages_sent = d.value("messages_sent", std::uint64_t{0});
        st.last_seen_ms = d.value("last_seen_ms", std::int64_t{0});
        st.firmware_version = d.value("firmware_version", std::string{});
        st.last_seq = d.value("last_seq", std::uint64_t{0});
        s_->states.emplace(id, std::move(st));
      }
    }
  }

  /// The device's state, or a default one if it was never stored.
  [[nodiscard]] devgate::store::load_result load(const std::string& id) const {
    std::lock_guard lock(s_->m);
    const auto it = s_->states.find(id);
    return {it == s_->states.end() ? devgate::store::device_state{} : it->second, {}};
  }
  /// Adds `n` to the device's message count.
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n) {
    std::lock_guard lock(s_->m);
    s_->dirty = true;
    s_->states[id].messages_sent += n;
    return {};
  }
  /// Records activity at `unix_ms`.
  std::error_code touch(const std::string& id, std::int64_t unix_ms) {
    std::lock_guard lock(s_->m);
    s_->dirty = true;
    s_->states[id].last_seen_ms = unix_ms;
    return {};
  }
  /// Records the firmware version the device runs.
  std::error_code set_firmware_version(const std::string& id, const std::string& version) {
    std::lock_guard lock(s_->m);
    s_->dirty = true;
    s_->states[id].firmware_version = version;
    return {};
  }
  /// Records the device's transfer (kept in memory only).
  std::error_code set_transfer(const std::string& id, const devgate::store::transfer_state& t) {
    std::lock_guard lock(s_->m);
    s_->states[id].transfer = t;
    return {};
  }
  /// Records the last sequence number assigned to the device.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq) {
    std::lock_guard lock(s_->m);
    s_->dirty = true;
    s_->states[id].last_seq = seq;
    return {};
  }
  /// Forgets the device (gone from the file at the next flush).
  std::error_code forget(const std::string& id) {
    std::lock_guard lock(s_->m);
    s_->dirty = s_->states.erase(id) != 0 || s_->dirty;
    return {};
  }

  /// The demo's firmware release counter: the number of images published so far (persisted,
  /// so versions keep rising across restarts).
  [[nodiscard]] std::uint64_t releases() const {
    std::lock_guard lock(s_->m);
    return s_->releases;
  }
  /// Counts one more release and returns its number (1, 2, ...).
  std::uint64_t next_release() {
    std::lock_guard lock(s_->m);
    s_->dirty = true;
    return ++s_->releases;
  }

  /// Writes the file if anything changed since the last flush. Safe from any thread.
  std::error_code flush() {
    // One writer at a time, so an older snapshot never overwrites a newer one.
    std::lock_guard write_lock(s_->write_m);
    const auto tmp = std::filesystem::path(s_->file.string() + ".tmp");
    {
      std::ofstream out(tmp, std::ios::trunc);
      {
        // Each device is encoded on its own and streamed out, so a flush holds one device's
        // JSON at a time rather than a document of the whole fleet.
        std::lock_guard lock(s_->m);
        if (!s_->dirty) return {};
        s_->dirty = false;
        out << "{\n  \"format\": 1,\n  \"releases\": " << s_->releases << ",\n  \"devices\": {";
        const char* sep = "\n    ";
        for (const auto& [id, st] : s_->states) {
          out << sep << nlohmann::json(id).dump() << ": "
              << nlohmann::json{{"messages_sent", st.messages_sent},
                                {"last_seen_ms", st.last_seen_ms},
                                {"firmware_version", st.firmware_version},
                                {"last_seq", st.last_seq}}
                     .dump();
          sep = ",\n    ";
        }
        out << "\n  }\n}\n";
      }
      if (!out.flush()) {
        mark_dirty();
        return std::make_error_code(std::errc::io_error);
      }
    }
    std::error_code ec;
    std::filesystem::rename(tmp, s_->file, ec);
    if (ec) mark_dirty();
    return ec;
  }
  /// The file the state lives in.
  [[nodiscard]] const std::filesystem::path& file() const noexcept { return s_->file; }

 private:
  void mark_dirty() {
    std::lock_guard lock(s_->m);
    s_->dirty = true;
  }
  struct shared {
    mutable std::mutex m;
    std::mutex write_m;
    std::filesystem::path file;
    std::unordered_map<std::string, devgate::store::device_state> states;
    std::uint64_t releases = 0;
    bool dirty = false;
  };
  std::unique_ptr<shared> s_;
};

static_assert(devgate::store::state_store<file_state_store>,
              "file_state_store must satisfy devgate::store::state_store");

}  // namespace devgate_demo
