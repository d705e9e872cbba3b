#pragma once

#include <array>         // the dispatch window's bits
#include <concepts>      // std::same_as
#include <cstddef>       // std::byte
#include <cstdint>       // counters, offsets
#include <optional>      // a send's id
#include <string>        // device ids, versions
#include <string_view>   // frames
#include <system_error>  // errors as values
#include <vector>        // replay entries, images

#include "devgate/core/bytes.hpp"           // payloads
#include "devgate/transport/transport.hpp"  // payload_kind

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

/// A sequenced message kept for a device until it acknowledges it: its sequence number and its
/// whole `deliver` frame (JSON text).
struct replay_entry {
  std::uint64_t seq = 0;  ///< Its sequence number.
  std::string frame;      ///< The `deliver` frame, as sent.
};

/// The ids of a device's most recent `send`s that reached the sink (ack policy `on_dispatch`),
/// so that a resend of one of them is answered without reaching the sink again: the highest
/// id seen and a bit for each of the `span` ids below it. An id older than that is not
/// remembered (a resend of it is dispatched again: at least once); a well-behaved device gives
/// its sends increasing ids and keeps fewer than `span` of them unacknowledged.
class dispatch_window {
 public:
  /// Ids remembered below the highest.
  static constexpr std::uint64_t span = 1024;
  /// Bytes of `to_bytes()`.
  static constexpr std::size_t encoded_size = 8 + span / 8;

  /// True if `id` was inserted and is still within the window.
  [[nodiscard]] bool contains(std::uint64_t id) const noexcept {
    if (empty_ || id > high_ || high_ - id >= span) return false;
    return (bits_[(id % span) / 64] >> (id % 64)) & 1u;
  }
  /// Remembers `id` (ids more than `span` below the highest are forgotten).
  void insert(std::uint64_t id) noexcept {
    if (empty_) {
      empty_ = false;
      high_ = id;
    } else if (id > high_) {
      // Clear the slots of the ids the window slides past.
      const std::uint64_t slide = id - high_;
      if (slide >= span) {
        bits_.fill(0);
      } else {
        for (std::uint64_t k = high_ + 1; k <= id; ++k) {
          bits_[(k % span) / 64] &= ~(std::uint64_t{1} << (k % 64));
        }
      }
      high_ = id;
    } else if (high_ - id >= span) {
      return;  // older than the window
    }
    bits_[(id % span) / 64] |= std::uint64_t{1} << (id % 64);
  }
  /// True when no id was inserted.
  [[nodiscard]] bool empty() const noexcept { return empty_; }
  /// The highest id inserted (0 when empty).
  [[nodiscard]] std::uint64_t highest() const noexcept { return high_; }

  /// The window as `encoded_size` bytes (little-endian), for a store; empty when it is empty.
  [[nodiscard]] std::string to_bytes() const {
    if (empty_) return {};
    std::string out(encoded_size, '\0');
    put(out.data(), high_);
    for (std::size_t i = 0; i < bits_.size(); ++i) put(out.data() + 8 + 8 * i, bits_[i]);
    return out;
  }
  /// The window `to_bytes()` made; an empty window for anything else (empty, or the wrong
  /// size).
  [[nodiscard]] static dispatch_window from_bytes(std::string_view b) noexcept {
    dispatch_window w;
    if (b.size() != encoded_size) return w;
    w.empty_ = false;
    w.high_ = get(b.data());
    for (std::size_t i = 0; i < w.bits_.size(); ++i) w.bits_[i] = get(b.data() + 8 + 8 * i);
    return w;
  }
  /// Windows holding the same ids are equal.
  friend bool operator==(const dispatch_window&, const dispatch_window&) = default;

