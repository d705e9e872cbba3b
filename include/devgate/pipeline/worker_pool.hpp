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

/// Runtime knobs of the worker pool (part of `pipeline_options`).
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

/// Worker pool policy: a fixed number of workers.
struct fixed_pool {
  static constexpr bool scales = false;  ///< Never adds or retires workers.
};
/// Worker pool policy: min..max workers, scaling up on sustained backlog or latency and down
/// after idle time.
struct dynamic_pool {
  static constexpr bool scales = true;  ///< Adds and retires workers.
};

/// A pool policy says whether the pool scales. Requirement: `P::scales` is a constant bool.
template <class P>
concept pool_policy = requires {
  { P::scales } -> std::convertible_to<bool>;
  requires std::same_as<decltype(P::scales), const bool>;
};

/// The threads that run workers. Each worker has a stable id (its slot, 0..max_workers-1) for
/// its whole life; a retired worker's slot is reused by the next worker the pool adds.
template <pool_policy Policy>
class worker_pool {
 public:
  /// Validates `options` (std::invalid_argument with the reason on misuse).
  explicit worker_pool(const pool_options& options) : options_(options) {
    if constexpr (Policy::scales) {
      if (options.min_workers == 0) {
        throw std::invalid_argument(
            "devgate: pool_options.min_workers must be >= 1 (a worker drains on stop)");
      }
      if (options.max_workers < options.min_workers) {
        throw std::invalid_argument("devgate: pool_options.max_workers must be >= min_workers");
      }
    } else if (options.workers == 0) {
      throw std::invalid_argument("devgate: pool_options.workers must be >= 1");
    }
    slots_.resize(max_workers());
    running_ = std::make_unique<std::atomic<bool>[]>(max_workers());
  }
  worker_pool(const worker_pool&) = delete;
  worker_pool& operator=(const worker_pool&) = delete;
  ~worker_pool() { join_all(); }

  /// Number of worker slots (the largest worker id + 1).
  [[nodiscard]] std::size_t max_workers() const noexcept {
    return Policy::scales ? options_.max_workers : options_.workers;
  }
  /// Workers started by `start`.
  [[nodiscard]] std::size_t initial_workers() const noexcept {
    return Policy::scales ? options_.min_workers : options_.workers;
  }
  /// Workers running now.
  [[nodiscard]] std::size_t alive() const noexcept {
    return alive_.load(std::memory_order_relaxed);
  }

  /// Starts the initial workers, each running `body(id)`.
  void start(std::function<void(std::size_t)> body) {
    body_ = std::move(body);
    for (std::size_t i = 0; i < initial_workers(); ++i) try_spawn();
  }

  /// A dynamic pool's workers report after each batch whether the pipeline looks hot; a worker
  /// is added once it has stayed hot for `scale_up_after`.
  void observe(bool hot, clock::time_point now) {
    if constexpr (Policy::scales) {
      const auto ticks = now.time_since_epoch().count();
      auto since = hot_since_.load(std::memory_order_relaxed);
      if (!hot) {
        if (since != 0) hot_since_.store(0, std::memory_order_relaxed);
        return;
      }
      if (since == 0) {
        hot_since_.compare_exchange_strong(since, ticks, std::memory_order_relaxed);
        return;
      }
      if (clock::duration(ticks - since) < options_.scale_up_after) return;
      if (alive() >= options_.max_workers) return;
      if (hot_since_.compare_exchange_strong(since, 0, std::memory_order_relaxed)) try_spawn();
    } else {
      (void)hot;
      (void)now;
    }
  }

  /// Called by an idle worker: true if it may retire (and it is then no longer counted alive).
  [[nodiscard]] bool try_retire() {
    if constexpr (Policy::scales) {
      std::lock_guard lock(mutex_);
      const auto n = alive_.load(std::memory_order_relaxed);
      if (n > options_.min_workers) {
        alive_.store(n - 1, std::memory_order_relaxed);
        return true;
      }
    }
    return false;
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
    if (stopping_ || alive() >= max_workers()) return false;
    for (std::size_t id = 0; id < slots_.size(); ++id) {
      auto& slot = slots_[id];
      if (slot.joinable()) {
        if (!finished(id)) continue;
        slot.join();  // a retired worker: its thread has left the body and is ending
      }
      running_[id].store(true, std::memory_order_relaxed);
      alive_.fetch_add(1, std::memory_order_relaxed);
      slot = std::thread([this, id] {
        body_(id);
        running_[id].store(false, std::memory_order_release);
      });
      return true;
    }
    return false;
  }
  [[nodiscard]] bool finished(std::size_t id) const noexcept {
    return !running_[id].load(std::memory_order_acquire);
  }

  pool_options options_;
  std::function<void(std::size_t)> body_;
  std::mutex mutex_;
  std::condition_variable exited_cv_;
  std::vector<std::thread> slots_;
  std::unique_ptr<std::atomic<bool>[]> running_;  // slot id -> its thread is still in the body
  std::atomic<std::size_t> alive_{0};
  std::atomic<clock::rep> hot_since_{0};
  bool stopping_ = false;
};

}  // namespace devgate
