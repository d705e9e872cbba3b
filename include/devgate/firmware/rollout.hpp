#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>      // std::min
#include <atomic>         // rollout ids
#include <chrono>         // stall timeout, backoff
#include <cstddef>        // std::size_t, std::byte
#include <cstdint>        // rollout ids, offsets
#include <functional>     // the slot demand hook
#include <memory>         // the current image
#include <mutex>          // the current image, the device's mutex
#include <optional>       // lookups, errors
#include <span>           // image bytes
#include <stdexcept>      // set-up errors
#include <string>         // versions, reasons
#include <string_view>    // device ids
#include <system_error>   // a fleet store's refusal
#include <unordered_set>  // a gated rollout's admitted devices
#include <utility>        // std::move
#include <vector>         // devices to start

#include "devgate/detail/utf8_prefix.hpp"
#include "devgate/device/delivery.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/device/record.hpp"
#include "devgate/device/registry.hpp"
#include "devgate/firmware/detail/ticker.hpp"
#include "devgate/firmware/image.hpp"
#include "devgate/firmware/slots.hpp"
#include "devgate/firmware/tally.hpp"
#include "devgate/store/state_store.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::firmware {

/// Fleet totals of a rollout.
struct rollout_totals {
  std::uint32_t rollout = 0;          ///< Current rollout id (0: none published).
  std::string version;                ///< Its version.
  std::size_t size = 0;               ///< Image bytes.
  std::size_t pending = 0;            ///< Devices waiting (connected or not).
  std::size_t transferring = 0;       ///< Devices receiving chunks now.
  std::size_t verified = 0;           ///< Devices that confirmed the SHA-256.
  std::size_t failed = 0;             ///< Devices that reported a failure.
  std::size_t skipped = 0;            ///< Devices already on the version.
  std::uint64_t bytes_acked = 0;      ///< Sum of acknowledged bytes over the fleet.
  std::size_t peak_transferring = 0;  ///< Most devices ever transferring at once.
  std::size_t timed_out = 0;          ///< Of `failed`: transfers that stalled past their retries.
  std::uint64_t retries = 0;          ///< Stalled transfers taken back to be retried later.
};

