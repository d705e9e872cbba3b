#pragma once

#include <concepts>      // std::same_as
#include <cstdint>       // counters, offsets
#include <string>        // device ids, versions
#include <system_error>  // errors as values

namespace devgate::store {

/// Where a device's firmware transfer stands (the rollout's per-device status).
enum class transfer_status : std::uint8_t {
  none,          ///< No rollout concerns this device.
  pending,       ///< Waiting for its turn (or for the device to connect).
  transferring,  ///< Chunks are flowing; `offset` bytes acknowledged so far.
  verified,      ///< The device received every byte and confirmed the SHA-256.
  failed,        ///< The device reported a failure, or its result failed the check (`reason`).
  skipped,       ///< The device already reported the rollout's version.
};

/// The name used on the wire and in logs for `s`.
[[nodiscard]] constexpr const char* to_string(transfer_status s) noexcept {
  switch (s) {
    case transfer_status::none:
      return "none";
    case transfer_status::pending:
      return "pending";
    case transfer_status::transferring:
      return "transferring";
    case transfer_status::verified:
      return "verified";
    case transfer_status::failed:
      return "failed";
    case transfer_status::skipped:
      return "skipped";
  }
  return "none";
}

/// A device's firmware transfer as last recorded.
struct transfer_state {
  std::uint32_t rollout = 0;                       ///< Rollout id (0: none).
  std::string version;                             ///< The version being rolled out.
  transfer_status status = transfer_status::none;  ///< Where it stands.
  std::uint64_t offset = 0;  ///< Bytes the device acknowledged (resume point).
  std::string reason;        ///< Why it failed (status failed only).
};

/// Everything devgate remembers about a device across connections.
struct device_state {
  std::uint64_t messages_sent = 0;  ///< Messages the device sent that the pipeline accepted.
  std::int64_t last_seen_ms = 0;    ///< Unix time (ms) of its last activity; 0 = never seen.
  std::string firmware_version;     ///< The version it reported or was last verified with.
  /// The last sequence number assigned to it when the hub last let go of its record, so that
  /// numbering continues above it when the device returns (0: none).
  std::uint64_t last_seq = 0;
  transfer_state transfer;  ///< Its part in the current firmware rollout.
};

/// What `load` answers: the device's state, or the error that kept the store from reading it
/// (then `state` is a default one, and the hub counts the error and carries on with it).
struct load_result {
  device_state state;     ///< The stored state (default for an unknown device).
  std::error_code error;  ///< Why the store could not answer (empty: it did).
};

/// What the device hub requires of a state store. Every operation is per field, so that a
/// store backed by Redis (HINCRBY, HSET) or a file can implement each one atomically without
/// a read-modify-write of the whole record; all must be safe to call from any thread, and each
/// reports failure as a value (a store should not throw; if it does, the hub counts the
/// exception as an error of that call).
/// - `load(id)`: the device's state (a default `device_state` for an unknown device).
/// - `add_messages_sent(id, n)`: adds `n` to the count.
/// - `touch(id, unix_ms)`: records activity.
/// - `set_firmware_version(id, v)`, `set_transfer(id, t)`, `set_last_seq(id, seq)`: replace
///   one field.
/// - `forget(id)`: removes everything stored about the device (`hub::forget_device`).
/// Writes return a `std::error_code` (empty on success), `load` a `load_result`.
///
/// Threads: a store that may block (disk, network) is called from the hub's store thread only,
/// never from a network thread (`store::write_behind`). A store whose every call is quick and
/// never waits on I/O opts out of that thread with `static constexpr bool nonblocking = true;`
/// and is then called inline (`memory_state_store` does).
/// The hub never holds one of its own locks while calling the store.
/// A hub given a type that does not fit stops the build with: "device::hub: Store must satisfy
/// devgate::store::state_store (load, add_messages_sent, touch, set_firmware_version,
/// set_transfer, set_last_seq, forget; errors as values)".
template <class S>
concept state_store = requires(S& s, const std::string& id, std::uint64_t n, std::int64_t ms,
                               const std::string& version, const transfer_state& t) {
  { s.load(id) } -> std::same_as<load_result>;
  { s.add_messages_sent(id, n) } -> std::same_as<std::error_code>;
  { s.touch(id, ms) } -> std::same_as<std::error_code>;
  { s.set_firmware_version(id, version) } -> std::same_as<std::error_code>;
  { s.set_transfer(id, t) } -> std::same_as<std::error_code>;
  { s.set_last_seq(id, n) } -> std::same_as<std::error_code>;
  { s.forget(id) } -> std::same_as<std::error_code>;
};

/// True for a store that says every call is quick and never waits (`S::nonblocking`): the hub
/// calls it inline, on whatever thread needs it, instead of through its store thread.
template <class S>
inline constexpr bool is_nonblocking_store = requires {
  requires static_cast<bool>(S::nonblocking);
};

}  // namespace devgate::store
