#pragma once

#include <netinet/tcp.h>  // TCP_DEFER_ACCEPT
#include <sys/socket.h>   // accept4
#include <asio.hpp>

#include <algorithm>     // std::clamp, std::min
#include <atomic>        // run state
#include <cerrno>        // accept4 errors
#include <chrono>        // stop deadline
#include <cstddef>       // std::size_t
#include <cstdint>       // port
#include <cstdio>        // the authenticator's start warning
#include <future>        // waiting for workers in stop()
#include <memory>        // workers
#include <span>          // broadcast recipients
#include <stdexcept>     // programmer errors
#include <string>        // close reasons
#include <string_view>   // close reasons
#include <system_error>  // results
#include <thread>        // workers
#include <vector>        // workers, broadcast groups

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/transport/transport.hpp"
#include "devgate/websocket/detail/core.hpp"
#include "devgate/websocket/detail/reactor.hpp"
#include "devgate/websocket/detail/stream.hpp"
#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/server_options.hpp"

namespace devgate::websocket {

/// The reference WebSocket transport: an RFC 6455 server on standalone Asio and Linux epoll that
/// satisfies `devgate::transport`.
///
/// Each worker thread runs its own io_context and epoll set; a connection stays on the thread it
/// was given. Idle connections hold no read buffer (a ready socket is read into a per-thread
/// buffer) and no write queue; one timer per thread drives every timeout.
/// `send`, `broadcast`, `close` and `buffered_bytes` may be called from any thread; handlers
/// run on the worker threads. Do not call `stop()` from a handler.
class server {
 public:
  /// A server with `options`; nothing listens until `start()`.
  explicit server(server_options options = {}) : core_(std::make_unique<detail::server_core>()) {
    core_->options = std::move(options);
  }
  server(const server&) = delete;
  server& operator=(const server&) = delete;
  /// Stops (closing every session with 1001) if still running.
  ~server() { stop(); }

  /// Sets the engine's callbacks; call before `start()`.
  void set_handlers(transport_handlers handlers) {
    if (state_ != state_t::created) {
      throw std::logic_error("websocket::server::set_handlers must be called before start()");
    }
    core_->handlers = std::move(handlers);
  }

