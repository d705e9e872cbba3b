#pragma once

#include <sqlite3.h>

#include <array>         // the migration steps
#include <cstddef>       // std::size_t
#include <string>        // error messages
#include <system_error>  // set-up failures throw std::system_error

#include "devgate/store/detail/sqlite_handle.hpp"
#include "devgate/store/sqlite_error.hpp"

namespace devgate::store::detail {

/// The migration steps of `sqlite_state_store`'s schema: step `i` takes a database of version
/// `i` (`PRAGMA user_version`; 0 is an empty file) to version `i + 1`. A new version appends a
/// step and never edits an old one, so every database ever written can be brought up to date.
inline constexpr std::array<const char*, 2> sqlite_migrations{
    // 0 -> 1: devices, replay buffers, the current rollout, the message log.
    R"sql(
CREATE TABLE devices(
  id TEXT PRIMARY KEY NOT NULL,
  messages_sent INTEGER NOT NULL DEFAULT 0,
  last_seen_ms INTEGER NOT NULL DEFAULT 0,
  firmware_version TEXT NOT NULL DEFAULT '',
  last_seq INTEGER NOT NULL DEFAULT 0,
  transfer_rollout INTEGER NOT NULL DEFAULT 0,
  transfer_version TEXT NOT NULL DEFAULT '',
  transfer_status INTEGER NOT NULL DEFAULT 0,
  transfer_offset INTEGER NOT NULL DEFAULT 0,
  transfer_reason TEXT NOT NULL DEFAULT '',
  dispatched BLOB);
CREATE INDEX devices_last_seen ON devices(last_seen_ms);
CREATE TABLE replay(
  device TEXT NOT NULL,
  seq INTEGER NOT NULL,
  frame TEXT NOT NULL,
  PRIMARY KEY(device, seq)) WITHOUT ROWID;
CREATE TABLE rollout(
  singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
  rollout INTEGER NOT NULL,
  version TEXT NOT NULL,
  image BLOB NOT NULL);
CREATE TABLE messages(
  device TEXT NOT NULL,
  id INTEGER,
  number INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  payload BLOB NOT NULL);
CREATE INDEX messages_device ON messages(device);
)sql",
    // 1 -> 2: rollout campaigns and their devices (an ended campaign's image is NULL).
    R"sql(
CREATE TABLE campaigns(
  id INTEGER PRIMARY KEY NOT NULL,
  rollout INTEGER NOT NULL,
  version TEXT NOT NULL,
  state TEXT NOT NULL,
  image BLOB);
CREATE TABLE campaign_devices(
  campaign INTEGER NOT NULL,
  device TEXT NOT NULL,
  position INTEGER NOT NULL,
  state TEXT NOT NULL,
  PRIMARY KEY(campaign, device)) WITHOUT ROWID;
)sql",
};

/// The schema version this build writes.
inline constexpr int sqlite_schema_version = static_cast<int>(sqlite_migrations.size());

/// Throws `std::system_error` for `rc` with "<path>: <what> (<SQLite's message>)".
[[noreturn]] inline void sqlite_setup_failed(sqlite_connection& db, int rc, const std::string& path,
                                             const std::string& what) {
  throw std::system_error(make_sqlite_error(rc), "sqlite_state_store: " + path + ": " + what +
                                                     " (" + db.last_message() + ")");
}

/// The `PRAGMA user_version` of `db`, or a negative SQLite result code when it cannot be read.
inline int sqlite_user_version(sqlite_connection& db) {
  sqlite_statement s(db.get(), "PRAGMA user_version");
  sqlite_use use(s);
  const int rc = use.step();
  if (rc != SQLITE_ROW) return -rc;
  return static_cast<int>(use.integer(0));
}

/// Brings `db` (opened on `path`) to `sqlite_schema_version`: applies the missing migration
/// steps in order, in one transaction, and sets `user_version`. Throws `std::system_error` for
/// a database that is not one (a corrupt file), that a newer devgate wrote, or that cannot be
/// written.
inline void sqlite_migrate(sqlite_connection& db, const std::string& path) {
  // IMMEDIATE: two processes opening a fresh file do not both create the tables.
  if (const int rc = db.exec("BEGIN IMMEDIATE"); rc != SQLITE_OK) {
    sqlite_setup_failed(db, rc, path, "cannot start the schema transaction");
  }
  const int found = sqlite_user_version(db);
  if (found < 0) {
    db.exec("ROLLBACK");
    sqlite_setup_failed(db, -found, path, "cannot read the schema version");
  }
  if (found > sqlite_schema_version) {
    db.exec("ROLLBACK");
    throw std::system_error(make_sqlite_error(SQLITE_ERROR),
                            "sqlite_state_store: " + path + ": schema version " +
                                std::to_string(found) + " was written by a newer devgate; " +
                                "this build knows versions up to " +
                                std::to_string(sqlite_schema_version) +
                                " (upgrade devgate, or point it at another state directory)");
  }
  for (int v = found; v < sqlite_schema_version; ++v) {
    if (const int rc = db.exec(sqlite_migrations[static_cast<std::size_t>(v)]); rc != SQLITE_OK) {
      const std::string why = db.last_message();
      db.exec("ROLLBACK");
      throw std::system_error(make_sqlite_error(rc), "sqlite_state_store: " + path +
                                                         ": cannot migrate the schema from " +
                                                         std::to_string(v) + " to " +
                                                         std::to_string(v + 1) + " (" + why + ")");
    }
  }
  if (found != sqlite_schema_version) {
    const std::string set = "PRAGMA user_version = " + std::to_string(sqlite_schema_version);
    if (const int rc = db.exec(set.c_str()); rc != SQLITE_OK) {
      const std::string why = db.last_message();
      db.exec("ROLLBACK");
      throw std::system_error(
          make_sqlite_error(rc),
          "sqlite_state_store: " + path + ": cannot record the schema version (" + why + ")");
    }
  }
  if (const int rc = db.exec("COMMIT"); rc != SQLITE_OK) {
    const std::string why = db.last_message();
    db.exec("ROLLBACK");
    throw std::system_error(make_sqlite_error(rc), "sqlite_state_store: " + path +
                                                       ": cannot commit the schema (" + why + ")");
  }
}

}  // namespace devgate::store::detail
