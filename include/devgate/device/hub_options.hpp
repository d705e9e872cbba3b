#pragma once

#include <chrono>       // firmware stall timeout
#include <cstddef>      // std::size_t
#include <cstdint>      // counters
#include <functional>   // topic_policy
#include <optional>     // fleet totals
#include <string>       // allowed topics
#include <string_view>  // device ids, topics
#include <utility>      // std::move
#include <vector>       // allowed topics

#include "devgate/firmware/rollout.hpp"    // rollout_totals
#include "devgate/pipeline/pipeline.hpp"   // pipeline_options
#include "devgate/store/write_behind.hpp"  // store_error_handler

namespace devgate::device {

/// Whether device `device_id` may subscribe to `topic` (server, stats or fleet), asked at each
/// `subscribe` on the device's network thread (keep it quick). A refusal is answered with the
/// error `topic_not_allowed`; unsubscribing is always allowed.
using topic_policy = std::function<bool(std::string_view device_id, std::string_view topic)>;

/// A topic_policy that lets every device subscribe to `topics` and to nothing else.
[[nodiscard]] inline topic_policy allow_topics(std::vector<std::string> topics) {
  return [t = std::move(topics)](std::string_view, std::string_view topic) {
    for (const auto& allowed : t) {
      if (allowed == topic) return true;
    }
    return false;
  };
}

/// When the hub answers a device's `send` with `sent` (docs/PROTOCOL.md, "Acknowledgements").
enum class ack_policy : std::uint8_t {
  /// As soon as the pipeline accepted the message (in memory): fastest, but a crash loses the
  /// messages accepted and not yet dispatched.
  on_accept,
  /// Once the sink accepted the message and the state store recorded it (its count and the
  /// `send`'s id): with a durable store, nothing a device was told is lost, and a resent id
  /// the hub already dispatched is answered without reaching the sink again.
  on_dispatch,
};

/// The device hub's knobs. Each bounds a resource per device or per fleet.
struct hub_options {
  /// The pipeline that dispatches device messages (capacity, workers, overflow...).
  pipeline_options pipeline;
  /// Sequenced messages kept per device until acknowledged (offline devices included). Past
  /// it (or past `max_replay_bytes`) the oldest is dropped and counted; the device sees the
  /// gap in sequence numbers and the count in its next welcome (`replay_dropped`). The newest
  /// message is always kept.
  std::size_t max_replay_messages = 256;
  /// Bytes of sequenced messages kept per device (see `max_replay_messages`).
  std::size_t max_replay_bytes = 1u << 20;
  /// Bytes of sequenced messages kept over the whole fleet. Past it, the kept messages of the
  /// offline devices seen least recently are dropped first (counted in `replay_dropped`, and
  /// reported to each device in its next welcome); online devices keep their own bound only.
  std::size_t max_replay_bytes_total = std::size_t{256} << 20;
  /// Device records held in memory. Past it, records of offline devices are evicted, least
  /// recently seen first, once the store has everything written about them; a device that
  /// returns is loaded from the store again (its unacknowledged deliveries are not kept: they
  /// are counted as dropped). 0: no bound. Online devices are never evicted, so the records
  /// held are at most this or the devices online, whichever is larger.
  std::size_t max_devices = 100'000;
  /// Writes queued for a state store that may block (`store::write_behind`); past it a write
  /// is dropped and counted as a store error. A non-blocking store is called inline instead.
  std::size_t store_queue_capacity = 1u << 16;
  /// How that store's thread groups writes into one batch (one commit for SQLite) when few are
  /// in flight: it waits up to `delay` for `batch` writes. Fewer commits and wake-ups per
  /// message under light load (1.5-1.8x the messages per CPU-second with SQLite at 40 sends in
  /// flight), at up to `delay` more latency for a `sent` under on_dispatch or a held `deliver`.
  store::group_commit store_group_commit{std::chrono::microseconds(500), 64};
  /// Called for each store error (operation, device, error), on the thread that met it: log
  /// it. Empty: errors are only counted (`hub_stats::store_errors`).
  store::store_error_handler on_store_error;
  /// With a durable store that may block (SQLite): called once the store has committed the
  /// device's `deliver`s numbered `seq` and below (`stored`), or failed to (they are sent all
  /// the same; the error is counted). From then on a crash cannot lose them: the moment to
  /// acknowledge them upstream. On the store thread: keep it short. Empty: not called.
  std::function<void(const std::string& device_id, std::uint64_t seq, bool stored)>
      on_deliver_stored;
  /// Largest message (text or binary) a device may send (error `too_big` past it). The
  /// WebSocket layer's own limit (reader_limits::max_message_size, close 1009) applies first.
  std::size_t max_message_bytes = 64u << 10;
  /// When a `send` is answered with `sent` (on_accept: queued; on_dispatch: in the sink).
  ack_policy ack = ack_policy::on_accept;
  /// Which topics devices may subscribe to. Empty: `fleet` only. The `server` log shows every
  /// device's traffic and `stats` the gateway's figures: allow them (`allow_topics`) only where
  /// a device may see that, as the demo's pages do.
  topic_policy may_subscribe;
  /// Only sessions an authenticator vouched for (`session_info::authenticated`) may become a
  /// device's session: others are closed with 1008 before they reach the device, so they
  /// neither take over the id (4000 to the device) nor receive its replayed messages. Turn it
  /// on with `websocket::server_options::authenticate`; it also guards transports that do not
  /// authenticate at all.
  bool require_authentication = false;
  /// Bad messages tolerated per session; one more closes it with 4002.
  unsigned max_errors = 16;
  /// Firmware chunk size: larger chunks mean fewer acks, smaller ones finer resume points.
  std::size_t chunk_size = 16u << 10;
  /// Unacknowledged chunks in flight per device (window * chunk_size bytes of buffering).
  std::size_t window = 8;
  /// At most this many devices receive firmware at once; the rest wait their turn.
  std::size_t max_concurrent_transfers = 16;
  /// A firmware transfer making no progress for this long gives up its slot and is retried
  /// later (`firmware::rollout_options::stall_timeout`; 0: never).
  std::chrono::milliseconds stall_timeout{30'000};
  /// Stalls (and restarts) one device may have per rollout before it fails with `timed_out`.
  unsigned max_transfer_retries = 3;
  /// The wait before a stalled transfer's first retry; it doubles with each next one.
  std::chrono::milliseconds transfer_retry_backoff{1'000};
  /// Several nodes, one fleet: `max_concurrent_transfers` is the fleet's cap, and this hub's
  /// slots are its lease of it (`firmware::rollout_options::leased_slots`): none until the
  /// lease holder (`redis::state_store::lease_transfer_slots`) calls `hub::set_transfer_limit`.
  bool leased_transfer_slots = false;
  /// With leased slots: called when the lease should change (a device waits, a slot freed),
  /// from any thread with no lock held: `redis::state_store::want_slots`.
  std::function<void()> on_slot_demand;
  /// Several nodes, one fleet: where `hub::rollout()` (and the stats) read the fleet's totals
  /// of the current rollout (`redis::state_store::rollout_totals`). Empty, or an answer for
  /// another rollout: this hub's own counts. Called on any thread: it must not block.
  std::function<std::optional<firmware::rollout_totals>()> fleet_rollout_totals;
  /// Several nodes, one fleet: where `publish_stats` reads the figures summed over the fleet's
  /// live nodes (`redis::state_store::fleet_figures`); they replace this hub's own connected,
  /// devices, queue depth, workers, dispatched and rate in the stats frame, which then says
  /// `nodes`. Empty, or no answer: this hub's own. Called on any thread: it must not block.
  std::function<std::optional<store::gateway_figures>()> fleet_figures;
};

/// Gateway figures (also what `publish_stats` sends on the stats topic).
struct hub_stats {
  std::size_t connected = 0;           ///< Sessions open now.
  std::size_t devices = 0;             ///< Device records held in memory now.
  std::uint64_t devices_evicted = 0;   ///< Records evicted since start (max_devices).
  std::uint64_t devices_released = 0;  ///< Records let go to reload from a shared store.
  std::uint64_t store_errors = 0;      ///< Store calls that failed (or writes dropped).
  std::size_t replay_bytes = 0;        ///< Bytes of sequenced messages kept, fleet-wide.
  std::uint64_t enqueued = 0;          ///< Device messages accepted by the pipeline.
  std::uint64_t dispatched = 0;        ///< Device messages dispatched.
  std::uint64_t queue_depth = 0;       ///< Accepted, not yet dispatched.
  std::uint64_t workers_alive = 0;     ///< Pipeline workers running.
  std::uint64_t replay_dropped = 0;    ///< Sequenced messages dropped by replay overflow.
  std::uint64_t protocol_errors = 0;   ///< Error replies sent to devices (bad_resume excepted).
  std::uint64_t takeovers = 0;         ///< Sessions replaced by a newer one (closed with 4000).
  firmware::rollout_totals rollout;    ///< Current firmware rollout.
};

}  // namespace devgate::device
