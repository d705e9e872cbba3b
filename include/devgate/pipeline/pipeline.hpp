#pragma once

#include <algorithm>           // std::min, std::max
#include <atomic>              // counters and flags
#include <bit>                 // std::bit_ceil
#include <chrono>              // timestamps, backoff
#include <condition_variable>  // interruptible retry backoff
#include <cstddef>             // std::size_t
#include <cstdint>             // counters
#include <exception>           // host handlers' exceptions, contained
#include <functional>          // dead-letter and drop handlers (rare paths only)
#include <memory>              // per-worker statistics
#include <mutex>               // backoff sleep, stop
#include <optional>            // stop deadline
#include <span>                // push_bulk batches
#include <stdexcept>           // std::invalid_argument at set-up
#include <string>              // Prometheus text
#include <system_error>        // results
#include <thread>              // std::this_thread::yield
#include <type_traits>         // static checks
#include <utility>             // std::move
#include <vector>              // handed-back messages

#include "devgate/core/error.hpp"
#include "devgate/pipeline/demand.hpp"
#include "devgate/pipeline/detail/eventcount.hpp"
#include "devgate/pipeline/detail/network_thread.hpp"
#include "devgate/pipeline/fetcher.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/metrics.hpp"
#include "devgate/pipeline/queue.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/pipeline/worker_pool.hpp"

namespace devgate {

/// The pipeline's policy types. Derive and override what you need:
/// `struct my_traits : devgate::pipeline_traits { using pool_type = devgate::fixed_pool; };`
struct pipeline_traits {
  /// Where accepted messages wait: `lockfree_queue` (moodycamel) or `locked_queue` (mutex+deque).
  using queue_type = lockfree_queue;
  /// How many messages a worker asks for: `adaptive_demand` or `fixed_demand<N>`.
  using demand_type = adaptive_demand;
  /// How many workers run: `dynamic_pool` (min..max), `fixed_pool`, or a `pool_policy` of yours.
  using pool_type = dynamic_pool;
};

/// The pipeline's runtime knobs, checked at construction (std::invalid_argument on misuse).
struct pipeline_options {
  /// Most messages held at once (queued plus being dispatched). Memory is bounded by this times
  /// the payload size; past it, `overflow` applies.
  std::size_t capacity = 1u << 16;
  /// What a push does at capacity: reject, drop the oldest, or block up to `block_timeout`.
  /// A push from a network thread never waits: `gateway::start` refuses `block` with a transport
  /// that delivers on network threads (`errc::would_block`), and there `drop_oldest` makes one
  /// eviction pass instead of waiting for an evictable message.
  overflow_policy overflow = overflow_policy::reject;
  /// Longest a `block` push waits for room (and a `drop_oldest` push off a network thread waits
  /// for an evictable message while workers hold every partition) before it is rejected.
  std::chrono::milliseconds block_timeout{100};
  /// Partitions (hash of device id). More partitions let more workers run in parallel while
  /// each device's messages stay in order; each partition costs one queue. A worker dispatches
  /// from one partition at a time, so fewer partitions than `pool.max_workers` would cap how
  /// many messages are dispatched at once: the pipeline raises the count to `max_workers`
  /// (rounded up to a power of two) when it is below it.
  std::size_t partitions = 32;
  /// Worker counts and scaling thresholds.
  pool_options pool;
  /// Batch sizes and the latency target of the adaptive demand.
  demand_options demand;
  /// Failed sink attempts retried per message before it is dead-lettered.
  unsigned retry_limit = 3;
  /// Wait before the first retry; doubles per retry up to `retry_backoff_max`. A retrying
  /// message holds back the later messages of its partition (that keeps per-device order).
  std::chrono::microseconds retry_backoff{1000};
  /// Longest wait between retries.
  std::chrono::microseconds retry_backoff_max{100000};
  /// How long an idle worker keeps looking for work (yielding the CPU between looks) before it
  /// sleeps. Under steady traffic this keeps workers awake between messages, so producers do
  /// not pay a futex wake-up (a system call and a context switch) per push; the price is up to
  /// this much CPU per idle period. 0 sleeps at once (lowest idle CPU, slowest under load).
  std::chrono::microseconds idle_spin{50};
  /// Receives each message that failed `retry_limit + 1` times, with the last error
  /// (`errc::handler_threw` when the sink threw), on the worker thread. If it throws, the
  /// exception is caught and counted, and the message is counted lost.
  std::function<void(const message&, std::error_code)> dead_letter;
  /// Receives each message `drop_oldest` evicted (they are also counted), on the pushing thread.
  /// If it throws, the exception is caught and counted; the push still succeeds.
  std::function<void(const message&)> on_dropped;
};

/// What `pipeline::push_bulk` did with a batch: its first `accepted` messages were taken (moved
/// from) in order; the rest were left untouched, for the reason in `error`.
struct push_bulk_result {
  std::size_t accepted = 0;  ///< How many messages, from the front of the batch, were accepted.
  std::error_code error;     ///< Empty when all were; else `errc::queue_full` or `errc::closed`.
};

/// Queue -> fetcher<demand> -> worker pool -> sink, without a transport: host code or a
/// transport pushes messages, workers dispatch them to the sink.
template <class Sink, class Traits = pipeline_traits>
class pipeline {
  static_assert(sink<Sink>,
                "devgate::pipeline: Sink needs `std::error_code consume(const devgate::message&, "
                "devgate::dispatch_context&)` (wrap a lambda in devgate::callback_sink)");
  static_assert(queue_policy<typename Traits::queue_type>,
                "devgate::pipeline: Traits::queue_type must be a queue policy such as "
                "devgate::lockfree_queue or devgate::locked_queue (requirements in queue.hpp)");
  static_assert(
      demand_policy<typename Traits::demand_type>,
      "devgate::pipeline: Traits::demand_type must be a demand policy such as "
      "devgate::adaptive_demand or devgate::fixed_demand<N> (requirements in demand.hpp)");
  static_assert(pool_policy<typename Traits::pool_type>,
                "devgate::pipeline: Traits::pool_type must be a pool policy such as "
                "devgate::dynamic_pool or devgate::fixed_pool (requirements in worker_pool.hpp)");

