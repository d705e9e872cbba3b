#pragma once

#include <asio.hpp>

#if !defined(__linux__)
#error "devgate::websocket::server needs Linux (epoll); the rest of devgate does not"
#endif
#include <sys/epoll.h>  // the worker's readiness set
#include <unistd.h>     // close of a failed epoll set

#include <array>         // ready events
#include <atomic>        // the live count
#include <cerrno>        // epoll_create1 errors
#include <cstddef>       // std::size_t
#include <cstdint>       // slots, generations
#include <mutex>         // the registry lock
#include <optional>      // the work guard while running
#include <span>          // broadcast recipients
#include <string>        // close reasons posted to the worker
#include <string_view>   // close reasons
#include <system_error>  // results
#include <thread>        // the worker thread
#include <utility>       // std::move
#include <vector>        // registry, snapshots

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/transport/transport.hpp"
#include "devgate/websocket/detail/backpressure.hpp"
#include "devgate/websocket/detail/core.hpp"
#include "devgate/websocket/detail/out_queue.hpp"
#include "devgate/websocket/detail/session.hpp"
#include "devgate/websocket/detail/session_stream.hpp"
#include "devgate/websocket/detail/stream.hpp"
#include "devgate/websocket/detail/thread_resources.hpp"
#include "devgate/websocket/frame.hpp"

namespace devgate::websocket::detail {

/// One worker thread of a server: its io_context, its epoll set of session sockets, the registry
/// of its sessions, its timer tick, and the operations the server runs on its sessions from any
/// thread (send, broadcast, close, buffered bytes).
///
/// Session sockets are not Asio sockets: each is registered once, edge-triggered, in this
/// worker's own epoll set, and the worker waits on that set through Asio (one readiness wait
/// whenever the set was found empty). Reads and writes are the sessions' own, synchronous and
/// non-blocking, on this thread. Linux-only (epoll).
class reactor : public thread_resources {
 public:
  static constexpr int max_events = 256;                // ready sockets taken per epoll_wait
  static constexpr int max_rounds = 16;                 // epoll_waits before Asio's tasks run
  static constexpr std::uint32_t max_slots = 1u << 24;  // sessions per worker (24-bit slot)

  /// Worker `index` (0-255, the low byte of its session ids) of the server sharing `c`.
  reactor(server_core& c, std::uint8_t index)
      : thread_resources(c, &reactor::retire_session),
        index_(index),
        tick_timer_(ioc),
        ready_(ioc) {
    const int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) {
      error_ = std::error_code(errno, std::system_category());
      return;
    }
    ready_.assign(fd, error_);
    if (error_) ::close(fd);
  }

  /// The worker's index.
  [[nodiscard]] std::uint8_t index() const noexcept { return index_; }
  /// Why the worker cannot run (its epoll set could not be created); server::start reports it.
  [[nodiscard]] std::error_code error() const noexcept { return error_; }

  // ---- lifecycle (the server's thread) ------------------------------------------------------

  /// Starts the timer, the readiness wait and the thread.
  void start() {
    guard_.emplace(ioc.get_executor());
    start_tick();
    poll();
    thread_ = std::thread([this] { ioc.run(); });
  }
  /// Lets the thread end once its io_context has nothing left to run now.
  void stop() {
    guard_.reset();
    ioc.stop();
  }
  /// Waits for the thread, then drops the registry.
  void join() {
    if (thread_.joinable()) thread_.join();
    std::lock_guard lock(mutex_);
    slots_.clear();
    free_slots_.clear();
    inbox_.clear();  // sends the stopped thread never took
    draining_.clear();
  }

  // ---- on this worker's thread --------------------------------------------------------------

  /// Starts the close handshake of every session with `code`.
  void close_all(close_code code) {
    snapshot();
    for (auto& s : scratch_) s->start_close(code, "server stopping");
    scratch_.clear();
  }
  /// Ends every session now (going away) and stops waiting for sockets and the timer.
  void abort_all() {
    snapshot();
    for (auto& s : scratch_) s->finish(close_code::going_away);
    scratch_.clear();
    retired_.clear();
    tick_timer_.cancel();
    polling_ = false;
    std::error_code ignored;
    ready_.cancel(ignored);
  }

  /// Takes an accepted socket: adopted now when called on this thread, otherwise by a task
  /// posted to it (the socket is closed if the server stops first).
  void assign(tcp_stream s) {
    if (on_this_thread()) {
      adopt(std::move(s));
      return;
    }
    asio::post(ioc, [this, s = std::move(s)]() mutable {
      if (core.stopping.load(std::memory_order_acquire)) return;  // `s` closes the socket
      adopt(std::move(s));
    });
  }

  // ---- the server's operations, from any thread ---------------------------------------------