 private:
  static void put(char* p, std::uint64_t v) noexcept {
    for (int i = 0; i < 8; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  }
  static std::uint64_t get(const char* p) noexcept {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t{static_cast<unsigned char>(p[i])} << (8 * i);
    return v;
  }
  bool empty_ = true;
  std::uint64_t high_ = 0;
  std::array<std::uint64_t, span / 64> bits_{};
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
  /// Sequenced messages not yet acknowledged, oldest first (a durable store only).
  std::vector<replay_entry> replay;
  /// Its recent sends that reached the sink (a durable store only; ack policy on_dispatch).
  dispatch_window dispatched;
  /// The history epoch of a shared store (empty: the store has none): it changes when the
  /// store lost what it held (a Redis restarted empty), and the welcome tells the device, so
  /// a device that sees it change knows its history is gone rather than complete.
  std::string epoch;
  /// Messages other nodes routed to the device that wait for this node to number them
  /// (`fleet_delivery_store`; the hub takes them once the state is in).
  std::size_t routed = 0;
};

/// One device message the sink accepted, as the hub records it under ack policy `on_dispatch`.
struct dispatch_record {
  std::optional<std::uint64_t> id;         ///< The `send`'s id (none: it had no id).
  std::uint64_t number = 0;                ///< Its number among the device's messages.
  payload_kind kind = payload_kind::text;  ///< Text (a send's data) or binary.
  shared_bytes payload;                    ///< The data the sink received.
};

/// The current firmware rollout, kept so that a restarted hub resumes it.
struct rollout_record {
  std::uint32_t rollout = 0;     ///< Rollout id (ids continue above it after a restart).
  std::string version;           ///< The version rolled out.
  std::vector<std::byte> image;  ///< The whole image.
  bool gated = false;            ///< A campaign's: only the devices it admits take part.
};

/// What `load_rollout` answers: the rollout kept (none if there was none), or the error that
/// kept the store from reading it.
struct rollout_load_result {
  std::optional<rollout_record> rollout;  ///< The rollout kept.
  std::error_code error;                  ///< Why the store could not answer (empty: it did).
};

/// A rollout campaign as a store keeps it (`campaign_store`). The store does not read the
/// campaign's state: the firmware layer writes and reads it (`firmware::keep`, `revive`).
struct campaign_record {
  std::uint64_t id = 0;          ///< Campaign id (ids continue above it after a restart).
  std::uint32_t rollout = 0;     ///< The rollout (gated) that carries its image.
  std::string version;           ///< The version it rolls out.
  std::string state;             ///< Its spec and own state (JSON text).
  std::vector<std::byte> image;  ///< Its image, in its first save; empty after (kept as it is).
  bool ended = false;            ///< It is over: the store may drop its image.
};

/// One device of a campaign as a store keeps it.
struct campaign_device_record {
  std::string device;          ///< The device's id.
  std::uint32_t position = 0;  ///< Its place in the campaign's order (waves follow it).
  std::string state;           ///< Its status, attempts and history (JSON text).
};

/// A campaign read back from a store, with its devices in order.
struct kept_campaign {
  campaign_record campaign;                     ///< The campaign (its image if not ended).
  std::vector<campaign_device_record> devices;  ///< Its devices, by position.
};

/// What `load_campaigns` answers: the campaigns kept, oldest first, or why the store could not
/// read them.
struct campaign_load_result {
  std::vector<kept_campaign> campaigns;  ///< The campaigns kept, by id.
  std::error_code error;                 ///< Why the store could not answer (empty: it did).
};

/// What a store shared by several nodes made of a new rollout (`fleet_rollout_store`): the id
/// the fleet gave it (0: this store does not share rollouts; the caller numbers and saves it
/// itself), or why it could not (nothing was published).
struct rollout_publish_result {
  std::uint32_t rollout = 0;  ///< Fleet-wide rollout id (0: not handled).
  std::error_code error;      ///< Why the store refused (empty: it did not).
};

/// A gateway node's figures as it shares them with the other nodes of a fleet
/// (`redis::state_store::share_figures`), or their sum over the fleet's live nodes.
struct gateway_figures {
  std::size_t nodes = 0;            ///< Nodes counted (1 for a node's own figures).
  std::uint64_t connected = 0;      ///< Sessions open.
  std::uint64_t devices = 0;        ///< Device records held in memory.
  std::uint64_t enqueued = 0;       ///< Device messages accepted by the pipelines.
  std::uint64_t dispatched = 0;     ///< Device messages dispatched.
  std::uint64_t queue_depth = 0;    ///< Accepted, not yet dispatched.
  std::uint64_t workers_alive = 0;  ///< Pipeline workers running.
  double msgs_per_s = 0;            ///< Dispatched per second, lately.
};

/// What `route` answers (`fleet_delivery_store`).
struct route_result {
  /// Another live node holds the device: the message waits in the store for that node, which
  /// was told. False: no other node holds it; the caller delivers it itself.
  bool routed = false;
  std::error_code error;  ///< Why the store did not take the message (empty: it answered).
};

/// The messages routed to a device and not yet taken (`fleet_delivery_store::routed`).
struct routed_messages {
  std::vector<std::string> messages;  ///< Each one's `data` (JSON text), oldest first.
  std::error_code error;              ///< Why the store could not answer (empty: it did).
};

/// What `keep_routed` did with the messages a node numbered.
struct keep_routed_result {
  /// This node no longer owns the device: nothing was kept, and the messages stay routed for
  /// the node that does.
  bool refused = false;
  std::error_code error;  ///< Why the store could not keep them (empty: kept, or refused).
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

/// A state store that also keeps what a crash must not lose: the replay buffer, the sends
/// that reached the sink, and the current rollout. The hub keeps them in such a store as they
/// change (through `write_behind`, in order per device) and reads them back with `load` (the
/// `replay` and `dispatched` fields) and at start (`load_rollout`).
/// - `append_replay(id, seq, frame)`: keeps a sequenced message (seq above every kept one), and
///   raises the device's `last_seq` to `seq` (numbering continues above it after a restart).
/// - `forget_replay(id, seq)`: forgets the kept messages numbered `seq` and below (acknowledged,
///   or dropped by the replay bounds).
/// - `record_dispatched(id, r)`: the sink accepted message `r`: adds 1 to `messages_sent` and
///   inserts `r.id` (if any) into the device's dispatch window, in one write.
/// - `save_rollout(r)`: the rollout now current (replaces the one kept).
/// - `load_rollout()`: the rollout kept.
template <class S>
concept durable_state_store = state_store<S> &&
    requires(S& s, const std::string& id, std::uint64_t seq, std::string_view frame,
             const dispatch_record& d, const rollout_record& r) {
  { s.append_replay(id, seq, frame) } -> std::same_as<std::error_code>;
  { s.forget_replay(id, seq) } -> std::same_as<std::error_code>;
  { s.record_dispatched(id, d) } -> std::same_as<std::error_code>;
  { s.save_rollout(r) } -> std::same_as<std::error_code>;
  { s.load_rollout() } -> std::same_as<rollout_load_result>;
};

/// A durable store that several gateway nodes share and that numbers rollouts fleet-wide:
/// `publish_rollout` keeps the rollout under an id above every earlier one of the fleet and
/// tells the other nodes (on the calling thread; it may block).
template <class S>
concept fleet_rollout_store = requires(S& s, const rollout_record& r) {
  { s.publish_rollout(r) } -> std::same_as<rollout_publish_result>;
};

/// A durable store shared by several nodes that carries messages for a device to the node
/// that holds it, instead of that node losing the device to the sender (`hub::send_to`):
/// - `route(id, data)`: when another live node owns the device, keeps `data` (a `deliver`'s
///   data, JSON text) for it and tells that node, in one step (`routed`); else nothing
///   (`routed` false: the caller delivers it itself). An error: the message was not taken.
/// - `routed(id)`: the messages routed to the device, oldest first, if this node owns it
///   (none otherwise). They stay routed until `keep_routed`.
/// - `keep_routed(id, entries)`: keeps the numbered `deliver` frames (as `append_replay`
///   does) and removes as many routed messages, oldest first, in one step, if this node still
///   owns the device (`refused` otherwise).
/// `load` reports in `device_state::routed` how many wait. All may block (store thread, or a
/// thread that may wait).
template <class S>
concept fleet_delivery_store = requires(S& s, const std::string& id, std::string_view data,
                                        const std::vector<replay_entry>& entries) {
  { s.route(id, data) } -> std::same_as<route_result>;
  { s.routed(id) } -> std::same_as<routed_messages>;
  { s.keep_routed(id, entries) } -> std::same_as<keep_routed_result>;
};

/// A store that keeps rollout campaigns across a restart (docs/ROLLOUTS.md):
/// - `save_campaign(c, devices)`: keeps campaign `c` (inserting it, with its image, the first
///   time; replacing its state after) and the changed `devices` rows, in one step; keeps only
///   the newest campaigns (the store's bound) and drops an ended campaign's image.
/// - `load_campaigns()`: the campaigns kept, oldest first, each with its devices by position.
/// The hub calls `save_campaign` on its store thread, `load_campaigns` at start.
template <class S>
concept campaign_store = requires(S& s, const campaign_record& c,
                                  const std::vector<campaign_device_record>& d) {
  { s.save_campaign(c, d) } -> std::same_as<std::error_code>;
  { s.load_campaigns() } -> std::same_as<campaign_load_result>;
};

/// What one node of a fleet tells the others about the campaign running on a gated rollout
/// (`fleet_campaign_store`): the node that runs the campaign admits and stops devices, the
/// nodes that hold them report their progress and the hellos of devices it has not admitted.
struct campaign_event {
  /// What happened.
  enum class kind : std::uint8_t {
    admit,  ///< `ids` join the rollout (their campaign's turn came).
    stop,   ///< `ids` leave it before their time, for `reason`.
    news,   ///< device `ids[0]` moved to `status` (with `reason`) on the node that holds it.
    seen,   ///< device `ids[0]`, not admitted, said hello with `attributes` (JSON object).
  };
  kind what = kind::admit;                         ///< What happened.
  std::uint32_t rollout = 0;                       ///< The campaign's gated rollout.
  std::vector<std::string> ids;                    ///< The devices concerned.
  transfer_status status = transfer_status::none;  ///< `news`: the device's new status.
  std::string reason;                              ///< `stop`, `news`: why.
  std::string attributes;                          ///< `seen`: the device's attributes.
  /// `admit`: a device whose part ended failed starts again (false when a node catches up
  /// with the admitted set: an ended part stays so).
  bool retry = true;
};

/// A store shared by several nodes that carries a campaign between them (docs/ROLLOUTS.md,
/// "Across nodes"); every call returns at once (the store sends in the background) and may be
/// made from any thread:
/// - `campaign_admit(rollout, ids)` / `campaign_stop(rollout, id, reason)`: the node running
///   the campaign admits or stops devices on every node (the admitted set is kept with the
///   rollout, for nodes that start later);
/// - `campaign_news(rollout, id, t)`: a node tells the others of a device's status change;
/// - `campaign_seen(rollout, id, attributes)`: a node tells of a hello it did not admit;
/// - `campaign_admitted(rollout)`: the devices admitted so far (blocks: at start only);
/// - `fleet_devices()`: the devices the live nodes hold (blocks: for a campaign's target).
template <class S>
concept fleet_campaign_store = requires(S& s, std::uint32_t r, const std::string& id,
                                        const std::vector<std::string>& ids,
                                        const transfer_state& t) {
  s.campaign_admit(r, ids);
  s.campaign_stop(r, id, id);
  s.campaign_news(r, id, t);
  s.campaign_seen(r, id, id);
  { s.campaign_admitted(r) } -> std::same_as<std::vector<std::string>>;
  { s.fleet_devices() } -> std::same_as<std::vector<std::string>>;
};

/// A store that groups writes into transactions: `write_behind` calls `begin_batch()` before
/// applying a batch of queued writes and `commit_batch()` after it (group commit), and tells
/// whoever waits for those writes only once `commit_batch` returned.
template <class S>
concept transactional_store = requires(S& s) {
  { s.begin_batch() } -> std::same_as<std::error_code>;
  { s.commit_batch() } -> std::same_as<std::error_code>;
};

/// True for a store that says every call is quick and never waits (`S::nonblocking`): the hub
/// calls it inline, on whatever thread needs it, instead of through its store thread.
template <class S>
inline constexpr bool is_nonblocking_store = requires {
  requires static_cast<bool>(S::nonblocking);
};

/// True for a store that can say whether several gateway nodes share it (`s.shared()`, for
/// example `redis::state_store`): another node may then change a device's state at any time, so
/// the hub reloads it for every new session of a device it holds offline
/// (`hub::release_device` lets go of one whose session moved to another node). A run-time
/// answer, so that one hub type can run on a shared store or a single node's.
template <class S>
concept may_be_shared = requires(const S& s) {
  { s.shared() } -> std::convertible_to<bool>;
};

}  // namespace devgate::store