  /// Binds, listens and starts the worker threads. Errors: errc::already_running,
  /// errc::invalid_argument (bad address, more than 256 threads, a negative timeout or one over
  /// 20 days, max_buffered_bytes over 1 GiB), a tls_errc (TLS files that cannot be used), or the
  /// socket error (e.g. address in use).
  std::error_code start() {
    if (state_ != state_t::created) return errc::already_running;
    auto& o = core_->options;
    unsigned threads = o.threads ? o.threads : std::thread::hardware_concurrency();
    if (threads == 0) threads = 1;
    if (threads > 256) return errc::invalid_argument;
    // Session buffers are counted in 32 bits and timeouts in 32-bit milliseconds.
    if (o.backpressure.max_buffered_bytes > (1u << 30)) return errc::invalid_argument;
    constexpr auto max_timeout = std::chrono::hours(24 * 20);
    for (const auto t : {o.handshake_timeout, o.idle_timeout, o.pong_timeout, o.close_timeout}) {
      if (t.count() < 0 || t > max_timeout) return errc::invalid_argument;
    }
    std::error_code ec;
    const auto address = asio::ip::make_address(o.address, ec);
    if (ec) return errc::invalid_argument;
    if (o.tls) {
      if (const auto err = core_->tls.load(*o.tls)) return err;
    }

    auto shortest = std::min({o.handshake_timeout, o.pong_timeout, o.close_timeout});
    if (o.idle_timeout.count() > 0) shortest = std::min(shortest, o.idle_timeout);
    core_->tick = std::clamp<clock::duration>(shortest / 4, std::chrono::milliseconds(5),
                                              std::chrono::milliseconds(250));

    for (unsigned i = 0; i < threads; ++i) {
      workers_.push_back(std::make_unique<detail::reactor>(*core_, static_cast<std::uint8_t>(i)));
      if (const auto err = workers_.back()->error()) {
        workers_.clear();
        return err;
      }
    }
    acceptor_ = std::make_unique<asio::ip::tcp::acceptor>(workers_[0]->ioc);
    const asio::ip::tcp::endpoint endpoint(address, o.port);
    acceptor_->open(endpoint.protocol(), ec);
    if (!ec) acceptor_->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_->bind(endpoint, ec);
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux (no setsockopt per
    // connection).
    if (!ec) acceptor_->set_option(asio::ip::tcp::no_delay(true), ec);
    if (!ec) acceptor_->listen(o.backlog, ec);
    if (!ec) acceptor_->non_blocking(true, ec);  // accept4 until EAGAIN
    if (!ec && o.defer_accept) acceptor_->set_option(defer_accept_option{1}, ec);
    if (!ec) port_ = acceptor_->local_endpoint(ec).port();
    if (ec) {
      acceptor_.reset();
      workers_.clear();
      return ec;
    }
    state_ = state_t::running;
    if (!o.authenticate.start_warning.empty()) {
      std::fprintf(stderr, "%s\n", o.authenticate.start_warning.c_str());
    }
    accept_next();
    for (auto& w : workers_) w->start();
    return {};
  }

  /// Closes every session with 1001 (going away), waits for their close handshakes up to
  /// `close_timeout`, then drops what is left and joins the threads. Idempotent.
  void stop() {
    if (state_ != state_t::running) {
      state_ = state_t::stopped;
      return;
    }
    for (auto& w : workers_) {
      if (w->on_this_thread()) {
        throw std::logic_error("websocket::server::stop() called from a transport handler");
      }
    }
    core_->stopping.store(true, std::memory_order_release);
    run_on_all([this](detail::reactor& w) {
      if (w.index() == 0) {
        std::error_code ignored;
        acceptor_->close(ignored);
      }
      w.close_all(close_code::going_away);
    });
    const auto deadline =
        clock::now() + core_->options.close_timeout + std::chrono::milliseconds(200);
    while (core_->live.load(std::memory_order_acquire) > 0 && clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    run_on_all([](detail::reactor& w) { w.abort_all(); });
    for (auto& w : workers_) w->stop();
    for (auto& w : workers_) w->join();
    acceptor_.reset();
    state_ = state_t::stopped;
  }

  /// Queues one message to one session from any thread. Errors: errc::unknown_session (no such
  /// open session), errc::closed (it is closing), errc::backpressure (over its buffer limit: the
  /// session is closed with 1008/1013 unless the policy is drop_oldest).
  std::error_code send(session_id id, payload_kind kind, shared_bytes payload) {
    detail::reactor* w = worker_of(id);
    if (!w) return errc::unknown_session;
    return w->send(id, opcode_of(kind), std::move(payload));
  }

  /// Queues one payload to many sessions: every recipient's queue shares the one payload buffer
  /// (server frames are unmasked, so the same bytes serve all; headers are encoded as each
  /// session writes); one task per worker thread, not per recipient. Returns how many
  /// sessions it was queued to (unknown, closing and over-limit sessions are skipped).
  std::size_t broadcast(std::span<const session_id> ids, payload_kind kind, shared_bytes payload) {
    if (ids.empty() || state_ != state_t::running) return 0;
    std::vector<std::vector<session_id>> by_worker(workers_.size());
    for (const session_id id : ids) {
      const std::size_t w = id & 0xFF;
      if (w < workers_.size()) by_worker[w].push_back(id);
    }
    std::size_t queued = 0;
    for (std::size_t w = 0; w < workers_.size(); ++w) {
      if (!by_worker[w].empty())
        queued += workers_[w]->broadcast(by_worker[w], opcode_of(kind), payload);
    }
    return queued;
  }

  /// Starts the close handshake of one session (from any thread) with `code` and `reason`
  /// (at most 123 bytes are sent). Messages queued and not yet being written are dropped.
  void close(session_id id, close_code code, std::string_view reason) {
    if (detail::reactor* w = worker_of(id)) w->close(id, code, reason);
  }

  /// Bytes queued to one session and not yet written (0 for an unknown session).
  [[nodiscard]] std::size_t buffered_bytes(session_id id) const {
    detail::reactor* w = worker_of(id);
    return w ? w->buffered(id) : 0;
  }

  /// Reads the TLS certificate chain, key and client CA files again (after a renewal): new
  /// connections get the new certificate, open ones keep theirs. On error (a tls_errc) the
  /// previous certificate stays in use. From any thread but a handler's, while running.
  std::error_code reload_tls() {
    if (!core_->options.tls || !core_->tls.enabled()) return websocket::tls_errc::not_enabled;
    return core_->tls.load(*core_->options.tls);
  }

  /// The port the server listens on (useful with `server_options::port = 0`); 0 before start.
  [[nodiscard]] std::uint16_t local_port() const noexcept { return port_; }

  /// Connections currently alive (upgraded or not).
  [[nodiscard]] std::size_t connection_count() const noexcept {
    return core_->live.load(std::memory_order_relaxed);
  }

  /// The options the server was made with.
  [[nodiscard]] const server_options& options() const noexcept { return core_->options; }

 private:
  enum class state_t : std::uint8_t { created, running, stopped };

  static opcode opcode_of(payload_kind kind) noexcept {
    return kind == payload_kind::text ? opcode::text : opcode::binary;
  }

  // The worker a session id names (its low byte), while running.
  [[nodiscard]] detail::reactor* worker_of(session_id id) const noexcept {
    if (state_ != state_t::running) return nullptr;
    const std::size_t w = id & 0xFF;
    return w < workers_.size() ? workers_[w].get() : nullptr;
  }

  // TCP_DEFER_ACCEPT (seconds) as an Asio SettableSocketOption.
  struct defer_accept_option {
    int seconds;
    template <class Protocol>
    [[nodiscard]] int level(const Protocol&) const noexcept {
      return IPPROTO_TCP;
    }
    template <class Protocol>
    [[nodiscard]] int name(const Protocol&) const noexcept {
      return TCP_DEFER_ACCEPT;
    }
    template <class Protocol>
    [[nodiscard]] const int* data(const Protocol&) const noexcept {
      return &seconds;
    }
    template <class Protocol>
    [[nodiscard]] std::size_t size(const Protocol&) const noexcept {
      return sizeof seconds;
    }
  };

  // Waits until the listener has connections, takes them with accept4 (non-blocking sockets:
  // no per-connection ioctl) and hands them to the workers in turn. Runs on worker 0's thread.
  void accept_next() {
    acceptor_->async_wait(asio::ip::tcp::acceptor::wait_read, [this](const std::error_code& ec) {
      if (ec || !acceptor_->is_open()) return;
      if (core_->stopping.load(std::memory_order_acquire)) return;
      // A bounded batch, then the wait again (which completes at once if more are waiting), so
      // a connection storm does not starve worker 0's own sessions.
      for (int i = 0; i < 64; ++i) {
        const int fd =
            ::accept4(acceptor_->native_handle(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
          hand_over(fd);
          continue;
        }
        const int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK) break;
        // The peer gave up before we took it, or a signal: try the next one.
        if (err == ECONNABORTED || err == EINTR || err == EPROTO) continue;
        // Out of descriptors or memory: pause instead of spinning on a full backlog.
        retry_timer_ = std::make_unique<asio::steady_timer>(workers_[0]->ioc);
        retry_timer_->expires_after(std::chrono::milliseconds(50));
        retry_timer_->async_wait([this](const std::error_code& e) {
          if (!e && acceptor_->is_open()) accept_next();
        });
        return;
      }
      accept_next();
    });
  }

  void hand_over(int fd) {
    workers_[next_worker_++ % workers_.size()]->assign(detail::tcp_stream(fd));
  }

  // Runs `fn` on every worker thread and waits until all have run it.
  template <class Fn>
  void run_on_all(Fn fn) {
    std::vector<std::future<void>> done;
    for (auto& w : workers_) {
      auto p = std::make_shared<std::promise<void>>();
      done.push_back(p->get_future());
      asio::post(w->ioc, [p, fn, &w = *w] {
        fn(w);
        p->set_value();
      });
    }
    for (auto& f : done) f.wait();
  }

  std::unique_ptr<detail::server_core> core_;
  std::vector<std::unique_ptr<detail::reactor>> workers_;
  std::unique_ptr<asio::ip::tcp::acceptor> acceptor_;
  std::unique_ptr<asio::steady_timer> retry_timer_;
  std::size_t next_worker_ = 0;  // used only on worker 0's thread (the acceptor's)
  std::uint16_t port_ = 0;
  std::atomic<state_t> state_{state_t::created};
};

static_assert(devgate::transport<server>, "websocket::server must satisfy devgate::transport");

}  // namespace devgate::websocket
