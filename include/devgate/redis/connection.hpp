#pragma once

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include <algorithm>              // std::min
#include <asio/dispatch.hpp>      // stop from the loop's own thread
#include <asio/io_context.hpp>    // the caller's event loop
#include <asio/ip/tcp.hpp>        // asynchronous name resolution
#include <asio/post.hpp>          // commands handed to the loop
#include <asio/steady_timer.hpp>  // backoff, connect timeout
#include <atomic>                 // state read from any thread
#include <chrono>                 // waits
#include <concepts>               // callable commands
#include <condition_variable>     // call, wait_connected
#include <cstddef>                // std::size_t
#include <cstdint>                // counters
#include <deque>                  // callbacks of commands in flight, in order
#include <functional>             // the subscription handler
#include <initializer_list>       // argv literals
#include <memory>                 // shared state kept alive by pending handlers
#include <mutex>                  // the inbox
#include <random>                 // jitter
#include <set>                    // subscribed channels
#include <span>                   // argv
#include <string>                 // the last error
#include <string_view>            // argv items
#include <system_error>           // results
#include <utility>                // std::move
#include <vector>                 // the inbox

#include "devgate/redis/detail/asio_adapter.hpp"
#include "devgate/redis/error.hpp"
#include "devgate/redis/options.hpp"
#include "devgate/redis/reply.hpp"

namespace devgate::redis {

/// Called once per command with its outcome: `ec` empty and `r` the reply; `errc::error_reply`
/// and `r` the error reply; or another error (`not_connected`, `disconnected`, `stopped`) and
/// `r` null. Runs on the connection's `io_context` thread; `r` is valid only during the call.
using reply_fn = void (*)(void* user, std::error_code ec, const redisReply* r);

/// One connection to Redis, driven by the caller's `asio::io_context` (hiredis's async API
/// through `detail::asio_adapter`): no thread of the loop ever blocks on Redis. Commands can be
/// issued from any thread; they are pipelined (many in flight) and answered in order. After a
/// drop it reconnects with exponential backoff and jitter, sending AUTH and SELECT again; a
/// command in flight at the drop fails with `errc::disconnected`, one issued while there is no
/// connection with `errc::not_connected`: a command is never dropped without its callback.
/// Commands are argv vectors (binary-safe, never printf-formatted), request/reply. A connection
/// may instead serve subscriptions (`subscribe`, `on_message`): Redis then takes nothing but
/// (un)subscriptions on it, so use one connection for commands and another for subscriptions.
class connection {
 public:
  /// Prepares a connection to `options.server` on `io`; nothing happens before `start`.
  connection(asio::io_context& io, connection_options options)
      : state_(std::make_shared<state>(io, std::move(options))) {}
  /// Stops (see `stop`).
  ~connection() { stop(); }
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  /// Connects (and keeps reconnecting) in the background; returns at once. Thread-safe.
  void start() {
    asio::post(state_->io, [s = state_] {
      if (s->phase_ == phase::idle) s->connect();
    });
  }

  /// Closes the connection and stops reconnecting: commands in flight and later ones fail with
  /// `errc::stopped`. Thread-safe; done when the loop runs it (at once on the loop's thread).
  void stop() {
    asio::dispatch(state_->io, [s = state_] { s->shut(); });
  }

  /// Sends `argv` (command and arguments, binary-safe) and calls `fn(user, ...)` with the
  /// outcome. Thread-safe: the command is encoded on the calling thread and handed to the loop,
  /// which writes everything handed to it since its last turn in one go (pipelining).
  void command(std::span<const std::string_view> argv, reply_fn fn, void* user) {
    constexpr std::size_t inline_args = 16;
    const char* ptrs_small[inline_args];
    std::size_t lens_small[inline_args];
    std::vector<const char*> ptrs_big;
    std::vector<std::size_t> lens_big;
    const char** ptrs = ptrs_small;
    std::size_t* lens = lens_small;
    if (argv.size() > inline_args) {
      ptrs_big.resize(argv.size());
      lens_big.resize(argv.size());
      ptrs = ptrs_big.data();
      lens = lens_big.data();
    }
    for (std::size_t i = 0; i < argv.size(); ++i) {
      ptrs[i] = argv[i].data();
      lens[i] = argv[i].size();
    }
    // The sds variant: hiredis's own formatter, one allocation sized up front (the plain
    // redisFormatCommandArgv runs sprintf for every argument's header).
    sds cmd = nullptr;
    const int len = redisFormatSdsCommandArgv(&cmd, static_cast<int>(argv.size()), ptrs, lens);
    if (len < 0 || cmd == nullptr) {
      fn(user, std::make_error_code(std::errc::not_enough_memory), nullptr);
      return;
    }
    state_->submit(submission{cmd, len, fn, user});
  }

