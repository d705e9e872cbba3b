#pragma once

// Internals of devgate::websocket::server: one session per TCP connection, pinned to one worker
// thread (its io_context), so per-session state needs no locks. Only `buffered_` and `phase_`
// are read from other threads (send/broadcast/buffered_bytes), and they are atomics.
//
// Session sockets are not Asio sockets: each worker registers them once, edge-triggered, in an
// epoll set of its own, and waits on that set through Asio (one readiness wait per batch of
// ready sockets, not one wait and one epoll_ctl per read). Reads and writes are plain
// non-blocking recv and sendmsg on the session's thread. This is Linux-only (epoll, accept4).

#include <asio.hpp>

#if !defined(__linux__)
#error "devgate::websocket::server needs Linux (epoll); the rest of devgate does not"
#endif
#include <sys/epoll.h>   // the worker's readiness set
#include <sys/socket.h>  // recv, sendmsg, shutdown
#include <sys/uio.h>     // iovec
#include <unistd.h>      // close

#include <cerrno>  // EAGAIN and friends

#include <algorithm>     // std::min
#include <array>         // write batches
#include <atomic>        // cross-thread counters
#include <cstddef>       // std::byte, std::size_t
#include <cstdint>       // compact fields
#include <cstring>       // memcpy of encoded fragments
#include <memory>        // std::unique_ptr
#include <mutex>         // registry shard lock
#include <optional>      // identify results
#include <span>          // byte views
#include <string>        // texts
#include <string_view>   // reasons
#include <system_error>  // error codes
#include <thread>        // worker thread

#include <utility>  // std::move
#include <vector>   // queues, pools

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/transport/transport.hpp"
#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/handshake.hpp"
#include "devgate/websocket/http.hpp"
#include "devgate/websocket/reader.hpp"
#include "devgate/websocket/server_options.hpp"

namespace devgate::detail {

class ws_server_session;
struct ws_server_worker;

/// Fixed-size blocks carved from 8 KiB chunks, so what every idle session keeps (its session
/// object) costs its exact size rather than a heap block with a header and rounding, and
/// long-lived blocks do not interleave with short-lived ones.
/// Not thread-safe; the memory returns when the pool dies (it keeps its peak size until then).
class ws_server_block_pool {
 public:
  ws_server_block_pool() = default;
  ws_server_block_pool(const ws_server_block_pool&) = delete;
  ws_server_block_pool& operator=(const ws_server_block_pool&) = delete;

  void* allocate(std::size_t size) {
    if (block_ == 0) block_ = (std::max(size, sizeof(node)) + 15) & ~std::size_t{15};
    if (size > block_) return ::operator new(size);
    if (!free_) grow();
    node* n = free_;
    free_ = n->next;
    return n;
  }
  void deallocate(void* p, std::size_t size) noexcept {
    if (size > block_) {
      ::operator delete(p);
      return;
    }
    auto* n = static_cast<node*>(p);
    n->next = free_;
    free_ = n;
  }

 private:
  struct node {
    node* next;
  };
  void grow() {
    constexpr std::size_t chunk_bytes = 8192;
    const std::size_t count = chunk_bytes / block_;
    chunks_.push_back(std::make_unique<std::byte[]>(count * block_));
    std::byte* base = chunks_.back().get();
    for (std::size_t i = 0; i < count; ++i) {
      auto* n = reinterpret_cast<node*>(base + i * block_);
      n->next = free_;
      free_ = n;
    }
  }
  node* free_ = nullptr;
  std::size_t block_ = 0;
  std::vector<std::unique_ptr<std::byte[]>> chunks_;
};

/// The session allocator: a block pool behind a lock, since the last reference to a session
/// may be dropped on any thread (allocation and release happen once per connection).
class ws_server_session_pool {
 public:
  void* allocate(std::size_t size) {
    std::lock_guard lock(mutex_);
    return pool_.allocate(size);
  }
  void deallocate(void* p, std::size_t size) noexcept {
    std::lock_guard lock(mutex_);
    pool_.deallocate(p, size);
  }

 private:
  std::mutex mutex_;
  ws_server_block_pool pool_;
};

/// The process-wide session pool. Never destroyed: a session may be released while its
/// io_context is being destroyed, and a server may itself be a static object.
inline ws_server_session_pool& ws_server_sessions() {
  static auto* pool = new ws_server_session_pool;
  return *pool;
}

/// Everything the sessions of one server share: options, handlers, counters. Lives in the server.
struct ws_server_core {
  websocket::server_options options;
  transport_handlers handlers;
  clock::duration tick{};                  // the workers' timer period
  clock::time_point epoch = clock::now();  // sessions keep 32-bit millisecond stamps from here
  std::atomic<std::size_t> live{0};        // sessions not yet finished, for stop()
  std::atomic<bool> stopping{false};

  /// Milliseconds since `epoch`, wrapping after 49 days: compare with `reached`, never with <.
  [[nodiscard]] std::uint32_t now_ms() const noexcept {
    return static_cast<std::uint32_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - epoch).count());
  }
  /// True when `deadline` is not in the future (valid for spans under 24 days).
  [[nodiscard]] static bool reached(std::uint32_t now, std::uint32_t deadline) noexcept {
    return static_cast<std::int32_t>(now - deadline) >= 0;
  }
  /// A duration in the sessions' millisecond stamps.
  [[nodiscard]] static std::uint32_t ms(std::chrono::milliseconds d) noexcept {
    return static_cast<std::uint32_t>(d.count());
  }
};

