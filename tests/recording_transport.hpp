#pragma once
// A transport that keeps what it is asked to send, for tests that drive the device hub's parts
// (delivery, protocol dispatch, the rollout engine) without sockets.

#include <cstddef>       // std::size_t
#include <mutex>         // sends from several threads
#include <span>          // broadcast recipients
#include <string_view>   // close reasons
#include <system_error>  // results
#include <vector>        // what was sent

#include "devgate/core/bytes.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::testing {

/// Records every `send`; everything else succeeds and does nothing. Read `out` under `mutex`
/// while other threads may still send.
struct recording_transport {
  /// One recorded send.
  struct sent {
    session_id session;
    payload_kind kind;
    shared_bytes bytes;
  };
  std::mutex mutex;
  std::vector<sent> out;

  void set_handlers(transport_handlers) {}
  std::error_code start() { return {}; }
  void stop() {}
  std::error_code send(session_id s, payload_kind k, shared_bytes b) {
    std::lock_guard lock(mutex);
    out.push_back({s, k, std::move(b)});
    return {};
  }
  std::size_t broadcast(std::span<const session_id> ss, payload_kind, shared_bytes) {
    return ss.size();
  }
  void close(session_id, close_code, std::string_view) {}
  std::size_t buffered_bytes(session_id) const { return 0; }
};
static_assert(transport<recording_transport>);

}  // namespace devgate::testing
