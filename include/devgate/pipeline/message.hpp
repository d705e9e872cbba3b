#pragma once

#include <cstdint>  // sequence numbers
#include <utility>  // std::move

#include "devgate/core/bytes.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate {

/// One device message as it travels the pipeline. Moving it moves two pointers; the payload and
/// the device id are shared immutable buffers, so no stage ever copies their bytes.
struct message {
  session_id session = 0;  ///< The session it arrived on (0 when host code pushed it directly).
  shared_bytes device_id;  ///< Who sent it; shared with the session, so no allocation per message.
  std::uint64_t sequence = 0;              ///< Per-device (per-session) number from the transport.
  payload_kind kind = payload_kind::text;  ///< Text or binary.
  /// True when `reference` holds the sender's id for the message (a device `send` with an id).
  bool has_reference = false;
  /// Sink attempts this message already had: 0 until `stop(deadline)` hands back a message it
  /// interrupted after one or more failed attempts (in retry backoff), so whoever takes it back
  /// knows a sink may have seen it. The pipeline does not read it.
  std::uint32_t attempts = 0;
  /// The sender's id for the message (a device `send`'s `id`), when `has_reference`: the hub
  /// answers it once the sink took the message (ack policy on_dispatch).
  std::uint64_t reference = 0;
  shared_bytes payload;          ///< The message bytes, shared by every stage and sink.
  clock::time_point received{};  ///< When the transport finished reading it.
  clock::time_point enqueued{};  ///< When the pipeline accepted it (one reading per push_bulk).
  /// When a worker started dispatching the batch holding it: one clock reading per batch, so a
  /// message waiting behind slow sink calls of its batch is stamped early (the adaptive demand
  /// keeps a batch's dispatch near its latency target). A sink needing the exact time reads the
  /// clock itself.
  clock::time_point dispatched{};

  /// The message a transport delivered, ready to push (timestamps after `received` are set later).
  static message from(inbound_message&& in) noexcept {
    message m;
    m.session = in.session;
    m.device_id = std::move(in.device_id);
    m.sequence = in.sequence;
    m.kind = in.kind;
    m.payload = std::move(in.payload);
    m.received = in.received;
    return m;
  }
};

/// A message in a partition queue, with the ticket that fixes its place in the partition's
/// order: what a queue policy's container holds.
struct queued_message {
  message msg;                  ///< The message.
  std::uint64_t ticket = 0;     ///< Position in its partition's arrival order.
  std::uint32_t partition = 0;  ///< The partition (hash of the device id).
};

}  // namespace devgate