/// An intrusive reference to a session: 8 bytes in every Asio handler and registry slot, where a
/// shared_ptr would cost 16 plus a control block and enable_shared_from_this's weak pointer.
class ws_server_session_ref {
 public:
  ws_server_session_ref() noexcept = default;
  explicit ws_server_session_ref(ws_server_session* s) noexcept;
  ws_server_session_ref(const ws_server_session_ref& o) noexcept : ws_server_session_ref(o.p_) {}
  ws_server_session_ref(ws_server_session_ref&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  ws_server_session_ref& operator=(ws_server_session_ref o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~ws_server_session_ref();
  ws_server_session* operator->() const noexcept { return p_; }
  ws_server_session& operator*() const noexcept { return *p_; }
  ws_server_session* get() const noexcept { return p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }

 private:
  ws_server_session* p_ = nullptr;
};

/// Reservation credit a session takes on its own thread beyond what it needs (see
/// ws_server_session::reserve_local).
inline constexpr std::size_t ws_server_credit = 4096;

/// Outbound messages larger than this are sent as fragments of this size (RFC 6455 5.4), so a
/// ping, pong or close waits behind at most one write, never behind a whole 16 MiB frame.
inline constexpr std::size_t ws_server_fragment_size = 64u * 1024u;

/// Bytes of the unmasked header of a server frame with `len` payload bytes (RFC 6455 5.2).
[[nodiscard]] constexpr std::size_t ws_server_header_size(std::size_t len) noexcept {
  return len <= 125 ? 2 : len <= 0xFFFF ? 4 : 10;
}

/// Wire bytes of a data message of `len` payload bytes sent as ws_server_fragment_size
/// fragments (at least one frame: an empty message is a 2-byte frame).
[[nodiscard]] constexpr std::size_t ws_server_wire_size(std::size_t len) noexcept {
  constexpr std::size_t f = ws_server_fragment_size;
  const std::size_t full = len / f;
  const std::size_t last = len % f;
  std::size_t total = len + full * ws_server_header_size(f);
  if (last > 0 || full == 0) total += ws_server_header_size(last);
  return total;
}

/// Something waiting to be written, in one of two forms:
/// - a whole data message (`lazy`): its payload, shared and never copied (a broadcast's
///   recipients all point at one buffer), cut into frames of at most ws_server_fragment_size
///   whose headers are encoded while it is written, so a message is one queue entry whatever its
///   size;
/// - literal bytes, `head` then `body`: control frames, HTTP responses, and the one frame of a
///   data message that a full socket buffer cut in the middle.
struct ws_server_out_frame {
  /// What the frame is, for accounting and for the close handshake.
  enum kind_t : std::uint8_t { data, control, close, raw };
  shared_bytes body;
  std::array<std::byte, 10> head{};  // literal only; RFC 6455 5.2: at most 10 bytes
  std::uint8_t head_len = 0;
  kind_t kind = data;
  websocket::opcode op = websocket::opcode::binary;  // lazy: the opcode of its next frame
  bool lazy = false;
  bool more = false;  // literal: a fragment that is not its message's last (RFC 6455 5.4)
  /// Bytes it puts on the wire (for a lazy message, what is left of it).
  [[nodiscard]] std::size_t size() const noexcept {
    return lazy ? ws_server_wire_size(body.size()) : head_len + body.size();
  }
};

/// A data message for the queue: the payload shared, headers encoded while it is written.
inline ws_server_out_frame ws_server_message(websocket::opcode op, shared_bytes payload) noexcept {
  ws_server_out_frame m;
  m.body = std::move(payload);
  m.op = op;
  m.lazy = true;
  return m;
}

/// A session's outbound queue, allocated only while something waits to be written (idle sessions
/// hold a null pointer) and recycled through a per-worker pool. Writes are synchronous and
/// non-blocking (see ws_server_session::pump), so nothing is "in flight": a frame is either
/// queued, written, or the one `partial` frame a full socket buffer cut in the middle.
struct ws_server_out_queue {
  std::vector<ws_server_out_frame> control;  // FIFO; jumps ahead of data at frame boundaries
  std::vector<ws_server_out_frame> data;     // FIFO from data_head
  std::size_t data_head = 0;
  ws_server_out_frame partial;  // written up to `offset`; goes first in the next write
  std::size_t offset = 0;
  bool has_partial = false;
  bool mid_message = false;  // the last data frame a write started was not its message's last

  [[nodiscard]] bool data_empty() const noexcept { return data_head == data.size(); }
  [[nodiscard]] bool empty() const noexcept {
    return control.empty() && data_empty() && !has_partial;
  }
  void clear() noexcept {
    control.clear();
    data.clear();
    data_head = 0;
    partial = {};
    offset = 0;
    has_partial = false;
    mid_message = false;
  }
};

/// One gather write being assembled on a worker thread: small pieces (frame headers, small
/// payloads) are copied into one contiguous scratch run, so a burst of 64-byte replies is one
/// iovec instead of two per frame; large payloads are referenced where they are (never copied).
/// The write is synchronous, so the scratch is free again when the write returns.
struct ws_server_gather {
  static constexpr std::size_t max_iov = 64;                // iovecs per sendmsg
  static constexpr std::size_t scratch_size = 16u * 1024u;  // copied bytes per write
  static constexpr std::size_t copy_limit = 512;            // larger pieces are referenced
  static constexpr std::size_t max_bytes = 2048u * 1024u;   // stop adding frames past this

  std::array<::iovec, max_iov> iov;
  std::unique_ptr<std::byte[]> scratch{new std::byte[scratch_size]};
  std::size_t count = 0;  // iovecs used
  std::size_t used = 0;   // scratch bytes used
  std::size_t bytes = 0;  // total bytes in the write
  bool run_open = false;  // iov[count - 1] is the scratch run and may grow

  void reset() noexcept { count = used = bytes = 0, run_open = false; }
  /// Adds one frame from byte `skip` (a lazy message: as many of its frames as fit); false when
  /// not all of it fits, so that the caller adds nothing after it.
  bool add(const ws_server_out_frame& f, std::size_t skip) noexcept {
    if (f.lazy) return add_message(f.op, f.body.bytes());
    if (count + 2 > max_iov || (bytes > 0 && bytes + f.size() - skip > max_bytes)) return false;
    if (skip < f.head_len) {
      piece(f.head.data() + skip, f.head_len - skip);
      skip = 0;
    } else {
      skip -= f.head_len;
    }
    if (skip < f.body.size()) piece(f.body.data() + skip, f.body.size() - skip);
    return true;
  }
  /// Adds a data message (`op` for its first frame) as frames of at most
  /// ws_server_fragment_size; false when not all of it fits.
  bool add_message(websocket::opcode op, std::span<const std::byte> body) noexcept {
    const std::size_t total = body.size();
    std::size_t off = 0;
    do {
      const std::size_t len = std::min(ws_server_fragment_size, total - off);
      const bool fin = off + len == total;
      // The header is encoded here, so it must land in the scratch run.
      if (count + 2 > max_iov || used + 10 > scratch_size ||
          (bytes > 0 && bytes + ws_server_header_size(len) + len > max_bytes)) {
        return false;
      }
      std::array<std::byte, 10> head;
      piece(head.data(), websocket::encode_frame_header(head, op, fin, len));
      if (len > 0) piece(body.data() + off, len);
      off += len;
      op = websocket::opcode::continuation;
    } while (off < total);
    return true;
  }

 private:
  void piece(const std::byte* p, std::size_t n) noexcept {
    bytes += n;
    if (n <= copy_limit && used + n <= scratch_size) {
      std::memcpy(scratch.get() + used, p, n);
      if (run_open) {
        iov[count - 1].iov_len += n;
      } else {
        iov[count++] = {scratch.get() + used, n};
        run_open = true;
      }
      used += n;
      return;
    }
    iov[count++] = {const_cast<std::byte*>(p), n};  // iovec is not const-correct; only read
    run_open = false;
  }
};

/// An accepted socket not yet adopted by a worker: closed if nobody adopts it (a task posted
/// to a worker that stops first).
class ws_server_fd {
 public:
  explicit ws_server_fd(int fd) noexcept : fd_(fd) {}
  ws_server_fd(ws_server_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  ws_server_fd(const ws_server_fd&) = delete;
  ws_server_fd& operator=(const ws_server_fd&) = delete;
  ws_server_fd& operator=(ws_server_fd&&) = delete;
  ~ws_server_fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  /// The descriptor, now the caller's to close.
  [[nodiscard]] int release() noexcept { return std::exchange(fd_, -1); }

 private:
  int fd_;
};

/// One thread: its io_context, its epoll set of session sockets, its sessions, its read buffer
/// and its timer tick.
struct ws_server_worker {
  static constexpr std::size_t read_buffer_size = 64u * 1024u;
  static constexpr int max_events = 256;  // ready sockets taken per epoll_wait

  ws_server_worker(ws_server_core& c, std::uint8_t idx)
      : core(c),
        index(idx),
        tick_timer(ioc),
        ready(ioc),
        read_buffer(new std::byte[read_buffer_size]) {
    const int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) {
      epoll_error = std::error_code(errno, std::system_category());
      return;
    }
    ready.assign(fd, epoll_error);
    if (epoll_error) ::close(fd);
  }

  ws_server_core& core;
  std::uint8_t index;
  asio::io_context ioc{1};
  asio::steady_timer tick_timer;
  // The epoll set of this worker's session sockets, waited on through ioc (see poll()).
  asio::posix::stream_descriptor ready;
  std::error_code epoll_error;  // epoll_create1 failed: server::start reports it
  std::array<::epoll_event, max_events> events{};
  // Sessions finished during an event batch stay alive until the batch ends: later events in
  // it may still point at them.
  std::vector<ws_server_session_ref> retired;
  std::thread thread;
  // Shared by every session of this thread: sessions read into it and keep nothing when idle.
  std::unique_ptr<std::byte[]> read_buffer;
  // Registry shard: a slot per session, the slot index inside the session id (so a lookup is an
  // index, and a session costs 8 bytes here instead of a hash node). Written only by this
  // worker's thread (under the lock); read by it without the lock and by other threads (send,
  // broadcast, close, buffered_bytes) under the lock.
  mutable std::mutex mutex;
  std::vector<ws_server_session_ref> slots;
  std::vector<std::uint32_t> free_slots;
  std::uint32_t generation = 0;  // makes ids unique although slots are reused
  static constexpr std::uint32_t max_slots = 1u << 24;
  clock::time_point read_time{};  // when the current read burst arrived (message timestamps)
  // Pools so that busy sessions do not allocate a reader and a queue per read or write burst.
  std::vector<std::unique_ptr<websocket::frame_reader>> reader_pool;
  std::vector<std::unique_ptr<ws_server_out_queue>> queue_pool;
  std::vector<ws_server_session_ref> scratch;  // tick and stop snapshots
  ws_server_gather gather;                     // the write being assembled (pump)
  inbound_message delivering;                  // reused by ws_server_session::deliver
  bool delivering_busy = false;                // a handler is running with `delivering`

  [[nodiscard]] std::span<std::byte> buffer() const noexcept {
    return {read_buffer.get(), read_buffer_size};
  }
  [[nodiscard]] bool on_this_thread() noexcept {
    return ioc.get_executor().running_in_this_thread();
  }
  std::unique_ptr<websocket::frame_reader> take_reader() {
    if (reader_pool.empty()) {
      return std::make_unique<websocket::frame_reader>(core.options.reader);
    }
    auto r = std::move(reader_pool.back());
    reader_pool.pop_back();
    return r;
  }
  void give_reader(std::unique_ptr<websocket::frame_reader> r) {
    if (r && r->idle() && !r->finished() && reader_pool.size() < 64)
      reader_pool.push_back(std::move(r));
  }
  std::unique_ptr<ws_server_out_queue> take_queue() {
    if (queue_pool.empty()) return std::make_unique<ws_server_out_queue>();
    auto q = std::move(queue_pool.back());
    queue_pool.pop_back();
    return q;
  }
  void give_queue(std::unique_ptr<ws_server_out_queue> q) {
    if (!q) return;
    q->clear();
    if (queue_pool.size() < 64) queue_pool.push_back(std::move(q));
  }

  void adopt(int fd);
  /// Registers `s`'s socket once, edge-triggered, for input, output and peer half-close.
  [[nodiscard]] bool watch(ws_server_session& s) noexcept;
  /// Waits (through ioc) until a session socket is ready, handles every ready one, repeats.
  void poll();
  void on_ready();
  void start_tick();
  void on_tick();
  void close_all(close_code code);
  void abort_all();
  /// The session with `id` on this worker, or null. Session ids are
  /// (generation << 32) | (slot << 8) | worker index.
  [[nodiscard]] ws_server_session_ref find(session_id id) {
    if (on_this_thread()) return find_locked(id);  // the only writer is this thread: no lock
    std::lock_guard lock(mutex);
    return find_locked(id);
  }
  [[nodiscard]] ws_server_session_ref find_locked(session_id id) const;
  /// The session with `id`, without a reference; only on this worker's thread (the registry's
  /// only writer), and only until control leaves the caller.
  [[nodiscard]] ws_server_session* peek_local(session_id id) const noexcept;
  void erase(session_id id) {
    const auto slot = static_cast<std::uint32_t>((id >> 8) & 0xFFFFFF);
    std::lock_guard lock(mutex);
    if (slot < slots.size()) {
      slots[slot] = {};
      free_slots.push_back(slot);
    }
  }
  // Snapshot of live sessions (finish() empties slots while callers iterate).
  void snapshot() {
    scratch.clear();
    for (auto& s : slots) {
      if (s) scratch.push_back(s);
    }
  }
};

/// The session whose on_message handler runs on this thread (null outside one), so that a reply
/// from inside the handler (`server::send` to that session) skips the lookup, the reference
/// count and the thread check.
struct ws_server_delivering {
  const ws_server_core* core = nullptr;
  ws_server_session* session = nullptr;
};
inline thread_local ws_server_delivering ws_server_current{};

/// One WebSocket (or not yet upgraded HTTP) connection.
class ws_server_session {
 public:
  /// Where the connection is in its life. Read by other threads only to refuse sends early.
  enum class phase_t : std::uint8_t { http, open, closing, draining, done };

  /// A session on the connected non-blocking socket `fd` (now the session's), living on `w`.
  ws_server_session(int fd, ws_server_worker& w, session_id id) noexcept
      : worker_(&w), id_(id), fd_(fd) {}
  ws_server_session(const ws_server_session&) = delete;
  ~ws_server_session() {
    if (phase() == phase_t::http) {
      delete parser_;
    } else {
      delete reader_;
    }
  }
  ws_server_session& operator=(const ws_server_session&) = delete;

  [[nodiscard]] session_id id() const noexcept { return id_; }
  /// The socket, or -1 once finished.
  [[nodiscard]] int fd() const noexcept { return fd_; }
  /// The worker this session lives on.
  [[nodiscard]] ws_server_worker& worker() const noexcept { return *worker_; }
  [[nodiscard]] phase_t phase() const noexcept { return phase_.load(std::memory_order_acquire); }
  [[nodiscard]] std::size_t buffered() const noexcept {
    return buffered_.load(std::memory_order_relaxed);
  }

  // ---- called on the session's own thread ------------------------------------------------

  void start() {
    const std::uint32_t now = core().now_ms();
    deadline_ = now + core().ms(core().options.handshake_timeout);
    last_rx_ = now;
    // Read at once: the request is usually there already (always with defer_accept). The
    // worker registers the socket after this, and registration reports what arrived meanwhile.
    on_readable();
  }

  /// What epoll reported for this socket (edge-triggered: the state changed).
  void on_event(std::uint32_t events) {
    if (phase() == phase_t::done) return;
    if ((events & (EPOLLOUT | EPOLLERR)) && wait_out_) {
      wait_out_ = false;
      writing_ = false;
      pump();
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable();
  }

  /// Reserves room for `bytes` of data from any thread; false means "over the limit" (the
  /// caller applies the overflow policy). drop_oldest may pass the limit up to twice its size
  /// until the worker drops older frames; nothing passes that hard bound.
  [[nodiscard]] bool reserve(std::size_t bytes) noexcept {
    if (bytes > core().options.backpressure.max_buffered_bytes) return false;
    return add_reserved(bytes);
  }
  /// reserve() on the session's own thread (replies from its handler): taken from the credit
  /// the session holds when that suffices, otherwise from the shared counter together with
  /// ws_server_credit more, so a burst of replies costs one atomic operation, not one each. The
  /// credit is given back when the queue drains; until then it counts against the limit too.
  [[nodiscard]] bool reserve_local(std::size_t bytes) noexcept {
    if (credit_ >= bytes) {
      credit_ -= static_cast<std::uint32_t>(bytes);
      return true;
    }
    if (bytes > core().options.backpressure.max_buffered_bytes) return false;
    const std::size_t need = bytes - credit_;
    if (add_reserved(need + ws_server_credit)) {
      credit_ = ws_server_credit;
      return true;
    }
    if (!add_reserved(need)) return false;  // near the limit: exactly what is needed
    credit_ = 0;
    return true;
  }
  /// Gives back a reservation that will not be queued.
  void unreserve(std::size_t bytes) noexcept {
    buffered_.fetch_sub(static_cast<std::uint32_t>(bytes), std::memory_order_relaxed);
  }

  /// Queues one data message whose bytes were reserved. On the session's thread.
  void enqueue_data(ws_server_out_frame m) {
    if (phase() != phase_t::open) {
      unreserve(m.size() + std::exchange(credit_, 0));
      return;
    }
    auto& q = queue();
    q.data.push_back(std::move(m));
    const auto& bp = core().options.backpressure;
    if (bp.on_overflow == overflow_action::drop_oldest) {
      // Drop the oldest whole messages no write has started; the newest one always stays.
      while (buffered() - credit_ > bp.max_buffered_bytes && !q.mid_message &&
             q.data_head + 1 < q.data.size()) {
        give_back(q.data[q.data_head].size());
        q.data[q.data_head++] = {};
      }
    }
    flush_soon();
  }

  /// Writes the queue once the handlers already posted to this thread have run, so a burst of
  /// sends from other threads (each a posted task) goes out in one write, not one write each.
  /// Inside a read batch or a write in progress, their end writes it anyway.
  void flush_soon() {
    if (reading_ || writing_ || phase() == phase_t::done) return;
    writing_ = true;
    asio::post(worker().ioc, [self = ws_server_session_ref(this)] {
      self->writing_ = false;
      self->pump();
    });
  }

  /// Sends one data message whose `wire` bytes were reserved, sharing `payload` (a broadcast):
  /// when nothing else waits to be written it goes straight to the socket, with no queue and no
  /// reference taken; only what the socket does not take is queued. On the session's thread.
  void send_shared(websocket::opcode op, const shared_bytes& payload, std::size_t wire) {
    if (phase() != phase_t::open) {
      unreserve(wire);
      return;
    }
    if (q_ || writing_ || reading_) {
      enqueue_data(ws_server_message(op, payload));
      return;
    }
    auto& g = worker().gather;
    g.reset();
    if (!g.add_message(op, payload.bytes())) {  // larger than one write: the queue cuts it
      enqueue_data(ws_server_message(op, payload));
      return;
    }
    const auto n = write(g);
    if (!n) return;
    if (*n == g.bytes) {
      unreserve(wire);
      return;
    }
    auto& q = queue();
    q.data.push_back(ws_server_message(op, payload));
    consume(q, *n);
    wait_writable();
  }

  /// Starts the close handshake (RFC 6455 7.1.2) with `code`; queued data is dropped.
  void start_close(close_code code, std::string_view reason) {
    const phase_t p = phase();
    if (p == phase_t::http) {
      finish(close_code::abnormal);
      return;
    }
    if (p != phase_t::open) return;
    close_code_ = code;
    queue_close(code, reason);
    set_phase(phase_t::closing);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
    pump();
  }

  /// Closes the TCP connection now and reports `code` (used by timeouts and stop()).
  void finish(close_code code) {
    if (phase() == phase_t::done) return;
    const bool was_open = opened_;
    const bool was_http = phase() == phase_t::http;
    if (close_code_ == close_code::abnormal) close_code_ = code;
    set_phase(phase_t::done);
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);  // also leaves the worker's epoll set
    fd_ = -1;
    wait_out_ = false;
    auto& w = worker();
    if (was_http) {
      drop_parser();
    } else if (reader_) {
      w.give_reader(std::unique_ptr<websocket::frame_reader>(std::exchange(reader_, nullptr)));
    }
    if (q_) w.give_queue(std::move(q_));
    core().live.fetch_sub(1, std::memory_order_release);
    // The registry's reference goes away below; events already taken from epoll in this batch
    // may still name this session, so it lives until the batch ends.
    w.retired.emplace_back(this);
    w.erase(id_);
    if (was_open && core().handlers.on_close) {
      try {
        core().handlers.on_close(id_, close_code_);
      } catch (...) {
        // Nothing left to tell the peer; the session is gone either way.
      }
    }
  }

  /// Periodic timeouts: handshake, idle ping, pong, close handshake, lingering close.
  void on_tick(std::uint32_t now) {
    const auto& o = core().options;
    switch (phase()) {
      case phase_t::http:
        if (core().reached(now, deadline_)) finish(close_code::abnormal);
        break;
      case phase_t::open:
        if (ping_outstanding_) {
          if (core().reached(now, deadline_)) {
            finish(close_code::abnormal);  // no pong: the peer is gone
          }
        } else if (o.idle_timeout.count() > 0 && now - last_rx_ >= core().ms(o.idle_timeout)) {
          // RFC 6455 5.5.2: a ping; any bytes from the peer count as the answer.
          ws_server_out_frame f;
          f.body = websocket::encode_frame(websocket::opcode::ping, {});
          f.kind = ws_server_out_frame::control;
          queue().control.push_back(std::move(f));
          ping_outstanding_ = true;
          deadline_ = now + core().ms(o.pong_timeout);
          pump();
        }
        break;
      case phase_t::closing:
      case phase_t::draining:
        if (core().reached(now, deadline_)) finish(close_code_);
        break;
      case phase_t::done:
        break;
    }
  }

  // ---- reference count ----------------------------------------------------------------------
  void add_ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    // The last reference may be dropped on any thread (a sender's lookup): the pool is locked.
    this->~ws_server_session();
    ws_server_sessions().deallocate(this, sizeof(ws_server_session));
  }

 private:
  friend struct ws_server_reader_sink;

  [[nodiscard]] ws_server_core& core() const noexcept { return worker().core; }
  void set_phase(phase_t p) noexcept { phase_.store(p, std::memory_order_release); }

  void drop_parser() noexcept { delete std::exchange(parser_, nullptr); }

  // The hard bound of reservations: drop_oldest may pass the limit up to twice its size until
  // the worker drops older messages.
  [[nodiscard]] bool add_reserved(std::size_t bytes) noexcept {
    const auto& bp = core().options.backpressure;
    const std::size_t hard = bp.on_overflow == overflow_action::drop_oldest
                                 ? 2 * bp.max_buffered_bytes
                                 : bp.max_buffered_bytes;
    std::uint32_t cur = buffered_.load(std::memory_order_relaxed);
    do {
      if (cur + bytes > hard) return false;
    } while (!buffered_.compare_exchange_weak(cur, cur + static_cast<std::uint32_t>(bytes),
                                              std::memory_order_relaxed));
    return true;
  }
  // Bytes no longer queued, on the session's thread: kept as credit (up to 2 x ws_server_credit)
  // while the queue is in use; on_drained() gives all of it back.
  void give_back(std::size_t bytes) noexcept {
    credit_ += static_cast<std::uint32_t>(bytes);
    if (credit_ > 2 * ws_server_credit) {
      unreserve(credit_ - ws_server_credit);
      credit_ = ws_server_credit;
    }
  }

  ws_server_out_queue& queue() {
    if (!q_) q_ = worker().take_queue();
    return *q_;
  }

  // Reads until the socket is drained (a short read: edge-triggered readiness reports only new
  // input after that), at most 4 buffers per turn so that one busy peer cannot starve the
  // others; a socket with more to read is continued by a posted task.
  void on_readable() {
    if (phase() == phase_t::done) return;
    const std::span<std::byte> buf = worker().buffer();
    // Frames queued while the batch is parsed (replies from on_message) go out in one gather
    // write after it, not the first alone and the rest after that write completes.
    reading_ = true;
    bool more = false;
    for (int round = 0; round < 4; ++round) {
      const ::ssize_t got = ::recv(fd_, buf.data(), buf.size(), 0);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      if (got <= 0) {  // the peer's FIN, or a reset
        reading_ = false;
        on_eof();
        return;
      }
      const auto n = static_cast<std::size_t>(got);
      const clock::time_point now = clock::now();
      worker().read_time = now;
      last_rx_ = static_cast<std::uint32_t>(
          std::chrono::duration_cast<std::chrono::milliseconds>(now - core().epoch).count());
      ping_outstanding_ = false;  // any bytes prove the peer is alive, not only a pong
      try {
        process(buf.first(n));
      } catch (...) {
        on_handler_exception();
      }
      if (phase() == phase_t::done) {
        reading_ = false;
        return;
      }
      if (n < buf.size()) break;
      more = round == 3;
    }
    reading_ = false;
    pump();
    if (more && phase() != phase_t::done) {
      asio::post(worker().ioc, [self = ws_server_session_ref(this)] { self->on_readable(); });
    }
  }

  // A handler (route, identify, on_open, on_message) threw: answer 500 before the upgrade,
  // close with 1011 after it; the worker thread and every other session carry on.
  void on_handler_exception() {
    switch (phase()) {
      case phase_t::http:
        respond_error(500, "internal error");
        break;
      case phase_t::open:
      case phase_t::closing:
        delete std::exchange(reader_, nullptr);  // it may have stopped mid-frame
        close_received_ = true;                  // read no further frames
        fail(close_code::internal_error);
        break;
      case phase_t::draining:
      case phase_t::done:
        break;
    }
  }

  void on_eof() {
    // The peer closed its side. During the close handshake that is the expected end.
    finish(close_code::abnormal);
  }

  void process(std::span<std::byte> bytes) {
    switch (phase()) {
      case phase_t::http:
        process_http(bytes);
        break;
      case phase_t::open:
      case phase_t::closing:
        process_frames(bytes);
        break;
      case phase_t::draining:
      case phase_t::done:
        break;  // lingering close: read and discard until the peer closes
    }
  }

  // ---- HTTP phase (RFC 9112, RFC 6455 section 4.2) ----------------------------------------
  void process_http(std::span<const std::byte> bytes);
  void handle_request(const websocket::http_request& req);
  void respond_error(int status, std::string_view body, std::string_view extra = {}) {
    queue_raw(websocket::http_response(status, body, false, "text/plain; charset=utf-8", extra));
    linger_after_write();
  }
  // HTTP bytes go through the control FIFO: they precede every WebSocket frame (the 101 must
  // reach the peer before a close frame that fails the connection right after it).
  void queue_raw(std::string_view text) { queue_raw(shared_bytes::copy_of(text)); }
  void queue_raw(shared_bytes bytes) {
    if (bytes.empty()) return;
    ws_server_out_frame f;
    f.body = std::move(bytes);
    f.kind = ws_server_out_frame::raw;
    queue().control.push_back(std::move(f));
    pump();
  }
  // After the queued bytes are written: half-close and discard input until EOF, so the peer
  // reads the whole response instead of a reset (RFC 9112 9.6).
  void linger_after_write() {
    shutdown_when_drained_ = true;
    drop_parser();
    set_phase(phase_t::draining);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
    pump();
  }

  // ---- WebSocket phase ----------------------------------------------------------------------
  void process_frames(std::span<std::byte> bytes);
  void deliver(payload_kind kind, shared_bytes payload);
  void on_peer_close(std::uint16_t code, std::string_view reason);
  void on_ping(std::span<const std::byte> payload) {
    if (phase() != phase_t::open) return;
    // RFC 6455 5.5.3: answering only the most recent ping is allowed, so at most one pong waits
    // (a ping flood from a peer that does not read cannot grow the queue).
    auto& q = queue();
    shared_bytes pong = websocket::encode_frame(websocket::opcode::pong, payload);
    for (auto& f : q.control) {
      if (f.kind == ws_server_out_frame::control && f.body.size() > 1 &&
          (static_cast<std::uint8_t>(f.body.data()[0]) & 0x0F) == 0xA) {
        f.body = std::move(pong);
        return;
      }
    }
    ws_server_out_frame f;
    f.body = std::move(pong);
    f.kind = ws_server_out_frame::control;
    q.control.push_back(std::move(f));
    pump();
  }
  // RFC 6455 7.1.7: fail the connection: send a close with `code`, do not wait for the reply.
  void fail(close_code code) {
    if (phase() == phase_t::open) {
      close_code_ = code;
      queue_close(code, {});
    }
    shutdown_when_drained_ = true;
    set_phase(phase_t::closing);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
    pump();
  }
  void queue_close(close_code code, std::string_view reason) {
    auto& q = queue();
    // RFC 6455 5.5.1: no data frames after a close frame; drop what has not started.
    for (std::size_t i = q.data_head; i < q.data.size(); ++i) unreserve(q.data[i].size());
    q.data.clear();
    q.data_head = 0;
    ws_server_out_frame f;
    if (code == close_code::no_status) {
      f.body = websocket::encode_frame(websocket::opcode::close, {});
    } else {
      // RFC 6455 5.5: a control payload is at most 125 bytes, 2 of them the code.
      if (reason.size() > 123) reason = reason.substr(0, 123);
      const auto payload = websocket::encode_close_payload(code, reason);
      f.body = websocket::encode_frame(websocket::opcode::close, payload);
    }
    f.kind = ws_server_out_frame::close;
    q.control.push_back(std::move(f));
  }

  // ---- write path -------------------------------------------------------------------------
  void pump();
  /// One gather write of `g`: the bytes the socket took (0 when its buffer is full), or nullopt
  /// when the write failed and the session was closed.
  std::optional<std::size_t> write(const ws_server_gather& g);
  void consume(ws_server_out_queue& q, std::size_t n);
  void wait_writable();
  void on_drained() {
    if (q_) worker().give_queue(std::move(q_));
    if (credit_ > 0) unreserve(std::exchange(credit_, 0));  // idle: buffered() is 0
    if (!shutdown_when_drained_ || phase() == phase_t::done) return;
    shutdown_when_drained_ = false;
    // RFC 6455 7.1.1: the server closes the TCP connection first; half-close, then read until
    // the peer's FIN so the close frame is not lost to a reset.
    ::shutdown(fd_, SHUT_WR);
    set_phase(phase_t::draining);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
  }

  ws_server_worker* worker_;
  session_id id_;
  shared_bytes device_id_;
  // One pointer for two lives: the HTTP parser before the upgrade (phase http), then the frame
  // reader while a frame or message is partial. Both are null when idle.
  union {
    websocket::http_request_parser* parser_ = nullptr;
    websocket::frame_reader* reader_;
  };
  std::unique_ptr<ws_server_out_queue> q_;  // only while bytes wait to be written
  std::uint64_t sequence_ = 0;
  std::atomic<std::uint32_t> buffered_{0};  // server::start checks that the limits fit
  std::uint32_t credit_ = 0;                // part of buffered_ reserved but unused (own thread)
  std::atomic<std::uint32_t> refs_{0};
  std::uint32_t last_rx_ = 0;   // core().now_ms() of the last read
  std::uint32_t deadline_ = 0;  // handshake, pong, close or linger deadline, by phase
  int fd_;                      // -1 once finished
  std::atomic<phase_t> phase_{phase_t::http};
  close_code close_code_ = close_code::abnormal;
  bool opened_ : 1 = false;
  bool writing_ : 1 = false;   // a write waits (wait_out_) or a flush is posted: pump() waits
  bool wait_out_ : 1 = false;  // waiting for an EPOLLOUT edge: the socket buffer was full
  bool reading_ : 1 = false;   // parsing a read batch: pump() waits for its end (one write)
  bool ping_outstanding_ : 1 = false;
  bool shutdown_when_drained_ : 1 = false;
  bool close_received_ : 1 = false;
};

inline ws_server_session_ref::ws_server_session_ref(ws_server_session* s) noexcept : p_(s) {
  if (p_) p_->add_ref();
}
inline ws_server_session_ref::~ws_server_session_ref() {
  if (p_) p_->release();
}

/// Adapts frame_reader callbacks to the session.
struct ws_server_reader_sink {
  ws_server_session& s;
  void on_message(payload_kind kind, shared_bytes payload) { s.deliver(kind, std::move(payload)); }
  void on_ping(std::span<const std::byte> payload) { s.on_ping(payload); }
  void on_pong(std::span<const std::byte>) {}
  void on_close(std::uint16_t code, std::string_view reason) { s.on_peer_close(code, reason); }
};

// ---- implementation ----------------------------------------------------------------------------

inline void ws_server_session::process_http(std::span<const std::byte> bytes) {
  if (!parser_) parser_ = new websocket::http_request_parser(core().options.http);
  using st = websocket::http_request_parser::status;
  st s = parser_->feed(bytes);
  // A keep-alive connection may carry pipelined requests; answer them in order.
  while (phase() == phase_t::http && parser_) {
    if (s == st::incomplete) return;
    if (s == st::error) {
      const int status = parser_->error_status();
      respond_error(status, websocket::status_reason(status));
      return;
    }
    handle_request(parser_->request());
    if (phase() != phase_t::http || !parser_) return;
    parser_->reset();
    s = parser_->state();
  }
}

inline void ws_server_session::handle_request(const websocket::http_request& req) {
  auto& o = core().options;
  if (websocket::is_websocket_upgrade(req)) {
    const auto verdict = websocket::check_upgrade(req);
    if (verdict.status != 101) {
      respond_error(verdict.status, verdict.reason, verdict.status == 405 ? "Allow: GET\r\n" : "");
      return;
    }
    std::optional<std::string> device;
    if (o.identify) {
      device = o.identify(req);
    } else {
      device = std::string(req.target);
    }
    if (!device) {
      respond_error(400, "unknown device");
      return;
    }
    if (core().stopping.load(std::memory_order_acquire)) {
      respond_error(503, "shutting down");
      return;
    }
    queue_raw(websocket::upgrade_response(req.header("Sec-WebSocket-Key")));
    device_id_ = shared_bytes::copy_of(*device);
    // Bytes after the request are the first frames (RFC 6455 4.1 lets a client send at once).
    const auto left = parser_->leftover();
    std::vector<std::byte> early(left.begin(), left.end());
    drop_parser();
    set_phase(phase_t::open);
    opened_ = true;
    deadline_ = 0;
    if (core().handlers.on_open) {
      session_info info;
      info.id = id_;
      info.device_id = *device;
      core().handlers.on_open(info);
    }
    if (!early.empty() && phase() == phase_t::open) process_frames(early);
    return;
  }
  // A plain request: the route handler (static files for the demo page), keep-alive allowed.
  if (req.method != "GET" && req.method != "HEAD") {
    respond_error(405, "only GET and HEAD are served", "Allow: GET, HEAD\r\n");
    return;
  }
  websocket::http_reply reply;
  if (o.route) {
    reply = o.route(req);
  } else {
    reply.status = 404;
    reply.body = shared_bytes::copy_of(std::string_view("not found"));
  }
  const bool keep = req.keep_alive() && !core().stopping.load(std::memory_order_relaxed);
  std::string head;
  head.reserve(160 + reply.content_type.size() + reply.extra_headers.size());
  head.append("HTTP/1.1 ").append(std::to_string(reply.status)).append(" ");
  head.append(websocket::status_reason(reply.status));
  head.append("\r\nContent-Type: ").append(reply.content_type);
  head.append("\r\nContent-Length: ").append(std::to_string(reply.body.size()));
  head.append(keep ? "\r\nConnection: keep-alive\r\n" : "\r\nConnection: close\r\n");
  head.append(reply.extra_headers).append("\r\n");
  queue_raw(std::string_view(head));
  if (req.method == "GET") queue_raw(reply.body);
  if (!keep) {
    linger_after_write();
    return;
  }
  deadline_ = core().now_ms() + core().ms(o.handshake_timeout);  // keep-alive idle limit
}

inline void ws_server_session::process_frames(std::span<std::byte> bytes) {
  if (close_received_) return;
  if (!reader_) reader_ = worker().take_reader().release();
  ws_server_reader_sink sink{*this};
  const auto status = reader_->consume(bytes, sink);
  if (status != websocket::read_status::ok) {
    const close_code code = reader_->error();
    delete std::exchange(reader_, nullptr);  // a reader that failed is not reused
    if (phase() == phase_t::open) {
      fail(code);
    } else {
      // Already closing: the peer broke the protocol during the handshake; stop waiting.
      shutdown_when_drained_ = true;
      pump();
    }
    return;
  }
  if (reader_ && reader_->idle()) {
    worker().give_reader(std::unique_ptr<websocket::frame_reader>(std::exchange(reader_, nullptr)));
  }
}

inline void ws_server_session::deliver(payload_kind kind, shared_bytes payload) {
  if (phase() != phase_t::open) return;
  auto& h = core().handlers;
  if (!h.on_message) return;
  // The worker's reusable message: its device id is assigned only when the sender changes (or
  // the last handler took it), not shared and released again for every message of a batch.
  auto& w = worker();
  std::optional<inbound_message> nested;  // only if a handler's call leads back here
  inbound_message& m = w.delivering_busy ? nested.emplace() : w.delivering;
  if (m.device_id.data() != device_id_.data() || m.device_id.size() != device_id_.size()) {
    m.device_id = device_id_;
  }
  m.session = id_;
  m.sequence = ++sequence_;
  m.kind = kind;
  m.payload = std::move(payload);
  m.received = w.read_time;
  // Restored on exit, exceptions included (a handler may deliver to another server's session).
  struct current_guard {
    ws_server_delivering prev;
    ws_server_worker& w;
    bool busy;
    ~current_guard() {
      ws_server_current = prev;
      w.delivering_busy = busy;
    }
  } guard{std::exchange(ws_server_current, ws_server_delivering{&core(), this}), w,
          std::exchange(w.delivering_busy, true)};
  const std::error_code ec = h.on_message(std::move(m));
  m.payload = {};  // what the handler did not take goes now, not with the next message
  if (!ec || phase() != phase_t::open) return;
  // Tell the device why its message was not taken (the device protocol refines this later).
  auto& o = core().options;
  const std::string text = o.error_text ? o.error_text(ec) : websocket::default_error_text(ec);
  auto reply =
      ws_server_message(websocket::opcode::text, shared_bytes::copy_of(std::string_view(text)));
  if (!reserve_local(reply.size())) return;  // over the limit: the reply is the first to go
  enqueue_data(std::move(reply));
}

inline void ws_server_session::on_peer_close(std::uint16_t code, std::string_view reason) {
  (void)reason;
  close_received_ = true;
  if (phase() == phase_t::open) {
    // RFC 6455 5.5.1: answer with a close echoing the status code, then the server closes TCP.
    const auto c = static_cast<close_code>(code);
    close_code_ = c;
    queue_close(c, {});
    set_phase(phase_t::closing);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
  }
  // When we started the handshake, the peer's close completes it.
  shutdown_when_drained_ = true;
  pump();
}

// Writes are synchronous and non-blocking: one gather write (sendmsg) of what is queued, straight
// from the session's thread; only when the socket buffer is full does the session wait for
// writability. No write operation is allocated or completed through the io_context per write.
inline void ws_server_session::pump() {
  if (writing_ || reading_ || phase() == phase_t::done) return;
  auto& g = worker().gather;
  // A few writes per turn (up to 8 MiB), then let the other sessions of this thread run.
  for (int round = 0; round < 4; ++round) {
    if (!q_ || q_->empty()) {
      on_drained();
      return;
    }
    auto& q = *q_;
    // Order on the wire: the frame a full buffer cut, control frames, then data frames.
    g.reset();
    bool fits = !q.has_partial || g.add(q.partial, q.offset);
    for (std::size_t i = 0; fits && i < q.control.size(); ++i) fits = g.add(q.control[i], 0);
    for (std::size_t i = q.data_head; fits && i < q.data.size(); ++i) fits = g.add(q.data[i], 0);
    const auto n = write(g);
    if (!n) return;
    consume(q, *n);
    if (*n < g.bytes) {
      wait_writable();
      return;
    }
  }
  if (!q_ || q_->empty()) {
    on_drained();
    return;
  }
  flush_soon();
}

inline std::optional<std::size_t> ws_server_session::write(const ws_server_gather& g) {
  ::msghdr m{};
  m.msg_iov = const_cast<::iovec*>(g.iov.data());
  m.msg_iovlen = g.count;
  for (;;) {
    const ::ssize_t n = ::sendmsg(fd_, &m, MSG_NOSIGNAL);  // non-blocking: never waits
    if (n >= 0) return static_cast<std::size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    finish(close_code::abnormal);
    return std::nullopt;
  }
}

inline void ws_server_session::consume(ws_server_out_queue& q, std::size_t n) {
  // Frames leave the queue in the order pump() wrote them; the one cut short becomes `partial`.
  // The data bytes written are given back to `buffered_` once, not per frame.
  std::size_t released = 0;
  auto done = [&](ws_server_out_frame& f) {
    if (f.kind == ws_server_out_frame::data) released += f.size();
    f = {};
  };
  if (q.has_partial) {
    const std::size_t rest = q.partial.size() - q.offset;
    if (n < rest) {
      q.offset += n;
      return;
    }
    n -= rest;
    done(q.partial);
    q.has_partial = false;
    q.offset = 0;
  }
  std::size_t c = 0;
  for (; c < q.control.size() && n > 0; ++c) {
    auto& f = q.control[c];
    if (n < f.size()) {
      q.partial = std::move(f);
      q.offset = n;
      q.has_partial = true;
      n = 0;
    } else {
      n -= f.size();
      done(f);
    }
  }
  q.control.erase(q.control.begin(), q.control.begin() + static_cast<std::ptrdiff_t>(c));
  // Data entries are lazy messages: walk their frames as pump() encoded them.
  while (!q.data_empty() && n > 0) {
    auto& m = q.data[q.data_head];
    const std::size_t left = m.body.size();
    const std::size_t len = std::min(ws_server_fragment_size, left);
    const bool fin = len == left;
    const std::size_t frame = ws_server_header_size(len) + len;
    q.mid_message = !fin;
    if (n < frame) {
      // Cut in the middle: this frame becomes literal bytes, the message keeps the rest.
      auto& p = q.partial;
      p.head_len =
          static_cast<std::uint8_t>(websocket::encode_frame_header(p.head, m.op, fin, len));
      p.body = fin ? std::move(m.body) : m.body.slice(0, len);
      p.kind = ws_server_out_frame::data;
      p.lazy = false;
      p.more = !fin;
      q.offset = n;
      q.has_partial = true;
      n = 0;
    } else {
      n -= frame;
      released += frame;
    }
    if (fin) {
      m = {};
      ++q.data_head;
    } else {
      m.body = m.body.slice(len, left - len);
      m.op = websocket::opcode::continuation;
    }
  }
  if (q.data_empty()) {
    q.data.clear();
    q.data_head = 0;
  } else if (q.data_head > 64 && q.data_head * 2 > q.data.size()) {
    q.data.erase(q.data.begin(), q.data.begin() + static_cast<std::ptrdiff_t>(q.data_head));
    q.data_head = 0;
  }
  if (released > 0) give_back(released);
}

// The socket took less than offered, so its buffer is full and the kernel will report the
// space freed by the peer's acknowledgements as an EPOLLOUT edge (on_event).
inline void ws_server_session::wait_writable() {
  writing_ = true;
  wait_out_ = true;
}

// ---- worker ------------------------------------------------------------------------------------

inline ws_server_session_ref ws_server_worker::find_locked(session_id id) const {
  const auto slot = static_cast<std::uint32_t>((id >> 8) & 0xFFFFFF);
  if (slot >= slots.size() || !slots[slot] || slots[slot]->id() != id) return {};
  return slots[slot];
}

inline ws_server_session* ws_server_worker::peek_local(session_id id) const noexcept {
  const auto slot = static_cast<std::uint32_t>((id >> 8) & 0xFFFFFF);
  if (slot >= slots.size() || !slots[slot] || slots[slot]->id() != id) return nullptr;
  return slots[slot].get();
}

inline void ws_server_worker::adopt(int fd) {
  // `fd` is non-blocking (accept4) and has TCP_NODELAY (inherited from the listener).
  ws_server_fd owned(fd);
  std::uint32_t slot = 0;
  {
    std::lock_guard lock(mutex);
    if (free_slots.empty()) {
      if (slots.size() >= max_slots) return;  // 16 M sessions on one thread: refuse
      slot = static_cast<std::uint32_t>(slots.size());
      slots.emplace_back();
    } else {
      slot = free_slots.back();
      free_slots.pop_back();
    }
  }
  // Ids are never reused: the generation changes with every session this worker accepts.
  const session_id id =
      (static_cast<session_id>(++generation) << 32) | (static_cast<session_id>(slot) << 8) | index;
  // From the server's session pool (see ws_server_session::release for the matching free).
  void* mem = ws_server_sessions().allocate(sizeof(ws_server_session));
  ws_server_session_ref s(new (mem) ws_server_session(owned.release(), *this, id));
  core.live.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard lock(mutex);
    slots[slot] = s;
  }
  s->start();
  // Registered after the first read, so a request that was already there (defer_accept) is
  // not reported again; registration reports whatever arrived since.
  if (s->phase() != ws_server_session::phase_t::done && !watch(*s)) {
    s->finish(close_code::abnormal);
  }
}

