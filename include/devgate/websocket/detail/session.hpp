#pragma once

#include <arpa/inet.h>   // inet_ntop: the peer's address for an authenticator
#include <netinet/in.h>  // sockaddr_in, sockaddr_in6
#include <sys/socket.h>  // getpeername

#include <asio.hpp>  // asio::post

#include <atomic>        // phase and refcount, read by other threads
#include <charconv>      // the peer's port
#include <cstddef>       // std::byte, std::size_t
#include <cstdint>       // compact fields
#include <memory>        // the outbound queue, pooled readers
#include <new>           // placement new into the session pool
#include <optional>      // write results
#include <span>          // byte views
#include <string>        // device ids, error texts
#include <string_view>   // close reasons
#include <system_error>  // handler results
#include <utility>       // std::exchange, std::move
#include <vector>        // early frames

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/transport/transport.hpp"
#include "devgate/websocket/detail/backpressure.hpp"
#include "devgate/websocket/detail/core.hpp"
#include "devgate/websocket/detail/http_phase.hpp"
#include "devgate/websocket/detail/out_queue.hpp"
#include "devgate/websocket/detail/pools.hpp"
#include "devgate/websocket/detail/read_batch.hpp"
#include "devgate/websocket/detail/session_stream.hpp"
#include "devgate/websocket/detail/stream.hpp"
#include "devgate/websocket/detail/thread_resources.hpp"
#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/reader.hpp"
#include "devgate/websocket/server_options.hpp"

