#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>    // std::min
#include <atomic>       // rollout ids
#include <cstddef>      // std::size_t, std::byte
#include <cstdint>      // rollout ids, offsets
#include <memory>       // the current image
#include <mutex>        // the current image, the device's mutex
#include <optional>     // lookups, errors
#include <span>         // image bytes
#include <stdexcept>    // set-up errors
#include <string>       // versions, reasons
#include <string_view>  // device ids
#include <utility>      // std::move
#include <vector>       // devices to start

#include "devgate/device/delivery.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/device/record.hpp"
#include "devgate/device/registry.hpp"
#include "devgate/firmware/image.hpp"
#include "devgate/firmware/slots.hpp"
#include "devgate/store/state_store.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::firmware {

/// Fleet totals of a rollout.
struct rollout_totals {
  std::uint32_t rollout = 0;          ///< Current rollout id (0: none published).
  std::string version;                ///< Its version.
  std::size_t size = 0;               ///< Image bytes.
  std::size_t pending = 0;            ///< Devices waiting (connected or not).
  std::size_t transferring = 0;       ///< Devices receiving chunks now.
  std::size_t verified = 0;           ///< Devices that confirmed the SHA-256.
  std::size_t failed = 0;             ///< Devices that reported a failure.
  std::size_t skipped = 0;            ///< Devices already on the version.
  std::uint64_t bytes_acked = 0;      ///< Sum of acknowledged bytes over the fleet.
  std::size_t peak_transferring = 0;  ///< Most devices ever transferring at once.
};

/// The rollout engine's knobs (`device::hub_options` carries the same three).
struct rollout_options {
  /// Firmware chunk size: larger chunks mean fewer acks, smaller ones finer resume points.
  std::size_t chunk_size = 16u << 10;
  /// Unacknowledged chunks in flight per device (window * chunk_size bytes of buffering).
  std::size_t window = 8;
  /// At most this many devices receive firmware at once; the rest wait their turn.
  std::size_t max_concurrent_transfers = 16;
};

/// Rolls one firmware image at a time out to the fleet. Each device's part is a small state
/// machine, kept in its record (`device_record::transfer`) and mirrored to the store:
///
///     none ──publish/join──▶ pending ──slot + live session──▶ transferring ──fw_result──▶
///     verified | failed;   pending ──reports the version──▶ skipped;
///     transferring ──session closed or replaced──▶ pending (resumes from its acked offset)
///
/// At most `max_concurrent_transfers` devices transfer at once (`transfer_slots`); a freed slot
/// goes to the next waiting device that can start. A transfer sends the start message, then a
/// window of chunks (slices of the one image buffer), one more per acknowledged chunk.
///
/// Locking: each method takes the device's mutex itself and never two devices' at once; the
/// slots and the current image have locks of their own, taken with no device's mutex held;
/// the store and the transport (through `delivery::flush`) are called with no lock held.
template <class Transport, class Store>
class rollout_engine {
 public:
  /// An engine over the hub's devices, their outboxes and the state store (all referenced).
  /// Throws std::invalid_argument for a window or chunk size of 0.
  rollout_engine(device::registry& devices, device::delivery<Transport>& out, Store& store,
                 rollout_options options)
      : devices_(devices),
        out_(out),
        store_(store),
        options_(checked(options)),
        slots_(options_.max_concurrent_transfers) {}
  rollout_engine(const rollout_engine&) = delete;
  rollout_engine& operator=(const rollout_engine&) = delete;

  /// Starts rollout of `bytes` as `version` (copied once into a new image): every known device
  /// joins it, `announce(const image&)` runs (the hub tells the fleet), then devices online now
  /// start while slots last. Returns the rollout id. Throws std::invalid_argument for an empty
  /// version or image, or an image over `device::max_firmware_size`.
  template <class Announce>
  std::uint32_t publish(std::string version, std::span<const std::byte> bytes,
                        Announce&& announce) {
    if (version.empty()) throw std::invalid_argument("publish_firmware: empty version");
    const auto id = next_rollout_.fetch_add(1, std::memory_order_relaxed) + 1;
    auto img = std::make_shared<const image>(id, std::move(version), bytes, options_.chunk_size);
    {
      std::lock_guard lock(current_mutex_);
      current_ = img;
    }
    slots_.clear();
    std::vector<device::registry::record_ptr> online;
    for (auto& rec : devices_.snapshot()) {
      bool want = false;
      store::transfer_state t;
      {
        std::lock_guard lock(rec->mutex);
        join_locked(*rec, img);
        want = rec->transfer.status == store::transfer_status::pending && rec->session.id != 0 &&
               rec->session.hello;
        t = state_locked(*rec);
      }
      store_.set_transfer(rec->id, t);
      if (want) online.push_back(std::move(rec));
    }
    announce(static_cast<const image&>(*img));
    for (auto& rec : online) {
      if (slots_.acquire(rec->id) && !start(*rec)) start_next(slots_.release(rec->id));
    }
    return id;
  }