  using fetcher_type = fetcher<typename Traits::queue_type, typename Traits::demand_type>;
  using pool_type = worker_pool<typename Traits::pool_type>;

 public:
  /// A producing thread's private path in (producer tokens for every partition): faster than
  /// `push(message)` for a thread that pushes often. Use from one thread at a time.
  using producer = typename fetcher_type::producer;

  /// Checks `options` and builds the pipeline; workers start with `start()`.
  explicit pipeline(Sink sink, pipeline_options options = {})
      : options_(checked(std::move(options))),
        sink_(std::forward<Sink>(sink)),
        pool_(options_.pool),
        fetcher_(cover_workers(options_.partitions, pool_.max_workers()), pool_.max_workers(),
                 options_.demand) {
    stats_.reserve(pool_.max_workers());
    for (std::size_t i = 0; i < pool_.max_workers(); ++i) {
      stats_.push_back(std::make_unique<worker_stats>());
    }
  }
  pipeline(const pipeline&) = delete;
  pipeline& operator=(const pipeline&) = delete;
  /// Stops and drains (every accepted message reaches the sink or the dead-letter handler).
  ~pipeline() { stop(); }

  /// Lets sinks reply through a transport (the gateway sets this before `start`).
  void set_reply_channel(const reply_channel* channel) noexcept { channel_ = channel; }

  /// Starts the workers. Messages pushed before `start` wait for them. `errc::already_running`
  /// when running, `errc::closed` after `stop` (a pipeline does not restart).
  std::error_code start() {
    std::lock_guard lock(lifecycle_);
    if (stopped_) return errc::closed;
    if (started_) return errc::already_running;
    started_ = true;
    pool_.start([this](std::size_t id) { worker_main(id); });
    return {};
  }

  /// A new producer for the calling thread.
  [[nodiscard]] producer make_producer() { return producer(fetcher_); }

  /// Accepts `m` (through the calling thread's implicit producer). Returns `errc::closed` after
  /// `stop`, `errc::queue_full` when the overflow policy refuses it.
  std::error_code push(message&& m) {
    return push_impl(std::move(m), [this](std::uint32_t p, message&& msg) {
      fetcher_.enqueue(p, std::move(msg));
    });
  }
  /// Accepts `m` through `prod` (see `producer`).
  std::error_code push(message&& m, producer& prod) {
    return push_impl(std::move(m), [this, &prod](std::uint32_t p, message&& msg) {
      fetcher_.enqueue(p, std::move(msg), prod);
    });
  }

