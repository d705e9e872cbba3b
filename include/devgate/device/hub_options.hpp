#pragma once

#include <chrono>   // firmware stall timeout
#include <cstddef>  // std::size_t
#include <cstdint>  // counters

#include "devgate/firmware/rollout.hpp"   // rollout_totals
#include "devgate/pipeline/pipeline.hpp"  // pipeline_options

namespace devgate::device {

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
  /// Largest message (text or binary) a device may send (error `too_big` past it). The
  /// WebSocket layer's own limit (reader_limits::max_message_size, close 1009) applies first.
  std::size_t max_message_bytes = 64u << 10;
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
};

/// Gateway figures (also what `publish_stats` sends on the stats topic).
struct hub_stats {
  std::size_t connected = 0;          ///< Sessions open now.
  std::size_t devices = 0;            ///< Devices seen since start.
  std::uint64_t enqueued = 0;         ///< Device messages accepted by the pipeline.
  std::uint64_t dispatched = 0;       ///< Device messages dispatched.
  std::uint64_t queue_depth = 0;      ///< Accepted, not yet dispatched.
  std::uint64_t workers_alive = 0;    ///< Pipeline workers running.
  std::uint64_t replay_dropped = 0;   ///< Sequenced messages dropped by replay overflow.
  std::uint64_t protocol_errors = 0;  ///< Error replies sent to devices (bad_resume excepted).
  std::uint64_t takeovers = 0;        ///< Sessions replaced by a newer one (closed with 4000).
  firmware::rollout_totals rollout;   ///< Current firmware rollout.
};

}  // namespace devgate::device
