#pragma once

#include <hiredis/async.h>
#include <pthread.h>  // pthread_sigmask: SIGPIPE blocked around hiredis's writes
#include <signal.h>   // sigtimedwait

#include <asio/io_context.hpp>               // the caller's event loop
#include <asio/posix/stream_descriptor.hpp>  // readiness waits on hiredis's socket
#include <memory>                            // shared ownership by pending waits
#include <system_error>                      // wait results

namespace devgate::redis::detail {

/// Drives one `redisAsyncContext` from an `asio::io_context`: hiredis's event hooks
/// (`ev.addRead/delRead/addWrite/delWrite/cleanup`) become `async_wait`s on its socket, and a
/// ready socket calls `redisAsyncHandleRead/Write`. hiredis owns the socket (it closes it); the
/// adapter only watches it. It lives until hiredis's `cleanup` and its last pending wait.
class asio_adapter : public std::enable_shared_from_this<asio_adapter> {
 public:
  /// Watches `ac`'s socket on `io`; use `attach`, which also installs the hooks.
  asio_adapter(asio::io_context& io, redisAsyncContext* ac) : ac_(ac), socket_(io, ac->c.fd) {}

  /// Installs the hooks on `ac` (which must have no event library yet) and starts watching for
  /// the connect to complete (a writable socket).
  static void attach(asio::io_context& io, redisAsyncContext* ac) {
    auto self = std::make_shared<asio_adapter>(io, ac);
    self->self_ = self;  // owned by hiredis until cleanup
    ac->ev.data = self.get();
    ac->ev.addRead = [](void* p) { static_cast<asio_adapter*>(p)->add(true); };
    ac->ev.delRead = [](void* p) { static_cast<asio_adapter*>(p)->want_read_ = false; };
    ac->ev.addWrite = [](void* p) { static_cast<asio_adapter*>(p)->add(false); };
    ac->ev.delWrite = [](void* p) { static_cast<asio_adapter*>(p)->want_write_ = false; };
    ac->ev.cleanup = [](void* p) { static_cast<asio_adapter*>(p)->cleanup(); };
    self->add(false);  // hiredis learns its non-blocking connect finished on the first write event
  }

 private:
  // Waits for the socket to be readable (or writable) unless a wait is already pending.
  void add(bool read) {
    (read ? want_read_ : want_write_) = true;
    bool& pending = read ? read_pending_ : write_pending_;
    if (pending || ac_ == nullptr) return;
    pending = true;
    socket_.async_wait(
        read ? asio::posix::stream_descriptor::wait_read
             : asio::posix::stream_descriptor::wait_write,
        [self = shared_from_this(), read](const std::error_code& ec) { self->ready(read, ec); });
  }

  // The socket is ready: hand the event to hiredis if it still wants it, then wait again. hiredis
  // may free the context inside the call (a dropped connection): `cleanup` then clears `ac_`.
  void ready(bool read, const std::error_code& ec) {
    (read ? read_pending_ : write_pending_) = false;
    if (ec || ac_ == nullptr) return;
    bool& want = read ? want_read_ : want_write_;
    if (!want) return;
    if (read) {
      redisAsyncHandleRead(ac_);
    } else {
      write_without_sigpipe(ac_);
    }
    if (ac_ != nullptr && want) add(read);
  }

  // hiredis writes with write(2), which raises SIGPIPE on a connection Redis closed; SIGPIPE's
  // default action ends the process. Without changing the process's signal handling, the write
  // runs with SIGPIPE blocked on this thread, and a SIGPIPE it raised is taken off the pending
  // set before the mask comes back (one write event per loop turn, not per command).
  static void write_without_sigpipe(redisAsyncContext* ac) {
    sigset_t pipe;
    sigset_t old;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &old);
    sigset_t pending;
    sigpending(&pending);
    const bool was_pending = sigismember(&pending, SIGPIPE) == 1;
    redisAsyncHandleWrite(ac);
    if (!was_pending) {
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec zero{};
        (void)sigtimedwait(&pipe, nullptr, &zero);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
  }

  // hiredis frees the context: stop watching, give the socket back (hiredis closes it) and drop
  // the self-reference (pending waits keep the adapter until they complete, aborted).
  void cleanup() {
    ac_ = nullptr;
    want_read_ = want_write_ = false;
    std::error_code ignored;
    socket_.cancel(ignored);
    (void)socket_.release();
    self_.reset();
  }

  redisAsyncContext* ac_;
  asio::posix::stream_descriptor socket_;
  std::shared_ptr<asio_adapter> self_;
  bool want_read_ = false;
  bool want_write_ = false;
  bool read_pending_ = false;
  bool write_pending_ = false;
};

}  // namespace devgate::redis::detail