  /// Queues one data message to session `id`. Errors: errc::unknown_session, errc::closed,
  /// errc::backpressure (the overflow policy applied).
  std::error_code send(session_id id, websocket::opcode op, shared_bytes payload) {
    // A reply from inside that session's handler: no lookup, reference or thread check.
    if (session* s = session::replying(this, id)) {
      catch_up();
      return s->send_local(op, std::move(payload));
    }
    // The payload is shared, never copied; headers are encoded as it is written (messages over
    // 64 KiB go as fragments).
    auto m = message_frame(op, std::move(payload));
    if (on_this_thread()) {
      catch_up();
      session* s = peek_local(id);
      if (!s) return errc::unknown_session;
      if (!s->is_open()) return errc::closed;
      if (!s->reserve(m.size())) {
        overflow(session_ref(s));
        return errc::backpressure;
      }
      s->enqueue_data(std::move(m));
      return {};
    }
    // From another thread: the lookup, the reservation and the hand-over share one lock, and a
    // burst of sends costs one posted task (the first into an empty inbox posts the drain).
    session_ref over;
    bool post = false;
    {
      std::lock_guard lock(mutex_);
      const std::uint32_t slot = slot_of(id);
      if (slot >= slots_.size() || !slots_[slot] || slots_[slot]->id() != id) {
        return errc::unknown_session;
      }
      session& target = *slots_[slot];
      if (!target.is_open()) return errc::closed;
      if (target.reserve(m.size())) {
        inbox_.push_back({session_ref(&target), std::move(m)});
        post = !inbox_posted_.exchange(true, std::memory_order_release);
      } else {
        over = session_ref(&target);
      }
    }
    if (over) {
      overflow(over);
      return errc::backpressure;
    }
    if (post) asio::post(ioc, [this] { drain_inbox(); });
    return {};
  }

  /// Queues `payload` to those of `ids` (all of this worker) that are open and within their
  /// limit, sharing the one buffer; through the inbox like `send` from other threads (so the
  /// two keep their order), at once on this thread (a recipient with nothing queued is written
  /// to directly). Returns how many it was queued to.
  std::size_t broadcast(std::span<const session_id> ids, websocket::opcode op,
                        const shared_bytes& payload) {
    const std::size_t wire = wire_size(payload.size());
    std::size_t queued = 0;
    if (on_this_thread()) {
      catch_up();
      // This thread is the registry's only writer: no lock and no references.
      for (const session_id id : ids) {
        session* s = peek_local(id);
        if (!s || !s->is_open()) continue;
        if (!s->reserve(wire)) {
          overflow(session_ref(s));
          continue;
        }
        ++queued;
        s->send_shared(op, payload, wire);
      }
      return queued;
    }
    std::vector<session_ref> over;
    bool post = false;
    {
      std::lock_guard lock(mutex_);
      for (const session_id id : ids) {
        auto s = find_locked(id);
        if (!s || !s->is_open()) continue;
        if (s->reserve(wire)) {
          inbox_.push_back({std::move(s), message_frame(op, payload)});
          ++queued;
        } else {
          over.push_back(std::move(s));
        }
      }
      if (queued > 0) post = !inbox_posted_.exchange(true, std::memory_order_release);
    }
    for (auto& s : over) overflow(s);
    if (post) asio::post(ioc, [this] { drain_inbox(); });
    return queued;
  }

  /// Starts the close handshake of session `id` (nothing if there is none).
  void close(session_id id, close_code code, std::string_view reason) {
    auto s = find(id);
    if (!s) return;
    if (on_this_thread()) {
      s->start_close(code, reason);
    } else {
      asio::post(ioc,
                 [s = std::move(s), code, r = std::string(reason)] { s->start_close(code, r); });
    }
  }

  /// Bytes reserved by session `id` (0 if there is none).
  [[nodiscard]] std::size_t buffered(session_id id) {
    auto s = find(id);
    return s ? s->buffered() : 0;
  }

 private:
  // Registers `s`'s socket once, edge-triggered, for input, output and peer half-close.
  [[nodiscard]] bool watch(session& s) noexcept {
    ::epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = &s;
    return ::epoll_ctl(ready_.native_handle(), EPOLL_CTL_ADD, s.stream().native_handle(), &ev) == 0;
  }

  void adopt(tcp_stream stream);
  void drain_inbox();
  // Before a send made on this thread: what other threads sent earlier is queued first, so that
  // every session's messages leave in the order they were made (a send that happens-before this
  // one set inbox_posted_ before it, and only a drain clears it). One atomic load when the
  // inbox is empty.
  void catch_up() {
    if (inbox_posted_.load(std::memory_order_acquire)) drain_inbox();
  }
  void poll();
  void run_ready();
  bool on_ready();
  void start_tick();
  void on_tick();