  /// Called for every message on a subscribed channel, on the loop's thread; the views are valid
  /// only during the call.
  using message_fn = std::function<void(std::string_view channel, std::string_view payload)>;
  /// Sets the subscription handler (before `start`).
  void on_message(message_fn f) { state_->on_message_ = std::move(f); }
  /// Subscribes to `channel` (SUBSCRIBE), now if up and again after every reconnect, until
  /// `unsubscribe`. Thread-safe; a connection that subscribes takes no other command.
  void subscribe(std::string channel) {
    asio::post(state_->io, [s = state_, c = std::move(channel)]() mutable {
      if (s->channels_.insert(c).second && s->up_.load()) s->send_subscription("SUBSCRIBE", c);
    });
  }
  /// Ends the subscription to `channel` (UNSUBSCRIBE). Thread-safe.
  void unsubscribe(std::string channel) {
    asio::post(state_->io, [s = state_, c = std::move(channel)] {
      if (s->channels_.erase(c) != 0 && s->up_.load()) s->send_subscription("UNSUBSCRIBE", c);
    });
  }
  /// Messages received on subscribed channels.
  [[nodiscard]] std::uint64_t messages() const noexcept { return state_->messages_.load(); }

  /// `command` with a callable `f(std::error_code, const redisReply*)` (one allocation for it).
  template <class F>
  void command(std::initializer_list<std::string_view> argv, F f) {
    command(std::span<const std::string_view>(argv.begin(), argv.size()), std::move(f));
  }
  /// `command` with an argv span and a callable `f(std::error_code, const redisReply*)`.
  template <class F>
  requires std::invocable<F&, std::error_code, const redisReply*>
  void command(std::span<const std::string_view> argv, F f) {
    auto* held = new F(std::move(f));
    command(
        argv,
        [](void* user, std::error_code ec, const redisReply* r) {
          auto* g = static_cast<F*>(user);
          (*g)(ec, r);
          delete g;
        },
        held);
  }

  /// The outcome of `call`: an error, or the reply (an error reply gives `errc::error_reply`
  /// and its text in `value.str`).
  struct result {
    std::error_code ec;  ///< Empty on success.
    reply value;         ///< The reply (nil when there was none).
  };

  /// Sends `argv` and waits for the reply, at most `timeout` (`errc::timeout`). For set-up,
  /// tools and tests: it blocks the calling thread, so never call it on the loop's thread.
  result call(std::span<const std::string_view> argv,
              std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    struct waiter {
      std::mutex m;
      std::condition_variable cv;
      bool done = false;
      result out;
    };
    auto w = std::make_shared<waiter>();
    auto* keep = new std::shared_ptr<waiter>(w);  // the callback owns one reference
    command(
        argv,
        [](void* user, std::error_code ec, const redisReply* r) {
          auto* held = static_cast<std::shared_ptr<waiter>*>(user);
          {
            std::lock_guard lock((*held)->m);
            (*held)->out.ec = ec;
            (*held)->out.value = reply::from(r);
            (*held)->done = true;
          }
          (*held)->cv.notify_all();
          delete held;
        },
        keep);
    std::unique_lock lock(w->m);
    if (!w->cv.wait_for(lock, timeout, [&] { return w->done; })) return {errc::timeout, {}};
    return w->out;
  }
  /// `call` with an argv literal.
  result call(std::initializer_list<std::string_view> argv,
              std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    return call(std::span<const std::string_view>(argv.begin(), argv.size()), timeout);
  }

  /// Waits until the connection is up (connected, AUTH and SELECT done), at most `timeout`.
  /// Blocks: never call it on the loop's thread.
  bool wait_connected(std::chrono::milliseconds timeout) const {
    std::unique_lock lock(state_->up_m_);
    return state_->up_cv_.wait_for(lock, timeout, [&] { return state_->up_.load(); });
  }

