#pragma once
// An optional part: needs SQLite 3 (<sqlite3.h>, link -lsqlite3; CMake target devgate::sqlite,
// meson devgate_sqlite_dep). The umbrella header devgate/devgate.hpp does not include it.

#include <sqlite3.h>

#include <cstddef>       // std::size_t
#include <cstdint>       // counters
#include <memory>        // the state lives on the heap so the store can move into the hub
#include <mutex>         // one connection, one caller at a time
#include <optional>      // a logged message's id, the kept rollout
#include <string>        // device ids, the path
#include <string_view>   // replay frames
#include <system_error>  // errors as values
#include <utility>       // std::move
#include <vector>        // replay entries, the message log

#include "devgate/store/detail/sqlite_schema.hpp"
#include "devgate/store/detail/sqlite_store_state.hpp"
#include "devgate/store/sqlite_error.hpp"
#include "devgate/store/sqlite_options.hpp"
#include "devgate/store/state_store.hpp"

namespace devgate::store {

/// A durable state store in an SQLite database (WAL mode): device records, replay buffers,
/// dispatch windows, the current rollout with its image, and optionally a log of what reached
/// the sink. Every statement is prepared once, at construction. Writes between `begin_batch()`
/// and `commit_batch()` form one transaction (group commit: the hub's store thread applies a
/// batch of queued writes, then commits once); a write outside a batch commits on its own.
///
/// Calls may wait on the disk, so the store is not `nonblocking`: the hub calls it from its
/// store thread only. Every call is thread-safe (one internal lock). Errors are returned as
/// `std::error_code`s of `sqlite_category()`; only construction throws. Movable, not copyable;
/// a moved-from store may only be destroyed or assigned to.
class sqlite_state_store {
 public:
  /// Opens or creates the database at `options.path` and brings its schema to the current
  /// version. Throws `std::system_error` naming the path and SQLite's message when the file
  /// cannot be opened or written, is not a database, or was written by a newer devgate.
  explicit sqlite_state_store(sqlite_options options);
  sqlite_state_store(const sqlite_state_store&) = delete;
  sqlite_state_store& operator=(const sqlite_state_store&) = delete;
  /// Takes over `other`'s connection.
  sqlite_state_store(sqlite_state_store&& other) noexcept = default;
  /// Takes over `other`'s connection (closing this one; an open batch is rolled back).
  sqlite_state_store& operator=(sqlite_state_store&& other) noexcept = default;
  /// Closes the database; a batch still open is rolled back.
  ~sqlite_state_store() = default;

  /// The schema version this build writes (`PRAGMA user_version`).
  static constexpr int schema_version = detail::sqlite_schema_version;

  /// The device's state with its replay entries (ordered by seq) and dispatch window; a
  /// default state for an unknown device.
  [[nodiscard]] load_result load(const std::string& id);
  /// Adds `n` to the device's message count.
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n);
  /// Records activity at `unix_ms`.
  std::error_code touch(const std::string& id, std::int64_t unix_ms);
  /// Records the firmware version the device runs.
  std::error_code set_firmware_version(const std::string& id, const std::string& version);
  /// Records the device's firmware transfer.
  std::error_code set_transfer(const std::string& id, const transfer_state& t);
  /// Records the last sequence number assigned to the device.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq);
  /// Forgets the device and its replay entries (its message log rows stay: they record what
  /// the sink received).
  std::error_code forget(const std::string& id);

