#pragma once

#include <sqlite3.h>

#include <cstdint>        // counters
#include <mutex>          // one connection, one caller at a time
#include <string>         // device ids, messages
#include <system_error>   // errors as values
#include <unordered_map>  // dispatch windows cached for the current batch
#include <utility>        // std::move

#include "devgate/store/detail/sqlite_handle.hpp"
#include "devgate/store/detail/sqlite_schema.hpp"
#include "devgate/store/sqlite_error.hpp"
#include "devgate/store/sqlite_options.hpp"
#include "devgate/store/state_store.hpp"

namespace devgate::store::detail {

/// The connection, its prepared statements and the batch in progress (behind `mutex`).
struct sqlite_store_state {
  using statement = sqlite_statement;  ///< A prepared statement.
  using use = sqlite_use;              ///< One use of it.

  /// Opens `o.path`, configures and migrates it, prepares every statement; throws on failure.
  explicit sqlite_store_state(sqlite_options o) : opt(std::move(o)) {}

  sqlite_options opt;
  std::mutex mutex;
  sqlite_connection db{opt.path};
  bool configured = configure();

  statement load_device{db.get(),
                        "SELECT messages_sent, last_seen_ms, firmware_version, last_seq, "
                        "transfer_rollout, transfer_version, transfer_status, transfer_offset, "
                        "transfer_reason, dispatched FROM devices WHERE id = ?1"};
  statement load_replay{db.get(), "SELECT seq, frame FROM replay WHERE device = ?1 ORDER BY seq"};
  statement add_sent{db.get(),
                     "INSERT INTO devices(id, messages_sent) VALUES(?1, ?2) ON CONFLICT(id) DO "
                     "UPDATE SET messages_sent = messages_sent + excluded.messages_sent"};
  statement touch{db.get(),
                  "INSERT INTO devices(id, last_seen_ms) VALUES(?1, ?2) ON CONFLICT(id) DO "
                  "UPDATE SET last_seen_ms = excluded.last_seen_ms"};
  statement set_version{db.get(),
                        "INSERT INTO devices(id, firmware_version) VALUES(?1, ?2) ON CONFLICT(id) "
                        "DO UPDATE SET firmware_version = excluded.firmware_version"};
  statement set_last_seq{db.get(),
                         "INSERT INTO devices(id, last_seq) VALUES(?1, ?2) ON CONFLICT(id) DO "
                         "UPDATE SET last_seq = excluded.last_seq"};
  statement set_transfer{
      db.get(),
      "INSERT INTO devices(id, transfer_rollout, transfer_version, transfer_status, "
      "transfer_offset, transfer_reason) VALUES(?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(id) DO "
      "UPDATE SET transfer_rollout = excluded.transfer_rollout, transfer_version = "
      "excluded.transfer_version, transfer_status = excluded.transfer_status, transfer_offset = "
      "excluded.transfer_offset, transfer_reason = excluded.transfer_reason"};
  statement forget_device{db.get(), "DELETE FROM devices WHERE id = ?1"};
  statement forget_all_replay{db.get(), "DELETE FROM replay WHERE device = ?1"};
  statement append_replay{db.get(),
                          "INSERT INTO replay(device, seq, frame) VALUES(?1, ?2, ?3) ON "
                          "CONFLICT(device, seq) DO UPDATE SET frame = excluded.frame"};
  statement raise_last_seq{
      db.get(),
      "INSERT INTO devices(id, last_seq) VALUES(?1, ?2) ON CONFLICT(id) DO "
      "UPDATE SET last_seq = CASE WHEN (last_seq < 0) = (excluded.last_seq < 0) "
      "THEN max(last_seq, excluded.last_seq) WHEN last_seq < 0 THEN last_seq "
      "ELSE excluded.last_seq END"};  // unsigned: stored as int64
  statement forget_replay{db.get(), "DELETE FROM replay WHERE device = ?1 AND seq <= ?2"};
  statement read_window{db.get(), "SELECT dispatched FROM devices WHERE id = ?1"};
  statement dispatched{db.get(),
                       "INSERT INTO devices(id, messages_sent, dispatched) VALUES(?1, ?3, ?2) ON "
                       "CONFLICT(id) DO UPDATE SET messages_sent = messages_sent + "
                       "excluded.messages_sent, dispatched = excluded.dispatched"};
  statement log_message{db.get(),
                        "INSERT INTO messages(device, id, number, kind, payload) VALUES(?1, ?2, "
                        "?3, ?4, ?5)"};
  statement save_rollout{db.get(),
                         "INSERT INTO rollout(singleton, rollout, version, image) VALUES(1, ?1, "
                         "?2, ?3) ON CONFLICT(singleton) DO UPDATE SET rollout = "
                         "excluded.rollout, version = excluded.version, image = excluded.image"};
  statement load_rollout{db.get(),
                         "SELECT rollout, version, image FROM rollout WHERE singleton = 1"};
  statement save_campaign{db.get(),
                          "INSERT INTO campaigns(id, rollout, version, state, image) VALUES(?1, "
                          "?2, ?3, ?4, ?5) ON CONFLICT(id) DO UPDATE SET rollout = "
                          "excluded.rollout, version = excluded.version, state = excluded.state, "
                          "image = coalesce(excluded.image, image)"};
  statement drop_campaign_image{db.get(), "UPDATE campaigns SET image = NULL WHERE id = ?1"};
  statement save_campaign_device{
      db.get(),
      "INSERT INTO campaign_devices(campaign, device, position, state) VALUES(?1, ?2, ?3, ?4) ON "
      "CONFLICT(campaign, device) DO UPDATE SET position = excluded.position, state = "
      "excluded.state"};
  // The campaigns past the newest `?1`, then their devices.
  statement trim_campaign_devices{db.get(),
                                  "DELETE FROM campaign_devices WHERE campaign NOT IN (SELECT id "
                                  "FROM campaigns ORDER BY id DESC LIMIT ?1)"};
  statement trim_campaigns{db.get(),
                           "DELETE FROM campaigns WHERE id NOT IN (SELECT id FROM campaigns "
                           "ORDER BY id DESC LIMIT ?1)"};
  statement load_campaigns{db.get(),
                           "SELECT id, rollout, version, state, image FROM campaigns ORDER BY id"};
  statement load_campaign_devices{db.get(),
                                  "SELECT device, position, state FROM campaign_devices WHERE "
                                  "campaign = ?1 ORDER BY position"};
  statement count_devices{db.get(), "SELECT count(*) FROM devices"};
  statement count_log{db.get(), "SELECT count(*) FROM messages"};
  statement read_log{db.get(),
                     "SELECT id, number, kind, payload FROM messages WHERE device = ?1 ORDER BY "
                     "rowid"};
  // The least recently seen devices (ties by id, so both statements pick the same ones).
  statement evict_replay{db.get(),
                         "DELETE FROM replay WHERE device IN (SELECT id FROM devices ORDER BY "
                         "last_seen_ms, id LIMIT ?1)"};
  statement evict_devices{db.get(),
                          "DELETE FROM devices WHERE id IN (SELECT id FROM devices ORDER BY "
                          "last_seen_ms, id LIMIT ?1)"};
  statement begin{db.get(), "BEGIN IMMEDIATE"};
  statement commit{db.get(), "COMMIT"};
  statement rollback{db.get(), "ROLLBACK"};
  statement savepoint{db.get(), "SAVEPOINT devgate_write"};
  statement release{db.get(), "RELEASE devgate_write"};
  statement rollback_to{db.get(), "ROLLBACK TO devgate_write"};

