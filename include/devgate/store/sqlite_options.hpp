#pragma once

#include <chrono>    // the busy timeout
#include <cstddef>   // std::size_t
#include <cstdint>   // numbers
#include <optional>  // a logged message's id
#include <string>    // the path, payloads

#include "devgate/transport/transport.hpp"  // payload_kind

namespace devgate::store {

/// How hard SQLite works to keep a committed transaction across a power loss (`PRAGMA
/// synchronous`, in WAL mode). Either way a crash of the process alone loses nothing
/// committed.
enum class sqlite_synchronous : std::uint8_t {
  normal,  ///< The WAL is synced at checkpoints: a power loss may undo the last commits.
  full,    ///< The WAL is synced at every commit: a commit survives a power loss too.
};

/// What `sqlite_state_store` opens and how it behaves.
struct sqlite_options {
  /// The database file, created if missing (its directory must exist). SQLite keeps `-wal`
  /// and `-shm` files beside it.
  std::string path;
  /// Durability of each commit (`normal` or `full`).
  sqlite_synchronous durability = sqlite_synchronous::normal;
  /// Devices kept at most; past it the least recently seen ones (and their replay rows) are
  /// deleted after each commit. 0: no bound.
  std::size_t max_devices = 0;
  /// Keep a row per message `record_dispatched` reports (device, id, number, kind, payload):
  /// an append-only record of what reached the sink.
  bool message_log = false;
  /// Rollout campaigns kept at most (the newest; older ones go with their device rows).
  std::size_t max_campaigns = 16;
  /// How long a call waits for another connection's lock before it fails with `SQLITE_BUSY`.
  std::chrono::milliseconds busy_timeout{5000};
};

/// A message kept in the message log (`sqlite_options::message_log`).
struct logged_message {
  std::optional<std::uint64_t> id;         ///< The `send`'s id (none: it had none).
  std::uint64_t number = 0;                ///< Its number among the device's messages.
  payload_kind kind = payload_kind::text;  ///< Text or binary.
  std::string payload;                     ///< The data the sink received.
};

}  // namespace devgate::store