namespace devgate::websocket::detail {

class session;

/// The verified client certificate of a stream that has one (`X509* peer_certificate()`, a TLS
/// stream with mutual TLS), else null (TCP).
template <class Stream>
X509* peer_certificate_of(const Stream& s) noexcept {
  if constexpr (requires { s.peer_certificate(); }) {
    return s.peer_certificate();
  } else {
    return nullptr;
  }
}

/// The peer of socket `fd` as "address:port" ("[v6]:port") in `buf`, or "" when unknown.
inline std::string_view format_peer(int fd, char* buf, std::size_t size) noexcept {
  ::sockaddr_storage peer{};
  ::socklen_t len = sizeof peer;
  if (::getpeername(fd, reinterpret_cast<::sockaddr*>(&peer), &len) != 0) return {};
  std::size_t n = 0;
  unsigned port = 0;
  if (peer.ss_family == AF_INET) {
    const auto* in = reinterpret_cast<const ::sockaddr_in*>(&peer);
    if (::inet_ntop(AF_INET, &in->sin_addr, buf, static_cast<::socklen_t>(size)) == nullptr) {
      return {};
    }
    n = std::char_traits<char>::length(buf);
    port = ntohs(in->sin_port);
  } else if (peer.ss_family == AF_INET6) {
    const auto* in = reinterpret_cast<const ::sockaddr_in6*>(&peer);
    buf[0] = '[';
    if (::inet_ntop(AF_INET6, &in->sin6_addr, buf + 1, static_cast<::socklen_t>(size - 8)) ==
        nullptr) {
      return {};
    }
    n = std::char_traits<char>::length(buf);
    buf[n++] = ']';
    port = ntohs(in->sin6_port);
  } else {
    return {};
  }
  if (n + 7 > size) return {};
  buf[n++] = ':';
  n = static_cast<std::size_t>(std::to_chars(buf + n, buf + size, port).ptr - buf);
  return {buf, n};
}

/// An intrusive reference to a session: 8 bytes in every Asio handler and registry slot, where a
/// shared_ptr would cost 16 plus a control block and enable_shared_from_this's weak pointer.
class session_ref {
 public:
  session_ref() noexcept = default;
  explicit session_ref(session* s) noexcept;
  session_ref(const session_ref& o) noexcept : session_ref(o.p_) {}
  session_ref(session_ref&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  session_ref& operator=(session_ref o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~session_ref();
  session* operator->() const noexcept { return p_; }
  session& operator*() const noexcept { return *p_; }
  [[nodiscard]] session* get() const noexcept { return p_; }
  explicit operator bool() const noexcept { return p_ != nullptr; }

 private:
  session* p_ = nullptr;
};

/// The session whose messages the on_messages handler takes on this thread (null
/// outside one), so that a reply from inside the handler (`server::send` to that session) skips
/// the lookup, the reference count and the thread check.
struct delivery {
  const thread_resources* resources = nullptr;  // the worker it runs on
  session* target = nullptr;
};
/// See `delivery`.
inline thread_local delivery current_delivery{};

/// One connection: the HTTP phase until the upgrade, then the WebSocket phase (RFC 6455) with
/// its close handshake, on one worker thread, over a byte stream. Everything but `phase_`,
/// the budget's reserved count and the reference count is touched only on that thread.
class session {
 public:
  /// Where the connection is in its life. Read by other threads only to refuse sends early.
  enum class phase_t : std::uint8_t { http, open, closing, draining, done };

  /// A new session on `stream`, living on the worker `r`, from the process-wide session pool.
  static session_ref create(session_stream stream, thread_resources& r, session_id id) {
    void* mem = session_memory().allocate(sizeof(session));
    return session_ref(new (mem) session(std::move(stream), r, id));
  }
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  /// The session's id (see reactor::adopt).
  [[nodiscard]] session_id id() const noexcept { return id_; }
  /// The connection.
  [[nodiscard]] const session_stream& stream() const noexcept { return stream_; }
  /// The client certificate verified by the TLS handshake (mutual TLS), or null (plain
  /// connection, or no client CA configured). Borrowed: valid on the session's thread until
  /// the session finishes; see `websocket::certificate_der` for a copy.
  [[nodiscard]] X509* peer_certificate() const noexcept { return stream_.peer_certificate(); }
  /// Where the connection is.
  [[nodiscard]] phase_t phase() const noexcept { return phase_.load(std::memory_order_acquire); }
  /// Open for messages (upgraded, not closing).
  [[nodiscard]] bool is_open() const noexcept { return phase() == phase_t::open; }
  /// Outbound bytes reserved (any thread).
  [[nodiscard]] std::size_t buffered() const noexcept { return budget_.buffered(); }

  /// The session on worker `r` whose handler runs on this thread, if its id is `id`.
  [[nodiscard]] static session* replying(const thread_resources* r, session_id id) noexcept {
    const delivery cur = current_delivery;
    return cur.resources == r && cur.target->id_ == id ? cur.target : nullptr;
  }

  /// Reserves room for `bytes` of data from any thread; false means over the limit (the caller
  /// applies the overflow policy, see backpressure.hpp).
  [[nodiscard]] bool reserve(std::size_t bytes) noexcept {
    return budget_.reserve(bytes, core().options.backpressure);
  }

  // ---- called on the session's own thread ------------------------------------------------

  /// Reads the HTTP request at once: it is usually there already (always with defer_accept).
  /// The reactor watches the socket after this, and that reports what arrived meanwhile.
  void start() {
    const std::uint32_t now = core().now_ms();
    deadline_ = now + core().ms(core().options.handshake_timeout);
    last_rx_ = now;
    on_readable();
  }

  /// The socket has input, or the peer closed or reset it (edge-triggered: the state changed).
  void on_readable();

  /// The readiness edge says the peer closed its side (EPOLLRDHUP or EPOLLHUP): once a read
  /// comes up short, only the EOF is left, and no further edge will report it.
  void peer_hung_up() noexcept { hung_up_ = true; }

  /// The socket has room again after a write that did not fit (an EPOLLOUT edge).
  void on_writable() {
    if (phase() == phase_t::done) return;
    if (!wait_out_) {
      // TLS output no write waits for (handshake records, a close_notify): send it now.
      if (stream_.write_pending()) (void)flushed();
      return;
    }
    wait_out_ = false;
    writing_ = false;
    pump();
  }

  /// A reply from this session's own handler: the fast path of server::send.
  std::error_code send_local(websocket::opcode op, shared_bytes payload) {
    if (phase() != phase_t::open) return errc::closed;
    auto m = message_frame(op, std::move(payload));
    if (!budget_.reserve_local(m.size(), core().options.backpressure)) {
      overflow();
      return errc::backpressure;
    }
    enqueue_data(std::move(m));
    return {};
  }

  /// Queues one data message whose bytes were reserved.
  void enqueue_data(out_frame m) {
    if (queue_data(std::move(m))) flush_soon();
  }

  /// Queues one data message (its bytes reserved) of a batch the reactor hands over from its
  /// inbox, without writing it yet: true for the first of the batch, whose caller then calls
  /// `release_held` once the whole batch is queued, so the session writes it in one go.
  [[nodiscard]] bool enqueue_held(out_frame m) {
    if (!queue_data(std::move(m))) return false;
    if (held_ || reading_ || writing_) return false;  // already due to be written
    held_ = true;
    return true;
  }
  /// Writes what `enqueue_held` queued.
  void release_held() {
    held_ = false;
    pump();
  }

  /// Sends one data message whose `wire` bytes were reserved, sharing `payload` (a broadcast):
  /// when nothing else waits to be written it goes straight to the socket, with no queue and no
  /// reference taken; only what the socket does not take is queued.
  void send_shared(websocket::opcode op, const shared_bytes& payload, std::size_t wire);

  /// Applies the overflow policy to this session, which passed its limit: closes it with 1008
  /// or 1013 (nothing under drop_oldest).
  void overflow() {
    if (const auto code = overflow_close(core().options.backpressure)) {
      start_close(*code, overflow_reason);
    }
  }

  /// Starts the close handshake (RFC 6455 7.1.2) with `code`; queued data not yet started is
  /// dropped. Before the upgrade the connection just ends.
  void start_close(close_code code, std::string_view reason) {
    const phase_t p = phase();
    if (p == phase_t::http) {
      finish(close_code::abnormal);
      return;
    }
    if (p != phase_t::open) return;
    close_code_ = code;
    auto& q = queue();
    budget_.unreserve(q.drop_unstarted_data());  // RFC 6455 5.5.1: no data after a close
    q.control.push_back(literal_frame(out_frame::close, close_frame(code, reason)));
    set_phase(phase_t::closing);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
    pump();
  }

  /// Closes the connection now and reports `code` (timeouts, failed writes, stop()).
  void finish(close_code code);

  /// Periodic timeouts: handshake, idle ping, pong, close handshake, lingering close.
  void on_tick(std::uint32_t now);

  // ---- reference count ----------------------------------------------------------------------
  /// Takes a reference.
  void add_ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  /// Drops a reference; the last one (on any thread) frees the session.
  void release() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    this->~session();
    session_memory().deallocate(this, sizeof(session));
  }

 private:
  friend struct reader_sink;

  session(session_stream stream, thread_resources& r, session_id id) noexcept
      : res_(&r), id_(id), http_(), stream_(std::move(stream)) {}
  ~session() {
    if (phase() == phase_t::http) {
      http_.drop();
    } else {
      delete reader_;
    }
  }

  [[nodiscard]] thread_resources& res() const noexcept { return *res_; }
  [[nodiscard]] server_core& core() const noexcept { return res_->core; }
  void set_phase(phase_t p) noexcept { phase_.store(p, std::memory_order_release); }
  out_queue& queue() {
    if (!q_) q_ = res().take_queue();
    return *q_;
  }

  // Writes the queue once the handlers already posted to this thread have run, so a burst of
  // sends from other threads (each a posted task) goes out in one write, not one write each.
  // Inside a read batch or a write in progress, their end writes it anyway.
  // Queues a data message whose bytes were reserved (trimming under drop_oldest); false, with
  // the bytes given back, when the session is no longer open.
  bool queue_data(out_frame m) {
    if (phase() != phase_t::open) {
      budget_.refund(m.size());
      return false;
    }
    auto& q = queue();
    q.data.push_back(std::move(m));
    budget_.trim(q, core().options.backpressure);
    return true;
  }
  void flush_soon() {
    if (reading_ || writing_ || phase() == phase_t::done) return;
    writing_ = true;
    asio::post(res().ioc, [self = session_ref(this)] {
      self->writing_ = false;
      self->pump();
    });
  }

  // A handler (route, identify, on_open, on_messages) threw: answer 500 before the
  // upgrade, close with 1011 after it; the worker thread and every other session carry on.
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

  // ---- HTTP phase (http_phase.hpp decides, the session writes and switches) ------------------
  void process_http(std::span<const std::byte> bytes);
  void upgrade(std::string device, bool authenticated = false, std::string claims = {});
  void authenticate(const std::string& device);
  void on_authenticated(auth::result verdict);
  // The HTTP phase is over: its parser goes, and the storage it shared is the (null) reader.
  void leave_http() noexcept {
    http_.drop();
    reader_ = nullptr;
  }
  void respond_error(int status, std::string_view body) {
    queue_raw(http_phase::error_response(status, body));
    linger_after_write();
  }
  // HTTP bytes go through the control FIFO: they precede every WebSocket frame (the 101 must
  // reach the peer before a close frame that fails the connection right after it).
  // They count against the outbound limit (backpressure.hpp).
  void queue_raw(shared_bytes bytes) {
    if (bytes.empty()) return;
    budget_.charge(bytes.size());
    answered_ = true;
    queue().control.push_back(literal_frame(out_frame::raw, std::move(bytes)));
    pump();
  }
  // The responses that paused the parser are written: answer the requests it holds, then read
  // the socket again (its input raised no new edge while it was not read).
  void resume_http() {
    if (phase() != phase_t::http || !paused_ || authenticating_) return;
    paused_ = false;
    reading_ = true;
    try {
      process_http({});
    } catch (...) {
      on_handler_exception();
    }
    reading_ = false;
    if (phase() == phase_t::done) return;
    pump();
    if (!paused_) on_readable();
  }
  // After the queued bytes are written: half-close and discard input until EOF, so the peer
  // reads the whole response instead of a reset (RFC 9112 9.6).
  void linger_after_write() {
    shutdown_when_drained_ = true;
    paused_ = false;
    leave_http();
    set_phase(phase_t::draining);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
    pump();
  }

  // ---- WebSocket phase ----------------------------------------------------------------------
  void process_frames(std::span<std::byte> bytes);
  void collect(read_batch& batch, payload_kind kind, shared_bytes payload) {
    if (phase() != phase_t::open) return;  // closing: data after our close frame is dropped
    inbound_message& m = batch.next(id_, device_id_);
    m.sequence = ++sequence_;
    m.kind = kind;
    m.payload = std::move(payload);
    m.received = res().read_time;
  }
  void deliver(read_batch& batch);
  void refuse(const std::error_code& ec, std::size_t count);
  void on_peer_close(std::uint16_t code);
  void on_ping(std::span<const std::byte> payload) {
    if (phase() != phase_t::open) return;
    if (queue().push_pong(websocket::encode_frame(websocket::opcode::pong, payload))) pump();
  }
  // RFC 6455 7.1.7: fail the connection: a close with `code` after what is already queued (the
  // replies to the messages before the failure), without waiting for the peer's close.
  void fail(close_code code) {
    if (phase() == phase_t::open) {
      close_code_ = code;
      queue().push_close_after_data(close_frame(code, {}));
    }
    shutdown_when_drained_ = true;
    set_phase(phase_t::closing);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
    pump();
  }
  [[nodiscard]] static shared_bytes close_frame(close_code code, std::string_view reason) {
    if (code == close_code::no_status) return websocket::encode_frame(websocket::opcode::close, {});
    // encode_close_payload cuts the reason to what a close frame holds (RFC 6455 5.5), on a
    // character boundary.
    const auto payload = websocket::encode_close_payload(code, reason);
    return websocket::encode_frame(websocket::opcode::close, payload);
  }

  // ---- write path ---------------------------------------------------------------------------
  void pump();
  // One gather write of `g`: the bytes the stream took (0 when its buffer is full), or nullopt
  // when the connection failed and the session finished.
  std::optional<std::size_t> write(const gather& g) {
    const io_result r = stream_.write(g.iovecs());
    if (r.status == io_status::error) {
      finish(close_code::abnormal);
      return std::nullopt;
    }
    return r.bytes;
  }
  // What the stream took and still holds (a TLS record the socket did not take) is sent: true
  // when nothing waits any more; otherwise the session waits for writability (or finished).
  bool flushed() {
    const io_result r = stream_.flush();
    if (r.status == io_status::ok) return true;
    if (r.status == io_status::error) {
      finish(close_code::abnormal);
    } else {
      wait_writable();
    }
    return false;
  }
  // The stream took less than offered, so its buffer is full and the kernel will report the
  // space freed by the peer's acknowledgements as an EPOLLOUT edge (on_writable).
  void wait_writable() noexcept {
    writing_ = true;
    wait_out_ = true;
  }
  // The peer's FIN came with the bytes just read, so nothing more will arrive and no edge will
  // tell: end the connection now, after writing what answers those bytes.
  void end_after_peer_eof() {
    if (phase() == phase_t::done) return;
    if (!q_ || q_->empty()) {
      finish(close_code::abnormal);
      return;
    }
    if (phase() == phase_t::http) leave_http();
    if (phase() != phase_t::draining) set_phase(phase_t::closing);  // no more sends taken
    shutdown_when_drained_ = true;
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
  }
  void on_drained() {
    if (q_) res().give_queue(std::move(q_));
    budget_.settle();
    if (phase() == phase_t::http && answered_) {
      answered_ = false;
      // The client read every response: its idle time starts now (a client that does not read
      // keeps none of its time, see process_http).
      deadline_ = core().now_ms() + core().ms(core().options.handshake_timeout);
      if (paused_) asio::post(res().ioc, [self = session_ref(this)] { self->resume_http(); });
    }
    if (!shutdown_when_drained_ || phase() == phase_t::done) return;
    shutdown_when_drained_ = false;
    // RFC 6455 7.1.1: the server closes the TCP connection first; half-close, then read until
    // the peer's FIN so the close frame is not lost to a reset.
    stream_.shutdown_write();
    if (hung_up_) {
      finish(close_code_);  // the peer's EOF was read already: no lingering
      return;
    }
    set_phase(phase_t::draining);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
  }

  thread_resources* res_;
  session_id id_;
  shared_bytes device_id_;
  // One pointer's storage for two lives: the HTTP parser before the upgrade (phase http), then
  // the frame reader while a frame or message is partial. Both are null when idle.
  union {
    http_phase http_;
    websocket::frame_reader* reader_;
  };
  std::unique_ptr<out_queue> q_;  // only while bytes wait to be written
  std::uint64_t sequence_ = 0;
  outbound_budget budget_;
  std::atomic<std::uint32_t> refs_{0};
  std::uint32_t last_rx_ = 0;                    // core().now_ms() of the last read
  [[no_unique_address]] session_stream stream_;  // the next field fills its tail padding
  std::uint32_t deadline_ = 0;  // handshake, pong, close or linger deadline, by phase
  std::atomic<phase_t> phase_{phase_t::http};
  close_code close_code_ = close_code::abnormal;
  bool opened_ : 1 = false;
  bool writing_ : 1 = false;   // a write waits (wait_out_) or a flush is posted: pump() waits
  bool wait_out_ : 1 = false;  // waiting for an EPOLLOUT edge: the socket buffer was full
  bool reading_ : 1 = false;   // parsing a read batch: pump() waits for its end (one write)
  bool ping_outstanding_ : 1 = false;
  bool shutdown_when_drained_ : 1 = false;
  bool close_received_ : 1 = false;
  bool answered_ : 1 = false;  // HTTP responses queued since the queue last drained
  bool paused_ : 1 = false;    // HTTP: requests wait in the parser until responses are written
  bool hung_up_ : 1 = false;   // the peer closed its side (its EOF follows what is left to read)
  bool held_ : 1 = false;      // queued by the reactor's inbox drain, written at its end
  bool authenticating_ : 1 = false;  // HTTP: the upgrade waits for server_options::authenticate
};

inline session_ref::session_ref(session* s) noexcept : p_(s) {
  if (p_) p_->add_ref();
}
inline session_ref::~session_ref() {
  if (p_) p_->release();
}

/// Adapts frame_reader callbacks to the session, collecting the messages of one read in `batch`.
struct reader_sink {
  session& s;
  read_batch& batch;
  void on_message(payload_kind kind, shared_bytes payload) {
    s.collect(batch, kind, std::move(payload));
  }
  void on_ping(std::span<const std::byte> payload) { s.on_ping(payload); }
  void on_pong(std::span<const std::byte>) {}
  void on_close(std::uint16_t code, std::string_view) {
    s.deliver(batch);  // the messages before the close frame, before the close is answered
    s.on_peer_close(code);
  }
};

// ---- implementation ----------------------------------------------------------------------------

// Reads until the socket is drained (a short read: edge-triggered readiness reports only new
// input after that), at most 4 buffers per turn so that one busy peer cannot starve the others;
// a socket with more to read is continued by a posted task.
inline void session::on_readable() {
  if (phase() == phase_t::done || paused_) return;
  auto& r = res();
  const std::span<std::byte> buf = r.buffer();
  // Frames queued while a read is handled (replies from the handlers) go out in one gather
  // write after it, not the first alone and the rest after that write completes.
  reading_ = true;
  bool more = false;
  bool drained = false;  // a read came up short: the socket holds nothing more now
  for (int round = 0; round < 4; ++round) {
    const io_result got = stream_.read(buf);
    if (got.status == io_status::would_block) {
      drained = true;
      break;
    }
    if (got.status != io_status::ok) {
      // The peer's FIN or a reset. During the close handshake that is the expected end.
      reading_ = false;
      finish(close_code::abnormal);
      return;
    }
    r.read_time = clock::now();
    last_rx_ = core().stamp(r.read_time);
    ping_outstanding_ = false;  // any bytes prove the peer is alive, not only a pong
    try {
      process(buf.first(got.bytes));
    } catch (...) {
      on_handler_exception();
    }
    if (phase() == phase_t::done) {
      reading_ = false;
      return;
    }
    if (paused_) break;  // the rest waits in the socket until the responses are written
    if (got.bytes < buf.size()) {
      drained = true;
      break;
    }
    more = round == 3;
  }
  reading_ = false;
  pump();
  if (drained && hung_up_) {
    end_after_peer_eof();
    return;
  }
  if (more && phase() != phase_t::done) {
    asio::post(r.ioc, [self = session_ref(this)] { self->on_readable(); });
  }
}

inline void session::process_http(std::span<const std::byte> bytes) {
  const auto& bp = core().options.backpressure;
  auto outcome = http_.feed(
      bytes, core(), [this](shared_bytes b) { queue_raw(std::move(b)); },
      [this, &bp] { return !budget_.full(bp); }, stream_.peer_certificate());
  switch (outcome.what) {
    case http_phase::next::read_more:
    case http_phase::next::answered:  // the idle deadline restarts once they are written
      break;
    case http_phase::next::paused:  // see backpressure.hpp; on_drained() resumes
      paused_ = true;
      break;
    case http_phase::next::linger:
      linger_after_write();
      break;
    case http_phase::next::upgrade:
      upgrade(std::move(outcome.device_id));
      break;
    case http_phase::next::authenticate:
      authenticate(outcome.device_id);
      break;
  }
}

// Asks server_options::authenticate about the upgrade the parser holds. The session reads
// nothing until the answer is back on this thread (on_authenticated), so the request's views
// stay valid; answers are posted even when given at once, so both paths are the same.
inline void session::authenticate(const std::string& device) {
  auto& r = res();
  if (r.pending_authentications >= core().options.max_pending_authentications) {
    respond_error(503, "too many authentications in progress; retry later");
    return;
  }
  ++r.pending_authentications;
  paused_ = true;
  authenticating_ = true;
  const websocket::http_request& req = http_.request();
  auth::request ask;
  ask.device_id = device;
  ask.path = req.target;
  if (const auto q = req.target.find('?'); q != std::string_view::npos) {
    ask.path = req.target.substr(0, q);
    ask.query = req.target.substr(q + 1);
  }
  ask.http = &req;
  char address[INET6_ADDRSTRLEN + 8] = {};
  ask.peer_address = format_peer(stream_.native_handle(), address, sizeof address);
  ask.peer_certificate = peer_certificate_of(stream_);
  auth::completion done([self = session_ref(this), ioc = &r.ioc](auth::result verdict) {
    asio::post(*ioc,
               [self, v = std::move(verdict)]() mutable { self->on_authenticated(std::move(v)); });
  });
  core().options.authenticate.check(ask, std::move(done));
}

inline void session::on_authenticated(auth::result verdict) {
  --res().pending_authentications;
  if (phase() != phase_t::http || !authenticating_) return;  // timed out or stopped meanwhile
  authenticating_ = false;
  paused_ = false;
  reading_ = true;
  try {
    if (!verdict.accepted() || verdict.device_id.empty()) {
      // A refusal is a 4xx or 5xx; anything else an authenticator returns is its own error.
      const bool refusal = verdict.status >= 400 && verdict.status <= 599;
      const int status = refusal ? verdict.status : 500;
      queue_raw(http_phase::error_response(
          status, refusal ? std::string_view(verdict.reason) : "authentication gave no device",
          status == 401 ? "WWW-Authenticate: Bearer realm=\"devgate\"\r\n" : ""));
      linger_after_write();
    } else {
      queue_raw(http_.accept(verdict.subprotocol));
      upgrade(std::move(verdict.device_id), verdict.authenticated, std::move(verdict.claims));
    }
  } catch (...) {
    on_handler_exception();
  }
  reading_ = false;
  if (phase() == phase_t::done) return;
  pump();
  on_readable();  // what arrived meanwhile raised no edge the session acted on
}

inline void session::upgrade(std::string device, bool authenticated, std::string claims) {
  device_id_ = shared_bytes::copy_of(std::string_view(device));
  // Bytes after the request are the first frames (RFC 6455 4.1 lets a client send at once).
  const auto left = http_.leftover();
  std::vector<std::byte> early(left.begin(), left.end());
  leave_http();
  set_phase(phase_t::open);
  opened_ = true;
  deadline_ = 0;
  if (core().handlers.on_open) {
    session_info info;
    info.id = id_;
    info.device_id = std::move(device);
    info.authenticated = authenticated;
    info.claims = std::move(claims);
    core().handlers.on_open(info);
  }
  if (!early.empty() && phase() == phase_t::open) process_frames(early);
}

inline void session::process_frames(std::span<std::byte> bytes) {
  if (close_received_) return;
  if (!reader_) reader_ = res().take_reader().release();
  // The worker's batch, unless a handler's call led back here while that one is delivered.
  read_batch nested;
  read_batch& batch = res().batch.busy() ? nested : res().batch;
  const read_batch::scope collecting(batch);
  reader_sink sink{*this, batch};
  const auto status = reader_->consume(bytes, sink);
  const close_code code = status == websocket::read_status::ok ? close_code{} : reader_->error();
  // Every message the read decoded goes to the engine before the session acts on a protocol
  // error after them, so the replies to them are queued before the close frame.
  deliver(batch);
  if (status != websocket::read_status::ok) {
    delete std::exchange(reader_, nullptr);  // a reader that failed is not reused
    if (phase() == phase_t::open) {
      fail(code);
    } else if (phase() != phase_t::done) {
      // Already closing: the peer broke the protocol during the handshake; stop waiting.
      shutdown_when_drained_ = true;
      pump();
    }
    return;
  }
  if (reader_ && reader_->idle()) {
    res().give_reader(std::unique_ptr<websocket::frame_reader>(std::exchange(reader_, nullptr)));
  }
}

// Hands the messages collected from one read to the engine in one call (on_messages); a refused
// message gets an error reply. The batch is empty afterwards.
inline void session::deliver(read_batch& batch) {
  if (batch.empty()) return;
  // Emptied on exit, exceptions included: what the handler did not take goes now.
  struct emptied {
    read_batch& b;
    ~emptied() { b.clear(); }
  } done{batch};
  if (phase() != phase_t::open) return;
  auto& h = core().handlers;
  // Restored on exit, exceptions included (a handler may deliver to another server's session).
  struct current_guard {
    delivery prev;
    ~current_guard() { current_delivery = prev; }
  } guard{std::exchange(current_delivery, delivery{&res(), this})};
  const std::span<inbound_message> messages = batch.messages();
  if (!h.on_messages) return;
  const batch_result r = h.on_messages(messages);
  if (r.accepted < messages.size() && r.error) refuse(r.error, messages.size() - r.accepted);
}

// Tells the device why `count` of its messages were not taken: one error text reply each, all
// sharing one buffer. Over the limit, these replies are the first to go.
inline void session::refuse(const std::error_code& ec, std::size_t count) {
  if (phase() != phase_t::open) return;
  const auto& o = core().options;
  const shared_bytes text = shared_bytes::copy_of(
      std::string_view(o.error_text ? o.error_text(ec) : websocket::default_error_text(ec)));
  for (std::size_t i = 0; i < count && phase() == phase_t::open; ++i) {
    auto reply = message_frame(websocket::opcode::text, text);
    if (!budget_.reserve_local(reply.size(), o.backpressure)) return;
    enqueue_data(std::move(reply));
  }
}

inline void session::on_peer_close(std::uint16_t code) {
  close_received_ = true;
  if (phase() == phase_t::open) {
    // RFC 6455 5.5.1: answer with a close echoing the status code, after the replies already
    // queued (to the messages before the close), then the server closes TCP.
    const auto c = static_cast<close_code>(code);
    close_code_ = c;
    queue().push_close_after_data(close_frame(c, {}));
    set_phase(phase_t::closing);
    deadline_ = core().now_ms() + core().ms(core().options.close_timeout);
  }
  // When we started the handshake, the peer's close completes it.
  shutdown_when_drained_ = true;
  pump();
}

inline void session::send_shared(websocket::opcode op, const shared_bytes& payload,
                                 std::size_t wire) {
  if (phase() != phase_t::open) {
    budget_.unreserve(wire);
    return;
  }
  if (q_ || writing_ || reading_) {
    enqueue_data(message_frame(op, payload));
    return;
  }
  auto& g = res().write;
  g.reset();
  if (!g.add_message(op, payload.bytes())) {  // larger than one write: the queue cuts it
    enqueue_data(message_frame(op, payload));
    return;
  }
  const auto n = write(g);
  if (!n) return;
  if (*n == g.bytes) {
    budget_.unreserve(wire);
    if (stream_.write_pending()) wait_writable();  // TLS: its last record waits for the socket
    return;
  }
  auto& q = queue();
  q.data.push_back(message_frame(op, payload));
  if (const std::size_t written = q.consume(*n)) budget_.give_back(written);
  wait_writable();
}

inline void session::finish(close_code code) {
  if (phase() == phase_t::done) return;
  const bool was_open = opened_;
  const bool was_http = phase() == phase_t::http;
  if (close_code_ == close_code::abnormal) close_code_ = code;
  set_phase(phase_t::done);
  auto& r = res();
  // Out of the registry and the epoll set (EPOLL_CTL_DEL before close: a descriptor another
  // process shares would otherwise stay in the set); events already taken from epoll in this
  // batch may still name this session, so the reactor keeps it alive until the batch ends.
  r.retire(r, *this);
  stream_.close();
  wait_out_ = false;
  if (was_http) {
    leave_http();
  } else if (reader_) {
    r.give_reader(std::unique_ptr<websocket::frame_reader>(std::exchange(reader_, nullptr)));
  }
  if (q_) r.give_queue(std::move(q_));
  core().live.fetch_sub(1, std::memory_order_release);
  if (was_open && core().handlers.on_close) {
    try {
      core().handlers.on_close(id_, close_code_);
    } catch (...) {
      // Nothing left to tell the peer; the session is gone either way.
    }
  }
}

inline void session::on_tick(std::uint32_t now) {
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
        queue().control.push_back(literal_frame(
            out_frame::control, websocket::encode_frame(websocket::opcode::ping, {})));
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

// Writes are synchronous and non-blocking: one gather write of what is queued, straight from the
// session's thread; only when the socket buffer is full does the session wait for writability.
inline void session::pump() {
  if (writing_ || reading_ || phase() == phase_t::done) return;
  auto& g = res().write;
  // A few writes per turn (up to 8 MiB), then let the other sessions of this thread run.
  for (int round = 0; round < 4; ++round) {
    if (!q_ || q_->empty()) {
      if (flushed()) on_drained();
      return;
    }
    q_->fill(g);
    const auto n = write(g);
    if (!n) return;
    if (const std::size_t written = q_->consume(*n)) budget_.give_back(written);
    if (*n < g.bytes) {
      wait_writable();
      return;
    }
  }
  if (!q_ || q_->empty()) {
    if (flushed()) on_drained();
    return;
  }
  flush_soon();
}

}  // namespace devgate::websocket::detail