  /// Keeps sequenced message `seq` for the device (replacing one kept under the same seq).
  std::error_code append_replay(const std::string& id, std::uint64_t seq, std::string_view frame);
  /// Forgets the device's kept messages numbered `seq` and below.
  std::error_code forget_replay(const std::string& id, std::uint64_t seq);
  /// The sink accepted `r`: adds 1 to `messages_sent`, inserts `r.id` into the dispatch window
  /// and, with the message log on, appends `r` to it; all or nothing.
  std::error_code record_dispatched(const std::string& id, const dispatch_record& r);
  /// Keeps `r` as the current rollout (replacing the one kept).
  std::error_code save_rollout(const rollout_record& r);
  /// The rollout kept, if any.
  [[nodiscard]] rollout_load_result load_rollout();
  /// Keeps campaign `c` and its changed `devices` rows, all or nothing; the first save of a
  /// campaign (with its image) trims the table to the newest `max_campaigns`, and an ended
  /// campaign's image is dropped.
  std::error_code save_campaign(const campaign_record& c,
                                const std::vector<campaign_device_record>& devices);
  /// The campaigns kept, oldest first, each with its devices by position.
  [[nodiscard]] campaign_load_result load_campaigns();

  /// Opens a transaction that the writes up to `commit_batch()` join.
  std::error_code begin_batch();
  /// Writes the batch's dispatch figures (one row update per device) and commits the batch's
  /// writes (then evicts past `max_devices`). Returns the error that made the batch roll back,
  /// if one did: then none of its writes is stored (except writes after a rollback SQLite made
  /// by itself, which committed on their own).
  std::error_code commit_batch();

  /// Devices stored.
  [[nodiscard]] std::size_t size();
  /// Devices deleted by the `max_devices` bound so far (by this object).
  [[nodiscard]] std::uint64_t evicted();
  /// Rows in the message log (all devices).
  [[nodiscard]] std::size_t message_log_size();
  /// The device's message log rows, in the order they were appended.
  [[nodiscard]] std::vector<logged_message> message_log(const std::string& id);
  /// The database file.
  [[nodiscard]] const std::string& path() const noexcept;

 private:
  std::unique_ptr<detail::sqlite_store_state> d_;
};

// ---- implementation -----------------------------------------------------------------------
inline sqlite_state_store::sqlite_state_store(sqlite_options options)
    : d_(std::make_unique<detail::sqlite_store_state>(std::move(options))) {}

inline load_result sqlite_state_store::load(const std::string& id) {
  std::lock_guard lock(d_->mutex);
  load_result r;
  // What this batch recorded for the device is read back like the rest of its row.
  if (const auto it = d_->windows.find(id); it != d_->windows.end()) {
    if (const auto ec = d_->flush_pending(id, it->second)) {
      r.error = ec;
      return r;
    }
  }
  {
    detail::sqlite_use u(d_->load_device);
    u.bind_text(1, id);
    const int rc = u.step();
    if (rc == SQLITE_ROW) {
      auto& s = r.state;
      s.messages_sent = static_cast<std::uint64_t>(u.integer(0));
      s.last_seen_ms = u.integer(1);
      s.firmware_version = u.text(2);
      s.last_seq = static_cast<std::uint64_t>(u.integer(3));
      s.transfer.rollout = static_cast<std::uint32_t>(u.integer(4));
      s.transfer.version = u.text(5);
      const auto status = u.integer(6);
      s.transfer.status = status >= 0 && status <= static_cast<int>(transfer_status::skipped)
                              ? static_cast<transfer_status>(status)
                              : transfer_status::none;
      s.transfer.offset = static_cast<std::uint64_t>(u.integer(7));
      s.transfer.reason = u.text(8);
      const auto b = u.blob(9);
      s.dispatched = dispatch_window::from_bytes(
          std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
    } else if (rc != SQLITE_DONE) {
      return {device_state{}, d_->failed(rc)};
    }
  }
  detail::sqlite_use u(d_->load_replay);
  u.bind_text(1, id);
  int rc = 0;
  while ((rc = u.step()) == SQLITE_ROW) {
    r.state.replay.push_back({static_cast<std::uint64_t>(u.integer(0)), std::string(u.text(1))});
  }
  if (rc != SQLITE_DONE) return {device_state{}, d_->failed(rc)};
  return r;
}

inline std::error_code sqlite_state_store::add_messages_sent(const std::string& id,
                                                             std::uint64_t n) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->add_sent);
  u.bind_text(1, id).bind(2, static_cast<std::int64_t>(n));
  const auto ec = d_->upsert(u);
  d_->wrote();
  return ec;
}

