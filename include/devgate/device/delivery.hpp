#pragma once

#include <algorithm>    // std::max, std::lower_bound
#include <atomic>       // drop count, hand-off progress
#include <cstddef>      // std::size_t
#include <cstdint>      // sequence numbers
#include <limits>       // forget everything
#include <mutex>        // the device's mutex
#include <string_view>  // message data
#include <utility>      // std::move
#include <vector>       // outbox batches

#include "devgate/core/bytes.hpp"
#include "devgate/device/protocol.hpp"  // deliver envelopes, the bad_resume error
#include "devgate/device/record.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// What `delivery` reports to a durable store, under the device's mutex so that the store sees
/// one device's changes in the order they happened: a sequenced message kept (`kept`), and the
/// kept messages up to a number forgotten (`forgot`: acknowledged or dropped). `kept` returns
/// true when the message must wait for the store before it is sent (`delivery::stored` then
/// releases it). This one reports nothing (a store that keeps no replay) and holds nothing.
struct no_journal {
  /// A message numbered `seq` with frame `frame` is kept for the device: it may go at once.
  bool kept(device_record&, std::uint64_t /*seq*/, std::string_view /*frame*/) const {
    return false;
  }
  /// The device's kept messages numbered `seq` and below are forgotten.
  void forgot(device_record&, std::uint64_t /*seq*/) const {}
  /// The device's numbering now continues above `seq` (it had numbers the server had lost).
  void numbered(device_record&, std::uint64_t /*seq*/) const {}
};

/// The journal of a hub whose store keeps replay (`Writer`: its `store::write_behind`): each
/// change is queued to the store under the device's mutex (a queue push that never waits), so
/// the store applies one device's changes in the order they happened; the record's
/// `store_ticket` follows, so that it is not evicted before the store has them (a record
/// loaded again then reads them back).
template <class Writer>
struct store_journal {
  Writer& writer;  ///< The hub's way to its store.
  /// Queues the kept message to the store. True when it must wait for the store's commit
  /// before it is sent (a durable store behind the store thread), so that a device never holds
  /// a number a crash can take from the store: the writer's replay-stored handler releases it.
  /// A write dropped for a full queue does not wait (it is counted as a store error).
  bool kept(device_record& rec, std::uint64_t seq, std::string_view frame) const {
    if constexpr (Writer::durable && !Writer::calls_inline) {
      const bool held = !writer.append_replay(rec.id, seq, frame);
      rec.store_ticket = writer.submitted();
      return held;
    } else {
      if constexpr (Writer::durable) (void)writer.append_replay(rec.id, seq, frame);
      return false;
    }
  }
  /// Queues the forgetting to the store.
  void forgot(device_record& rec, std::uint64_t seq) const {
    if constexpr (Writer::durable) {
      (void)writer.forget_replay(rec.id, seq);
      rec.store_ticket = writer.submitted();
    }
  }
  /// Queues the new numbering base to the store (`set_last_seq`).
  void numbered(device_record& rec, std::uint64_t seq) const {
    (void)writer.set_last_seq(rec.id, seq);
    rec.store_ticket = writer.submitted();
  }
};

/// Delivery to devices: per-device sequence numbers, the replay buffer that keeps sequenced
/// messages until the device acknowledges them (offline devices included), and each device's
/// outbox, through which everything sent to the device leaves in the order it was queued.
///
/// With a durable store behind a store thread, a sequenced message is sent only once the store
/// has committed it (`stored`): the journal's `kept` says it must wait, and it and every later
/// one of the device are held (`held_from`) until then. So a device never holds a number that a
/// crash took from the store, which the restarted server would give to another message.
///
/// Locking: each method takes the device's mutex (`device_record::mutex`) itself and calls the
/// transport only after releasing it; `queue_locked` is for a caller that holds the mutex and
/// queues as part of a change of its own (the messages leave with the next `flush`).
template <class Transport>
class delivery {
 public:
  /// What `ack` made of an acknowledgement.
  enum class ack_result : std::uint8_t {
    acknowledged,  ///< Everything up to the sequence number is forgotten.
    out_of_range,  ///< Beyond the last sequence number sent, or below one already acknowledged.
    not_live,      ///< The session is no longer the device's (ignored).
  };
  /// What `resume` found, for the welcome.
  struct resume_info {
    std::uint64_t last_seq = 0;        ///< The last sequence number assigned to the device.
    std::size_t replay = 0;            ///< Kept messages about to be sent again.
    std::uint64_t replay_dropped = 0;  ///< Messages dropped from the buffer since last time.
    bool bad_resume = false;           ///< The device's `last_seq` was beyond anything sent.
  };

