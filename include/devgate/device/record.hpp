#pragma once

#include <atomic>   // hand-off progress
#include <cstddef>  // std::size_t
#include <cstdint>  // sequence numbers, offsets
#include <deque>    // replay buffer
#include <list>     // the registry's offline order
#include <memory>   // the image a transfer streams
#include <mutex>    // the device's mutex
#include <string>   // id, topic, versions
#include <thread>   // the thread replaying parked messages
#include <utility>  // std::move, std::pair
#include <vector>   // messages parked while the device loads

#include "devgate/core/bytes.hpp"
#include "devgate/device/protocol.hpp"  // topics::device_prefix
#include "devgate/firmware/image.hpp"
#include "devgate/firmware/tally.hpp"
#include "devgate/store/state_store.hpp"    // transfer_status
#include "devgate/transport/transport.hpp"  // session_id, payload_kind

namespace devgate::device {

/// One message queued to a device's session, kept in the order it was produced.
struct outbound {
  session_id session = 0;                  ///< The session it is for.
  payload_kind kind = payload_kind::text;  ///< Text or binary.
  shared_bytes bytes;                      ///< The payload (often shared with other devices).
};

/// What the hub keeps in memory about one device: one slice per part of the hub, all guarded by
/// `mutex`. Each part takes the mutex itself, for as short as it can, and never holds it while
/// calling the transport, the store or a method of another part that locks (the functions named
/// `*_locked` are the ones that expect it held); no thread holds two devices' mutexes at once.
/// The one exception: a durable store's replay journal (`store_journal`) is queued under it, so
/// that the store sees one device's changes in order (a queue push that never waits).
struct device_record {
  /// A record for `device`, with the figures the state store kept across restarts.
  device_record(std::string device, std::uint64_t sent, std::string version,
                std::int64_t seen_ms = 0)
      : id(std::move(device)),
        topic(std::string(topics::device_prefix) + id),
        messages_sent(sent),
        last_seen_ms(seen_ms),
        firmware_version(std::move(version)) {}

  const std::string id;      ///< The device id.
  const std::string topic;   ///< Its sequenced topic, `device/<id>`.
  mutable std::mutex mutex;  ///< Guards every field below.

  /// The live session (written by the registry; `hello` by delivery's resume, `errors` by
  /// protocol dispatch).
  struct session_part {
    session_id id = 0;    ///< The live session (0: offline).
    bool hello = false;   ///< It said hello: deliveries and firmware go to it.
    unsigned errors = 0;  ///< Bad messages in this session so far.
  };
  session_part session;  ///< The live session.

  /// Device messages the pipeline accepted over the device's lifetime (protocol dispatch).
  std::uint64_t messages_sent;
  /// Unix time (ms) the device was last seen (hello, close); 0: never. The hub keeps the live
  /// figures here and writes them behind to the store, so it never reads the store back.
  std::int64_t last_seen_ms;
  /// The store's write ticket after the last write about this device that its eviction must
  /// wait for (it went offline; a change to its kept deliveries): the registry evicts the
  /// record only once the store has applied that far.
  std::uint64_t store_ticket = 0;
  /// The firmware version it reported in hello, or was verified with (dispatch, rollout).
  std::string firmware_version;
  /// The attributes it reported in hello (`hello.attributes`: region, model...), which rollout
  /// campaigns target; in the order sent, at most `max_attributes`.
  std::vector<std::pair<std::string, std::string>> attributes;
  /// The history epoch of a shared store (`store::device_state::epoch`; empty: none), told to
  /// the device in its welcome.
  std::string epoch;

  /// Sequenced delivery and the outbox (written by `device::delivery`).
  struct delivery_part {
    /// The next sequence number; `next_seq - 1` and below were assigned.
    std::uint64_t next_seq = 1;
    std::uint64_t acked = 0;  ///< The highest sequence number the device acknowledged.
    /// The first kept message waiting for the store's commit before it may be sent (0: none);
    /// every later one waits with it (`delivery::stored` releases them).
    std::uint64_t held_from = 0;
    /// Assigned, not yet acknowledged: (sequence number, `deliver` frame), bounded.
    std::deque<std::pair<std::uint64_t, shared_bytes>> replay;
    std::size_t replay_bytes = 0;      ///< Bytes in `replay`.
    std::uint64_t replay_dropped = 0;  ///< Dropped from `replay` since the last welcome.
    std::vector<outbound> outbox;      ///< Queued to the session, in order.
    bool draining = false;             ///< A thread is sending the outbox (with no lock held).
    std::uint64_t queued = 0;          ///< Messages ever queued to the outbox.
    /// Of the `queued` first messages, how many were handed to the transport (or forgotten);
    /// a `flush` that finds another thread sending waits for this to pass its own messages.
    std::atomic<std::uint64_t> handed{0};
  };
  delivery_part delivery;  ///< Sequenced delivery and the outbox.

  /// Its part in the current firmware rollout (written by `firmware::rollout_engine`).
  struct transfer_part {
    std::shared_ptr<const firmware::image> image;  ///< The rollout's image (nullptr: none).
    store::transfer_status status = store::transfer_status::none;  ///< Where it stands.
    session_id session = 0;   ///< The session chunks stream to while transferring.
    std::uint64_t acked = 0;  ///< Bytes the device acknowledged (the resume point).
    std::uint64_t sent = 0;   ///< Bytes queued to it in this session.
    std::string reason;       ///< Why it failed.

    std::shared_ptr<firmware::tally> tally;  ///< The rollout's fleet counters (with `image`).
    unsigned retries = 0;               ///< Stalls and restarts from 0 in this rollout (bounded).
    clock::time_point progress_at{};    ///< When `acked` last moved (or the transfer started).
    std::uint64_t progress_offset = 0;  ///< `acked` as the stall check last saw it.
    clock::time_point retry_at{};       ///< After a stall, it waits for a slot until then.
  };
  transfer_part transfer;  ///< Its part in the current rollout.

  /// Its sends on their way to the sink, under ack policy on_dispatch (written by
  /// `protocol_dispatch` and the hub's dispatched handler).
  struct dispatch_part {
    store::dispatch_window window;         ///< Ids of its sends the sink took and the store has.
    std::vector<std::uint64_t> in_flight;  ///< Ids accepted into the pipeline, not yet recorded.
  };
  /// Made on the first `send` with an id under on_dispatch (most records never need one).
  std::unique_ptr<dispatch_part> dispatch;

  /// While its stored state loads on the store thread (a store that may block): the messages
  /// of its session wait here, in order, and are handled once the state is in (written by
  /// `protocol_dispatch`).
  struct load_part {
    bool pending = false;        ///< The state is not in yet, or parked messages remain.
    bool requested = false;      ///< A load is queued on the store thread.
    std::thread::id replayer{};  ///< The thread handling the parked messages now.
    /// The stored state is in the record (false from `get_or_create_unloaded` until loaded;
    /// waited on by whoever must number a delivery: numbering continues from the store's).
    std::atomic<bool> state_in{true};
    std::vector<inbound_message> parked;  ///< Messages that arrived before the state.
  };
  load_part load;  ///< Its stored state's loading.

  /// Its place among the offline records, least recently seen first (written by the registry
  /// under its device table's lock, not under `mutex`).
  struct registry_part {
    bool listed = false;  ///< In the offline list (evictable).
    /// Let go by `registry::release` (another node took the device over): out of the table
    /// and never listed again.
    std::atomic<bool> released{false};
    std::list<device_record*>::iterator position;  ///< Where, when listed.
  };
  registry_part offline;  ///< Its place among the offline records.
};

}  // namespace devgate::device
