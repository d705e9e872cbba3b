#pragma once

#include <chrono>   // backoff, timeouts
#include <cstddef>  // std::size_t
#include <string>   // stream names

#include "devgate/redis/url.hpp"  // endpoint

namespace devgate::redis {

/// How `redis::connection` connects and reconnects.
struct connection_options {
  /// The server, and the AUTH/SELECT sent on every connect (see `parse_url`).
  endpoint server;
  /// First wait before reconnecting after a drop or a failed attempt; doubled per failed attempt
  /// up to `reconnect_max`, each wait drawn at random in [half, all] of it (jitter, so many
  /// gateway nodes do not reconnect in step after a Redis restart).
  std::chrono::milliseconds reconnect_initial{50};
  /// Longest wait between reconnect attempts.
  std::chrono::milliseconds reconnect_max{2000};
  /// How long a connect (TCP, AUTH, SELECT) may take before it is abandoned and retried.
  std::chrono::milliseconds connect_timeout{2000};
};

/// What `redis::streams_sink` writes and how long it waits.
struct streams_sink_options {
  /// The stream every message goes to, or, with `stream_per_device`, the prefix of each
  /// device's stream (`<stream><device id>`).
  std::string stream = "devgate:messages";
  /// One stream per device (`<stream><device id>`) instead of one stream for all: a consumer
  /// can read one device's history; one stream for all gives one consumer group over the fleet.
  bool stream_per_device = false;
  /// Approximate trimming: `XADD ... MAXLEN ~ max_length`; 0 keeps every entry.
  std::size_t max_length = 0;
  /// How long `consume` waits for Redis's reply before it fails with `errc::timeout` (the
  /// pipeline then retries: a slow Redis may end up with the entry twice; at-least-once).
  std::chrono::milliseconds reply_timeout{1000};
  /// Pipeline workers the sink serves (worker ids 0..max_workers-1): one reply slot each.
  std::size_t max_workers = 64;
};

}  // namespace devgate::redis
