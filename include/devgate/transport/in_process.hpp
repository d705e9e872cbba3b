#pragma once

#include <atomic>         // session ids, sequence numbers, in-flight handler count
#include <cstddef>        // std::size_t
#include <cstdint>        // counters
#include <deque>          // inboxes
#include <iterator>       // std::make_move_iterator
#include <memory>         // sessions are shared with their handles
#include <mutex>          // session table, inboxes
#include <optional>       // close status
#include <shared_mutex>   // session table: many readers
#include <span>           // broadcast recipients
#include <string>         // close reasons
#include <string_view>    // device ids, text payloads
#include <system_error>   // results
#include <thread>         // std::this_thread::yield in stop
#include <unordered_map>  // session table
#include <utility>        // std::move
#include <vector>         // inbox snapshots

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate {

/// A transport inside the process: host code connects devices and pushes their messages
/// directly, and reads what the engine sent back from each session's inbox. For tests, embedding
/// and benchmarks; it honours back-pressure exactly as a network transport does, and contains
/// its handlers' exceptions as one does: a throwing `on_open` or `on_messages` closes that
/// session with 1011 (internal error), a throwing `on_close` is ignored (the session is gone).
class in_process_transport {
 public:
  /// One message the engine sent to a session.
  struct outbound {
    payload_kind kind = payload_kind::text;  ///< Text or binary.
    shared_bytes payload;                    ///< The bytes (shared with other recipients).
  };

 private:
  struct state {
    session_id id = 0;
    shared_bytes device_id;
    std::atomic<std::uint64_t> sequence{0};
    mutable std::mutex mutex;
    std::deque<outbound> inbox;
    std::size_t buffered = 0;
    std::uint64_t dropped = 0;
    std::optional<close_code> closed;
    std::string close_reason;
  };

 public:
  /// The host's handle on one connected device.
  class session {
   public:
    /// The session id the engine sees.
    [[nodiscard]] session_id id() const noexcept { return state_->id; }
    /// Sends `payload` as this device: returns the engine's verdict (`errc::queue_full`,
    /// `errc::closed`, ...) or `errc::closed` if the session or transport is closed.
    std::error_code push(shared_bytes payload, payload_kind kind = payload_kind::text) const {
      return owner_->deliver(*state_, std::move(payload), kind);
    }
    /// Sends `text` as this device.
    std::error_code push(std::string_view text) const {
      return push(shared_bytes::copy_of(text), payload_kind::text);
    }
    /// Takes every message the engine sent to this session so far (frees their buffered bytes).
    [[nodiscard]] std::vector<outbound> take_inbox() const {
      std::lock_guard lock(state_->mutex);
      std::vector<outbound> out(std::make_move_iterator(state_->inbox.begin()),
                                std::make_move_iterator(state_->inbox.end()));
      state_->inbox.clear();
      state_->buffered = 0;
      return out;
    }
    /// The close code, once the session closed.
    [[nodiscard]] std::optional<close_code> close_status() const {
      std::lock_guard lock(state_->mutex);
      return state_->closed;
    }
    /// Outbound messages dropped by `overflow_action::drop_oldest`.
    [[nodiscard]] std::uint64_t dropped() const {
      std::lock_guard lock(state_->mutex);
      return state_->dropped;
    }
    /// The device closes the session (normal closure, 1000).
    void disconnect() const {
      owner_->close(state_->id, close_code::normal, "device disconnected");
    }

   private:
    friend class in_process_transport;
    session(in_process_transport* owner, std::shared_ptr<state> s)
        : owner_(owner), state_(std::move(s)) {}
    in_process_transport* owner_;
    std::shared_ptr<state> state_;
  };

  /// Handlers run on the host thread that connects, pushes or disconnects, never on a network
  /// thread: a `block` push may wait there (see `handlers_on_network_threads`).
  static constexpr bool handlers_on_caller_threads = true;

  /// A transport applying `backpressure` to every session's outbound buffer.
  explicit in_process_transport(backpressure_options backpressure = {})
      : backpressure_(backpressure) {}
  in_process_transport(const in_process_transport&) = delete;
  in_process_transport& operator=(const in_process_transport&) = delete;

  /// Installs the engine's callbacks (before `start`).
  void set_handlers(transport_handlers handlers) { handlers_ = std::move(handlers); }
  /// Starts delivering.
  std::error_code start() {
    if (running_.exchange(true)) return errc::already_running;
    return {};
  }
  /// Closes every session with 1001 and returns when no handler runs any more.
  void stop() {
    running_.store(false, std::memory_order_seq_cst);
    while (in_handler_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
    std::vector<session_id> ids;
    {
      std::shared_lock lock(table_mutex_);
      for (const auto& [id, s] : sessions_) ids.push_back(id);
    }
    for (auto id : ids) close(id, close_code::going_away, "server stopping");
  }

  /// Connects a device; `on_open` runs before this returns. Returns the host's handle (of a
  /// closed session, 1011, if `on_open` threw).
  session connect(std::string_view device_id) {
    auto s = std::make_shared<state>();
    s->id = next_id_.fetch_add(1, std::memory_order_relaxed) + 1;
    s->device_id = shared_bytes::copy_of(device_id);
    {
      std::unique_lock lock(table_mutex_);
      sessions_.emplace(s->id, s);
    }
    if (handlers_.on_open) {
      try {
        handlers_.on_open(session_info{s->id, std::string(device_id), false, {}});
      } catch (...) {
        close(s->id, close_code::internal_error, "on_open threw");
      }
    }
    return session(this, std::move(s));
  }

  /// Queues one message to one session, from any thread.
  std::error_code send(session_id id, payload_kind kind, shared_bytes bytes) {
    auto s = find(id);
    if (!s) return errc::unknown_session;
    std::optional<close_code> close_with;
    {
      std::lock_guard lock(s->mutex);
      if (s->closed) return errc::unknown_session;
      const std::size_t size = bytes.size();
      if (s->buffered + size > backpressure_.max_buffered_bytes) {
        switch (backpressure_.on_overflow) {
          case overflow_action::close_policy_violation:
            close_with = close_code::policy_violation;
            break;
          case overflow_action::close_try_again_later:
            close_with = close_code::try_again_later;
            break;
          case overflow_action::drop_oldest:
            while (!s->inbox.empty() && s->buffered + size > backpressure_.max_buffered_bytes) {
              s->buffered -= s->inbox.front().payload.size();
              s->inbox.pop_front();
              ++s->dropped;
            }
            if (s->buffered + size > backpressure_.max_buffered_bytes) return errc::backpressure;
            break;
        }
      }
      if (!close_with) {
        s->buffered += size;
        s->inbox.push_back(outbound{kind, std::move(bytes)});
        return {};
      }
    }
    close(id, *close_with, "outbound buffer over its limit");
    return errc::backpressure;
  }

  /// Queues one payload (shared, not copied) to many sessions; returns how many took it.
  std::size_t broadcast(std::span<const session_id> ids, payload_kind kind, shared_bytes bytes) {
    std::size_t n = 0;
    for (auto id : ids) n += send(id, kind, bytes) ? 0 : 1;
    return n;
  }

  /// Closes one session with `code`; `on_close` runs once (an exception from it is ignored).
  void close(session_id id, close_code code, std::string_view reason) {
    std::shared_ptr<state> s;
    {
      std::unique_lock lock(table_mutex_);
      auto it = sessions_.find(id);
      if (it == sessions_.end()) return;
      s = std::move(it->second);
      sessions_.erase(it);
    }
    {
      std::lock_guard lock(s->mutex);
      s->closed = code;
      s->close_reason = std::string(reason);
    }
    if (handlers_.on_close) {
      try {
        handlers_.on_close(id, code);
      } catch (...) {
        // Nothing left to tell the device; the session is gone either way.
      }
    }
  }

  /// Bytes queued to one session and not yet taken by the host.
  [[nodiscard]] std::size_t buffered_bytes(session_id id) const {
    auto s = find(id);
    if (!s) return 0;
    std::lock_guard lock(s->mutex);
    return s->buffered;
  }

  /// Sessions open now.
  [[nodiscard]] std::size_t session_count() const {
    std::shared_lock lock(table_mutex_);
    return sessions_.size();
  }

 private:
  std::shared_ptr<state> find(session_id id) const {
    std::shared_lock lock(table_mutex_);
    auto it = sessions_.find(id);
    return it == sessions_.end() ? nullptr : it->second;
  }

  std::error_code deliver(state& s, shared_bytes payload, payload_kind kind) {
    // Count ourselves in before checking `running_`, so stop() waits for this handler call.
    in_handler_.fetch_add(1, std::memory_order_seq_cst);
    struct leave {
      std::atomic<int>& n;
      ~leave() { n.fetch_sub(1, std::memory_order_seq_cst); }
    } guard{in_handler_};
    if (!running_.load(std::memory_order_seq_cst)) return errc::closed;
    {
      std::lock_guard lock(s.mutex);
      if (s.closed) return errc::closed;
    }
    inbound_message in;
    in.session = s.id;
    in.device_id = s.device_id;
    in.sequence = s.sequence.fetch_add(1, std::memory_order_relaxed) + 1;
    in.kind = kind;
    in.payload = std::move(payload);
    in.received = clock::now();
    if (!handlers_.on_messages) return {};
    batch_result r;
    try {
      // One push is a batch of one.
      r = handlers_.on_messages(std::span<inbound_message>(&in, 1));
    } catch (...) {
      close(s.id, close_code::internal_error, "on_messages threw");
      return errc::closed;
    }
    return r.accepted > 0 ? std::error_code{} : r.error;
  }

  backpressure_options backpressure_;
  transport_handlers handlers_;
  std::atomic<bool> running_{false};
  std::atomic<int> in_handler_{0};
  std::atomic<session_id> next_id_{0};
  mutable std::shared_mutex table_mutex_;
  std::unordered_map<session_id, std::shared_ptr<state>> sessions_;
};

static_assert(transport<in_process_transport>,
              "in_process_transport must satisfy the devgate::transport concept");
static_assert(!handlers_on_network_threads<in_process_transport>);

}  // namespace devgate
