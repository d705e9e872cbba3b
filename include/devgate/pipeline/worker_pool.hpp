#pragma once

#include <atomic>              // alive count, scale-up timer
#include <chrono>              // thresholds
#include <concepts>            // pool_policy
#include <condition_variable>  // waiting for workers to exit
#include <cstddef>             // std::size_t
#include <cstdint>             // timer ticks
#include <functional>          // the worker body (set once at start)
#include <memory>              // running flags
#include <mutex>               // slot table
#include <stdexcept>           // std::invalid_argument at set-up
#include <thread>              // workers
#include <vector>              // slots

#include "devgate/transport/transport.hpp"

namespace devgate {

/// Runtime knobs of the worker pool (part of `pipeline_options`). Each pool policy reads the
/// fields it needs; a policy of your own may read any of them.
struct pool_options {
  /// Workers of a `fixed_pool`.
  std::size_t workers = 2;
  /// Fewest workers a `dynamic_pool` keeps (at least 1: someone must drain on stop).
  std::size_t min_workers = 1;
  /// Most workers a `dynamic_pool` runs; worker ids are 0..max_workers-1.
  std::size_t max_workers = 4;
  /// A dynamic pool is "hot" while more than this many messages wait...
  std::size_t scale_up_backlog = 1024;
  /// ...or while a message waited longer than this from enqueue to dispatch.
  std::chrono::microseconds scale_up_latency{2000};
  /// It adds one worker when it has stayed hot this long (hysteresis against bursts of a few ms).
  std::chrono::milliseconds scale_up_after{10};
  /// A dynamic-pool worker that found no work for this long retires (down to `min_workers`).
  /// Much longer than `scale_up_after`, so the pool does not flap.
  std::chrono::milliseconds idle_before_retire{500};
};

/// What a worker tells the pool policy after each batch it dispatched.
struct pool_sample {
  std::size_t backlog = 0;  ///< Messages accepted and not yet dispatched (the pipeline's depth).
  /// Longest a message of the batch waited between enqueue and dispatch.
  std::chrono::nanoseconds oldest_wait{0};
  std::size_t alive = 0;    ///< Workers running now (this one included).
  clock::time_point now{};  ///< When the batch ended.
};

/// A pool policy decides how many workers run. `worker_pool` holds one instance, built from
/// `pipeline_options::pool`, and asks it at these points:
/// - construction from `const pool_options&`: check the fields it uses and throw
///   std::invalid_argument naming the field on misuse;
/// - `p.max_workers()`: worker slots (ids 0..max_workers()-1), read once at construction;
/// - `p.initial_workers()`: workers `start` runs, in 1..max_workers(), read once;
/// - `p.add_worker(sample)`: after every batch, from every worker at once: true asks for one
///   more worker (the pool adds none past `max_workers()`). It is on the dispatch path: no lock,
///   no allocation, no system call there (a relaxed atomic is fine);
/// - `p.idle_wait()`: how long a worker with nothing to do sleeps before it asks `may_retire`;
///   `clock::duration::max()` sleeps until woken and never asks;
/// - `p.may_retire(alive)`: may an idle worker leave, `alive` workers running? Asked under the
///   pool's mutex, one worker at a time; the pool never lets the last worker go.
/// A `Traits::pool_type` that does not fit stops the build with: "devgate::pipeline:
/// Traits::pool_type must be a pool policy such as devgate::dynamic_pool or devgate::fixed_pool
/// (requirements in worker_pool.hpp)".
template <class P>
concept pool_policy = std::constructible_from<P, const pool_options&> &&
    requires(P& p, const P& cp, const pool_sample& sample, std::size_t alive) {
  { cp.max_workers() } -> std::convertible_to<std::size_t>;
  { cp.initial_workers() } -> std::convertible_to<std::size_t>;
  { p.add_worker(sample) } -> std::same_as<bool>;
  { cp.idle_wait() } -> std::convertible_to<clock::duration>;
  { p.may_retire(alive) } -> std::same_as<bool>;
};

/// Worker pool policy: `pool_options::workers` workers, started together, never added or retired;
/// idle workers sleep until work comes.
class fixed_pool {
 public:
  /// Checks `workers` (std::invalid_argument when it is 0).
  explicit fixed_pool(const pool_options& options) : workers_(options.workers) {
    if (workers_ == 0) throw std::invalid_argument("devgate: pool_options.workers must be >= 1");
  }
  /// `workers`.
  [[nodiscard]] std::size_t max_workers() const noexcept { return workers_; }
  /// `workers`: all of them from the start.
  [[nodiscard]] std::size_t initial_workers() const noexcept { return workers_; }
  /// Never adds one.
  static constexpr bool add_worker(const pool_sample& /*unused*/) noexcept { return false; }
  /// Sleeps until woken.
  static constexpr clock::duration idle_wait() noexcept { return clock::duration::max(); }
  /// Never retires one.
  static constexpr bool may_retire(std::size_t /*unused*/) noexcept { return false; }