  /// Delivery through `transport` (referenced), keeping at most `max_replay_messages` and
  /// `max_replay_bytes` of sequenced messages per device (the newest is always kept).
  delivery(Transport& transport, std::size_t max_replay_messages, std::size_t max_replay_bytes)
      : transport_(transport),
        max_replay_messages_(max_replay_messages),
        max_replay_bytes_(max_replay_bytes) {}

  /// Gives `data_json` (JSON text) the device's next sequence number and keeps its `deliver`
  /// frame until acknowledged; past the limits the oldest kept message is dropped and counted.
  /// Sent at once if the device's session said hello (once stored, if the journal holds it).
  /// Returns the sequence number. `journal` hears of the kept message and of what the bounds
  /// dropped (see `no_journal`).
  template <class Journal = no_journal>
  std::uint64_t deliver(device_record& rec, std::string_view data_json,
                        const Journal& journal = Journal{}) {
    std::uint64_t seq = 0;
    {
      std::lock_guard lock(rec.mutex);
      auto& d = rec.delivery;
      seq = d.next_seq++;
      auto frame = make_envelope("deliver", seq, rec.topic, data_json);
      d.replay_bytes += frame.size();
      replay_bytes_total_.fetch_add(frame.size(), std::memory_order_relaxed);
      d.replay.emplace_back(seq, frame);
      const bool held = journal.kept(rec, seq, frame.view());
      std::uint64_t dropped_through = 0;
      while (d.replay.size() > 1 &&
             (d.replay.size() > max_replay_messages_ || d.replay_bytes > max_replay_bytes_)) {
        dropped_through = d.replay.front().first;
        drop_oldest_locked(d);
      }
      if (dropped_through != 0) journal.forgot(rec, dropped_through);
      if (held) {
        if (d.held_from == 0) d.held_from = seq;
      } else if (d.held_from != 0) {
        release_locked(rec, seq);  // the ones held before it go first
      } else if (rec.session.id != 0 && rec.session.hello) {
        queue_locked(rec, rec.session.id, payload_kind::text, std::move(frame));
      }
    }
    flush(rec);
    return seq;
  }