  bool in_batch = false;       // begin_batch opened the transaction that is open now
  std::error_code batch_lost;  // why SQLite rolled the current batch back, if it did
  std::uint64_t evicted = 0;
  // What the current batch's record_dispatched calls did to a device, written to its row once,
  // when the batch commits (or before a load of it): the batch holds the write lock, so no
  // other connection changes the row meanwhile.
  struct pending_device {
    dispatch_window window;   // as the batch left it
    std::uint64_t added = 0;  // messages to add to messages_sent
    bool dirty = false;       // not written to the row yet
  };
  std::unordered_map<std::string, pending_device> windows;
  // Devices stored, as this connection counted them (the bound is checked against it, so that
  // a write need not count the table; `enforce_bound` counts exactly before it deletes).
  std::int64_t devices = recount();

  // WAL mode, the durability level and the busy timeout, then the schema; throws on failure.
  bool configure() {
    sqlite3_busy_timeout(db.get(), static_cast<int>(opt.busy_timeout.count()));
    {
      // The first statement reads the file: a file that is not a database fails here.
      sqlite3_stmt* wal = nullptr;
      int rc = sqlite3_prepare_v2(db.get(), "PRAGMA journal_mode = WAL", -1, &wal, nullptr);
      if (rc == SQLITE_OK) rc = sqlite3_step(wal);
      const auto* mode = rc == SQLITE_ROW ? sqlite3_column_text(wal, 0) : nullptr;
      const std::string found = mode != nullptr ? reinterpret_cast<const char*>(mode) : "";
      sqlite3_finalize(wal);
      if (rc != SQLITE_ROW) {
        sqlite_setup_failed(db, rc, opt.path, "cannot open the database in WAL mode");
      }
      if (found != "wal" && found != "memory") {
        sqlite_setup_failed(db, SQLITE_ERROR, opt.path,
                            "the database refuses WAL mode (journal mode " + found + ")");
      }
    }
    const char* sync = opt.durability == devgate::store::sqlite_synchronous::full
                           ? "PRAGMA synchronous = FULL"
                           : "PRAGMA synchronous = NORMAL";
    if (const int rc = db.exec(sync); rc != SQLITE_OK) {
      sqlite_setup_failed(db, rc, opt.path, "cannot set the durability level");
    }
    sqlite_migrate(db, opt.path);
    return true;
  }