 private:
  std::size_t workers_;
};

/// Worker pool policy: `min_workers..max_workers` workers. The pipeline is hot while more than
/// `scale_up_backlog` messages wait or a batch held one that waited longer than
/// `scale_up_latency`; hot for `scale_up_after` adds a worker. A worker idle for
/// `idle_before_retire` retires, down to `min_workers`. The asymmetry (10 ms against 500 ms by
/// default) is the hysteresis that keeps the pool from flapping.
class dynamic_pool {
 public:
  /// Checks `min_workers` and `max_workers` (std::invalid_argument on misuse).
  explicit dynamic_pool(const pool_options& options) : options_(options) {
    if (options.min_workers == 0) {
      throw std::invalid_argument(
          "devgate: pool_options.min_workers must be >= 1 (a worker drains on stop)");
    }
    if (options.max_workers < options.min_workers) {
      throw std::invalid_argument("devgate: pool_options.max_workers must be >= min_workers");
    }
  }
  /// `max_workers`.
  [[nodiscard]] std::size_t max_workers() const noexcept { return options_.max_workers; }
  /// `min_workers`.
  [[nodiscard]] std::size_t initial_workers() const noexcept { return options_.min_workers; }
  /// True once the pipeline has stayed hot for `scale_up_after` (then the clock restarts, so
  /// workers are added one per `scale_up_after` while it stays hot). Lock-free: one relaxed
  /// load per batch, a store or CAS only when hot starts, ends or lasts long enough.
  bool add_worker(const pool_sample& s) noexcept {
    const bool hot =
        s.backlog > options_.scale_up_backlog || s.oldest_wait > options_.scale_up_latency;
    const auto ticks = s.now.time_since_epoch().count();
    auto since = hot_since_.load(std::memory_order_relaxed);
    if (!hot) {
      if (since != 0) hot_since_.store(0, std::memory_order_relaxed);
      return false;
    }
    if (since == 0) {
      hot_since_.compare_exchange_strong(since, ticks, std::memory_order_relaxed);
      return false;
    }
    if (clock::duration(ticks - since) < options_.scale_up_after) return false;
    if (s.alive >= options_.max_workers) return false;
    // One worker wins the CAS: one addition per hot period.
    return hot_since_.compare_exchange_strong(since, 0, std::memory_order_relaxed);
  }
  /// `idle_before_retire`.
  [[nodiscard]] clock::duration idle_wait() const noexcept { return options_.idle_before_retire; }
  /// True above `min_workers`.
  [[nodiscard]] bool may_retire(std::size_t alive) const noexcept {
    return alive > options_.min_workers;
  }

 private:
  pool_options options_;
  std::atomic<clock::rep> hot_since_{0};  // when the pipeline turned hot (0: it is not)
};

static_assert(pool_policy<fixed_pool>);
static_assert(pool_policy<dynamic_pool>);

/// The threads that run workers. Each worker has a stable id (its slot, 0..max_workers-1) for
/// its whole life; a retired worker's slot is reused by the next worker the pool adds. How many
/// run, and when one is added or retires, is the `Policy`'s decision (see `pool_policy`).
template <pool_policy Policy>
class worker_pool {
 public:
  /// Builds the policy from `options` (it throws std::invalid_argument on misuse).
  explicit worker_pool(const pool_options& options)
      : policy_(options),
        max_workers_(policy_.max_workers()),
        initial_workers_(policy_.initial_workers()) {
    if (initial_workers_ == 0 || initial_workers_ > max_workers_) {
      throw std::invalid_argument(
          "devgate: a pool policy must give 1 <= initial_workers() <= max_workers()");
    }
    slots_.resize(max_workers_);
    running_ = std::make_unique<std::atomic<bool>[]>(max_workers_);
  }
  worker_pool(const worker_pool&) = delete;
  worker_pool& operator=(const worker_pool&) = delete;
  ~worker_pool() { join_all(); }