  /// Resumes delivery to session `s` after its hello: forgets what `last_seq` acknowledges,
  /// queues the welcome, a `bad_resume` error if `last_seq` was beyond anything sent (then the
  /// kept messages are renumbered from `last_seq + 1`, and numbering continues from there), then
  /// every kept message in order, and makes the session live (later deliveries go straight to it);
  /// then sends. `welcome(device_record&, const resume_info&)` returns the welcome's payload;
  /// it runs with the device's mutex held, so it may read and set the record's fields but must
  /// call nothing that locks. False, with nothing queued, if `s` is not the device's session.
  /// `journal` hears of what was forgotten (and of the renumbered messages, kept anew).
  template <class Welcome, class Journal = no_journal>
  bool resume(device_record& rec, session_id s, std::uint64_t last_seq, Welcome&& welcome,
              const Journal& journal = Journal{}) {
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return false;
      auto& d = rec.delivery;
      resume_info info;
      info.bad_resume = last_seq >= d.next_seq;
      if (!info.bad_resume) {
        forget_through(d, last_seq);
        d.acked = std::max(d.acked, last_seq);
        if (last_seq != 0) journal.forgot(rec, last_seq);
      } else {
        renumber_above_locked(rec, last_seq);
        journal.forgot(rec, std::numeric_limits<std::uint64_t>::max());
        d.held_from = 0;
        for (const auto& [seq, frame] : d.replay) {
          if (!journal.kept(rec, seq, frame.view())) {
            d.held_from = 0;  // goes now, with any held before it
          } else if (d.held_from == 0) {
            d.held_from = seq;
          }
        }
        // The store lost numbers the device has (a crash before they were written): numbering
        // continues above them after the next restart too.
        journal.numbered(rec, d.next_seq - 1);
      }
      info.last_seq = d.next_seq - 1;
      info.replay = d.replay.size();
      info.replay_dropped = d.replay_dropped;
      d.replay_dropped = 0;
      shared_bytes w = welcome(rec, static_cast<const resume_info&>(info));
      queue_locked(rec, s, payload_kind::text, std::move(w));
      if (info.bad_resume) {
        queue_locked(rec, s, payload_kind::text, make_error(error::bad_resume, "hello"));
      }
      for (const auto& [seq, frame] : d.replay) {
        if (d.held_from != 0 && seq >= d.held_from) break;  // follows once stored
        queue_locked(rec, s, payload_kind::text, frame);
      }
      rec.session.hello = true;
    }
    flush(rec);
    return true;
  }

  /// Session `s` acknowledges every sequenced message up to `seq` (`journal` hears of it).
  template <class Journal = no_journal>
  ack_result ack(device_record& rec, session_id s, std::uint64_t seq,
                 const Journal& journal = Journal{}) {
    std::lock_guard lock(rec.mutex);
    if (rec.session.id != s) return ack_result::not_live;
    auto& d = rec.delivery;
    // Beyond what was sent: above what is held for the store, if any, else above what was
    // assigned.
    if (seq >= (d.held_from != 0 ? d.held_from : d.next_seq) || seq < d.acked) {
      return ack_result::out_of_range;
    }
    d.acked = seq;
    forget_through(d, seq);
    journal.forgot(rec, seq);
    return ack_result::acknowledged;
  }
  /// Puts the messages a durable store kept for the device (oldest first) back in its replay
  /// buffer, ahead of any kept since (the caller holds the device's mutex; the record was just
  /// made from the store). Numbering continues above them.
  void restore_locked(device_record& rec, std::vector<store::replay_entry>&& kept) {
    auto& d = rec.delivery;
    for (auto it = kept.rbegin(); it != kept.rend(); ++it) {
      if (it->seq <= d.acked) continue;
      if (!d.replay.empty() && it->seq >= d.replay.front().first) continue;
      auto frame = shared_bytes::copy_of(std::string_view(it->frame));
      d.replay_bytes += frame.size();
      replay_bytes_total_.fetch_add(frame.size(), std::memory_order_relaxed);
      d.replay.emplace_front(it->seq, std::move(frame));
    }
    if (!d.replay.empty() && d.replay.back().first + 1 > d.next_seq) {
      d.next_seq = d.replay.back().first + 1;
    }
  }

  /// The store has the device's kept messages numbered `seq` and below (or gave up on them: a
  /// failed write is counted and the message goes all the same): those held for it are sent, in
  /// order, if the device's session said hello. From the store thread.
  void stored(device_record& rec, std::uint64_t seq) {
    {
      std::lock_guard lock(rec.mutex);
      if (rec.delivery.held_from == 0 || seq < rec.delivery.held_from) return;
      release_locked(rec, seq);
    }
    flush(rec);
  }

  /// Queues `bytes` to session `s` if it is still the device's session, then sends. False if
  /// it is not (nothing is queued).
  bool post(device_record& rec, session_id s, payload_kind kind, shared_bytes bytes) {
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return false;
      queue_locked(rec, s, kind, std::move(bytes));
    }
    flush(rec);
    return true;
  }
  /// Queues `bytes` to session `s`; the caller holds the device's mutex and calls `flush`
  /// after releasing it.
  static void queue_locked(device_record& rec, session_id s, payload_kind kind,
                           shared_bytes bytes) {
    rec.delivery.outbox.push_back({s, kind, std::move(bytes)});
    ++rec.delivery.queued;
  }
  /// Sends the device's queued messages in order, and returns once everything queued before
  /// the call has been handed to the transport. Whoever finds the outbox idle sends it,
  /// including what other threads queue meanwhile, with no lock held; a thread that finds
  /// another one sending waits until that thread has handed over its messages too. So what one
  /// thread produces reaches the transport in the order it produced it, whether it goes
  /// through this outbox or not (an event broadcast after a `deliver` cannot overtake it).
  /// The wait lasts one batch of non-blocking transport sends; a flush called from inside a
  /// hand-off (a transport callback) does not wait, so no cycle of waits can form.
  void flush(device_record& rec) {
    std::unique_lock lock(rec.mutex);
    auto& d = rec.delivery;
    if (d.draining) {
      if (handing_off() != 0) return;
      const std::uint64_t mine = d.queued;
      lock.unlock();
      for (auto h = d.handed.load(std::memory_order_acquire); h < mine;
           h = d.handed.load(std::memory_order_acquire)) {
        d.handed.wait(h, std::memory_order_acquire);
      }
      return;
    }
    d.draining = true;
    ++handing_off();
    std::vector<outbound> batch;
    while (!d.outbox.empty()) {
      batch.swap(d.outbox);
      const std::uint64_t taken = d.queued;
      lock.unlock();
      for (auto& o : batch) (void)transport_.send(o.session, o.kind, std::move(o.bytes));
      batch.clear();
      lock.lock();
      d.handed.store(taken, std::memory_order_release);
      d.handed.notify_all();
    }
    // The emptied buffer goes back to the record, so a busy device's outbox does not
    // allocate again; one that grew past a burst is let go.
    if (batch.capacity() <= keep_outbox_capacity) d.outbox.swap(batch);
    --handing_off();
    d.handed.store(d.queued, std::memory_order_release);  // counts what `forget` dropped
    d.handed.notify_all();
    d.draining = false;
  }
  /// Drops what is queued for session `s` and not yet sent (it closed or was replaced).
  void forget(device_record& rec, session_id s) {
    std::lock_guard lock(rec.mutex);
    std::erase_if(rec.delivery.outbox, [s](const outbound& o) { return o.session == s; });
  }

  /// Drops every kept message of the device (counted: the device sees the count in its next
  /// welcome, the fleet in `replay_dropped`); the caller holds the device's mutex. For the
  /// fleet-wide replay budget, and for a record being evicted.
  /// `counted` false: a record evicted from memory whose replay a durable store keeps (it
  /// comes back with the record, so nothing is dropped).
  void drop_replay_locked(device_record& rec, bool counted = true) {
    auto& d = rec.delivery;
    d.held_from = 0;  // nothing left to hold
    if (!counted) {
      replay_bytes_total_.fetch_sub(d.replay_bytes, std::memory_order_relaxed);
      d.replay.clear();
      d.replay_bytes = 0;
      return;
    }
    while (!d.replay.empty()) drop_oldest_locked(d);
  }

  /// Sequenced messages dropped by replay overflow since start, over every device.
  [[nodiscard]] std::uint64_t replay_dropped() const noexcept {
    return replay_dropped_.load(std::memory_order_relaxed);
  }
  /// Bytes of sequenced messages kept now, over every device held.
  [[nodiscard]] std::size_t replay_bytes() const noexcept {
    return replay_bytes_total_.load(std::memory_order_relaxed);
  }

 private:
  // Outbox capacity a record keeps between flushes (a `send` run's answers fit in it).
  static constexpr std::size_t keep_outbox_capacity = 64;
  // Outboxes the calling thread is handing to the transport now (0 or 1; more only when a
  // transport callback re-enters the hub).
  static int& handing_off() noexcept {
    thread_local int depth = 0;
    return depth;
  }
  // The held messages numbered up to `through` may go: queued to the live session if it said
  // hello (else they wait in the replay buffer for its resume); later ones stay held.
  static void release_locked(device_record& rec, std::uint64_t through) {
    auto& d = rec.delivery;
    if (rec.session.id != 0 && rec.session.hello) {
      auto it = std::lower_bound(d.replay.begin(), d.replay.end(), d.held_from,
                                 [](const std::pair<std::uint64_t, shared_bytes>& e,
                                    std::uint64_t n) { return e.first < n; });
      for (; it != d.replay.end() && it->first <= through; ++it) {
        queue_locked(rec, rec.session.id, payload_kind::text, it->second);
      }
    }
    d.held_from = through + 1 < d.next_seq ? through + 1 : 0;
  }
  void forget_through(device_record::delivery_part& d, std::uint64_t seq) {
    while (!d.replay.empty() && d.replay.front().first <= seq) {
      d.replay_bytes -= d.replay.front().second.size();
      replay_bytes_total_.fetch_sub(d.replay.front().second.size(), std::memory_order_relaxed);
      d.replay.pop_front();
    }
  }
  // The device has numbers this record never assigned: its record was evicted (or the server
  // restarted) since. Numbering continues above what the device has, kept messages included,
  // so that it does not drop them, or what comes next, as duplicates.
  void renumber_above_locked(device_record& rec, std::uint64_t last_seq) {
    auto& d = rec.delivery;
    std::uint64_t seq = last_seq;
    for (auto& [number, frame] : d.replay) {
      // A deliver frame is {"type":"deliver","seq":N,"topic":"T","data":<data>}.
      const auto old_prefix = make_envelope("deliver", number, rec.topic, "").size() - 1;
      const auto text = frame.view();
      const auto data = text.substr(old_prefix, text.size() - old_prefix - 1);
      auto fresh = make_envelope("deliver", ++seq, rec.topic, data);
      d.replay_bytes += fresh.size() - frame.size();
      replay_bytes_total_.fetch_add(fresh.size() - frame.size(), std::memory_order_relaxed);
      number = seq;
      frame = std::move(fresh);
    }
    d.next_seq = seq + 1;
    d.acked = last_seq;
  }
  void drop_oldest_locked(device_record::delivery_part& d) {
    d.replay_bytes -= d.replay.front().second.size();
    replay_bytes_total_.fetch_sub(d.replay.front().second.size(), std::memory_order_relaxed);
    d.replay.pop_front();
    ++d.replay_dropped;
    replay_dropped_.fetch_add(1, std::memory_order_relaxed);
  }

  Transport& transport_;
  const std::size_t max_replay_messages_;
  const std::size_t max_replay_bytes_;
  std::atomic<std::uint64_t> replay_dropped_{0};
  std::atomic<std::size_t> replay_bytes_total_{0};
};

}  // namespace devgate::device