/// The rollout engine's knobs (`device::hub_options` carries the same ones).
struct rollout_options {
  /// Firmware chunk size: larger chunks mean fewer acks, smaller ones finer resume points.
  std::size_t chunk_size = 16u << 10;
  /// Unacknowledged chunks in flight per device (window * chunk_size bytes of buffering).
  std::size_t window = 8;
  /// At most this many devices receive firmware at once; the rest wait their turn.
  std::size_t max_concurrent_transfers = 16;
  /// A transfer whose acknowledged offset has not moved for this long gives up its slot and
  /// goes back to pending (it resumes from that offset after `retry_backoff`). Shorter frees
  /// slots held by dead devices sooner, but must stay well above the time a slow device needs
  /// for one window. 0 turns the check (and the engine's timer thread) off.
  std::chrono::milliseconds stall_timeout{30'000};
  /// Stalls (and restarts from byte 0, `fw_restart`) one device may have in a rollout; one more
  /// stall fails its transfer with reason `timed_out` (a restart: `too_many_restarts`).
  unsigned max_retries = 3;
  /// The wait before a stalled transfer may take a slot again; it doubles with each retry of
  /// the same device (up to 64 times). The device keeps no slot meanwhile.
  std::chrono::milliseconds retry_backoff{1'000};
  /// The slots are a lease of a fleet-wide cap (several nodes, one fleet): the limit starts at
  /// 0 and whoever holds the lease sets it (`rollout_engine::set_slot_limit`).
  bool leased_slots = false;
  /// With leased slots: called (no lock held, any thread) when the lease should change, that
  /// is when a device starts waiting for a slot or a slot was freed. Keep it cheap (post).
  std::function<void()> on_slot_demand;
  /// Called (no lock held, any thread) when a device's status in a rollout changes: it joined
  /// (pending or skipped), started, went back to pending, ended verified or failed (reason
  /// `timed_out` for a stall past its retries). Not for `stop`, whose caller knows. A rollout
  /// campaign hears its devices through it. Keep it cheap (queue the news).
  std::function<void(const std::string& id, const store::transfer_state& t)> on_status;
  /// Called (no lock held) when a device says hello while the current rollout is gated and
  /// has not admitted it: a campaign with a continuous target may take it in.
  std::function<void(const std::string& id)> on_not_admitted;
};

/// Rolls one firmware image at a time out to the fleet. Each device's part is a small state
/// machine, kept in its record (`device_record::transfer`) and mirrored to the store:
///
///     none ──publish/join──▶ pending ──slot + live session──▶ transferring ──fw_result──▶
///     verified | failed;   pending ──reports the version──▶ skipped;
///     transferring ──session closed or replaced──▶ pending (resumes from its acked offset);
///     transferring ──no progress for stall_timeout──▶ pending (after a backoff, resumes) or,
///         past max_retries, failed (reason `timed_out`)
///
/// At most `max_concurrent_transfers` devices transfer at once (`transfer_slots`); a freed slot
/// goes to the next waiting device that can start. A transfer sends the start message, then a
/// window of chunks (slices of the one image buffer), one more per acknowledged chunk. Fleet
/// totals come from the rollout's `tally`, changed with each device's status.
///
/// A gated rollout (`publish(..., gated)`, for a campaign) starts no device by itself: only the
/// devices `admit`ted join it, when and as their campaign allows; `stop` ends one's part.
///
/// Stalls are found by a timer thread (started by the first publish, unless `stall_timeout`
/// is 0) that looks only at the devices holding a slot and at those waiting out a backoff.
///
/// A publish is atomic with respect to concurrent hellos: the slots move to the new rollout
/// and the running transfers stop before any hello can see the new rollout, a slot request for
/// an older rollout is refused (`transfer_slots::grant::stale`), and a device never goes back
/// to an older rollout than the one it is in. Publishes are serialised among themselves.
///
/// Locking: each method takes the device's mutex itself and never two devices' at once; the
/// slots, the current rollout and the backoff list have locks of their own, taken with no
/// device's mutex held; the store and the transport (through `delivery::flush`) are called
/// with no lock held (the publish lock excepted, which only publishes take).
template <class Transport, class Store>
class rollout_engine {
 public:
  /// The most bytes of a device's failure reason that are kept (a longer one is cut at a
  /// UTF-8 character boundary): the reason is stored, sent back, and kept in campaign histories.
  static constexpr std::size_t max_reason_bytes = 256;

  /// An engine over the hub's devices, their outboxes and the state store (all referenced).
  /// Throws std::invalid_argument for a window or chunk size of 0, or a negative timeout.
  rollout_engine(device::registry& devices, device::delivery<Transport>& out, Store& store,
                 rollout_options options)
      : devices_(devices),
        out_(out),
        store_(store),
        options_(checked(std::move(options))),
        slots_(options_.max_concurrent_transfers) {
    if (options_.leased_slots) (void)slots_.set_limit(0);  // nothing leased yet
  }
  rollout_engine(const rollout_engine&) = delete;
  rollout_engine& operator=(const rollout_engine&) = delete;
  /// Stops the timer thread.
  ~rollout_engine() { ticker_.stop(); }

  /// Starts rollout of `bytes` as `version` (copied once into a new image): every known device
  /// joins it, `announce(const image&)` runs (the hub tells the fleet), then devices online now
  /// start while slots last. Returns the rollout id. Throws std::invalid_argument for an empty
  /// version or image, or an image over `device::max_firmware_size`. A `gated` rollout takes
  /// no device but those `admit`ted (a campaign's).
  template <class Announce>
  std::uint32_t publish(std::string version, std::span<const std::byte> bytes, Announce&& announce,
                        bool gated = false) {
    if (version.empty()) throw std::invalid_argument("publish_firmware: empty version");
    auto id = next_rollout_.fetch_add(1, std::memory_order_relaxed) + 1;
    bool kept = false;
    // A store shared by several nodes numbers the rollout fleet-wide, keeps it and tells the
    // other nodes (they `adopt` it); a refusal there is the caller's error, nothing started.
    // No lock is held meanwhile: an `adopt` arriving on the store's thread never waits for it.
    // A gated rollout (a campaign's) goes to the fleet marked so: the other nodes take part
    // in it (the devices they hold join when the campaign admits them).
    if constexpr (requires { store_.publish_rollout(store::rollout_record{}); }) {
      if (!gated || store_.shared()) {
        image::check(bytes);  // before the fleet hears of it
        const auto r = store_.publish_rollout({id, version, {bytes.begin(), bytes.end()}, gated});
        if (r.error) throw std::system_error(r.error, "publish_firmware: the fleet's store");
        if (r.rollout != 0) {
          id = r.rollout;
          raise_next(id);
          kept = true;
        }
      }
    }
    std::lock_guard publishing(publish_mutex_);
    // A newer rollout of the fleet, adopted meanwhile, overtook this one.
    if (auto cur = current(); kept && cur && cur->rollout() >= id) return id;
    auto img = std::make_shared<const image>(id, std::move(version), bytes, options_.chunk_size);
    // A durable store keeps the rollout before any device's part in it.
    if constexpr (requires { store_.save_rollout(store::rollout_record{}); }) {
      if (!kept && !gated) store_.save_rollout({id, img->version(), {bytes.begin(), bytes.end()}});
    }
    begin_locked(std::move(img), std::forward<Announce>(announce), gated);
    return id;
  }
  /// Makes rollout `r`, published by another node of the fleet (a store shared by several
  /// nodes hands it over), the current one here, as `publish` would have: every known device
  /// joins it, `announce` runs, devices online start while slots last (a gated one, a
  /// campaign's, takes only the devices admitted). Nothing (false) when the rollout is not
  /// newer than the current one.
  template <class Announce>
  bool adopt(const store::rollout_record& r, Announce&& announce) {
    std::lock_guard publishing(publish_mutex_);
    if (auto cur = current(); cur && cur->rollout() >= r.rollout) return false;
    auto img = std::make_shared<const image>(
        r.rollout, r.version, std::span<const std::byte>(r.image), options_.chunk_size);
    raise_next(r.rollout);
    begin_locked(std::move(img), std::forward<Announce>(announce), r.gated);
    return true;
  }
  /// Writes every held device's part in the current rollout to the store again: after the
  /// store lost writes (Redis away), so that its per-device states and fleet totals catch up.
  void rewrite() {
    const auto img = current();
    if (!img) return;
    for (auto& rec : devices_.snapshot()) {
      store::transfer_state t;
      {
        std::lock_guard lock(rec->mutex);
        if (rec->transfer.image != img) continue;
        t = state_locked(*rec);
      }
      store_.set_transfer(rec->id, t);
    }
  }
  /// With leased slots (`rollout_options::leased_slots`): sets the limit to the node's lease;
  /// devices that a raised limit lets in start now. Lowering it stops no transfer.
  void set_slot_limit(std::size_t n) {
    const auto rollout = slots_.rollout();
    for (auto& id : slots_.set_limit(n)) start_next(std::move(id), rollout);
  }

  /// Makes rollout `r`, kept by a durable store, current again after a restart: rollout ids
  /// continue above it, and each device rejoins it where the store left it as its state loads
  /// (`restore_locked`). The fleet totals count the devices seen since. A `gated` rollout (a
  /// campaign's) takes back only the devices its campaign admits again.
  void restore(const store::rollout_record& r, bool gated = false) {
    std::lock_guard publishing(publish_mutex_);
    if (auto cur = current(); cur && cur->rollout() >= r.rollout) return;  // adopted already
    auto img = std::make_shared<const image>(
        r.rollout, r.version, std::span<const std::byte>(r.image), options_.chunk_size);
    auto counts = std::make_shared<tally>();
    (void)slots_.reset(r.rollout);
    {
      std::lock_guard lock(current_mutex_);
      current_ = std::move(img);
      current_tally_ = std::move(counts);
      gate_ = gated ? std::make_shared<rollout_gate>(r.rollout) : nullptr;
    }
    raise_next(r.rollout);
    if (options_.stall_timeout.count() > 0) {
      ticker_.start(tick_period(), [this] { tick(clock::now()); });
    }
  }
  /// Puts a device whose state was just loaded back into the current rollout as the store
  /// recorded it: its acknowledged offset (a transfer resumes there), or its end (verified,
  /// failed, skipped). Nothing for a record of another rollout. The caller holds its mutex.
  void restore_locked(device::device_record& rec, const store::transfer_state& t) const {
    if (t.rollout == 0 || rec.transfer.image) return;
    auto [img, counts] = current_rollout();
    if (!img || img->rollout() != t.rollout || !allowed(rec.id, t.rollout)) return;
    join_locked(rec, img, counts);
    auto& tr = rec.transfer;
    const bool ended = t.status == store::transfer_status::verified ||
                       t.status == store::transfer_status::failed ||
                       t.status == store::transfer_status::skipped;
    if (ended) {
      tr.reason = t.reason;
      set_status_locked(rec, t.status);
    }
    if ((ended || tr.status == store::transfer_status::pending) && t.offset <= img->size()) {
      tr.acked = t.offset;  // a transfer resumes here; an ended one keeps what it acknowledged
      counts->add_acked(static_cast<std::int64_t>(t.offset));
    }
  }

  /// Admits device `id` into the current gated rollout (its campaign's turn came): it joins
  /// (skipped if it runs the version) and starts when a slot is free, now if it is online, else
  /// at its next hello. With `retry`, a device whose part in the rollout ended failed starts
  /// again (from its acknowledged offset after a timeout, from byte 0 otherwise); without, an
  /// ended part stays so (a node catching up with the fleet's admitted set). False when the
  /// current rollout is not `rollout` or is not gated.
  bool admit(const std::string& id, std::uint32_t rollout, bool retry = true) {
    auto [img, counts] = current_rollout();
    auto g = gate();
    if (!img || img->rollout() != rollout || !g || g->rollout != rollout) return false;
    {
      std::lock_guard lock(g->mutex);
      g->admitted.insert(id);
    }
    auto rec = devices_.find(id);
    if (!rec) return true;  // not seen yet: its hello joins it
    bool want = false;
    store::transfer_state t;
    {
      std::lock_guard lock(rec->mutex);
      auto& tr = rec->transfer;
      if (retry && tr.image == img && tr.status == store::transfer_status::failed) {
        if (tr.reason != "timed_out") {
          counts->add_acked(-static_cast<std::int64_t>(tr.acked));
          tr.acked = 0;
        }
        tr.reason.clear();
        tr.retries = 0;
        tr.retry_at = {};
        set_status_locked(*rec, store::transfer_status::pending);
      }
      join_locked(*rec, img, counts);
      want = tr.image == img && tr.status == store::transfer_status::pending &&
             rec->session.id != 0 && rec->session.hello;
      t = state_locked(*rec);
    }
    report(id, t);
    if (want) take_slot(*rec, rollout);
    return true;
  }
  /// Ends device `id`'s part in rollout `rollout` before its time (its campaign was cancelled,
  /// or its attempt timed out): a pending or running transfer ends failed with `reason`, a
  /// running one is told (`fw_status`), its slot goes to the next device, and it is no longer
  /// admitted. Nothing for a part already ended. `on_status` is not called.
  void stop(const std::string& id, std::uint32_t rollout, const std::string& reason) {
    if (auto g = gate(); g && g->rollout == rollout) {
      std::lock_guard lock(g->mutex);
      g->admitted.erase(id);
    }
    auto rec = devices_.find(id);
    if (!rec) return;
    store::transfer_state t;
    std::optional<std::string> next;
    {
      std::lock_guard lock(rec->mutex);
      auto& tr = rec->transfer;
      if (!tr.image || tr.image->rollout() != rollout) return;
      if (tr.status != store::transfer_status::pending &&
          tr.status != store::transfer_status::transferring) {
        return;
      }
      const bool told = tr.status == store::transfer_status::transferring && rec->session.id != 0 &&
                        tr.session == rec->session.id;
      tr.reason = reason;
      set_status_locked(*rec, store::transfer_status::failed);
      if (told) queue_status_locked(*rec);
      next = slots_.release(rec->id, rollout);
      t = state_locked(*rec);
    }
    out_.flush(*rec);
    store_.set_transfer(id, t);
    start_next(std::move(next), rollout);
  }

  /// Session `s` of the device said hello: the device joins the current rollout (once per
  /// rollout; skipped if it runs the version) and starts or resumes when a slot is free (after
  /// its backoff, if its transfer stalled).
  void join(device::device_record& rec, session_id s) {
    auto [img, counts] = current_rollout();
    if (!img) return;
    if (!allowed(rec.id, img->rollout())) {
      if (options_.on_not_admitted) options_.on_not_admitted(rec.id);
      return;
    }
    bool want = false;
    bool holds_slot = false;
    std::uint32_t rollout = 0;
    store::transfer_state t;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return;
      join_locked(rec, img, counts);
      auto& tr = rec.transfer;
      if (tr.status == store::transfer_status::transferring && tr.session != s) {
        // Its session is gone (a takeover whose on_replaced has not run yet): it keeps its
        // slot and resumes on this session.
        set_status_locked(rec, store::transfer_status::pending);
        holds_slot = true;
      }
      rollout = tr.image->rollout();
      want = tr.status == store::transfer_status::pending &&
             (tr.retry_at == clock::time_point{} || tr.retry_at <= clock::now());
      t = state_locked(rec);
    }
    report(rec.id, t);
    if (holds_slot) {
      start_or_free(rec, rollout);
    } else if (want) {
      take_slot(rec, rollout);
    }
  }
  /// The device's session `old` was replaced by a newer one: a transfer streaming to it goes
  /// back to pending (to resume from its acknowledged offset) and its slot goes to the next
  /// waiting device. A place in the queue is kept.
  void on_replaced(device::device_record& rec, session_id old) {
    std::uint32_t rollout = 0;
    std::optional<std::string> next;
    store::transfer_state t;
    {
      // The slot is given up under the device's mutex, with the status: a hello of the new
      // session sees the transfer either still holding it or pending without it, never between.
      std::lock_guard lock(rec.mutex);
      if (rec.transfer.status == store::transfer_status::transferring &&
          rec.transfer.session == old) {
        set_status_locked(rec, store::transfer_status::pending);
        rollout = rec.transfer.image->rollout();
        next = slots_.release(rec.id, rollout);
        t = state_locked(rec);
      }
    }
    if (rollout == 0) return;
    report(rec.id, t);
    start_next(std::move(next), rollout);
  }
  /// The device went offline (its live session closed): a transfer goes back to pending, and
  /// its slot, or its place in the queue, is given up. Nothing if a newer session has taken
  /// the device meanwhile.
  void on_offline(device::device_record& rec) {
    std::optional<std::string> next;
    std::uint32_t rollout = 0;
    std::optional<store::transfer_state> t;
    {
      std::lock_guard lock(rec.mutex);  // as in on_replaced: status and slot together
      if (rec.session.id != 0 || !rec.transfer.image) return;
      if (rec.transfer.status == store::transfer_status::transferring) {
        set_status_locked(rec, store::transfer_status::pending);  // resumes from `acked`
        t = state_locked(rec);
      }
      rollout = rec.transfer.image->rollout();
      next = slots_.release(rec.id, rollout);
    }
    if (t) report(rec.id, *t);  // the store (and fleet totals) see it pending
    start_next(std::move(next), rollout);
  }

  /// The device's record is about to leave memory (evicted while offline; the store keeps its
  /// state): its part leaves its rollout's counters, so that the record made again at its next
  /// hello is counted once, and a slot or place in the queue it had is given up.
  void forget(device::device_record& rec) {
    std::uint32_t rollout = 0;
    {
      std::lock_guard lock(rec.mutex);
      rollout = forget_locked(rec);
    }
    release_forgotten(rec.id, rollout);
  }
  /// `forget` for a caller that holds `rec.mutex` (the registry's eviction): takes the record's
  /// part out of the counters and returns the rollout whose slot or queue place the device
  /// gives up (0: none), to pass to `release_forgotten` once the caller holds no lock.
  std::uint32_t forget_locked(device::device_record& rec) {
    auto& tr = rec.transfer;
    if (!tr.image) return 0;
    if (tr.tally) {
      tr.tally->move(tr.status, store::transfer_status::none);
      tr.tally->add_acked(-static_cast<std::int64_t>(tr.acked));
      tr.tally.reset();
    }
    return tr.image->rollout();
  }
  /// Gives up the slot or queue place of a device `forget_locked` returned `rollout` for.
  void release_forgotten(const std::string& id, std::uint32_t rollout) {
    if (rollout != 0) start_next(slots_.release(id, rollout), rollout);
  }

  /// Session `s` acknowledged the image up to `offset` of rollout `rollout`: more chunks go
  /// out. Returns the error to answer with: `unknown_rollout` (no such transfer running for
  /// the device) or `bad_fw_ack` (beyond what was sent, misaligned or backwards).
  std::optional<device::error> on_ack(device::device_record& rec, session_id s,
                                      std::uint64_t rollout, std::uint64_t offset) {
    store::transfer_state t;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return std::nullopt;
      auto& tr = rec.transfer;
      if (!running(rec, rollout)) return device::error::unknown_rollout;
      if (offset < tr.acked || offset > tr.sent ||
          (offset % tr.image->chunk_size() != 0 && offset != tr.image->size())) {
        return device::error::bad_fw_ack;
      }
      tr.tally->add_acked(static_cast<std::int64_t>(offset - tr.acked));
      tr.acked = offset;
      fill_window_locked(rec);
      t = state_locked(rec);
    }
    out_.flush(rec);
    store_.set_transfer(rec.id, t);
    return std::nullopt;
  }
  /// Session `s` lost its partial image of rollout `rollout` and asks for the transfer again
  /// from byte 0 (`fw_restart`): its acknowledged offset goes back to 0 and a new `firmware`
  /// start (offset 0) and window follow. Each restart uses one of the device's `max_retries`;
  /// past them the transfer fails with reason `too_many_restarts`. Returns `unknown_rollout`
  /// when no such transfer is running for the device.
  std::optional<device::error> on_restart(device::device_record& rec, session_id s,
                                          std::uint64_t rollout) {
    store::transfer_state t;
    bool failed = false;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return std::nullopt;
      if (!running(rec, rollout)) return device::error::unknown_rollout;
      auto& tr = rec.transfer;
      if (++tr.retries > options_.max_retries) {
        fail_locked(rec, "too_many_restarts");
        failed = true;
      } else {
        tr.tally->add_acked(-static_cast<std::int64_t>(tr.acked));
        tr.acked = 0;
        queue_start_locked(rec);
      }
      t = state_locked(rec);
    }
    out_.flush(rec);
    if (failed) {
      report(rec.id, t);
    } else {
      store_.set_transfer(rec.id, t);
    }
    const auto id = static_cast<std::uint32_t>(rollout);
    if (failed) start_next(slots_.release(rec.id, id), id);
    return std::nullopt;
  }
  /// Session `s` reported the result of rollout `rollout` (`sha256` and `reason` as sent): the
  /// transfer ends verified (every byte acknowledged and the hash matches) or failed with a
  /// reason (the device's, cut to `max_reason_bytes`), the device is told (`fw_status`), and its
  /// slot goes to the next waiting device.
  /// Returns `unknown_rollout` when no such transfer is running for the device.
  std::optional<device::error> on_result(device::device_record& rec, session_id s,
                                         std::uint64_t rollout, bool ok,
                                         const std::optional<std::string>& sha256,
                                         const std::optional<std::string>& reason) {
    bool verified = false;
    store::transfer_state t;
    std::string version;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return std::nullopt;
      if (!running(rec, rollout)) return device::error::unknown_rollout;
      auto& tr = rec.transfer;
      const auto& img = *tr.image;
      if (!ok) {
        fail_locked(rec, reason
                             ? std::string(devgate::detail::utf8_prefix(*reason, max_reason_bytes))
                             : "device reported a failure");
      } else if (tr.acked != img.size()) {
        fail_locked(rec, "result before every byte was acknowledged");
      } else if (!sha256 || *sha256 != img.sha256()) {
        fail_locked(rec, "sha256 mismatch");
      } else {
        verified = true;
        rec.firmware_version = img.version();
        version = img.version();
        tr.reason.clear();
        set_status_locked(rec, store::transfer_status::verified);
        queue_status_locked(rec);
      }
      t = state_locked(rec);
    }
    out_.flush(rec);
    report(rec.id, t);
    if (verified) store_.set_firmware_version(rec.id, version);
    const auto id = static_cast<std::uint32_t>(rollout);
    start_next(slots_.release(rec.id, id), id);
    return std::nullopt;
  }

  /// The stall check at time `now` (the timer thread calls it every `tick_period()`; tests may
  /// call it themselves): a transfer whose acknowledged offset has not moved for
  /// `stall_timeout` gives up its slot and goes back to pending until its backoff ends, or
  /// fails with reason `timed_out` past `max_retries`; devices whose backoff ended ask for a
  /// slot again. Looks only at the devices holding a slot and at those waiting out a backoff.
  void tick(clock::time_point now) {
    if (options_.stall_timeout.count() <= 0) return;
    const auto rollout = slots_.rollout();
    for (const auto& id : slots_.holders()) {
      auto rec = devices_.find(id);
      if (!rec) {
        start_next(slots_.release(id, rollout), rollout);
        continue;
      }
      check_stall(*rec, rollout, now);
    }
    std::vector<std::string> due;
    {
      std::lock_guard lock(backoff_mutex_);
      for (auto it = backoff_.begin(); it != backoff_.end();) {
        if (it->first <= now) {
          due.push_back(std::move(it->second));
          it = backoff_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (const auto& id : due) {
      auto rec = devices_.find(id);
      if (!rec) continue;
      bool want = false;
      {
        std::lock_guard lock(rec->mutex);
        auto& tr = rec->transfer;
        if (!tr.image || tr.image->rollout() != rollout ||
            tr.status != store::transfer_status::pending) {
          continue;
        }
        tr.retry_at = {};  // its backoff is over
        want = rec->session.id != 0 && rec->session.hello;
      }
      if (want) take_slot(*rec, rollout);  // offline: its next hello asks
    }
  }
  /// How often the timer thread runs the stall check: an eighth of the shorter of the stall
  /// timeout and the backoff, between 1 ms and 1 s.
  [[nodiscard]] clock::duration tick_period() const noexcept {
    const auto shorter = options_.retry_backoff.count() > 0
                             ? std::min(options_.stall_timeout, options_.retry_backoff)
                             : options_.stall_timeout;
    return std::clamp<clock::duration>(shorter / 8, std::chrono::milliseconds(1),
                                       std::chrono::seconds(1));
  }

  /// Fleet totals of the current rollout, from its counters (constant time).
  [[nodiscard]] rollout_totals totals() const {
    rollout_totals out;
    auto [img, counts] = current_rollout();
    if (!img) return out;
    out.rollout = img->rollout();
    out.version = img->version();
    out.size = img->size();
    out.pending = counts->count(store::transfer_status::pending);
    out.transferring = counts->count(store::transfer_status::transferring);
    out.verified = counts->count(store::transfer_status::verified);
    out.failed = counts->count(store::transfer_status::failed);  // before timed_out (tally.hpp)
    out.skipped = counts->count(store::transfer_status::skipped);
    out.bytes_acked = counts->bytes_acked();
    out.timed_out = counts->timed_out();
    out.retries = counts->retries();
    out.peak_transferring = slots_.peak();
    return out;
  }
  /// One device's part in the current rollout (std::nullopt for a device never seen).
  [[nodiscard]] std::optional<store::transfer_state> transfer_of(std::string_view id) const {
    auto rec = devices_.find(id);
    if (!rec) return std::nullopt;
    std::lock_guard lock(rec->mutex);
    return state_locked(*rec);
  }
  /// The device's part as the store records it; the caller holds the device's mutex.
  [[nodiscard]] static store::transfer_state state_locked(const device::device_record& rec) {
    store::transfer_state t;
    const auto& tr = rec.transfer;
    if (!tr.image) return t;
    t.rollout = tr.image->rollout();
    t.version = tr.image->version();
    t.status = tr.status;
    t.offset = tr.acked;
    t.reason = tr.reason;
    return t;
  }
  /// The transfer slots (limit, active, waiting, peak).
  [[nodiscard]] const transfer_slots& slots() const noexcept { return slots_; }
  /// The image being rolled out (nullptr before the first publish).
  [[nodiscard]] std::shared_ptr<const image> current() const {
    std::lock_guard lock(current_mutex_);
    return current_;
  }
  /// The options in force.
  [[nodiscard]] const rollout_options& options() const noexcept { return options_; }
  /// The current rollout's id when it is gated (a campaign's), else 0.
  [[nodiscard]] std::uint32_t gated() const {
    auto g = gate();
    return g ? g->rollout : 0;
  }

 private:
  // A gated rollout's admitted devices.
  struct rollout_gate {
    explicit rollout_gate(std::uint32_t r) : rollout(r) {}
    const std::uint32_t rollout;
    std::mutex mutex;
    std::unordered_set<std::string> admitted;
  };
  // The current rollout's gate (nullptr: not gated).
  [[nodiscard]] std::shared_ptr<rollout_gate> gate() const {
    std::lock_guard lock(current_mutex_);
    return gate_;
  }
  // Whether device `id` may join rollout `rollout`: any device when it is not gated, else an
  // admitted one (a gate of another rollout: a publish came meanwhile, which joins it).
  [[nodiscard]] bool allowed(const std::string& id, std::uint32_t rollout) const {
    auto g = gate();
    if (!g) return true;
    if (g->rollout != rollout) return false;
    std::lock_guard lock(g->mutex);
    return g->admitted.count(id) != 0;
  }
  // The device's part changed status: the store keeps it and `on_status` hears it.
  void report(const std::string& id, const store::transfer_state& t) {
    store_.set_transfer(id, t);
    if (options_.on_status) options_.on_status(id, t);
  }
  // Takes the device out of its rollout (a gated rollout replaced it; caller holds its mutex).
  static void leave_locked(device::device_record& rec) {
    auto& tr = rec.transfer;
    if (tr.tally) tr.tally->move(tr.status, store::transfer_status::none);
    tr.tally.reset();
    tr.image.reset();
    tr.status = store::transfer_status::none;
    tr.acked = 0;
    tr.sent = 0;
    tr.reason.clear();
  }

  // Starts rollout `img` (the caller holds the publish lock and kept it in the store): the
  // slots move to it and the transfers that held one stop (they join it), so no device
  // transfers the old image once a hello can see the new; then every known device joins,
  // `announce` runs and the devices online now start while slots last.
  template <class Announce>
  void begin_locked(std::shared_ptr<const image> img, Announce&& announce, bool gated) {
    const auto id = img->rollout();
    auto counts = std::make_shared<tally>();
    for (const auto& held : slots_.reset(id)) {
      if (auto rec = devices_.find(held)) {
        std::lock_guard lock(rec->mutex);
        if (gated) {
          leave_locked(*rec);  // its old transfer stops; it joins when admitted
        } else {
          join_locked(*rec, img, counts);
        }
      }
    }
    {
      std::lock_guard lock(current_mutex_);
      current_ = img;
      current_tally_ = counts;
      gate_ = gated ? std::make_shared<rollout_gate>(id) : nullptr;
    }
    {
      std::lock_guard lock(backoff_mutex_);
      backoff_.clear();
    }
    if (options_.stall_timeout.count() > 0) {
      ticker_.start(tick_period(), [this] { tick(clock::now()); });
    }
    std::vector<device::registry::record_ptr> online;
    for (auto& rec : gated ? std::vector<device::registry::record_ptr>{} : devices_.snapshot()) {
      bool want = false;
      store::transfer_state t;
      {
        std::lock_guard lock(rec->mutex);
        join_locked(*rec, img, counts);
        want = rec->transfer.image == img &&
               rec->transfer.status == store::transfer_status::pending && rec->session.id != 0 &&
               rec->session.hello;
        t = state_locked(*rec);
      }
      report(rec->id, t);
      if (want) online.push_back(std::move(rec));
    }
    announce(static_cast<const image&>(*img));
    for (auto& rec : online) take_slot(*rec, id);
  }
  // Rollout ids here continue above `id`.
  void raise_next(std::uint32_t id) {
    auto seen = next_rollout_.load(std::memory_order_relaxed);
    while (seen < id && !next_rollout_.compare_exchange_weak(seen, id, std::memory_order_relaxed)) {
    }
  }
  // With leased slots, tells the lease holder that the demand changed.
  void demand_changed() const {
    if (options_.leased_slots && options_.on_slot_demand) options_.on_slot_demand();
  }

  static rollout_options checked(rollout_options o) {
    if (o.window == 0) throw std::invalid_argument("hub_options::window must be >= 1");
    if (o.chunk_size == 0) throw std::invalid_argument("hub_options::chunk_size must be >= 1");
    if (o.stall_timeout.count() < 0 || o.retry_backoff.count() < 0) {
      throw std::invalid_argument("hub_options: stall_timeout and retry_backoff must be >= 0");
    }
    return o;
  }

  // The current image and its counters, read together.
  [[nodiscard]] std::pair<std::shared_ptr<const image>, std::shared_ptr<tally>> current_rollout()
      const {
    std::lock_guard lock(current_mutex_);
    return {current_, current_tally_};
  }
  // Whether the device is transferring rollout `rollout` (caller holds its mutex).
  static bool running(const device::device_record& rec, std::uint64_t rollout) {
    const auto& tr = rec.transfer;
    return tr.image && tr.image->rollout() == rollout &&
           tr.status == store::transfer_status::transferring;
  }
  // Moves the device to `to`, in its rollout's counters too (caller holds its mutex).
  static void set_status_locked(device::device_record& rec, store::transfer_status to) {
    auto& tr = rec.transfer;
    if (tr.tally) tr.tally->move(tr.status, to);
    tr.status = to;
  }
  // Puts the device into `img`'s rollout (once per rollout, and never back to an older one: a
  // thread that read the previous rollout may come late; caller holds its mutex).
  static void join_locked(device::device_record& rec, const std::shared_ptr<const image>& img,
                          const std::shared_ptr<tally>& counts) {
    auto& tr = rec.transfer;
    if (tr.image && tr.image->rollout() > img->rollout()) return;
    if (tr.image != img) {
      tr.image = img;
      tr.tally = counts;
      tr.acked = 0;
      tr.sent = 0;
      tr.reason.clear();
      tr.retries = 0;
      tr.retry_at = {};
      tr.status = store::transfer_status::pending;
      counts->enter(tr.status);
    }
    if (tr.status == store::transfer_status::pending && rec.firmware_version == img->version()) {
      set_status_locked(rec, store::transfer_status::skipped);
    }
  }
  // Ends the transfer failed with `reason` and tells the device (caller holds its mutex).
  static void fail_locked(device::device_record& rec, std::string reason) {
    rec.transfer.reason = std::move(reason);
    set_status_locked(rec, store::transfer_status::failed);
    queue_status_locked(rec);
  }
  // Queues `fw_status` with the transfer's end to its session (caller holds the mutex).
  static void queue_status_locked(device::device_record& rec) {
    const auto& tr = rec.transfer;
    nlohmann::json status{{"type", "fw_status"},
                          {"rollout", tr.image->rollout()},
                          {"status", store::to_string(tr.status)},
                          {"reason", tr.reason}};
    device::delivery<Transport>::queue_locked(rec, tr.session, payload_kind::text,
                                              device::to_payload(status));
  }
  // Queues the start message from `acked` and a window of chunks, and restarts the stall clock
  // (caller holds the device's mutex; the transfer is transferring).
  void queue_start_locked(device::device_record& rec) {
    auto& tr = rec.transfer;
    tr.sent = tr.acked;
    tr.progress_offset = tr.acked;
    tr.progress_at = clock::now();
    const auto& img = *tr.image;
    nlohmann::json start{
        {"type", "firmware"},          {"rollout", img.rollout()}, {"version", img.version()},
        {"size", img.size()},          {"sha256", img.sha256()},   {"chunk_size", img.chunk_size()},
        {"chunks", img.chunk_count()}, {"offset", tr.acked},       {"window", options_.window}};
    device::delivery<Transport>::queue_locked(rec, tr.session, payload_kind::text,
                                              device::to_payload(start));
    fill_window_locked(rec);
  }
  // Queues chunks until `window` are unacknowledged (caller holds the device's mutex).
  void fill_window_locked(device::device_record& rec) {
    auto& tr = rec.transfer;
    const auto& img = *tr.image;
    const std::uint64_t window = options_.window * img.chunk_size();
    while (tr.sent < img.size() && tr.sent - tr.acked < window) {
      device::delivery<Transport>::queue_locked(rec, tr.session, payload_kind::binary,
                                                img.chunk_at(tr.sent));
      tr.sent += std::min<std::uint64_t>(img.chunk_size(), img.size() - tr.sent);
    }
  }
  // What `start` made of a device holding a slot.
  enum class start_result : std::uint8_t {
    started,  // the transfer runs (started now, or already by another thread)
    kept,     // a session is live but has not said hello yet: its hello starts the transfer
    freed,    // the device cannot use the slot (offline, in another rollout, not pending)
    lost,     // the device holds no slot (the stall check took it back meanwhile)
  };
  // Asks for a slot of rollout `rollout` for the device and starts it if it has one; a slot it
  // cannot use goes to the next waiting device.
  void take_slot(device::device_record& rec, std::uint32_t rollout) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      const auto g = slots_.acquire(rec.id, rollout);
      if (g == transfer_slots::grant::queued) demand_changed();
      if (g != transfer_slots::grant::acquired && g != transfer_slots::grant::held) return;
      if (start_or_free(rec, rollout) != start_result::lost) return;
    }
  }
  // Starts the device's transfer (it holds a slot of rollout `rollout`), or frees the slot.
  start_result start_or_free(device::device_record& rec, std::uint32_t rollout) {
    const auto r = start(rec, rollout);
    if (r == start_result::freed) start_next(slots_.release(rec.id, rollout), rollout);
    return r;
  }
  // Starts (or resumes) the device's transfer of rollout `rollout`, whose slot it holds. Whoever
  // gave the slot and the device's own hello may both call it: the first starts the transfer.
  start_result start(device::device_record& rec, std::uint32_t rollout) {
    store::transfer_state t;
    {
      std::lock_guard lock(rec.mutex);
      auto& tr = rec.transfer;
      if (!tr.image || tr.image->rollout() != rollout) return start_result::freed;
      if (tr.status == store::transfer_status::transferring) return start_result::started;
      if (tr.status != store::transfer_status::pending || rec.session.id == 0) {
        return start_result::freed;
      }
      if (!slots_.holds(rec.id, rollout)) return start_result::lost;
      if (!rec.session.hello) {
        tr.progress_at = clock::now();  // the stall check frees the slot if no hello comes
        return start_result::kept;
      }
      set_status_locked(rec, store::transfer_status::transferring);
      tr.session = rec.session.id;
      queue_start_locked(rec);
      t = state_locked(rec);
    }
    out_.flush(rec);
    report(rec.id, t);
    return start_result::started;
  }
  // Gives a freed slot of rollout `rollout` to the next waiting device that can start.
  void start_next(std::optional<std::string> next, std::uint32_t rollout) {
    while (next) {
      auto rec = devices_.find(*next);
      const auto r = rec ? start(*rec, rollout) : start_result::freed;
      if (r == start_result::started || r == start_result::kept) return;
      next = r == start_result::freed ? slots_.release(*next, rollout) : std::nullopt;
    }
    demand_changed();  // a slot may be idle: the lease can shrink
  }
  // The stall check of one slot holder of rollout `rollout` (see `tick`).
  void check_stall(device::device_record& rec, std::uint32_t rollout, clock::time_point now) {
    store::transfer_state t;
    bool failed = false;
    clock::time_point retry_at{};
    {
      std::unique_lock lock(rec.mutex);
      auto& tr = rec.transfer;
      if (!running(rec, rollout)) {
        // A slot kept for a session that never says hello is taken back after stall_timeout
        // (under the device's mutex, so that a hello starting the transfer sees it gone).
        if (tr.image && tr.image->rollout() == rollout &&
            tr.status == store::transfer_status::pending && rec.session.id != 0 &&
            !rec.session.hello && now - tr.progress_at >= options_.stall_timeout) {
          auto next = slots_.release(rec.id, rollout);
          lock.unlock();
          start_next(std::move(next), rollout);
        }
        return;  // otherwise starting or stopping: whoever does it frees the slot
      }
      if (tr.acked != tr.progress_offset) {
        tr.progress_offset = tr.acked;
        tr.progress_at = now;
        return;
      }
      if (now - tr.progress_at < options_.stall_timeout) return;
      if (++tr.retries > options_.max_retries) {
        // Counted before the move to failed: a reader that sees the failure sees its reason.
        tr.tally->count_timed_out();
        fail_locked(rec, "timed_out");
        failed = true;
      } else {
        set_status_locked(rec, store::transfer_status::pending);
        tr.tally->count_retry();
        tr.retry_at = now + options_.retry_backoff * (1u << std::min(tr.retries - 1, 6u));
        retry_at = tr.retry_at;
      }
      t = state_locked(rec);
    }
    if (failed) {
      out_.flush(rec);
    } else {
      std::lock_guard lock(backoff_mutex_);
      backoff_.emplace_back(retry_at, rec.id);
    }
    report(rec.id, t);
    start_next(slots_.release(rec.id, rollout), rollout);
  }

  device::registry& devices_;
  device::delivery<Transport>& out_;
  Store& store_;
  const rollout_options options_;
  transfer_slots slots_;
  std::mutex publish_mutex_;
  mutable std::mutex current_mutex_;
  std::shared_ptr<const image> current_;
  std::shared_ptr<tally> current_tally_;
  std::shared_ptr<rollout_gate> gate_;  // under current_mutex_; nullptr: not gated
  std::mutex backoff_mutex_;
  std::vector<std::pair<clock::time_point, std::string>> backoff_;  // devices waiting to retry
  std::atomic<std::uint32_t> next_rollout_{0};
  detail::ticker ticker_;  // last: stopped first
};

}  // namespace devgate::firmware