  /// Number of worker slots (the largest worker id + 1).
  [[nodiscard]] std::size_t max_workers() const noexcept { return max_workers_; }
  /// Workers started by `start`.
  [[nodiscard]] std::size_t initial_workers() const noexcept { return initial_workers_; }
  /// Workers running now.
  [[nodiscard]] std::size_t alive() const noexcept {
    return alive_.load(std::memory_order_relaxed);
  }
  /// The policy (for inspection; workers call it concurrently while running).
  [[nodiscard]] Policy& policy() noexcept { return policy_; }

  /// Starts the initial workers, each running `body(id)` (std::system_error when the system
  /// has no thread to give).
  void start(std::function<void(std::size_t)> body) {
    body_ = std::move(body);
    for (std::size_t i = 0; i < initial_workers_; ++i) try_spawn();
  }

  /// A worker reports the batch it just dispatched (`sample.alive` is filled in here); the pool
  /// adds a worker when the policy asks for one (if the system gives no thread, it adds none).
  /// Only adding one takes the pool's mutex.
  void observe(pool_sample sample) noexcept {
    sample.alive = alive();
    try {
      if (policy_.add_worker(sample)) try_spawn();
    } catch (...) {
      // No thread to be had now (or a policy that threw): the workers running carry on, and a
      // worker asking for help from its dispatch loop is not thrown at (it holds capacity).
    }
  }

  /// How long an idle worker sleeps before `try_retire` (`clock::duration::max()`: until woken).
  [[nodiscard]] clock::duration idle_wait() const noexcept { return policy_.idle_wait(); }

  /// Called by a worker that stayed idle for `idle_wait()`: true if it may retire (and it is
  /// then no longer counted alive). The last worker never retires: someone must see new work.
  [[nodiscard]] bool try_retire() {
    std::lock_guard lock(mutex_);
    const auto n = alive_.load(std::memory_order_relaxed);
    if (n <= 1 || !policy_.may_retire(n)) return false;
    alive_.store(n - 1, std::memory_order_relaxed);
    return true;
  }

  /// Called by a worker leaving for any other reason than retiring.
  void exited() {
    {
      std::lock_guard lock(mutex_);
      alive_.fetch_sub(1, std::memory_order_relaxed);
    }
    exited_cv_.notify_all();
  }

  /// Waits until every worker left or `deadline` passed; true if all left.
  bool wait_exited_until(clock::time_point deadline) {
    std::unique_lock lock(mutex_);
    return exited_cv_.wait_until(lock, deadline, [&] { return alive() == 0; });
  }

  /// Stops adding workers and joins every thread (workers must be on their way out).
  void join_all() {
    std::vector<std::thread> threads;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      for (auto& t : slots_) {
        if (t.joinable()) threads.push_back(std::move(t));
      }
    }
    for (auto& t : threads) t.join();
  }

 private:
  bool try_spawn() {
    std::lock_guard lock(mutex_);
    if (stopping_ || alive() >= max_workers_) return false;
    for (std::size_t id = 0; id < slots_.size(); ++id) {
      auto& slot = slots_[id];
      if (slot.joinable()) {
        if (!finished(id)) continue;
        slot.join();  // a retired worker: its thread has left the body and is ending
      }
      running_[id].store(true, std::memory_order_relaxed);
      alive_.fetch_add(1, std::memory_order_relaxed);
      try {
        slot = std::thread([this, id] {
          body_(id);
          running_[id].store(false, std::memory_order_release);
        });
      } catch (...) {
        // No thread to be had (a process or memory limit): the slot stays free.
        running_[id].store(false, std::memory_order_relaxed);
        alive_.fetch_sub(1, std::memory_order_relaxed);
        throw;
      }
      return true;
    }
    return false;
  }
  [[nodiscard]] bool finished(std::size_t id) const noexcept {
    return !running_[id].load(std::memory_order_acquire);
  }

  Policy policy_;
  std::size_t max_workers_;
  std::size_t initial_workers_;
  std::function<void(std::size_t)> body_;
  std::mutex mutex_;
  std::condition_variable exited_cv_;
  std::vector<std::thread> slots_;
  std::unique_ptr<std::atomic<bool>[]> running_;  // slot id -> its thread is still in the body
  std::atomic<std::size_t> alive_{0};
  bool stopping_ = false;
};

}  // namespace devgate