inline std::error_code sqlite_state_store::touch(const std::string& id, std::int64_t unix_ms) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->touch);
  u.bind_text(1, id).bind(2, unix_ms);
  const auto ec = d_->upsert(u);
  d_->wrote();
  return ec;
}

inline std::error_code sqlite_state_store::set_firmware_version(const std::string& id,
                                                                const std::string& version) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->set_version);
  u.bind_text(1, id).bind_text(2, version);
  const auto ec = d_->upsert(u);
  d_->wrote();
  return ec;
}

inline std::error_code sqlite_state_store::set_transfer(const std::string& id,
                                                        const transfer_state& t) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->set_transfer);
  u.bind_text(1, id)
      .bind(2, t.rollout)
      .bind_text(3, t.version)
      .bind(4, static_cast<std::int64_t>(t.status))
      .bind(5, static_cast<std::int64_t>(t.offset))
      .bind_text(6, t.reason);
  const auto ec = d_->upsert(u);
  d_->wrote();
  return ec;
}

inline std::error_code sqlite_state_store::set_last_seq(const std::string& id, std::uint64_t seq) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->set_last_seq);
  u.bind_text(1, id).bind(2, static_cast<std::int64_t>(seq));
  const auto ec = d_->upsert(u);
  d_->wrote();
  return ec;
}

inline std::error_code sqlite_state_store::forget(const std::string& id) {
  std::lock_guard lock(d_->mutex);
  d_->windows.erase(id);
  return d_->atomically([&] {
    {
      detail::sqlite_use u(d_->forget_device);
      u.bind_text(1, id);
      if (const auto ec = d_->run(u)) return ec;
      d_->devices -= sqlite3_changes64(d_->db.get());
    }
    detail::sqlite_use u(d_->forget_all_replay);
    u.bind_text(1, id);
    return d_->run(u);
  });
}

inline std::error_code sqlite_state_store::append_replay(const std::string& id, std::uint64_t seq,
                                                         std::string_view frame) {
  std::lock_guard lock(d_->mutex);
  {
    detail::sqlite_use u(d_->append_replay);
    u.bind_text(1, id).bind(2, static_cast<std::int64_t>(seq)).bind_text(3, frame);
    if (auto ec = d_->run(u)) return ec;
  }
  // Numbering continues above every number kept, acknowledged or not.
  detail::sqlite_use u(d_->raise_last_seq);
  u.bind_text(1, id).bind(2, static_cast<std::int64_t>(seq));
  return d_->run(u);
}

inline std::error_code sqlite_state_store::forget_replay(const std::string& id, std::uint64_t seq) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->forget_replay);
  u.bind_text(1, id).bind(2, static_cast<std::int64_t>(seq));
  return d_->run(u);
}

inline std::error_code sqlite_state_store::record_dispatched(const std::string& id,
                                                             const dispatch_record& r) {
  std::lock_guard lock(d_->mutex);
  dispatch_window w;
  if (const auto ec = d_->window_of(id, w)) return ec;
  if (r.id) w.insert(*r.id);
  if (d_->in_batch) {
    // In a batch the device's row is written once, at commit (one upsert per device instead
    // of one per message); the message log's row now, so that a failure leaves nothing done.
    if (d_->opt.message_log) {
      if (const auto ec = d_->log(id, r)) return ec;
    }
    auto& p = d_->windows[id];
    p.window = w;
    ++p.added;
    p.dirty = true;
    return {};
  }
  const auto write = [&]() -> std::error_code {
    {
      const std::string bytes = w.to_bytes();
      detail::sqlite_use u(d_->dispatched);
      u.bind_text(1, id);
      if (bytes.empty()) {
        u.bind_null(2);
      } else {
        u.bind_blob(2, bytes.data(), bytes.size());
      }
      u.bind(3, std::int64_t{1});
      if (const auto ec = d_->upsert(u)) return ec;
    }
    return d_->opt.message_log ? d_->log(id, r) : std::error_code{};
  };
  // One statement is atomic by itself; with the message log there are two.
  const auto ec = d_->opt.message_log ? d_->atomically(write) : write();
  if (!ec) d_->wrote();
  return ec;
}