  // The error of a failed step, noting a batch that SQLite rolled back with it (some errors,
  // such as SQLITE_FULL or an I/O error, end the whole transaction).
  std::error_code failed(int rc) {
    const auto ec = make_sqlite_error(rc);
    if (in_batch && sqlite3_get_autocommit(db.get()) != 0) {
      in_batch = false;
      if (!batch_lost) batch_lost = ec;
      windows.clear();
      devices = recount();
    }
    return ec;
  }
  // Steps `u` to completion; its error, if any.
  std::error_code run(use& u) {
    const int rc = u.step();
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? std::error_code{} : failed(rc);
  }
  // Runs an upsert into `devices`, counting the row if it inserted one (an upsert that updates
  // leaves the last insert rowid alone, and rowids start at 1).
  std::error_code upsert(use& u) {
    sqlite3_set_last_insert_rowid(db.get(), 0);
    const auto ec = run(u);
    if (!ec && sqlite3_last_insert_rowid(db.get()) != 0) ++devices;
    return ec;
  }
  // Counts the devices stored (0 if that fails).
  std::int64_t recount() {
    use u(count_devices);
    return u.step() == SQLITE_ROW ? u.integer(0) : 0;
  }
  // Runs one of the transaction-control statements.
  int control(statement& s) {
    use u(s);
    return u.step();
  }
  // After a write outside a batch (it committed on its own): the device bound.
  void wrote() {
    if (!in_batch) enforce_bound();
  }
  // Deletes the least recently seen devices past `max_devices`, in one transaction.
  void enforce_bound() {
    const auto bound = static_cast<std::int64_t>(opt.max_devices);
    if (bound == 0 || devices <= bound) return;
    devices = recount();
    const std::int64_t count = devices;
    if (count <= bound) return;
    if (control(begin) != SQLITE_DONE) return;
    bool ok = false;
    {
      use u(evict_replay);
      u.bind(1, count - bound);
      ok = u.step() == SQLITE_DONE;
    }
    std::uint64_t deleted = 0;
    if (ok) {
      use u(evict_devices);
      u.bind(1, count - bound);
      ok = u.step() == SQLITE_DONE;
      deleted = static_cast<std::uint64_t>(sqlite3_changes64(db.get()));
    }
    if (ok && control(commit) == SQLITE_DONE) {
      evicted += deleted;
      devices -= static_cast<std::int64_t>(deleted);
    } else if (sqlite3_get_autocommit(db.get()) == 0) {
      control(rollback);
    }
  }
  // Runs `body` (several statements) all or nothing: inside a savepoint.
  template <class Body>
  std::error_code atomically(Body&& body) {
    if (const int rc = control(savepoint); rc != SQLITE_DONE) return failed(rc);
    const auto ec = body();
    if (!ec) {
      if (const int rc = control(release); rc != SQLITE_DONE) return failed(rc);
      return {};
    }
    if (sqlite3_get_autocommit(db.get()) == 0) {
      control(rollback_to);
      control(release);
    }
    devices = recount();  // a device row the savepoint inserted is gone again
    return ec;
  }
  // Appends `r` to the message log.
  std::error_code log(const std::string& id, const dispatch_record& r) {
    use u(log_message);
    u.bind_text(1, id);
    if (r.id) {
      u.bind(2, static_cast<std::int64_t>(*r.id));
    } else {
      u.bind_null(2);
    }
    u.bind(3, static_cast<std::int64_t>(r.number))
        .bind(4, static_cast<std::int64_t>(r.kind))
        .bind_blob(5, r.payload.data(), r.payload.size());
    return run(u);
  }
  // Writes a device's pending dispatch figures to its row (one upsert for the whole batch).
  std::error_code flush_pending(const std::string& id, pending_device& p) {
    if (!p.dirty) return {};
    const std::string bytes = p.window.to_bytes();
    use u(dispatched);
    u.bind_text(1, id);
    if (bytes.empty()) {
      u.bind_null(2);
    } else {
      u.bind_blob(2, bytes.data(), bytes.size());
    }
    u.bind(3, static_cast<std::int64_t>(p.added));
    if (const auto ec = upsert(u)) return ec;
    p.dirty = false;
    p.added = 0;
    return {};
  }
  // Writes every device's pending dispatch figures (before the batch commits).
  std::error_code flush_pending() {
    for (auto& [id, p] : windows) {
      if (const auto ec = flush_pending(id, p)) return ec;
    }
    return {};
  }
  // The device's dispatch window as stored (or as this batch left it).
  std::error_code window_of(const std::string& id, dispatch_window& out) {
    if (in_batch) {
      if (const auto it = windows.find(id); it != windows.end()) {
        out = it->second.window;
        return {};
      }
    }
    use u(read_window);
    u.bind_text(1, id);
    const int rc = u.step();
    if (rc == SQLITE_ROW) {
      const auto b = u.blob(0);
      out = dispatch_window::from_bytes(
          std::string_view(reinterpret_cast<const char*>(b.data()), b.size()));
    } else if (rc == SQLITE_DONE) {
      out = dispatch_window{};
    } else {
      return failed(rc);
    }
    return {};
  }
};

}  // namespace devgate::store::detail