  /// Accepts a batch through `prod` (a transport that decoded several messages in one read hands
  /// them over at once): one timestamp, one capacity reservation, and per partition one ticket
  /// range and one bulk enqueue for the whole batch, instead of one of each per message.
  ///
  /// Messages are accepted in order, as a prefix of `batch`: a message is never accepted after
  /// an earlier one of the batch was refused, so per-device order holds as with `push`. What
  /// does not fit right away goes through the overflow policy message by message (`block`
  /// waits, `drop_oldest` evicts); on the first refusal the rest of the batch is left untouched,
  /// counted in `devgate_rejected_total` (one per message) and reported as `errc::queue_full`.
  /// After `stop`, nothing is accepted and the result is `errc::closed`.
  push_bulk_result push_bulk(std::span<message> batch, producer& prod) {
    const std::size_t n = batch.size();
    if (n == 0) return {};
    if (!accepting_.load(std::memory_order_acquire)) return {0, errc::closed};
    // The batch arrived together: one clock reading stamps all of it.
    const auto now = clock::now();
    for (auto& m : batch) {
      m.enqueued = now;
      if (m.received == clock::time_point{}) m.received = now;
    }
    const std::size_t fit = reserve_up_to(n);
    if (fit != 0) {
      // Pairs with stop() exactly as in push_impl.
      if (!accepting_.load(std::memory_order_seq_cst)) {
        release(static_cast<std::int64_t>(fit));
        return {0, errc::closed};
      }
      const auto touched = fetcher_.enqueue_bulk(batch.data(), fit, prod);
      // Work for several partitions can keep several workers busy.
      if (touched > 1) {
        work_.notify_all_after_sc_rmw();  // ticket RMWs are seq_cst, as in push_impl
      } else {
        work_.notify_one_after_sc_rmw();
      }
    }
    for (std::size_t i = fit; i < n; ++i) {
      if (auto ec = push(std::move(batch[i]), prod); ec) {
        // push counted message i; the untouched rest of the batch is refused with it.
        if (ec == errc::queue_full) {
          rejected_.fetch_add(static_cast<std::uint64_t>(n - i - 1), std::memory_order_relaxed);
        }
        return {i, ec};
      }
    }
    return {n, {}};
  }

  /// Stops intake (pushes get `errc::closed`), dispatches every accepted message, joins workers.
  void stop() { (void)stop_impl(std::nullopt); }
  /// Like `stop()`, but at `deadline` workers finish the message in hand and stop; whatever is
  /// left undispatched is returned (in order per device) instead of lost.
  [[nodiscard]] std::vector<message> stop(clock::time_point deadline) {
    return stop_impl(deadline);
  }

  /// Reads every metric.
  [[nodiscard]] pipeline_metrics metrics() const {
    pipeline_metrics m;
    m.enqueued = fetcher_.tickets();
    for (const auto& s : stats_) {
      m.dispatched += s->dispatched.load(std::memory_order_relaxed);
      s->batch_size.add_to(m.batch_size);
      s->latency.add_to(m.latency_ns);
    }
    m.rejected = rejected_.load(std::memory_order_relaxed);
    m.dropped = dropped_.load(std::memory_order_relaxed);
    m.retried = retried_.load(std::memory_order_relaxed);
    m.dead_lettered = dead_lettered_.load(std::memory_order_relaxed);
    m.handed_back = handed_back_.load(std::memory_order_relaxed);
    m.handler_exceptions = handler_exceptions_.load(std::memory_order_relaxed);
    m.lost = lost_.load(std::memory_order_relaxed);
    m.queue_depth = depth();
    m.workers_alive = pool_.alive();
    return m;
  }
  /// Appends the metrics in Prometheus text format.
  void render_prometheus(std::string& out) const { devgate::render_prometheus(metrics(), out); }

  /// The sink (for inspection; it is called concurrently by workers while running).
  [[nodiscard]] Sink& sink() noexcept { return sink_; }
  /// The options in force.
  [[nodiscard]] const pipeline_options& options() const noexcept { return options_; }