  // The overflow policy for a session past its limit, applied on its thread.
  void overflow(const session_ref& s) {
    if (!overflow_close(core.options.backpressure)) return;  // drop_oldest only refuses
    if (on_this_thread()) {
      s->overflow();
    } else {
      asio::post(ioc, [s] { s->overflow(); });
    }
  }

  // ---- registry ------------------------------------------------------------------------------
  // A session id is (generation << 32) | (slot << 8) | worker index: a lookup is an index, and a
  // session costs 8 bytes here instead of a hash node. Each slot counts its own generations
  // (1 to 2^32 - 1, then 1 again; never 0, so no id is 0), so an id comes back only after
  // 2^32 - 1 later sessions have used its slot. Written only by this worker's thread (under the
  // lock); read by it without the lock and by other threads under the lock.

  [[nodiscard]] static std::uint32_t slot_of(session_id id) noexcept {
    return static_cast<std::uint32_t>((id >> 8) & 0xFFFFFF);
  }
  [[nodiscard]] session_ref find(session_id id) {
    if (on_this_thread()) return find_locked(id);  // the only writer is this thread: no lock
    std::lock_guard lock(mutex_);
    return find_locked(id);
  }
  [[nodiscard]] session_ref find_locked(session_id id) const {
    const std::uint32_t slot = slot_of(id);
    if (slot >= slots_.size() || !slots_[slot] || slots_[slot]->id() != id) return {};
    return slots_[slot];
  }
  // The session with `id`, without a reference; only on this thread, and only until control
  // leaves the caller.
  [[nodiscard]] session* peek_local(session_id id) const noexcept {
    const std::uint32_t slot = slot_of(id);
    if (slot >= slots_.size() || !slots_[slot] || slots_[slot]->id() != id) return nullptr;
    return slots_[slot].get();
  }
  void erase(session_id id) {
    const std::uint32_t slot = slot_of(id);
    std::uint32_t next = static_cast<std::uint32_t>(id >> 32) + 1;
    if (next == 0) next = 1;
    std::lock_guard lock(mutex_);
    if (slot < slots_.size()) {
      slots_[slot] = {};
      free_slots_.push_back(static_cast<std::uint64_t>(next) << 32 | slot);
    }
  }
  // A finishing session leaves the epoll set (its socket still open) and the registry, but
  // lives until the event batch ends: later events in the batch may still point at it.
  static void retire_session(thread_resources& r, session& s) {
    auto& self = static_cast<reactor&>(r);
    // ENOENT for a session that ended before it was watched (see adopt): nothing to undo.
    ::epoll_ctl(self.ready_.native_handle(), EPOLL_CTL_DEL, s.stream().native_handle(), nullptr);
    self.retired_.emplace_back(&s);
    self.erase(s.id());
  }
  // Snapshot of live sessions (finish() empties slots while callers iterate).
  void snapshot() {
    scratch_.clear();
    for (auto& s : slots_) {
      if (s) scratch_.push_back(s);
    }
  }

  std::uint8_t index_;
  asio::steady_timer tick_timer_;
  asio::posix::stream_descriptor ready_;  // the epoll set, waited on through ioc (poll())
  bool polling_ = true;                   // false once abort_all stopped the readiness loop
  std::error_code error_;
  std::array<::epoll_event, max_events> events_{};
  std::vector<session_ref> retired_;
  std::thread thread_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard_;
  mutable std::mutex mutex_;
  std::vector<session_ref> slots_;
  std::vector<std::uint64_t> free_slots_;  // (next generation << 32) | slot
  std::vector<session_ref> scratch_;       // tick and stop snapshots
  // Sends and broadcasts from other threads, in the order they were made, until this thread
  // drains them (a drain task, or a send on this thread catching up first).
  struct inbound_send {
    session_ref target;
    out_frame frame;  // reserved against the target's limit
  };
  std::vector<inbound_send> inbox_;     // guarded by mutex_
  std::vector<inbound_send> draining_;  // this thread's; swapped with inbox_
  bool draining_now_ = false;           // this thread's: drain_inbox is walking draining_
  std::vector<session*> held_;          // this thread's: sessions the drain queued to
  // The inbox holds sends not yet drained (set under mutex_ with them; read without it by
  // catch_up()).
  std::atomic<bool> inbox_posted_{false};
};

// ---- implementation ----------------------------------------------------------------------------

