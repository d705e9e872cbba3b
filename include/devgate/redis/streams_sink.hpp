#pragma once

#include <atomic>              // counters
#include <charconv>            // numbers as text
#include <chrono>              // the reply deadline
#include <condition_variable>  // a worker waits for its reply
#include <cstddef>             // std::size_t
#include <cstdint>             // counters
#include <memory>              // the slots
#include <mutex>               // a slot's state
#include <string>              // stream names
#include <string_view>         // argv
#include <system_error>        // results
#include <utility>             // std::move

#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/redis/connection.hpp"
#include "devgate/redis/error.hpp"
#include "devgate/redis/options.hpp"

namespace devgate::redis {

/// A pipeline sink that appends each message to a Redis stream:
/// `XADD <stream> [MAXLEN ~ N] * device <id> seq <n> kind <text|binary> payload <bytes>`.
/// `consume` returns only once Redis took the entry (its ID came back), or with the error that
/// stopped it (`not_connected`, `disconnected`, `error_reply`, or `timeout` past
/// `reply_timeout`), so the pipeline retries and dead-letters what Redis did not take: nothing
/// is lost silently, and a timed-out entry that Redis applied late may appear twice
/// (at-least-once). Workers wait on their own thread, never on the connection's loop; the
/// commands of all workers share the connection, pipelined (one in flight per worker).
class streams_sink {
 public:
  /// Writes through `c` (which must outlive the sink) as `options` say.
  streams_sink(connection& c, streams_sink_options options)
      : core_(std::make_unique<core>(c, std::move(options))) {}
  /// Moves the sink (not while a worker is in `consume`).
  streams_sink(streams_sink&&) noexcept = default;
  /// Moves the sink (not while a worker is in `consume`).
  streams_sink& operator=(streams_sink&&) noexcept = default;
  /// Waits (at most `reply_timeout`) for replies still owed to workers that timed out.
  ~streams_sink() {
    if (!core_) return;
    for (std::size_t i = 0; i < core_->options.max_workers; ++i) {
      slot& s = core_->slots[i];
      std::unique_lock lock(s.m);
      s.cv.wait_for(lock, core_->options.reply_timeout, [&] { return s.answered == s.issued; });
    }
  }

  /// Appends `m` to its stream and waits for Redis's answer (see the class comment).
  std::error_code consume(const message& m, dispatch_context& ctx) {
    core& c = *core_;
    if (ctx.worker_id >= c.options.max_workers) {
      c.failed.fetch_add(1, std::memory_order_relaxed);
      return errc::too_many_workers;
    }
    slot& s = c.slots[ctx.worker_id];
    std::string_view stream = c.options.stream;
    if (c.options.stream_per_device) {
      s.stream.assign(c.options.stream);  // the slot's buffer keeps its capacity
      s.stream.append(m.device_id.view());
      stream = s.stream;
    }
    char seq[24];
    const auto seq_end = std::to_chars(seq, seq + sizeof(seq), m.sequence).ptr;
    std::string_view argv[14];  // the optional MAXLEN triple and eleven more
    std::size_t n = 0;
    argv[n++] = "XADD";
    argv[n++] = stream;
    if (!c.max_length.empty()) {
      argv[n++] = "MAXLEN";
      argv[n++] = "~";
      argv[n++] = c.max_length;
    }
    argv[n++] = "*";
    argv[n++] = "device";
    argv[n++] = m.device_id.view();
    argv[n++] = "seq";
    argv[n++] = std::string_view(seq, static_cast<std::size_t>(seq_end - seq));
    argv[n++] = "kind";
    argv[n++] = m.kind == payload_kind::binary ? "binary" : "text";
    argv[n++] = "payload";
    argv[n++] = m.payload.view();
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(s.m);
      ticket = ++s.issued;
    }
    c.conn->command(std::span<const std::string_view>(argv, n), &streams_sink::on_reply, &s);
    std::unique_lock lock(s.m);
    if (!s.cv.wait_for(lock, c.options.reply_timeout, [&] { return s.answered >= ticket; })) {
      lock.unlock();
      c.failed.fetch_add(1, std::memory_order_relaxed);
      return errc::timeout;
    }
    const std::error_code ec = s.last;
    lock.unlock();
    (ec ? c.failed : c.sent).fetch_add(1, std::memory_order_relaxed);
    return ec;
  }

  /// Entries Redis took.
  [[nodiscard]] std::uint64_t sent() const noexcept { return core_->sent.load(); }
  /// Attempts that failed (each is retried or dead-lettered by the pipeline).
  [[nodiscard]] std::uint64_t failed() const noexcept { return core_->failed.load(); }

 private:
  // One per worker: its commands are answered in order, so the reply that brings `answered` to
  // a worker's ticket is that worker's (earlier tickets were timed out and are only counted).
  struct alignas(64) slot {
    std::mutex m;
    std::condition_variable cv;
    std::uint64_t issued = 0;
    std::uint64_t answered = 0;
    std::error_code last;
    std::string stream;
  };

  static void on_reply(void* user, std::error_code ec, const redisReply* /*r*/) {
    auto* s = static_cast<slot*>(user);
    {
      std::lock_guard lock(s->m);
      ++s->answered;
      s->last = ec;
    }
    s->cv.notify_all();
  }

  // Everything the sink holds, behind one pointer so the sink can move into a pipeline.
  struct core {
    core(connection& c, streams_sink_options o)
        : conn(&c), options(std::move(o)), slots(std::make_unique<slot[]>(options.max_workers)) {
      if (options.max_length != 0) max_length = std::to_string(options.max_length);
    }
    connection* conn;
    const streams_sink_options options;
    std::string max_length;
    std::unique_ptr<slot[]> slots;
    std::atomic<std::uint64_t> sent{0};
    std::atomic<std::uint64_t> failed{0};
  };

  std::unique_ptr<core> core_;
};

static_assert(sink<streams_sink>);

}  // namespace devgate::redis