inline bool ws_server_worker::watch(ws_server_session& s) noexcept {
  ::epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
  ev.data.ptr = &s;
  return ::epoll_ctl(ready.native_handle(), EPOLL_CTL_ADD, s.fd(), &ev) == 0;
}

inline void ws_server_worker::poll() {
  ready.async_wait(asio::posix::stream_descriptor::wait_read, [this](const std::error_code& ec) {
    if (ec) return;  // the descriptor was closed: the worker is stopping
    on_ready();
    poll();
  });
}

inline void ws_server_worker::on_ready() {
  // Each epoll_wait takes up to max_events ready sockets; a full batch is followed by another
  // at once, then the posted tasks and timers get their turn (poll() waits again, and the wait
  // completes at once when sockets are still ready).
  for (int round = 0; round < 2; ++round) {
    const int n = ::epoll_wait(ready.native_handle(), events.data(), max_events, 0);
    for (int i = 0; i < n; ++i) {
      static_cast<ws_server_session*>(events[static_cast<std::size_t>(i)].data.ptr)
          ->on_event(events[static_cast<std::size_t>(i)].events);
    }
    retired.clear();
    if (n < max_events) break;
  }
}

inline void ws_server_worker::start_tick() {
  tick_timer.expires_after(core.tick);
  tick_timer.async_wait([this](const std::error_code& ec) {
    if (ec) return;
    on_tick();
    start_tick();
  });
}

inline void ws_server_worker::on_tick() {
  const std::uint32_t now = core.now_ms();
  snapshot();
  for (auto& s : scratch) s->on_tick(now);
  scratch.clear();
  retired.clear();
}

inline void ws_server_worker::close_all(close_code code) {
  snapshot();
  for (auto& s : scratch) s->start_close(code, "server stopping");
  scratch.clear();
}

inline void ws_server_worker::abort_all() {
  snapshot();
  for (auto& s : scratch) s->finish(close_code::going_away);
  scratch.clear();
  retired.clear();
}

}  // namespace devgate::detail