inline void reactor::adopt(tcp_stream stream) {
  // The socket is non-blocking (accept4) and has TCP_NODELAY (inherited from the listener).
  session_stream connection(std::move(stream));
  if (core.tls.enabled()) {
    // TLS from the first byte; the handshake runs in the HTTP phase, under handshake_timeout.
    SSL* ssl = core.tls.new_connection();
    if (!ssl || !connection.start_tls(ssl)) return;  // out of memory: the socket is closed
  }
  std::uint32_t slot = 0;
  std::uint32_t generation = 1;
  {
    std::lock_guard lock(mutex_);
    if (free_slots_.empty()) {
      if (slots_.size() >= max_slots) return;  // 16 M sessions on one thread: refuse
      slot = static_cast<std::uint32_t>(slots_.size());
      slots_.emplace_back();
    } else {
      const std::uint64_t entry = free_slots_.back();
      free_slots_.pop_back();
      slot = static_cast<std::uint32_t>(entry);
      generation = static_cast<std::uint32_t>(entry >> 32);
    }
  }
  const session_id id =
      static_cast<session_id>(generation) << 32 | static_cast<session_id>(slot) << 8 | index_;
  session_ref s = session::create(std::move(connection), *this, id);
  core.live.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard lock(mutex_);
    slots_[slot] = s;
  }
  s->start();
  // Watched after the first read, so a request that was already there (defer_accept) is not
  // reported again; registration reports whatever arrived since.
  if (s->phase() != session::phase_t::done && !watch(*s)) s->finish(close_code::abnormal);
}

// Queues what other threads sent, in their order; each session writes it once the task ends (a
// burst to one session is one write).
inline void reactor::drain_inbox() {
  // A send made by a handler this drain runs (a session closed by a failed write, whose close
  // handler sends) must not swap the vector being walked; the task posted for what arrives
  // meanwhile drains it.
  if (draining_now_) return;
  draining_now_ = true;
  {
    std::lock_guard lock(mutex_);
    draining_.swap(inbox_);
    inbox_posted_.store(false, std::memory_order_relaxed);
  }
  // Everything for one session is queued first and written once: a subscriber that gets a
  // hundred events from a pipeline worker between two drains gets one gather write, not a
  // hundred. `draining_` keeps the sessions alive until the writes are done.
  for (auto& send : draining_) {
    if (send.target->enqueue_held(std::move(send.frame))) held_.push_back(send.target.get());
  }
  for (session* s : held_) s->release_held();
  held_.clear();
  draining_.clear();
  draining_now_ = false;
}

// Waits (through ioc) until a session socket is ready, then handles ready sockets.
inline void reactor::poll() {
  ready_.async_wait(asio::posix::stream_descriptor::wait_read, [this](const std::error_code& ec) {
    if (ec) return;  // cancelled: the worker is stopping
    run_ready();
  });
}

// Handles ready sockets. While sockets keep being ready, the next batch is taken by a posted task
// (the posted tasks and timers queued meanwhile run first) instead of a new readiness wait: a
// wait re-arms the epoll set in Asio's own set (an epoll_ctl that polls every ready socket) and
// costs an epoll_wait there, per batch. Only a set found empty goes back to waiting.
inline void reactor::run_ready() {
  if (!on_ready()) {
    poll();
    return;
  }
  asio::post(ioc, [this] {
    if (polling_) run_ready();
  });
}

// Takes batches of ready sockets (up to max_events each) until the set is empty or about
// max_events sockets were handled; true when sockets may still be ready.
inline bool reactor::on_ready() {
  int handled = 0;
  for (int round = 0; round < max_rounds; ++round) {
    const int n = ::epoll_wait(ready_.native_handle(), events_.data(), max_events, 0);
    for (int i = 0; i < n; ++i) {
      const ::epoll_event& ev = events_[static_cast<std::size_t>(i)];
      auto* s = static_cast<session*>(ev.data.ptr);
      if (ev.events & (EPOLLOUT | EPOLLERR)) s->on_writable();
      if (ev.events & (EPOLLRDHUP | EPOLLHUP)) s->peer_hung_up();
      if (ev.events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->on_readable();
    }
    retired_.clear();
    if (n <= 0) return false;
    handled += n;
    if (handled >= max_events) break;
  }
  return true;
}

inline void reactor::start_tick() {
  tick_timer_.expires_after(core.tick);
  tick_timer_.async_wait([this](const std::error_code& ec) {
    if (ec) return;
    on_tick();
    start_tick();
  });
}

inline void reactor::on_tick() {
  const std::uint32_t now = core.now_ms();
  snapshot();
  for (auto& s : scratch_) s->on_tick(now);
  scratch_.clear();
  retired_.clear();
  batch.shrink(1024);  // after a read of many tiny messages, keep about 100 KiB at most
  // After a burst of sends from other threads, keep about 256 KiB of inbox at most.
  constexpr std::size_t inbox_keep = 4096;
  if (draining_.capacity() > inbox_keep) std::vector<inbound_send>().swap(draining_);
  std::lock_guard lock(mutex_);
  if (inbox_.empty() && inbox_.capacity() > inbox_keep) std::vector<inbound_send>().swap(inbox_);
}

}  // namespace devgate::websocket::detail
