#pragma once

#include <condition_variable>  // waking the thread to stop
#include <mutex>               // the stop flag
#include <thread>              // the timer thread
#include <utility>             // std::move

#include "devgate/transport/transport.hpp"  // clock

namespace devgate::firmware::detail {

/// A thread that calls a function every `period` until it is stopped (or destroyed), for the
/// rollout engine's stall check. An exception from the function is dropped: the next call
/// runs as usual.
class ticker {
 public:
  ticker() = default;
  ticker(const ticker&) = delete;
  ticker& operator=(const ticker&) = delete;
  ~ticker() { stop(); }

  /// Starts calling `f()` every `period`; nothing if already started.
  template <class F>
  void start(clock::duration period, F f) {
    std::lock_guard lock(mutex_);
    if (thread_.joinable() || stopping_) return;
    thread_ = std::thread([this, period, f = std::move(f)]() mutable {
      std::unique_lock lock(mutex_);
      while (!stopping_) {
        if (wake_.wait_for(lock, period, [this] { return stopping_; })) break;
        lock.unlock();
        try {
          f();
        } catch (...) {  // the stall check runs again at the next period
        }
        lock.lock();
      }
    });
  }
  /// Stops the thread and waits for it (a call in progress finishes first).
  void stop() {
    std::thread t;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      t = std::move(thread_);
    }
    wake_.notify_all();
    if (t.joinable()) t.join();
  }
  /// Whether the thread runs.
  [[nodiscard]] bool running() const {
    std::lock_guard lock(mutex_);
    return thread_.joinable();
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace devgate::firmware::detail
