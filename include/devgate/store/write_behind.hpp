#pragma once

#include <atomic>              // error counts
#include <condition_variable>  // the store thread sleeps until there is work
#include <cstddef>             // std::size_t
#include <cstdint>             // counters
#include <deque>               // queued writes
#include <functional>          // the error handler
#include <mutex>               // the queue
#include <string>              // device ids, versions
#include <string_view>         // operation names
#include <system_error>        // results
#include <thread>              // the store thread
#include <type_traits>         // choosing inline or queued
#include <utility>             // std::move

#include "devgate/store/state_store.hpp"

namespace devgate::store {

/// Called for each store error: the operation (`"load"`, `"touch"`, ...), the device and the
/// error (`std::errc::io_error` for an exception the store threw, `std::errc::no_buffer_space`
/// for a write dropped because the queue was full).
using store_error_handler =
    std::function<void(std::string_view operation, const std::string& id, std::error_code)>;

/// The hub's way to its state store, so that no network thread waits for a store that may
/// block. For a store that says it never blocks (`is_nonblocking_store`, e.g.
/// `memory_state_store`) every call goes straight to it. For any other store, writes are queued
/// (bounded by `capacity`) and applied in order by one store thread; a write that finds the
/// queue full is dropped and counted, never waited for. Every error a store call returns, and
/// every exception it throws, is counted (`errors()`) and passed to the error handler; the
/// caller carries on with what it has in memory.
///
/// `load` runs on the caller's thread and `load_async` on the store thread, behind the writes
/// queued before it (the hub keeps the live figures in its records and loads a device only
/// when it first sees it, with `load_async` from a network thread). The writes of one device are
/// applied in the order they were queued; `applied_through(ticket)` says whether the writes
/// accepted up to a ticket (`submitted()` then) have been applied, which is what the hub waits for
/// before it evicts a record.
template <class Store>
class write_behind {
 public:
  /// Calls to `store` (referenced: it outlives this). `capacity` bounds queued writes;
  /// `on_error` may be empty.
  write_behind(Store& store, std::size_t capacity, store_error_handler on_error = {})
      : store_(store), capacity_(capacity), on_error_(std::move(on_error)) {
    if constexpr (!inline_calls) thread_ = std::thread([this] { run(); });
  }
  write_behind(const write_behind&) = delete;
  write_behind& operator=(const write_behind&) = delete;
  /// Applies what is queued, then stops the store thread.
  ~write_behind() {
    if constexpr (!inline_calls) {
      {
        std::lock_guard lock(mutex_);
        stopping_ = true;
      }
      wake_.notify_all();
      thread_.join();
    }
  }