 private:
  // Per-worker counters: one writer each, summed on read, on their own cache lines.
  struct alignas(64) worker_stats {
    std::atomic<std::uint64_t> dispatched{0};
    detail::pipeline_atomic_histogram<batch_histogram> batch_size;
    detail::pipeline_atomic_histogram<latency_histogram> latency;
  };

  // Raises `partitions` to the worker count (a power of two) when below it, so that every
  // worker can hold a partition of its own; returns it.
  static std::size_t cover_workers(std::size_t& partitions, std::size_t workers) noexcept {
    if (partitions < workers && workers <= (std::size_t{1} << 20)) {
      partitions = std::bit_ceil(workers);
    }
    return partitions;
  }
  static pipeline_options checked(pipeline_options o) {
    if (o.capacity == 0)
      throw std::invalid_argument("devgate: pipeline_options.capacity must be >= 1");
    if (o.partitions == 0 || o.partitions > (1u << 20)) {
      throw std::invalid_argument("devgate: pipeline_options.partitions must be in 1..1048576");
    }
    if (o.demand.max_batch == 0 || o.demand.min_batch > o.demand.max_batch) {
      throw std::invalid_argument("devgate: demand_options needs 1 <= min_batch <= max_batch");
    }
    if (o.idle_spin.count() < 0) {
      throw std::invalid_argument("devgate: pipeline_options.idle_spin must be >= 0");
    }
    if (o.retry_backoff.count() < 0 || o.retry_backoff_max < o.retry_backoff) {
      throw std::invalid_argument(
          "devgate: pipeline_options needs 0 <= retry_backoff <= retry_backoff_max");
    }
    return o;
  }

  // ---- intake ----------------------------------------------------------------------------

  template <class Enqueue>
  std::error_code push_impl(message&& m, Enqueue&& enqueue) {
    if (!accepting_.load(std::memory_order_acquire)) return errc::closed;
    const auto now = clock::now();
    m.enqueued = now;
    if (m.received == clock::time_point{}) m.received = now;
    const auto p = fetcher_.partition_of(m.device_id);
    if (!try_reserve()) {
      if (auto ec = overflow(p); ec) return ec;  // on success a unit of capacity is ours
    }
    // Pairs with stop(): either stop sees our reservation (and drains it) or we see it closed.
    if (!accepting_.load(std::memory_order_seq_cst)) {
      release(1);
      return errc::closed;
    }
    enqueue(p, std::move(m));
    // The ticket RMW inside enqueue is seq_cst and workers re-check tails with seq_cst loads
    // (a worker that sees the ticket before the message waits for it instead of sleeping).
    work_.notify_one_after_sc_rmw();
    return {};
  }

  // Messages held, read from the capacity units. A push that finds the pipeline full holds a
  // unit for an instant before it gives it back (try_reserve), so the units can read one per
  // refused push above the capacity; no message stands behind those, so the reading is capped.
  [[nodiscard]] std::uint64_t depth() const noexcept {
    const auto units = queued_.load(std::memory_order_relaxed);
    if (units <= 0) return 0;
    return std::min(static_cast<std::uint64_t>(units),
                    static_cast<std::uint64_t>(options_.capacity));
  }

  bool try_reserve() noexcept {
    const auto cap = static_cast<std::int64_t>(options_.capacity);
    if (queued_.fetch_add(1, std::memory_order_seq_cst) < cap) return true;
    // Undo without waking blocked producers (no real room appeared), but a drain in progress
    // may be waiting for this transient unit to go.
    queued_.fetch_sub(1, std::memory_order_seq_cst);
    if (!accepting_.load(std::memory_order_seq_cst)) work_.notify_all();
    return false;
  }