  /// Session `s` of the device said hello: the device joins the current rollout (once per
  /// rollout; skipped if it runs the version) and starts or resumes when a slot is free.
  void join(device::device_record& rec, session_id s) {
    auto img = current();
    if (!img) return;
    bool want = false;
    store::transfer_state t;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return;
      join_locked(rec, img);
      if (rec.transfer.status == store::transfer_status::transferring &&
          rec.transfer.session != s) {
        rec.transfer.status = store::transfer_status::pending;  // its session is gone
      }
      want = rec.transfer.status == store::transfer_status::pending;
      t = state_locked(rec);
    }
    store_.set_transfer(rec.id, t);
    if (want && slots_.acquire(rec.id) && !start(rec)) start_next(slots_.release(rec.id));
  }
  /// The device's session `old` was replaced by a newer one: a transfer streaming to it goes
  /// back to pending (to resume from its acknowledged offset) and its slot goes to the next
  /// waiting device. A place in the queue is kept.
  void on_replaced(device::device_record& rec, session_id old) {
    bool release = false;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.transfer.status == store::transfer_status::transferring &&
          rec.transfer.session == old) {
        rec.transfer.status = store::transfer_status::pending;
        release = true;
      }
    }
    if (release) start_next(slots_.release(rec.id));
  }
  /// The device went offline (its live session closed): a transfer goes back to pending, and
  /// its slot, or its place in the queue, is given up. Nothing if a newer session has taken
  /// the device meanwhile.
  void on_offline(device::device_record& rec) {
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != 0) return;
      if (rec.transfer.status == store::transfer_status::transferring) {
        rec.transfer.status = store::transfer_status::pending;  // resumes from `acked`
      }
    }
    start_next(slots_.release(rec.id));
  }

  /// Session `s` acknowledged the image up to `offset` of rollout `rollout`: more chunks go
  /// out. Returns the error to answer with: `unknown_rollout` (no such transfer running for
  /// the device) or `bad_fw_ack` (beyond what was sent, misaligned or backwards).
  std::optional<device::error> on_ack(device::device_record& rec, session_id s,
                                      std::uint64_t rollout, std::uint64_t offset) {
    store::transfer_state t;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return std::nullopt;
      auto& tr = rec.transfer;
      if (!running(rec, rollout)) return device::error::unknown_rollout;
      if (offset < tr.acked || offset > tr.sent ||
          (offset % tr.image->chunk_size() != 0 && offset != tr.image->size())) {
        return device::error::bad_fw_ack;
      }
      tr.acked = offset;
      fill_window_locked(rec);
      t = state_locked(rec);
    }
    out_.flush(rec);
    store_.set_transfer(rec.id, t);
    return std::nullopt;
  }
  /// Session `s` reported the result of rollout `rollout` (`sha256` and `reason` as sent): the
  /// transfer ends verified (every byte acknowledged and the hash matches) or failed with a
  /// reason, the device is told (`fw_status`), and its slot goes to the next waiting device.
  /// Returns `unknown_rollout` when no such transfer is running for the device.
  std::optional<device::error> on_result(device::device_record& rec, session_id s,
                                         std::uint64_t rollout, bool ok,
                                         const std::optional<std::string>& sha256,
                                         const std::optional<std::string>& reason) {
    bool verified = false;
    store::transfer_state t;
    std::string version;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return std::nullopt;
      if (!running(rec, rollout)) return device::error::unknown_rollout;
      auto& tr = rec.transfer;
      const auto& img = *tr.image;
      if (!ok) {
        tr.reason = reason.value_or("device reported a failure");
      } else if (tr.acked != img.size()) {
        tr.reason = "result before every byte was acknowledged";
      } else if (!sha256 || *sha256 != img.sha256()) {
        tr.reason = "sha256 mismatch";
      } else {
        verified = true;
        rec.firmware_version = img.version();
        version = img.version();
      }
      tr.status = verified ? store::transfer_status::verified : store::transfer_status::failed;
      t = state_locked(rec);
      nlohmann::json status{{"type", "fw_status"},
                            {"rollout", img.rollout()},
                            {"status", store::to_string(tr.status)},
                            {"reason", tr.reason}};
      device::delivery<Transport>::queue_locked(rec, s, payload_kind::text,
                                                device::to_payload(status));
    }
    out_.flush(rec);
    store_.set_transfer(rec.id, t);
    if (verified) store_.set_firmware_version(rec.id, version);
    start_next(slots_.release(rec.id));
    return std::nullopt;
  }

  /// Fleet totals of the current rollout.
  [[nodiscard]] rollout_totals totals() const {
    rollout_totals out;
    auto img = current();
    if (!img) return out;
    out.rollout = img->rollout();
    out.version = img->version();
    out.size = img->size();
    for (const auto& rec : devices_.snapshot()) {
      std::lock_guard lock(rec->mutex);
      if (rec->transfer.image != img) continue;
      switch (rec->transfer.status) {
        case store::transfer_status::pending:
          ++out.pending;
          break;
        case store::transfer_status::transferring:
          ++out.transferring;
          break;
        case store::transfer_status::verified:
          ++out.verified;
          break;
        case store::transfer_status::failed:
          ++out.failed;
          break;
        case store::transfer_status::skipped:
          ++out.skipped;
          break;
        case store::transfer_status::none:
          break;
      }
      out.bytes_acked += rec->transfer.acked;
    }
    out.peak_transferring = slots_.peak();
    return out;
  }
  /// One device's part in the current rollout (std::nullopt for a device never seen).
  [[nodiscard]] std::optional<store::transfer_state> transfer_of(std::string_view id) const {
    auto rec = devices_.find(id);
    if (!rec) return std::nullopt;
    std::lock_guard lock(rec->mutex);
    return state_locked(*rec);
  }
  /// The device's part as the store records it; the caller holds the device's mutex.
  [[nodiscard]] static store::transfer_state state_locked(const device::device_record& rec) {
    store::transfer_state t;
    const auto& tr = rec.transfer;
    if (!tr.image) return t;
    t.rollout = tr.image->rollout();
    t.version = tr.image->version();
    t.status = tr.status;
    t.offset = tr.acked;
    t.reason = tr.reason;
    return t;
  }
  /// The transfer slots (limit, active, waiting, peak).
  [[nodiscard]] const transfer_slots& slots() const noexcept { return slots_; }
  /// The image being rolled out (nullptr before the first publish).
  [[nodiscard]] std::shared_ptr<const image> current() const {
    std::lock_guard lock(current_mutex_);
    return current_;
  }
  /// The options in force.
  [[nodiscard]] const rollout_options& options() const noexcept { return options_; }

 private:
  static rollout_options checked(rollout_options o) {
    if (o.window == 0) throw std::invalid_argument("hub_options::window must be >= 1");
    if (o.chunk_size == 0) throw std::invalid_argument("hub_options::chunk_size must be >= 1");
    return o;
  }

  // Whether the device is transferring rollout `rollout` (caller holds its mutex).
  static bool running(const device::device_record& rec, std::uint64_t rollout) {
    const auto& tr = rec.transfer;
    return tr.image && tr.image->rollout() == rollout &&
           tr.status == store::transfer_status::transferring;
  }
  // Puts the device into `img`'s rollout (once per rollout; caller holds its mutex).
  static void join_locked(device::device_record& rec, const std::shared_ptr<const image>& img) {
    auto& tr = rec.transfer;
    if (tr.image != img) {
      tr.image = img;
      tr.acked = 0;
      tr.sent = 0;
      tr.reason.clear();
      tr.status = store::transfer_status::pending;
    }
    if (tr.status == store::transfer_status::pending && rec.firmware_version == img->version()) {
      tr.status = store::transfer_status::skipped;
    }
  }
  // Queues chunks until `window` are unacknowledged (caller holds the device's mutex).
  void fill_window_locked(device::device_record& rec) {
    auto& tr = rec.transfer;
    const auto& img = *tr.image;
    const std::uint64_t window = options_.window * img.chunk_size();
    while (tr.sent < img.size() && tr.sent - tr.acked < window) {
      device::delivery<Transport>::queue_locked(rec, tr.session, payload_kind::binary,
                                                img.chunk_at(tr.sent));
      tr.sent += std::min<std::uint64_t>(img.chunk_size(), img.size() - tr.sent);
    }
  }
  // Starts (or resumes) the device's transfer; false if it cannot start now (offline, or not
  // pending any more).
  bool start(device::device_record& rec) {
    store::transfer_state t;
    {
      std::lock_guard lock(rec.mutex);
      auto& tr = rec.transfer;
      if (rec.session.id == 0 || !rec.session.hello || !tr.image ||
          tr.status != store::transfer_status::pending) {
        return false;
      }
      tr.status = store::transfer_status::transferring;
      tr.session = rec.session.id;
      tr.sent = tr.acked;
      const auto& img = *tr.image;
      nlohmann::json start{{"type", "firmware"},          {"rollout", img.rollout()},
                           {"version", img.version()},    {"size", img.size()},
                           {"sha256", img.sha256()},      {"chunk_size", img.chunk_size()},
                           {"chunks", img.chunk_count()}, {"offset", tr.acked},
                           {"window", options_.window}};
      device::delivery<Transport>::queue_locked(rec, tr.session, payload_kind::text,
                                                device::to_payload(start));
      fill_window_locked(rec);
      t = state_locked(rec);
    }
    out_.flush(rec);
    store_.set_transfer(rec.id, t);
    return true;
  }
  // Gives a freed slot to the next waiting device that can start.
  void start_next(std::optional<std::string> next) {
    while (next) {
      auto rec = devices_.find(*next);
      if (rec && start(*rec)) return;
      next = slots_.release(*next);
    }
  }

  device::registry& devices_;
  device::delivery<Transport>& out_;
  Store& store_;
  const rollout_options options_;
  transfer_slots slots_;
  mutable std::mutex current_mutex_;
  std::shared_ptr<const image> current_;
  std::atomic<std::uint32_t> next_rollout_{0};
};

}  // namespace devgate::firmware
