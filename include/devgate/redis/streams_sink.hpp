#pragma once

#include <algorithm>           // std::fill
#include <atomic>              // counters
#include <charconv>            // numbers as text
#include <chrono>              // the reply deadline
#include <condition_variable>  // a worker waits for its reply
#include <cstddef>             // std::size_t
#include <cstdint>             // counters
#include <memory>              // the slots
#include <mutex>               // a slot's state
#include <span>                // batch results
#include <string>              // stream names
#include <string_view>         // argv
#include <system_error>        // results
#include <utility>             // std::move, std::pair
#include <vector>              // the devices failed in a batch

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
/// commands of all workers share the connection, pipelined. It is a `batch_sink`: the pipeline
/// hands it each share of a worker's batch, whose XADDs go out together and are waited for once
/// (`consume` remains for retries: one in flight).
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
    std::uint64_t ticket = 0;
    {
      std::lock_guard lock(s.m);
      ticket = ++s.issued;
      s.awaited = ticket;
    }
    send(c, s, m);
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

  /// Appends a worker's share whole: one XADD per message, all pipelined at once, then one wait
  /// (at most `reply_timeout`) for every answer. A device's messages after one of its failures
  /// are reported failed too, so the pipeline retries them in order after it (Redis may have
  /// taken them: at-least-once).
  void consume_batch(message_batch batch, dispatch_context& ctx,
                     std::span<std::error_code> results) {
    core& c = *core_;
    const std::size_t n = batch.size();
    if (ctx.worker_id >= c.options.max_workers) {
      c.failed.fetch_add(n, std::memory_order_relaxed);
      std::fill(results.begin(), results.end(), make_error_code(errc::too_many_workers));
      return;
    }
    slot& s = c.slots[ctx.worker_id];
    // Unanswered at the deadline: timed out. Replies overwrite these as they come.
    std::fill(results.begin(), results.end(), make_error_code(errc::timeout));
    std::uint64_t last = 0;
    {
      std::lock_guard lock(s.m);
      s.batch_first = s.issued + 1;
      s.issued += n;
      last = s.awaited = s.issued;
      s.batch_results = results.data();
      s.batch_size = n;
    }
    for (const message& m : batch) send(c, s, m);
    {
      std::unique_lock lock(s.m);
      s.cv.wait_for(lock, c.options.reply_timeout, [&] { return s.answered >= last; });
      s.batch_results = nullptr;  // a late reply must not write into `results`
    }
    // The prefix rule per device (failures are rare: the list is usually empty).
    auto& failed = s.failed_devices;
    failed.clear();
    std::uint64_t bad = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::string_view device = batch[i].device_id.view();
      if (results[i]) {
        ++bad;
        bool known = false;
        for (const auto& f : failed) known = known || f.first == device;
        if (!known) failed.emplace_back(device, results[i]);
      } else if (!failed.empty()) {
        for (const auto& f : failed) {
          if (f.first != device) continue;
          results[i] = f.second;
          ++bad;
          break;
        }
      }
    }
    failed.clear();
    c.failed.fetch_add(bad, std::memory_order_relaxed);
    c.sent.fetch_add(n - bad, std::memory_order_relaxed);
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
    std::uint64_t awaited = 0;  // the ticket the worker waits for: earlier replies do not wake it
    std::error_code last;
    // The batch being answered: the reply to ticket batch_first + i is batch_results[i].
    std::uint64_t batch_first = 0;
    std::error_code* batch_results = nullptr;
    std::size_t batch_size = 0;
    std::string stream;  // the stream name, per device
    std::vector<std::pair<std::string_view, std::error_code>> failed_devices;
  };

  static void on_reply(void* user, std::error_code ec, const redisReply* /*r*/) {
    auto* s = static_cast<slot*>(user);
    bool wake = false;
    {
      std::lock_guard lock(s->m);
      const std::uint64_t ticket = ++s->answered;
      s->last = ec;
      if (s->batch_results != nullptr && ticket >= s->batch_first &&
          ticket - s->batch_first < s->batch_size) {
        s->batch_results[ticket - s->batch_first] = ec;
      }
      wake = ticket >= s->awaited;
    }
    if (wake) s->cv.notify_all();
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

  // Hands `m`'s XADD to the connection (encoded on this thread; answered through `on_reply`).
  static void send(core& c, slot& s, const message& m) {
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
    c.conn->command(std::span<const std::string_view>(argv, n), &streams_sink::on_reply, &s);
  }

  std::unique_ptr<core> core_;
};

static_assert(batch_sink<streams_sink>);

}  // namespace devgate::redis