  // Reserves up to `n` units of capacity, as many as are free; returns how many. A CAS rather
  // than fetch_add(n): a big batch must not transiently over-reserve and make another
  // producer's push fail while there is room for it.
  std::size_t reserve_up_to(std::size_t n) noexcept {
    const auto cap = static_cast<std::int64_t>(options_.capacity);
    auto cur = queued_.load(std::memory_order_relaxed);
    for (;;) {
      if (cur >= cap) return 0;
      const auto fit = std::min<std::int64_t>(static_cast<std::int64_t>(n), cap - cur);
      if (queued_.compare_exchange_weak(cur, cur + fit, std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
        return static_cast<std::size_t>(fit);
      }
    }
  }

  // Capacity units leave: wake blocked producers, and workers waiting for a drain to finish.
  void release(std::int64_t n) noexcept {
    queued_.fetch_sub(n, std::memory_order_seq_cst);
    if (options_.overflow == overflow_policy::block) space_.notify_all();
    if (!accepting_.load(std::memory_order_relaxed)) work_.notify_all();
  }

  std::error_code overflow(std::uint32_t p) {
    switch (options_.overflow) {
      case overflow_policy::reject:
        break;
      case overflow_policy::block: {
        // gateway::start refuses block on network threads; a push there that gets here anyway
        // (an intake of another gateway's) still does not wait.
        if (detail::on_network_thread) {
          if (try_reserve()) return {};
          break;
        }
        const auto deadline = clock::now() + options_.block_timeout;
        for (;;) {
          const auto key = space_.prepare_wait();
          if (!accepting_.load(std::memory_order_seq_cst)) {
            space_.cancel_wait();
            return errc::closed;
          }
          if (try_reserve()) {
            space_.cancel_wait();
            return {};
          }
          if (!space_.wait_until(key, deadline) || clock::now() >= deadline) {
            if (try_reserve()) return {};
            break;
          }
        }
        break;
      }
      case overflow_policy::drop_oldest: {
        const auto deadline = clock::now() + options_.block_timeout;
        do {
          if (!accepting_.load(std::memory_order_acquire)) return errc::closed;
          queued_message victim;
          const bool evicted = fetcher_.evict_one(p, victim);
          // Eviction claims partitions; a worker that skipped one while we held it may have gone
          // to sleep over its remaining work, and nobody else re-fetches after our release.
          work_.notify_one();
          if (evicted) {
            // The victim's unit of capacity passes to the new message.
            dropped_.fetch_add(1, std::memory_order_relaxed);
            report_dropped(victim.msg);
            return {};
          }
          if (try_reserve()) return {};
          // A network thread does not wait: the message is refused after one pass.
          if (detail::on_network_thread) break;
          std::this_thread::yield();  // every partition is being dispatched: room comes soon
        } while (clock::now() < deadline);
        break;
      }
    }
    rejected_.fetch_add(1, std::memory_order_relaxed);
    return errc::queue_full;
  }

  // The push has succeeded whatever the handler does: its exception is counted, not thrown at
  // the pushing thread (a network thread, often), which would also leak the unit of capacity
  // the evicted message passed on.
  void report_dropped(const message& m) noexcept {
    if (!options_.on_dropped) return;
    try {
      options_.on_dropped(m);
    } catch (...) {
      handler_exceptions_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // ---- workers -------------------------------------------------------------------------------

  [[nodiscard]] bool drained() const noexcept {
    return !accepting_.load(std::memory_order_seq_cst) &&
           queued_.load(std::memory_order_seq_cst) <= 0;
  }

  // A worker thread's body: nothing escapes it. Host handlers' exceptions are caught per call
  // (consume, dead_letter) and adding a worker cannot throw (worker_pool::observe); what is
  // left is the batch's allocation, before the worker holds any message, so a worker that fails
  // there only leaves the pool, and the others carry on.
  void worker_main(std::size_t id) noexcept {
    try {
      run_worker(id);
    } catch (...) {
      pool_.exited();
    }
  }

  void run_worker(std::size_t id) {
    typename fetcher_type::batch b(fetcher_.demand(id).max_demand());
    // A batch sink's results, one per message of a share (a share is at most a batch).
    std::vector<std::error_code> results;
    if constexpr (batch_sink<Sink>) results.resize(fetcher_.demand(id).max_demand());
    auto& stats = *stats_[id];
    dispatch_context ctx;
    ctx.worker_id = id;
    ctx.channel = channel_;
    // Workers start their scans at different partitions so they rarely collide on a claim.
    std::size_t cursor = id * fetcher_.partitions() / pool_.max_workers();
    for (;;) {
      if (abort_.load(std::memory_order_acquire)) break;
      if (fetch(id, b, cursor) != 0 || spin_for_work(id, b, cursor)) {
        cursor = next_cursor(b);
        if (!dispatch(id, b, ctx, stats, results)) break;
        continue;
      }
      if (drained()) break;
      const auto key = work_.prepare_wait();
      if (fetch(id, b, cursor) != 0) {
        work_.cancel_wait();
        cursor = next_cursor(b);
        if (!dispatch(id, b, ctx, stats, results)) break;
        continue;
      }
      if (b.in_flight()) {
        // A ticket is taken but its message is not visible yet: its producer may have checked
        // for sleepers before our announcement (notify_one_after_sc_rmw), so do not sleep.
        work_.cancel_wait();
        std::this_thread::yield();
        continue;
      }
      if (drained() || abort_.load(std::memory_order_acquire)) {
        work_.cancel_wait();
        break;
      }
      // The pool policy says how long an idle worker sleeps before it asks to retire.
      const auto idle = pool_.idle_wait();
      if (idle == clock::duration::max()) {
        work_.wait(key);
      } else {
        const bool woke = work_.wait_until(key, clock::now() + idle);
        if (!woke && accepting_.load(std::memory_order_acquire) && pool_.try_retire()) return;
      }
    }
    pool_.exited();
  }

  // Looks for work for up to `idle_spin`, yielding between looks (see pipeline_options). True
  // when `b` was filled. Stops early when the pipeline is stopping, so drains are not delayed.
  bool spin_for_work(std::size_t id, typename fetcher_type::batch& b, std::size_t cursor) {
    if (options_.idle_spin.count() <= 0) return false;
    const auto until = clock::now() + options_.idle_spin;
    do {
      std::this_thread::yield();
      if (!accepting_.load(std::memory_order_relaxed) || abort_.load(std::memory_order_relaxed)) {
        return false;
      }
      // One shared load first: scanning every partition's tail would pull their cache lines away
      // from producers on every look.
      if (queued_.load(std::memory_order_relaxed) > 0 && fetch(id, b, cursor) != 0) {
        return true;
      }
    } while (clock::now() < until);
    return false;
  }

  // Starts a batch. With other workers around, it is served one partition at a time so they can
  // take the partitions this worker has not reached (see fetcher::batch); a lone worker takes
  // every share in one pass. Workers counted: those alive now, and at least the initial ones
  // (they may still be starting); a worker the pool adds later sees the next batch spread.
  std::size_t fetch(std::size_t id, typename fetcher_type::batch& b, std::size_t cursor) {
    const std::size_t workers = std::max(pool_.alive(), pool_.initial_workers());
    return fetcher_.fetch(id, b, cursor, workers > 1);
  }

  std::size_t next_cursor(const typename fetcher_type::batch& b) const noexcept {
    return (b.last_partition() + 1) % fetcher_.partitions();
  }

  // Dispatches a fetched batch, one partition's share at a time (see fetcher::batch); false when
  // a stop deadline interrupted it.
  bool dispatch(std::size_t id, typename fetcher_type::batch& b, dispatch_context& ctx,
                worker_stats& stats, std::vector<std::error_code>& results) {
    // One clock reading per batch: every message of the batch is stamped with the time the
    // worker started dispatching it (see message::dispatched).
    const auto start = clock::now();
    std::size_t done = 0;
    std::uint64_t ok = 0;
    std::chrono::nanoseconds oldest{0};
    bool aborted = false;
    do {
      if constexpr (batch_sink<Sink>) {
        if (!dispatch_share(b, ctx, stats, start, oldest, results, done, ok)) {
          aborted = true;
          break;
        }
      } else {
        for (auto& item : b) {
          if (abort_.load(std::memory_order_relaxed)) {
            aborted = true;
            break;
          }
          item.msg.dispatched = start;
          const auto waited = item.msg.dispatched - item.msg.enqueued;
          if (waited > oldest) oldest = waited;
          stats.latency.record(static_cast<std::uint64_t>(waited.count()));
          ctx.partition = item.partition;
          const auto outcome = deliver(item.msg, ctx);
          if (outcome == delivery::aborted) {
            aborted = true;
            break;
          }
          ok += outcome == delivery::delivered ? 1 : 0;
          // Drop our references to the payload now, not when the slot is reused.
          item.msg = message{};
          ++done;
        }
        if (aborted) break;
      }
      // Work left in the partition just dispatched is free for another worker now; a sleeper
      // (it found every partition claimed) would not look again until the next push.
      const auto held = b.last_partition();
      fetcher_.fetch_next(b);
      if (work_.has_waiters() && fetcher_.has_work(held)) work_.notify_one();
    } while (b.size() != 0);
    end_batch(ctx);
    stats.dispatched.store(stats.dispatched.load(std::memory_order_relaxed) + ok,
                           std::memory_order_relaxed);
    stats.batch_size.record(b.taken());
    if (aborted) {
      fetcher_.give_back(b, done);  // what was not dispatched is still claimed
    } else {
      const auto end = clock::now();
      fetcher_.release(id, b, batch_feedback{b.asked(), b.taken(), end - start});
      pool_sample sample;
      sample.backlog = static_cast<std::size_t>(depth());
      sample.oldest_wait = oldest;
      sample.now = end;
      pool_.observe(sample);
    }
    if (done != 0) release(static_cast<std::int64_t>(done));
    return !aborted;
  }

  // A batch sink's share: the sink takes it whole, then each message it failed is retried on
  // its own, in order, like any failure. `done` and `ok` count as in `dispatch`. False when a
  // stop deadline interrupted it: the share's messages not dispatched are then gathered at its
  // end, and `done` stops before them, so `give_back(b, done)` hands back exactly those.
  bool dispatch_share(typename fetcher_type::batch& b, dispatch_context& ctx, worker_stats& stats,
                      clock::time_point start, std::chrono::nanoseconds& oldest,
                      std::vector<std::error_code>& results, std::size_t& done, std::uint64_t& ok) {
    if (abort_.load(std::memory_order_relaxed)) return false;
    queued_message* items = b.begin();
    const std::size_t n = b.size();
    for (std::size_t i = 0; i < n; ++i) {
      items[i].msg.dispatched = start;
      const auto waited = start - items[i].msg.enqueued;
      if (waited > oldest) oldest = waited;
      stats.latency.record(static_cast<std::uint64_t>(waited.count()));
    }
    const std::span<std::error_code> out(results.data(), n);
    std::fill(out.begin(), out.end(), std::error_code{});
    ctx.partition = items[0].partition;
    ctx.attempt = 0;
    consume_batch(message_batch(items, n), ctx, out);
    for (std::size_t i = 0; i < n; ++i) {
      auto outcome = delivery::delivered;
      if (out[i]) {
        ctx.partition = items[i].partition;
        outcome = retry(items[i].msg, ctx, out[i]);
      }
      if (outcome == delivery::aborted) {
        // This one and the later failures were not dispatched; the later successes were.
        const std::size_t left =
            fetcher_.gather_undelivered(b, i, [&](std::size_t j) { return j == i || out[j]; });
        done += n - i - left;
        ok += n - i - left;
        return false;
      }
      ok += outcome == delivery::delivered ? 1 : 0;
      items[i].msg = message{};  // drop the payload's references now
      ++done;
    }
    return true;
  }

  enum class delivery { delivered, dead_lettered, aborted };

  delivery deliver(message& m, dispatch_context& ctx) {
    ctx.attempt = 0;
    const std::error_code ec = consume(m, ctx);
    return ec ? retry(m, ctx, ec) : delivery::delivered;
  }

  // After a first attempt failed with `ec`: retries with backoff (attempts 1, 2, ...), then
  // dead-letters.
  delivery retry(message& m, dispatch_context& ctx, std::error_code ec) {
    auto backoff = options_.retry_backoff;
    for (unsigned attempt = 0;;) {
      if (attempt >= options_.retry_limit) {
        dead_lettered_.fetch_add(1, std::memory_order_relaxed);
        dead_letter(m, ec);
        return delivery::dead_lettered;
      }
      retried_.fetch_add(1, std::memory_order_relaxed);
      {
        std::unique_lock lock(abort_mutex_);
        if (abort_cv_.wait_for(lock, backoff, [&] { return abort_.load(); })) {
          // Handed back by stop(deadline): say the sink has had it.
          m.attempts += attempt + 1;
          return delivery::aborted;
        }
      }
      backoff = std::min(backoff * 2, options_.retry_backoff_max);
      ctx.attempt = ++attempt;
      ec = consume(m, ctx);
      if (!ec) return delivery::delivered;
    }
  }

  // Tells a sink that has `end_batch(dispatch_context&)` that the worker's batch is dispatched
  // (a sink may gather per batch and flush there); an exception is counted and contained.
  void end_batch(dispatch_context& ctx) noexcept {
    if constexpr (requires { sink_.end_batch(ctx); }) {
      try {
        sink_.end_batch(ctx);
      } catch (...) {
        handler_exceptions_.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
  // A share to a batch sink. An exception fails every message of it (each is then retried),
  // counted once.
  void consume_batch(message_batch batch, dispatch_context& ctx,
                     std::span<std::error_code> results) noexcept {
    try {
      sink_.consume_batch(batch, ctx, results);
    } catch (...) {
      handler_exceptions_.fetch_add(1, std::memory_order_relaxed);
      std::fill(results.begin(), results.end(), make_error_code(errc::handler_threw));
    }
  }
  // One sink attempt. An exception is that attempt's failure (retried, then dead-lettered with
  // errc::handler_threw), counted; the try costs nothing while nothing throws.
  std::error_code consume(const message& m, dispatch_context& ctx) noexcept {
    try {
      return sink_.consume(m, ctx);
    } catch (...) {
      handler_exceptions_.fetch_add(1, std::memory_order_relaxed);
      return errc::handler_threw;
    }
  }

  // A dead-letter handler that throws may not have kept the message: counted lost.
  void dead_letter(const message& m, std::error_code ec) noexcept {
    if (!options_.dead_letter) return;
    try {
      options_.dead_letter(m, ec);
    } catch (...) {
      handler_exceptions_.fetch_add(1, std::memory_order_relaxed);
      lost_.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // ---- stop ----------------------------------------------------------------------------------

  std::vector<message> stop_impl(std::optional<clock::time_point> deadline) {
    std::lock_guard lock(lifecycle_);
    std::vector<message> left;
    if (stopped_) return left;
    stopped_ = true;
    accepting_.store(false, std::memory_order_seq_cst);
    space_.notify_all();
    work_.notify_all();
    if (!started_) {
      // Nobody ran: hand back (with a deadline) or dispatch (without) what was pushed.
      if (deadline) {
        collect(left);
        return left;
      }
      started_ = true;
      pool_.start([this](std::size_t id) { worker_main(id); });
    }
    if (deadline && !pool_.wait_exited_until(*deadline)) {
      {
        std::lock_guard abort_lock(abort_mutex_);
        abort_.store(true, std::memory_order_seq_cst);
      }
      abort_cv_.notify_all();
      work_.notify_all();
    }
    pool_.join_all();
    collect(left);
    return left;
  }

  // Takes what is still held after the workers left; pushes that reserved before the close
  // are still finishing, so this waits until every unit of capacity is accounted for.
  void collect(std::vector<message>& out) {
    for (;;) {
      const auto before = out.size();
      fetcher_.drain_into(out);
      const auto got = static_cast<std::int64_t>(out.size() - before);
      if (got != 0) {
        queued_.fetch_sub(got, std::memory_order_seq_cst);
        handed_back_.fetch_add(static_cast<std::uint64_t>(got), std::memory_order_relaxed);
      }
      if (queued_.load(std::memory_order_seq_cst) <= 0) return;
      std::this_thread::yield();
    }
  }

  pipeline_options options_;
  Sink sink_;
  pool_type pool_;
  fetcher_type fetcher_;
  std::vector<std::unique_ptr<worker_stats>> stats_;
  const reply_channel* channel_ = nullptr;

  alignas(64) std::atomic<std::int64_t> queued_{0};  // accepted, not yet out (capacity units)
  alignas(64) std::atomic<bool> accepting_{true};
  std::atomic<bool> abort_{false};
  std::atomic<std::uint64_t> rejected_{0};
  std::atomic<std::uint64_t> dropped_{0};
  std::atomic<std::uint64_t> retried_{0};
  std::atomic<std::uint64_t> dead_lettered_{0};
  std::atomic<std::uint64_t> handed_back_{0};
  std::atomic<std::uint64_t> handler_exceptions_{0};
  std::atomic<std::uint64_t> lost_{0};

  detail::eventcount work_;   // workers sleep here when no partition has work
  detail::eventcount space_;  // blocked producers sleep here
  std::mutex abort_mutex_;
  std::condition_variable abort_cv_;
  std::mutex lifecycle_;
  bool started_ = false;
  bool stopped_ = false;
};

/// Deduces the sink type: `devgate::pipeline p(devgate::callback_sink(f));`.
template <class Sink>
pipeline(Sink, pipeline_options = {}) -> pipeline<Sink>;

}  // namespace devgate
