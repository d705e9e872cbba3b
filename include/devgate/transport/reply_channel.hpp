#pragma once

#include <cstddef>       // std::size_t
#include <span>          // broadcast recipients
#include <system_error>  // results
#include <utility>       // std::move

#include "devgate/core/bytes.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate {

/// The way back to a transport's sessions, whatever the transport's type: what sinks reply
/// through (`dispatch_context`) and what topics publish through (`device::pubsub`). Type-erased,
/// since it is used per reply, not per message, so an indirect call costs nothing that matters.
struct reply_channel {
  void* target = nullptr;  ///< The transport.
  /// Sends to one session.
  std::error_code (*send)(void*, session_id, payload_kind, shared_bytes) = nullptr;
  /// Sends one payload to many sessions.
  std::size_t (*broadcast)(void*, std::span<const session_id>, payload_kind,
                           shared_bytes) = nullptr;

  /// The channel to `t` (referenced: it must outlive the channel's users), whatever its type.
  template <class Transport>
  [[nodiscard]] static reply_channel to(Transport& t) noexcept {
    reply_channel c;
    c.target = &t;
    c.send = [](void* target, session_id id, payload_kind kind, shared_bytes bytes) {
      return static_cast<Transport*>(target)->send(id, kind, std::move(bytes));
    };
    c.broadcast = [](void* target, std::span<const session_id> ids, payload_kind kind,
                     shared_bytes bytes) {
      return static_cast<Transport*>(target)->broadcast(ids, kind, std::move(bytes));
    };
    return c;
  }
};

}  // namespace devgate
