#pragma once

#include <atomic>              // error counts
#include <chrono>              // the group commit delay
#include <concepts>            // a store's optional peek
#include <condition_variable>  // the store thread sleeps until there is work
#include <cstddef>             // std::size_t
#include <cstdint>             // counters
#include <deque>               // queued writes
#include <functional>          // the error handler
#include <memory>              // a rollout's image, shared by the queued write
#include <mutex>               // the queue
#include <optional>            // load_rollout
#include <string>              // device ids, versions
#include <string_view>         // operation names
#include <system_error>        // results
#include <thread>              // the store thread
#include <type_traits>         // choosing inline or queued
#include <utility>             // std::move
#include <vector>              // the batch's results

#include "devgate/store/state_store.hpp"

namespace devgate::store {

/// Called once the store has applied the record of a dispatched message (`record_dispatched`),
/// with the device id, the record, and whether it is in the store: true once applied (and, for a
/// transactional store, committed), false if the write or its batch's commit failed. On the
/// store thread (inline for a non-blocking store).
using dispatched_handler =
    std::function<void(const std::string& id, const dispatch_record&, bool recorded)>;

/// Called once the store has applied a kept sequenced message (`append_replay`) of a store that
/// may block, with the device id, its sequence number, and whether it is in the store (as for
/// `dispatched_handler`). Of several consecutive ones of the same device in a batch, only the last
/// is reported, for all of them (stored: all of them are). On
/// the store thread; never for a non-blocking store (its writes are in when the call returns).
using replay_stored_handler =
    std::function<void(const std::string& id, std::uint64_t seq, bool stored)>;

/// Called for each store error: the operation (`"load"`, `"touch"`, ...), the device and the
/// error (`std::errc::io_error` for an exception the store threw, `std::errc::no_buffer_space`
/// for a write dropped because the queue was full).
using store_error_handler =
    std::function<void(std::string_view operation, const std::string& id, std::error_code)>;

/// How the store thread of `write_behind` groups writes under light load.
struct group_commit {
  /// When the store thread wakes to fewer than `batch` queued writes, it waits up to this long
  /// for more before applying them (0: never waits): fewer commits and wake-ups per write when
  /// few writes are in flight, at up to this much added latency.
  std::chrono::microseconds delay{0};
  /// Queued writes that are worth applying at once (no wait).
  std::size_t batch = 64;
};

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
  /// `on_error`, `on_dispatched` and `on_replay_stored` may be empty; `grouping` says how long
  /// the store thread may wait for a fuller batch.
  write_behind(Store& store, std::size_t capacity, store_error_handler on_error = {},
               dispatched_handler on_dispatched = {}, replay_stored_handler on_replay_stored = {},
               group_commit grouping = {})
      : store_(store),
        capacity_(capacity),
        grouping_(grouping),
        on_error_(std::move(on_error)),
        on_dispatched_(std::move(on_dispatched)),
        on_replay_stored_(std::move(on_replay_stored)) {
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
  /// The device's stored state for a reader that does not take the device on: the store's
  /// `peek(id)` when it has one (a shared store, whose `load` claims the device for this
  /// node), else `load`.
  [[nodiscard]] device_state peek(const std::string& id) {
    if constexpr (requires {
                    { store_.peek(id) } -> std::same_as<load_result>;
                  }) {
      try {
        auto r = store_.peek(id);
        if (r.error) failed("peek", id, r.error);
        return std::move(r.state);
      } catch (...) {
        failed("peek", id, std::make_error_code(std::errc::io_error));
        return {};
      }
    } else {
      return load(id);
    }
  }
  /// True when several gateway nodes share the store (its `shared()`: `may_be_shared`).
  [[nodiscard]] bool shared() const noexcept {
    if constexpr (may_be_shared<Store>) {
      return store_.shared();
    } else {
      return false;
    }
  }
  /// True when every call goes straight to the store (it says it never blocks).
  static constexpr bool calls_inline = is_nonblocking_store<Store>;
  /// True when the store carries deliveries between nodes (`fleet_delivery_store`).
  static constexpr bool routes = fleet_delivery_store<Store>;
  /// Loads the device's stored state off the calling thread: `done(state)` runs on the store
  /// thread after every write queued before this call (inline for a non-blocking store). False,
  /// with `done` not called, when the queue is full (counted as a dropped call).
  template <class Done>
  bool load_async(const std::string& id, Done&& done) {
    if constexpr (inline_calls) {
      done(load(id));
      return true;
    } else {
      op o{op_kind::load, id};
      o.loaded = std::forward<Done>(done);
      return !submit(std::move(o));
    }
  }
  /// Adds `n` to the device's message count (queued unless the store is non-blocking).
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n) {
    op o{op_kind::add_messages_sent, id};
    o.n = n;
    return submit(std::move(o));
  }
  /// Records activity at `unix_ms`.
  std::error_code touch(const std::string& id, std::int64_t unix_ms) {
    op o{op_kind::touch, id};
    o.ms = unix_ms;
    return submit(std::move(o));
  }
  /// Records the firmware version the device runs.
  std::error_code set_firmware_version(const std::string& id, const std::string& version) {
    op o{op_kind::set_firmware_version, id};
    o.text = version;
    return submit(std::move(o));
  }
  /// Records the device's firmware transfer.
  std::error_code set_transfer(const std::string& id, const transfer_state& t) {
    op o{op_kind::set_transfer, id};
    o.transfer = t;
    return submit(std::move(o));
  }
  /// Records the last sequence number assigned to the device.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq) {
    op o{op_kind::set_last_seq, id};
    o.n = seq;
    return submit(std::move(o));
  }
  /// Forgets the device.
  std::error_code forget(const std::string& id) { return submit(op(op_kind::forget, id)); }

  /// True when the store keeps replay, dispatch windows and the rollout
  /// (`durable_state_store`); the calls below do nothing for any other store.
  static constexpr bool durable = durable_state_store<Store>;
  /// Keeps a sequenced message (`frame`, numbered `seq`) for the device (durable stores only);
  /// the replay-stored handler hears of it after its batch's commit (a store that may block).
  /// An error: the write was dropped (queue full), and the handler will not hear of it.
  std::error_code append_replay(const std::string& id, std::uint64_t seq, std::string_view frame) {
    if constexpr (!durable) {
      return {};
    } else {
      op o{op_kind::append_replay, id};
      o.n = seq;
      o.text.assign(frame);
      return submit(std::move(o));
    }
  }
  /// Forgets the device's kept messages numbered `seq` and below (durable stores only).
  std::error_code forget_replay(const std::string& id, std::uint64_t seq) {
    if constexpr (!durable) {
      return {};
    } else {
      op o{op_kind::forget_replay, id};
      o.n = seq;
      return submit(std::move(o));
    }
  }
  /// The sink accepted `r`: a durable store adds it to the device's count and dispatch window
  /// (`record_dispatched`), any other store to its count (`add_messages_sent`); then the
  /// dispatched handler runs (after the batch's commit). Unlike other writes this one waits for
  /// room rather than being dropped: a worker may wait here, a network thread never calls it.
  std::error_code record_dispatched(const std::string& id, dispatch_record r) {
    op o{op_kind::record_dispatched, id};
    o.dispatched = std::move(r);
    return submit(std::move(o), true);
  }
  /// Makes `r` the rollout the store keeps (durable stores only).
  std::error_code save_rollout(rollout_record r) {
    if constexpr (!durable) {
      return {};
    } else {
      op o{op_kind::save_rollout, {}};
      o.rollout = std::make_shared<const rollout_record>(std::move(r));
      return submit(std::move(o), true);
    }
  }
  /// A store shared by several nodes (`fleet_rollout_store`) numbers, keeps and announces
  /// rollout `r` fleet-wide, on the calling thread; any other store: nothing (rollout 0).
  [[nodiscard]] rollout_publish_result publish_rollout(const rollout_record& r) {
    if constexpr (!fleet_rollout_store<Store>) {
      (void)r;
      return {};
    } else {
      try {
        auto res = store_.publish_rollout(r);
        if (res.error) failed("publish_rollout", {}, res.error);
        return res;
      } catch (...) {
        failed("publish_rollout", {}, std::make_error_code(std::errc::io_error));
        return {0, std::make_error_code(std::errc::io_error)};
      }
    }
  }
  /// A store that carries deliveries between nodes (`fleet_delivery_store`) takes `data` for
  /// device `id` when another node holds it, on the calling thread (errors counted); any
  /// other store: not routed.
  [[nodiscard]] route_result route(const std::string& id, std::string_view data) {
    if constexpr (!fleet_delivery_store<Store>) {
      (void)id;
      (void)data;
      return {};
    } else {
      try {
        auto r = store_.route(id, data);
        if (r.error) failed("route", id, r.error);
        return r;
      } catch (...) {
        failed("route", id, std::make_error_code(std::errc::io_error));
        return {false, std::make_error_code(std::errc::io_error)};
      }
    }
  }
  /// Runs `task(store)` on the store thread after every write queued before it (inline for a
  /// non-blocking store), for work that calls the store itself (device `id`'s; its error, or
  /// a throw, is counted and reported). False, with `task` not run, when the queue is full.
  bool post(const std::string& id, std::function<std::error_code(Store&)> task) {
    op o{op_kind::task, id};
    o.task = std::move(task);
    return !submit(std::move(o));
  }
  /// The rollout the store keeps, read on the calling thread (none for a store that keeps
  /// none, or when it fails: counted and reported).
  [[nodiscard]] std::optional<rollout_record> load_rollout() {
    if constexpr (!durable) {
      return std::nullopt;
    } else {
      try {
        auto r = store_.load_rollout();
        if (r.error) failed("load_rollout", {}, r.error);
        return std::move(r.rollout);
      } catch (...) {
        failed("load_rollout", {}, std::make_error_code(std::errc::io_error));
        return std::nullopt;
      }
    }
  }

  /// The campaigns the store keeps (`campaign_store`), read on the calling thread (none for a
  /// store that keeps none, or when it fails: counted and reported).
  [[nodiscard]] std::vector<kept_campaign> load_campaigns() {
    if constexpr (!campaign_store<Store>) {
      return {};
    } else {
      try {
        auto r = store_.load_campaigns();
        if (r.error) failed("load_campaigns", {}, r.error);
        return std::move(r.campaigns);
      } catch (...) {
        failed("load_campaigns", {}, std::make_error_code(std::errc::io_error));
        return {};
      }
    }
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
    load,
    append_replay,
    forget_replay,
    record_dispatched,
    save_rollout,
    task
  };
  struct op {
    op(op_kind k, std::string device) : kind(k), id(std::move(device)) {}
    op_kind kind;
    std::string id;
    std::uint64_t n = 0;
    std::int64_t ms = 0;
    std::string text;  // a version, or a replay frame
    transfer_state transfer;
    dispatch_record dispatched;
    std::shared_ptr<const rollout_record> rollout;
    std::function<void(device_state&&)> loaded;   // load only: what to do with the state
    std::function<std::error_code(Store&)> task;  // task only
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
      case op_kind::append_replay:
        return "append_replay";
      case op_kind::forget_replay:
        return "forget_replay";
      case op_kind::record_dispatched:
        return "record_dispatched";
      case op_kind::save_rollout:
        return "save_rollout";
      case op_kind::task:
        return "task";
    }
    return "write";
  }

  std::error_code submit(op o, bool wait_for_room = false) {
    if constexpr (inline_calls) {
      submitted_.fetch_add(1, std::memory_order_relaxed);
      const auto ec = apply(o);
      applied_.fetch_add(1, std::memory_order_release);
      after_commit(o, !ec);
      return ec;
    } else {
      bool wake = false;
      {
        std::unique_lock lock(mutex_);
        if (wait_for_room) {
          drained_.wait(lock, [&] { return queue_.size() < capacity_ || stopping_; });
        }
        if (queue_.size() >= capacity_) {
          dropped_.fetch_add(1, std::memory_order_relaxed);
          errors_.fetch_add(1, std::memory_order_relaxed);
          // Reported by the store thread: the handler may be slow, and this is a hot path.
          if (on_error_ && pending_drop_report_.empty()) pending_drop_report_ = o.id;
          return std::make_error_code(std::errc::no_buffer_space);
        }
        queue_.push_back(std::move(o));
        submitted_.fetch_add(1, std::memory_order_release);
        // The store thread waits for a first write, or (grouping) for a batch's worth: only
        // those wake it, so a burst of writes costs one wake-up, not one each.
        wake = queue_.size() == 1 || queue_.size() == grouping_.batch;
      }
      if (wake) wake_.notify_one();
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
          ec = store_.set_firmware_version(o.id, o.text);
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
        case op_kind::append_replay:
          if constexpr (durable) ec = store_.append_replay(o.id, o.n, o.text);
          break;
        case op_kind::forget_replay:
          if constexpr (durable) ec = store_.forget_replay(o.id, o.n);
          break;
        case op_kind::record_dispatched:
          if constexpr (durable) {
            ec = store_.record_dispatched(o.id, o.dispatched);
          } else {
            ec = store_.add_messages_sent(o.id, 1);
          }
          break;
        case op_kind::save_rollout:
          if constexpr (durable) ec = store_.save_rollout(*o.rollout);
          break;
        case op_kind::task:
          ec = o.task(store_);
          break;
      }
    } catch (...) {
      ec = std::make_error_code(std::errc::io_error);
    }
    if (ec) failed(name(o.kind), o.id, ec);
    return ec;
  }
  // After the op's batch committed (`recorded`: it and its commit succeeded): a dispatched
  // message's handler runs, or a kept message's (queued stores only: inline, the caller holds
  // the device's lock and knows the write is in when the call returns).
  void after_commit(const op& o, bool recorded) {
    try {
      if (o.kind == op_kind::record_dispatched && on_dispatched_) {
        on_dispatched_(o.id, o.dispatched, recorded);
      } else if (o.kind == op_kind::append_replay && !inline_calls && on_replay_stored_) {
        on_replay_stored_(o.id, o.n, recorded);
      }
    } catch (...) {  // the hub's handlers do not throw; a throw loses one answer, not the thread
    }
  }
  // True when the batch's next op keeps a later message of the same device: its report
  // speaks for this one too.
  static bool superseded(const std::deque<op>& batch, std::size_t i) {
    return batch[i].kind == op_kind::append_replay && i + 1 < batch.size() &&
           batch[i + 1].kind == op_kind::append_replay && batch[i + 1].id == batch[i].id;
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
      if (grouping_.delay.count() > 0 && queue_.size() < grouping_.batch && !stopping_) {
        wake_.wait_for(lock, grouping_.delay,
                       [&] { return stopping_ || queue_.size() >= grouping_.batch; });
      }
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
      // One transaction per batch for a store that groups writes (group commit); whoever waits
      // for a write hears of it only after the commit.
      // A failed commit leaves the batch's writes out of the store: their waiters hear so.
      if constexpr (transactional_store<Store>) {
        if (const auto ec = store_.begin_batch()) failed("begin_batch", {}, ec);
      }
      ok_.assign(batch.size(), false);
      for (std::size_t i = 0; i < batch.size(); ++i) ok_[i] = !apply(batch[i]);
      if constexpr (transactional_store<Store>) {
        if (const auto ec = store_.commit_batch()) {
          failed("commit_batch", {}, ec);
          ok_.assign(batch.size(), false);
        }
      }
      applied_.fetch_add(batch.size(), std::memory_order_release);
      for (std::size_t i = 0; i < batch.size(); ++i) {
        if (!superseded(batch, i)) {
          after_commit(batch[i], ok_[i]);
        } else if (!ok_[i]) {
          ok_[i + 1] = false;  // the report of the run says whether all of it is in
        }
      }
      lock.lock();
      applying_ = false;
      drained_.notify_all();  // room for writers waiting on a full queue, and for drain()
    }
  }

  Store& store_;
  const std::size_t capacity_;
  const group_commit grouping_;
  store_error_handler on_error_;
  dispatched_handler on_dispatched_;
  replay_stored_handler on_replay_stored_;
  std::vector<bool> ok_;  // the store thread's: which writes of the batch applying succeeded
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