  /// True while the connection is up (connected, AUTH and SELECT done).
  [[nodiscard]] bool connected() const noexcept { return state_->up_.load(); }
  /// Successful connects so far (the first one and every reconnect).
  [[nodiscard]] std::uint64_t connects() const noexcept { return state_->connects_.load(); }
  /// Connect attempts that failed (refused, timed out, AUTH or SELECT refused).
  [[nodiscard]] std::uint64_t failed_connects() const noexcept {
    return state_->failed_connects_.load();
  }
  /// Established connections that dropped.
  [[nodiscard]] std::uint64_t drops() const noexcept { return state_->drops_.load(); }
  /// The last connect failure's text (refused, AUTH or SELECT error), empty if none.
  [[nodiscard]] std::string last_error() const;

 private:
  enum class phase { idle, connecting, up, backoff, stopped };

  // A command encoded by `command`, on its way to the loop.
  struct submission {
    sds cmd;  // freed with redisFreeSdsCommand
    int len;
    reply_fn fn;
    void* user;
  };
  // The callback of a command handed to hiredis; replies come back in this order.
  struct in_flight {
    reply_fn fn;
    void* user;
  };

  // Everything the loop's handlers touch; they hold it by shared_ptr, so a connection destroyed
  // with handlers pending leaves them nothing dangling. Only the loop's thread touches it, except
  // the inbox (under its mutex) and the atomics.
  struct state : std::enable_shared_from_this<state> {
    state(asio::io_context& io_context, connection_options o)
        : io(io_context),
          options(std::move(o)),
          resolver_(io_context),
          backoff_timer_(io_context),
          connect_timer_(io_context),
          rng_(std::random_device{}()) {}
    ~state() {
      if (ac_ != nullptr) redisAsyncFree(ac_);  // the loop stopped before `stop` ran
      for (auto& s : inbox_) redisFreeSdsCommand(s.cmd);
    }

    void submit(submission s) {
      bool post = false;
      {
        std::lock_guard lock(inbox_m_);
        inbox_.push_back(s);
        post = !flush_posted_;
        flush_posted_ = true;
      }
      if (post) asio::post(io, [self = shared_from_this()] { self->flush(); });
    }

    // Hands every submitted command to hiredis, which writes them together when the socket is
    // next writable.
    void flush() {
      {
        std::lock_guard lock(inbox_m_);
        draining_.swap(inbox_);
        flush_posted_ = false;
      }
      for (auto& s : draining_) {
        issue(s.cmd, s.len, s.fn, s.user);
        redisFreeSdsCommand(s.cmd);
      }
      draining_.clear();
    }

    void issue(const char* cmd, int len, reply_fn fn, void* user) {
      if (ac_ == nullptr) {
        fn(user, phase_ == phase::stopped ? errc::stopped : errc::not_connected, nullptr);
        return;
      }
      in_flight_.push_back({fn, user});
      if (redisAsyncFormattedCommand(ac_, &state::on_reply, this, cmd,
                                     static_cast<std::size_t>(len)) != REDIS_OK) {
        in_flight_.pop_back();
        fn(user, errc::disconnected, nullptr);
      }
    }

    static void on_reply(redisAsyncContext* /*ac*/, void* r, void* privdata) {
      auto* self = static_cast<state*>(privdata);
      const auto cb = self->in_flight_.front();
      self->in_flight_.pop_front();
      const auto* reply = static_cast<const redisReply*>(r);
      std::error_code ec;
      if (reply == nullptr) {
        ec = self->phase_ == phase::stopped ? errc::stopped : errc::disconnected;
      } else if (reply->type == REDIS_REPLY_ERROR) {
        ec = errc::error_reply;
      }
      cb.fn(cb.user, ec, reply);
    }

    // Resolves the host without blocking the loop, then starts hiredis's non-blocking connect.
    void connect() {
      phase_ = phase::connecting;
      resolver_.async_resolve(
          options.server.host, std::to_string(options.server.port),
          [self = shared_from_this()](const std::error_code& ec,
                                      const asio::ip::tcp::resolver::results_type& results) {
            if (self->phase_ != phase::connecting) return;
            if (ec || results.empty()) {
              self->failed();
              return;
            }
            self->open(results.begin()->endpoint().address().to_string());
          });
    }