  /// The device's stored state (a default one, and the error counted, if the store fails).
  [[nodiscard]] device_state load(const std::string& id) {
    try {
      auto r = store_.load(id);
      if (r.error) failed("load", id, r.error);
      return std::move(r.state);
    } catch (...) {
      failed("load", id, std::make_error_code(std::errc::io_error));
      return {};
    }
  }
  /// True when every call goes straight to the store (it says it never blocks).
  static constexpr bool calls_inline = is_nonblocking_store<Store>;
  /// Loads the device's stored state off the calling thread: `done(state)` runs on the store
  /// thread after every write queued before this call (inline for a non-blocking store). False,
  /// with `done` not called, when the queue is full (counted as a dropped call).
  template <class Done>
  bool load_async(const std::string& id, Done&& done) {
    if constexpr (inline_calls) {
      done(load(id));
      return true;
    } else {
      return !submit({op_kind::load, id, 0, 0, {}, {}, std::forward<Done>(done)});
    }
  }
  /// Adds `n` to the device's message count (queued unless the store is non-blocking).
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n) {
    return submit({op_kind::add_messages_sent, id, n, 0, {}, {}, {}});
  }
  /// Records activity at `unix_ms`.
  std::error_code touch(const std::string& id, std::int64_t unix_ms) {
    return submit({op_kind::touch, id, 0, unix_ms, {}, {}, {}});
  }
  /// Records the firmware version the device runs.
  std::error_code set_firmware_version(const std::string& id, const std::string& version) {
    return submit({op_kind::set_firmware_version, id, 0, 0, version, {}, {}});
  }
  /// Records the device's firmware transfer.
  std::error_code set_transfer(const std::string& id, const transfer_state& t) {
    return submit({op_kind::set_transfer, id, 0, 0, {}, t, {}});
  }
  /// Records the last sequence number assigned to the device.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq) {
    return submit({op_kind::set_last_seq, id, seq, 0, {}, {}, {}});
  }
  /// Forgets the device.
  std::error_code forget(const std::string& id) {
    return submit({op_kind::forget, id, 0, 0, {}, {}, {}});
  }

  /// Writes accepted so far (a ticket: `applied_through(submitted())` says that everything
  /// accepted until now has reached the store).
  [[nodiscard]] std::uint64_t submitted() const noexcept {
    return submitted_.load(std::memory_order_acquire);
  }
  /// True when the first `ticket` writes accepted have been applied (or failed).
  [[nodiscard]] bool applied_through(std::uint64_t ticket) const noexcept {
    return applied_.load(std::memory_order_acquire) >= ticket;
  }
  /// True when every write queued so far has been applied.
  [[nodiscard]] bool idle() const {
    if constexpr (inline_calls) {
      return true;
    } else {
      std::lock_guard lock(mutex_);
      return queue_.empty() && !applying_;
    }
  }
  /// Waits until every write queued so far has been applied (tests, shutdown).
  void drain() {
    if constexpr (!inline_calls) {
      std::unique_lock lock(mutex_);
      drained_.wait(lock, [&] { return queue_.empty() && !applying_; });
    }
  }
  /// Store calls that failed (errors returned, exceptions thrown, writes dropped).
  [[nodiscard]] std::uint64_t errors() const noexcept {
    return errors_.load(std::memory_order_relaxed);
  }
  /// Writes dropped because the queue was full (counted in `errors()` too).
  [[nodiscard]] std::uint64_t dropped() const noexcept {
    return dropped_.load(std::memory_order_relaxed);
  }
  /// Writes waiting for the store thread.
  [[nodiscard]] std::size_t queued() const {
    std::lock_guard lock(mutex_);
    return queue_.size();
  }

 private:
  static constexpr bool inline_calls = is_nonblocking_store<Store>;

  enum class op_kind : std::uint8_t {
    add_messages_sent,
    touch,
    set_firmware_version,
    set_transfer,
    set_last_seq,
    forget,
    load
  };
  struct op {
    op_kind kind;
    std::string id;
    std::uint64_t n;
    std::int64_t ms;
    std::string version;
    transfer_state transfer;
    std::function<void(device_state&&)> loaded;  // load only: what to do with the state
  };
  static constexpr std::string_view name(op_kind k) noexcept {
    switch (k) {
      case op_kind::add_messages_sent:
        return "add_messages_sent";
      case op_kind::touch:
        return "touch";
      case op_kind::set_firmware_version:
        return "set_firmware_version";
      case op_kind::set_transfer:
        return "set_transfer";
      case op_kind::set_last_seq:
        return "set_last_seq";
      case op_kind::forget:
        return "forget";
      case op_kind::load:
        return "load";
    }
    return "write";
  }

  std::error_code submit(op o) {
    if constexpr (inline_calls) {
      submitted_.fetch_add(1, std::memory_order_relaxed);
      const auto ec = apply(o);
      applied_.fetch_add(1, std::memory_order_release);
      return ec;
    } else {
      {
        std::lock_guard lock(mutex_);
        if (queue_.size() >= capacity_) {
          dropped_.fetch_add(1, std::memory_order_relaxed);
          errors_.fetch_add(1, std::memory_order_relaxed);
          // Reported by the store thread: the handler may be slow, and this is a hot path.
          if (on_error_ && pending_drop_report_.empty()) pending_drop_report_ = o.id;
          return std::make_error_code(std::errc::no_buffer_space);
        }
        queue_.push_back(std::move(o));
        submitted_.fetch_add(1, std::memory_order_release);
      }
      wake_.notify_one();
      return {};
    }
  }
  std::error_code apply(const op& o) {
    std::error_code ec;
    try {
      switch (o.kind) {
        case op_kind::add_messages_sent:
          ec = store_.add_messages_sent(o.id, o.n);
          break;
        case op_kind::touch:
          ec = store_.touch(o.id, o.ms);
          break;
        case op_kind::set_firmware_version:
          ec = store_.set_firmware_version(o.id, o.version);
          break;
        case op_kind::set_transfer:
          ec = store_.set_transfer(o.id, o.transfer);
          break;
        case op_kind::set_last_seq:
          ec = store_.set_last_seq(o.id, o.n);
          break;
        case op_kind::forget:
          ec = store_.forget(o.id);
          break;
        case op_kind::load:
          o.loaded(load(o.id));  // load() counts and reports its own failure
          break;
      }
    } catch (...) {
      ec = std::make_error_code(std::errc::io_error);
    }
    if (ec) failed(name(o.kind), o.id, ec);
    return ec;
  }
  void failed(std::string_view what, const std::string& id, std::error_code ec) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    if (!on_error_) return;
    try {
      on_error_(what, id, ec);
    } catch (...) {  // a throwing logger loses its line, not the process
    }
  }
  void run() {
    std::unique_lock lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything applied
      std::deque<op> batch;
      batch.swap(queue_);
      applying_ = true;
      std::string drop_report;
      drop_report.swap(pending_drop_report_);
      lock.unlock();
      if (!drop_report.empty() && on_error_) {
        try {
          on_error_("queue", drop_report, std::make_error_code(std::errc::no_buffer_space));
        } catch (...) {  // as in failed()
        }
      }
      for (const auto& o : batch) {
        (void)apply(o);
        applied_.fetch_add(1, std::memory_order_release);
      }
      lock.lock();
      applying_ = false;
      if (queue_.empty()) drained_.notify_all();
    }
  }

  Store& store_;
  const std::size_t capacity_;
  store_error_handler on_error_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable drained_;
  std::deque<op> queue_;
  std::string pending_drop_report_;  // a dropped write's device, reported by the store thread
  bool applying_ = false;
  bool stopping_ = false;
  std::atomic<std::uint64_t> errors_{0};
  std::atomic<std::uint64_t> dropped_{0};
  std::atomic<std::uint64_t> submitted_{0};
  std::atomic<std::uint64_t> applied_{0};
  std::thread thread_;
};

}  // namespace devgate::store