inline std::error_code sqlite_state_store::save_rollout(const rollout_record& r) {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->save_rollout);
  u.bind(1, r.rollout).bind_text(2, r.version).bind_blob(3, r.image.data(), r.image.size());
  return d_->run(u);
}

inline rollout_load_result sqlite_state_store::load_rollout() {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->load_rollout);
  const int rc = u.step();
  if (rc == SQLITE_DONE) return {};
  if (rc != SQLITE_ROW) return {std::nullopt, d_->failed(rc)};
  rollout_record r;
  r.rollout = static_cast<std::uint32_t>(u.integer(0));
  r.version = u.text(1);
  const auto image = u.blob(2);
  r.image.assign(image.begin(), image.end());
  return {std::move(r), {}};
}

inline std::error_code sqlite_state_store::save_campaign(
    const campaign_record& c, const std::vector<campaign_device_record>& devices) {
  std::lock_guard lock(d_->mutex);
  return d_->atomically([&]() -> std::error_code {
    {
      detail::sqlite_use u(d_->save_campaign);
      u.bind(1, static_cast<std::int64_t>(c.id))
          .bind(2, c.rollout)
          .bind_text(3, c.version)
          .bind_text(4, c.state);
      if (c.image.empty()) {
        u.bind_null(5);
      } else {
        u.bind_blob(5, c.image.data(), c.image.size());
      }
      if (const auto ec = d_->run(u)) return ec;
    }
    for (const auto& d : devices) {
      detail::sqlite_use u(d_->save_campaign_device);
      u.bind(1, static_cast<std::int64_t>(c.id))
          .bind_text(2, d.device)
          .bind(3, d.position)
          .bind_text(4, d.state);
      if (const auto ec = d_->run(u)) return ec;
    }
    if (c.ended) {
      detail::sqlite_use u(d_->drop_campaign_image);
      u.bind(1, static_cast<std::int64_t>(c.id));
      if (const auto ec = d_->run(u)) return ec;
    }
    if (!c.image.empty() && d_->opt.max_campaigns != 0) {
      const auto keep = static_cast<std::int64_t>(d_->opt.max_campaigns);
      for (auto* st : {&d_->trim_campaign_devices, &d_->trim_campaigns}) {
        detail::sqlite_use u(*st);
        u.bind(1, keep);
        if (const auto ec = d_->run(u)) return ec;
      }
    }
    return {};
  });
}

inline campaign_load_result sqlite_state_store::load_campaigns() {
  std::lock_guard lock(d_->mutex);
  campaign_load_result out;
  {
    detail::sqlite_use u(d_->load_campaigns);
    int rc;
    while ((rc = u.step()) == SQLITE_ROW) {
      kept_campaign k;
      k.campaign.id = static_cast<std::uint64_t>(u.integer(0));
      k.campaign.rollout = static_cast<std::uint32_t>(u.integer(1));
      k.campaign.version = std::string(u.text(2));
      k.campaign.state = std::string(u.text(3));
      if (u.is_null(4)) {
        k.campaign.ended = true;
      } else {
        const auto image = u.blob(4);
        k.campaign.image.assign(image.begin(), image.end());
      }
      out.campaigns.push_back(std::move(k));
    }
    if (rc != SQLITE_DONE) return {{}, d_->failed(rc)};
  }
  for (auto& k : out.campaigns) {
    detail::sqlite_use u(d_->load_campaign_devices);
    u.bind(1, static_cast<std::int64_t>(k.campaign.id));
    int rc;
    while ((rc = u.step()) == SQLITE_ROW) {
      k.devices.push_back({std::string(u.text(0)), static_cast<std::uint32_t>(u.integer(1)),
                           std::string(u.text(2))});
    }
    if (rc != SQLITE_DONE) return {{}, d_->failed(rc)};
  }
  return out;
}