    void open(const std::string& address) {
      redisAsyncContext* ac = redisAsyncConnect(address.c_str(), options.server.port);
      if (ac == nullptr || ac->err != 0) {
        if (ac != nullptr) redisAsyncFree(ac);
        failed();
        return;
      }
      ac_ = ac;
      ac->data = this;
      redisAsyncSetConnectCallback(ac, &state::on_connect);
      redisAsyncSetDisconnectCallback(ac, &state::on_disconnect);
      detail::asio_adapter::attach(io, ac);
      connect_timer_.expires_after(options.connect_timeout);
      connect_timer_.async_wait([self = shared_from_this(), ac](const std::error_code& ec) {
        if (ec || self->ac_ != ac || self->phase_ != phase::connecting) return;
        // Abandoned: hiredis fails whatever was queued on it; `ac_` is cleared first so its
        // disconnect callback, if it calls one, is ignored.
        self->ac_ = nullptr;
        redisAsyncFree(ac);
        self->failed();
      });
      // AUTH and SELECT go first; commands issued meanwhile queue behind them.
      handshake_left_ = 0;
      if (!options.server.password.empty()) {
        ++handshake_left_;
        if (options.server.username.empty()) {
          send_internal({"AUTH", options.server.password});
        } else {
          send_internal({"AUTH", options.server.username, options.server.password});
        }
      }
      if (options.server.db != 0) {
        ++handshake_left_;
        const std::string db = std::to_string(options.server.db);
        send_internal({"SELECT", db});
      }
    }

    void send_internal(std::initializer_list<std::string_view> argv) {
      std::vector<const char*> ptrs;
      std::vector<std::size_t> lens;
      for (auto a : argv) {
        ptrs.push_back(a.data());
        lens.push_back(a.size());
      }
      char* cmd = nullptr;
      const int len =
          redisFormatCommandArgv(&cmd, static_cast<int>(ptrs.size()), ptrs.data(), lens.data());
      if (len < 0) return;
      issue(cmd, len, &state::on_handshake, this);
      redisFreeCommand(cmd);
    }

    static void on_handshake(void* user, std::error_code ec, const redisReply* r) {
      auto* self = static_cast<state*>(user);
      if (ec) {
        if (ec == errc::error_reply && r != nullptr && self->ac_ != nullptr) {
          self->set_error(std::string("redis: connect refused: ") + r->str);
          redisAsyncDisconnect(self->ac_);  // counted as a failed attempt when it closes
        }
        return;
      }
      if (--self->handshake_left_ == 0 && self->connected_) self->went_up();
    }

    static void on_connect(const redisAsyncContext* ac, int status) {
      auto* self = static_cast<state*>(ac->data);
      if (status != REDIS_OK) {
        // hiredis frees the context after this callback; its disconnect callback, if any, finds
        // `ac_` cleared and is ignored.
        self->set_error(std::string("redis: connect failed: ") + ac->errstr);
        self->ac_ = nullptr;
        self->failed();
        return;
      }
      self->connected_ = true;
      if (self->handshake_left_ == 0) self->went_up();
    }

    static void on_disconnect(const redisAsyncContext* ac, int /*status*/) {
      auto* self = static_cast<state*>(ac->data);
      if (self->ac_ != ac) return;  // one this connection already let go of
      self->ac_ = nullptr;
      self->connected_ = false;
      const bool was_up = self->up_.exchange(false);
      if (self->phase_ == phase::stopped) return;
      if (was_up) {
        self->drops_.fetch_add(1, std::memory_order_relaxed);
        self->attempt_ = 0;
        self->reconnect();
      } else {
        self->failed();
      }
    }

    void went_up() {
      connect_timer_.cancel();
      phase_ = phase::up;
      attempt_ = 0;
      connects_.fetch_add(1, std::memory_order_relaxed);
      for (const auto& c : channels_) send_subscription("SUBSCRIBE", c);  // again, after a drop
      {
        std::lock_guard lock(up_m_);
        up_.store(true);
      }
      up_cv_.notify_all();
    }

    // SUBSCRIBE or UNSUBSCRIBE one channel; hiredis then calls on_push for the channel's
    // confirmations and messages (not in the in-order reply queue).
    void send_subscription(std::string_view verb, std::string_view channel) {
      if (ac_ == nullptr) return;  // went_up sends it on the next connect
      const char* ptrs[2] = {verb.data(), channel.data()};
      const std::size_t lens[2] = {verb.size(), channel.size()};
      sds cmd = nullptr;
      if (redisFormatSdsCommandArgv(&cmd, 2, ptrs, lens) < 0 || cmd == nullptr) return;
      redisAsyncFormattedCommand(ac_, &state::on_push, this, cmd, sdslen(cmd));
      redisFreeSdsCommand(cmd);
    }

    // A subscription's reply: ["message", channel, payload] is handed on; the confirmations
    // ("subscribe", "unsubscribe") and the null of a disconnect are not.
    static void on_push(redisAsyncContext* /*ac*/, void* r, void* privdata) {
      const auto* reply = static_cast<const redisReply*>(r);
      if (reply == nullptr || reply->type != REDIS_REPLY_ARRAY || reply->elements != 3) return;
      const redisReply* kind = reply->element[0];
      if (kind->type != REDIS_REPLY_STRING || std::string_view(kind->str, kind->len) != "message") {
        return;
      }
      auto* self = static_cast<state*>(privdata);
      self->messages_.fetch_add(1, std::memory_order_relaxed);
      if (!self->on_message_) return;
      const redisReply* channel = reply->element[1];
      const redisReply* payload = reply->element[2];
      self->on_message_(std::string_view(channel->str, channel->len),
                        std::string_view(payload->str, payload->len));
    }

    void failed() {
      connect_timer_.cancel();
      connected_ = false;
      if (phase_ == phase::stopped) return;
      failed_connects_.fetch_add(1, std::memory_order_relaxed);
      reconnect();
    }

    // Waits a backoff delay (doubling per failed attempt, capped, with jitter), then connects.
    void reconnect() {
      phase_ = phase::backoff;
      const auto cap = options.reconnect_max.count();
      auto base = options.reconnect_initial.count();
      for (unsigned i = 0; i < attempt_ && base < cap; ++i) base *= 2;
      base = std::min<decltype(base)>(base, cap);
      ++attempt_;
      std::uniform_int_distribution<long long> jitter(base / 2, base);
      backoff_timer_.expires_after(std::chrono::milliseconds(jitter(rng_)));
      backoff_timer_.async_wait([self = shared_from_this()](const std::error_code& ec) {
        if (!ec && self->phase_ == phase::backoff) self->connect();
      });
    }

    void shut() {
      if (phase_ == phase::stopped) return;
      phase_ = phase::stopped;
      backoff_timer_.cancel();
      connect_timer_.cancel();
      resolver_.cancel();
      up_.store(false);
      if (ac_ != nullptr) {
        redisAsyncContext* ac = ac_;
        ac_ = nullptr;
        redisAsyncFree(ac);  // fails every command in flight with errc::stopped
      }
      flush();  // and anything submitted since
    }

    void set_error(std::string text) {
      std::lock_guard lock(up_m_);
      last_error_ = std::move(text);
    }

    asio::io_context& io;
    const connection_options options;
    asio::ip::tcp::resolver resolver_;
    asio::steady_timer backoff_timer_;
    asio::steady_timer connect_timer_;
    std::minstd_rand rng_;
    redisAsyncContext* ac_ = nullptr;
    phase phase_ = phase::idle;
    unsigned attempt_ = 0;
    int handshake_left_ = 0;
    bool connected_ = false;
    std::deque<in_flight> in_flight_;
    std::set<std::string, std::less<>> channels_;  // subscribed (re-sent on every connect)
    message_fn on_message_;
    std::atomic<std::uint64_t> messages_{0};

    std::mutex inbox_m_;
    std::vector<submission> inbox_;
    std::vector<submission> draining_;
    bool flush_posted_ = false;

    mutable std::mutex up_m_;
    mutable std::condition_variable up_cv_;
    std::atomic<bool> up_{false};
    std::string last_error_;
    std::atomic<std::uint64_t> connects_{0};
    std::atomic<std::uint64_t> failed_connects_{0};
    std::atomic<std::uint64_t> drops_{0};
  };

  std::shared_ptr<state> state_;
};

inline std::string connection::last_error() const {
  std::lock_guard lock(state_->up_m_);
  return state_->last_error_;
}

}  // namespace devgate::redis