inline std::error_code sqlite_state_store::begin_batch() {
  std::lock_guard lock(d_->mutex);
  if (d_->in_batch) return std::make_error_code(std::errc::operation_in_progress);
  if (const int rc = d_->control(d_->begin); rc != SQLITE_DONE) return make_sqlite_error(rc);
  d_->in_batch = true;
  d_->batch_lost.clear();
  return {};
}

inline std::error_code sqlite_state_store::commit_batch() {
  std::lock_guard lock(d_->mutex);
  auto ec = std::exchange(d_->batch_lost, {});
  if (d_->in_batch) {
    // The batch's dispatch figures first: a failure to write them fails the whole batch.
    if (const auto flushed = d_->flush_pending(); flushed && !ec) ec = flushed;
    d_->in_batch = false;
    d_->windows.clear();
    if (ec && sqlite3_get_autocommit(d_->db.get()) == 0) {
      d_->control(d_->rollback);
      d_->devices = d_->recount();
    } else if (const int rc = d_->control(d_->commit); rc != SQLITE_DONE) {
      ec = make_sqlite_error(rc);
      if (sqlite3_get_autocommit(d_->db.get()) == 0) d_->control(d_->rollback);
      d_->devices = d_->recount();
    }
  }
  d_->enforce_bound();
  return ec;
}

inline std::size_t sqlite_state_store::size() {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->count_devices);
  return u.step() == SQLITE_ROW ? static_cast<std::size_t>(u.integer(0)) : 0;
}

inline std::uint64_t sqlite_state_store::evicted() {
  std::lock_guard lock(d_->mutex);
  return d_->evicted;
}

inline std::size_t sqlite_state_store::message_log_size() {
  std::lock_guard lock(d_->mutex);
  detail::sqlite_use u(d_->count_log);
  return u.step() == SQLITE_ROW ? static_cast<std::size_t>(u.integer(0)) : 0;
}

inline std::vector<logged_message> sqlite_state_store::message_log(const std::string& id) {
  std::lock_guard lock(d_->mutex);
  std::vector<logged_message> out;
  detail::sqlite_use u(d_->read_log);
  u.bind_text(1, id);
  while (u.step() == SQLITE_ROW) {
    logged_message m;
    if (!u.is_null(0)) m.id = static_cast<std::uint64_t>(u.integer(0));
    m.number = static_cast<std::uint64_t>(u.integer(1));
    m.kind = u.integer(2) == static_cast<int>(payload_kind::binary) ? payload_kind::binary
                                                                    : payload_kind::text;
    const auto p = u.blob(3);
    m.payload.assign(reinterpret_cast<const char*>(p.data()), p.size());
    out.push_back(std::move(m));
  }
  return out;
}

inline const std::string& sqlite_state_store::path() const noexcept { return d_->opt.path; }

static_assert(state_store<sqlite_state_store>,
              "sqlite_state_store must satisfy devgate::store::state_store");
static_assert(durable_state_store<sqlite_state_store>,
              "sqlite_state_store must satisfy devgate::store::durable_state_store");
static_assert(campaign_store<sqlite_state_store>,
              "sqlite_state_store must satisfy devgate::store::campaign_store");
static_assert(transactional_store<sqlite_state_store>,
              "sqlite_state_store must satisfy devgate::store::transactional_store");
static_assert(!is_nonblocking_store<sqlite_state_store>,
              "sqlite_state_store waits on the disk: the hub must call it from its store thread");

}  // namespace devgate::store
