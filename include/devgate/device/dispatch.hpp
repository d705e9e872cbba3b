#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>     // std::find
#include <atomic>        // error count
#include <chrono>        // last-seen times
#include <cstddef>       // std::size_t
#include <cstdint>       // sequence numbers
#include <iterator>      // std::begin, std::end
#include <optional>      // message fields
#include <span>          // batches
#include <string>        // device ids
#include <string_view>   // message types
#include <system_error>  // results
#include <thread>        // who handles parked messages
#include <utility>       // std::move
#include <vector>        // runs of device messages

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/device/delivery.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/hub_options.hpp"  // topic_policy
#include "devgate/device/protocol.hpp"
#include "devgate/device/pubsub.hpp"
#include "devgate/device/record.hpp"
#include "devgate/device/registry.hpp"
#include "devgate/firmware/rollout.hpp"
#include "devgate/pipeline/gateway.hpp"  // batch_result
#include "devgate/pipeline/message.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// The hub's side of every session: sessions opening and closing, and each message a device
/// sends, parsed as protocol v1 (docs/PROTOCOL.md), checked, and routed to the part that handles
/// it: `hello` and `ack` to delivery, `subscribe` to pub/sub, `fw_ack`, `fw_restart` and
/// `fw_result` to the rollout engine, `send` and binary messages into the gateway's pipeline.
/// Anything wrong is answered with an `error` message; too many close the session with 4002.
///
/// Runs on transport threads. Holds no lock of its own: it takes a device's mutex (through the
/// parts, or itself to count errors and messages) and never holds it while calling the
/// transport, the store (but the replay journal's queue push), the gateway or another part. `Store`
/// is the hub's `store::write_behind` front: writes never wait for a store that may block, and the
/// live figures (messages sent, last seen, firmware version) are read from the record, never from
/// the store, which is loaded only when a device's record is created.
template <class Transport, class Store, class Gateway>
class protocol_dispatch {
 public:
  /// Dispatch over the hub's parts (all referenced: they outlive it). `max_message_bytes`,
  /// `max_errors`, `may_subscribe` and `require_authentication` are the hub's options of those
  /// names.
  protocol_dispatch(Transport& transport, Gateway& gateway, registry& devices,
                    delivery<Transport>& out, firmware::rollout_engine<Transport, Store>& rollout,
                    pubsub& bus, Store& store, std::size_t max_message_bytes, unsigned max_errors,
                    topic_policy may_subscribe = {}, bool require_authentication = false,
                    ack_policy ack = ack_policy::on_accept)
      : transport_(transport),
        gateway_(gateway),
        devices_(devices),
        out_(out),
        rollout_(rollout),
        bus_(bus),
        store_(store),
        max_message_bytes_(max_message_bytes),
        max_errors_(max_errors),
        may_subscribe_(std::move(may_subscribe)),
        require_authentication_(require_authentication),
        ack_(ack) {}
  protocol_dispatch(const protocol_dispatch&) = delete;
  protocol_dispatch& operator=(const protocol_dispatch&) = delete;

  /// A session opened: it becomes its device's live session; an older one is closed with 4000.
  void open(const session_info& info) {
    if (!is_valid_device_id(info.device_id)) {
      // Transports other than the WebSocket server (which answers 400) may not validate ids.
      transport_.close(info.id, close_code::policy_violation, "invalid device id");
      return;
    }
    if (require_authentication_ && !info.authenticated) {
      // Before the record: an unauthenticated session neither replaces the device's session
      // nor receives its replayed messages.
      transport_.close(info.id, close_code::policy_violation, "not authenticated");
      return;
    }
    registry::record_ptr rec;
    if constexpr (Store::calls_inline) {
      rec = devices_.get_or_create(
          info.device_id, [&] { return store_.load(info.device_id); },
          [this](device_record& r, store::device_state& st) { restore_locked(r, st); });
    } else {
      if (store_.shared()) {
        // Other nodes may have changed the device's state since this record was filled: a new
        // session of an offline device starts from what the store has now.
        if (auto held = devices_.find(info.device_id)) {
          bool offline = false;
          {
            std::lock_guard lock(held->mutex);
            offline = held->session.id == 0 && !held->load.pending;
          }
          if (offline) (void)let_go(info.device_id);
        }
      }
      // A store that may block is read on its own thread: the session's messages wait in the
      // record (`load.parked`) until the state is in.
      rec = devices_.get_or_create_unloaded(info.device_id).first;
    }
    const session_id old = devices_.attach(rec, info.id);
    if constexpr (!Store::calls_inline) request_load(rec, info.id);
    if (old == 0) return;
    out_.forget(*rec, old);
    bus_.unsubscribe_all(old);
    transport_.close(old, close_replaced, "replaced by a newer session for this device");
    rollout_.on_replaced(*rec, old);
  }
  /// A session closed: its subscriptions end, and if it was its device's live session the
  /// device goes offline (deliveries are kept for its return, its transfer pauses).
  void close(session_id s, close_code /*code*/) {
    bus_.unsubscribe_all(s);
    auto rec = devices_.detach(s);
    if (!rec) return;
    out_.forget(*rec, s);
    const auto now = unix_ms();
    store_.touch(rec->id, now);
    {
      std::lock_guard lock(rec->mutex);
      rec->last_seen_ms = now;
      rec->store_ticket = store_.submitted();  // the touch above, and all before it
    }
    rollout_.on_offline(*rec);
    // Let go while it was live (`let_go`): its transfer leaves the rollout's counts now.
    if (rec->offline.released.load(std::memory_order_relaxed)) forget_transfer(*rec);
  }
  /// Takes device `id`'s record out of the registry (`registry::release`), so that its next
  /// session loads its state from the store again; an offline device's transfer leaves the
  /// rollout's counts at once, a live one's when its session closes. Returns the record
  /// (nullptr: none held), whose live session the caller closes.
  registry::record_ptr let_go(std::string_view id) {
    auto rec = devices_.release(id);
    if (!rec) return rec;
    bool offline = false;
    {
      std::lock_guard lock(rec->mutex);
      offline = rec->session.id == 0;
    }
    if (offline) forget_transfer(*rec);
    return rec;
  }

  /// The hub's intake: every message of `batch` (one session's, as transports deliver them) is
  /// handled in order; runs of device messages go into the pipeline together. Protocol errors
  /// are answered here, so every message is taken, except from a session the hub does not
  /// know (`errc::unknown_session`).
  batch_result intake(std::span<inbound_message> batch) {
    auto& shared = thread_run();
    if (shared.busy) {  // re-entered from a handler this thread called: a run of its own
      run local;
      return intake(batch, local);
    }
    return intake(batch, shared);
  }

  /// Error replies sent (bad_resume excepted).
  [[nodiscard]] std::uint64_t protocol_errors() const noexcept {
    return errors_.load(std::memory_order_relaxed);
  }

  /// Takes a record let go of (`let_go`) out of the rollout's counts, giving up its slot or
  /// queue place.
  void forget_transfer(device_record& rec) {
    std::uint32_t rollout = 0;
    {
      std::lock_guard lock(rec.mutex);
      rollout = rollout_.forget_locked(rec);
    }
    rollout_.release_forgotten(rec.id, rollout);
  }
  /// Puts what a durable store kept of a device, beyond the registry's figures, into its record
  /// made from that state: kept deliveries, the dispatch window, its part in the current
  /// rollout. The caller holds the record's mutex.
  void restore_locked(device_record& rec, store::device_state& st) {
    if (!st.replay.empty()) out_.restore_locked(rec, std::move(st.replay));
    if (!st.dispatched.empty()) {
      if (!rec.dispatch) rec.dispatch = std::make_unique<device_record::dispatch_part>();
      rec.dispatch->window = st.dispatched;
    }
    rollout_.restore_locked(rec, st.transfer);
    if (st.routed != 0) (void)take_routed(rec.id);  // runs once the record is in
  }
  /// Takes the messages other nodes routed to device `id` (`store::fleet_delivery_store`), on
  /// the store thread: numbers each as the device's next delivery, keeps them in the store
  /// while removing them from the routed ones (one step, fenced), then sends them. Nothing for
  /// a device whose state is not in here: they wait for its load, which reports them. False
  /// when the store's queue is full (they wait for the next call or the device's next load).
  bool take_routed(const std::string& id) {
    if constexpr (!Store::routes) {
      (void)id;
      return false;
    } else {
      return store_.post(id, [this, id](auto& s) -> std::error_code {
        const auto rec = devices_.find(id);
        if (!rec || !rec->load.state_in.load(std::memory_order_acquire)) return {};
        auto r = s.routed(id);
        if (r.error || r.messages.empty()) return r.error;
        std::vector<store::replay_entry> kept;
        kept.reserve(r.messages.size());
        const routed_journal j{journal_, kept};
        for (const auto& data : r.messages) (void)out_.deliver(*rec, data, j);
        const auto k = s.keep_routed(id, kept);
        // Refused: the device is another node's now; this record is let go (the release
        // handler) with the messages still held, and they stay routed for that node.
        if (k.refused) return {};
        // Kept, or failed (counted; they stay routed and may come again: at least once).
        out_.stored(*rec, kept.back().seq);
        return k.error;
      });
    }
  }
  /// Ack policy on_dispatch: the store recorded (`ok`) a message of device `id` the sink took,
  /// or failed to. A send with an id leaves the device's in-flight list; recorded, its id goes
  /// into the dispatch window and it is answered `sent` on the device's live session (which may
  /// be newer than the one it came on); not recorded, it is answered `not_dispatched`: a resend
  /// reaches the sink again (at least once), since nothing says it did.
  void recorded(const std::string& id, const store::dispatch_record& r, bool ok) {
    if (!r.id) return;
    auto rec = devices_.find(id);
    if (!rec) return;  // a record with sends in flight is never evicted: forgotten meanwhile
    bool queued = false;
    {
      std::lock_guard lock(rec->mutex);
      if (rec->dispatch) {
        std::erase(rec->dispatch->in_flight, *r.id);
        if (ok) rec->dispatch->window.insert(*r.id);
      }
      if (rec->session.id != 0 && rec->session.hello) {
        delivery<Transport>::queue_locked(
            *rec, rec->session.id, payload_kind::text,
            ok ? make_sent(*r.id, r.number) : make_error(error::not_dispatched, "send", *r.id));
        queued = true;
      }
    }
    if (!ok) errors_.fetch_add(1, std::memory_order_relaxed);
    if (queued) out_.flush(*rec);
  }
  /// Ack policy on_dispatch: message `m` will not reach the sink (dead-lettered, or dropped by
  /// the pipeline's overflow policy). A send with an id leaves the in-flight list, so that a
  /// resend is dispatched, and its live session hears `not_dispatched`.
  void not_dispatched(const message& m) {
    if (!m.has_reference || m.session == 0) return;
    auto rec = devices_.find_session(m.session);
    if (!rec) rec = devices_.find(m.device_id.view());
    if (!rec) return;
    bool queued = false;
    {
      std::lock_guard lock(rec->mutex);
      if (rec->dispatch) std::erase(rec->dispatch->in_flight, m.reference);
      if (rec->session.id != 0 && rec->session.hello) {
        delivery<Transport>::queue_locked(*rec, rec->session.id, payload_kind::text,
                                          make_error(error::not_dispatched, "send", m.reference));
        queued = true;
      }
    }
    if (queued) {
      errors_.fetch_add(1, std::memory_order_relaxed);
      out_.flush(*rec);
    }
  }

 private:
  // Consecutive device messages of one device, pushed together, with what to answer each.
  struct run {
    std::vector<message> messages;
    std::vector<std::optional<std::uint64_t>> refs;  // the `send` id to confirm, per message
    bool busy = false;
  };
  // Marks a run in use, and leaves it empty and free however the intake ends.
  struct run_guard {
    explicit run_guard(run& r) : r_(r) { r_.busy = true; }
    run_guard(const run_guard&) = delete;
    run_guard& operator=(const run_guard&) = delete;
    ~run_guard() {
      r_.messages.clear();
      r_.refs.clear();
      r_.busy = false;
    }
    run& r_;
  };
  // The calling thread's run: empty between intakes, so every hub of this type shares it.
  static run& thread_run() {
    thread_local run r;
    return r;
  }

  batch_result intake(std::span<inbound_message> batch, run& r) {
    run_guard guard(r);
    registry::record_ptr rec;  // the device of `current`, looked up once per batch
    session_id current = 0;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      inbound_message& in = batch[i];
      if (!rec || current != in.session) {
        if (rec) push_run(*rec, r);
        rec = devices_.find_session(in.session);
        if (!rec) return {i, errc::unknown_session};
        current = in.session;
      }
      handle(*rec, in, r);
    }
    if (rec) push_run(*rec, r);
    return {batch.size(), {}};
  }

  void handle(device_record& rec, inbound_message& in, run& r) {
    const session_id s = in.session;
    const bool fits = in.payload.size() <= max_message_bytes_;
    const bool binary = in.kind == payload_kind::binary;
    // The common `send` is read in one pass, before the lock; anything else takes the tree path.
    std::optional<send_fields> fast;
    if (!binary && fits) fast = read_send(in.payload.view());
    bool hello = false;
    bool parked = false;
    bool overflow = false;
    std::uint64_t number = 0;  // a device message's number, taken with the same lock
    admission admitted = admission::yes;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return;  // replaced: the old session's messages are ignored
      if (rec.load.pending && rec.load.replayer != std::this_thread::get_id()) [[unlikely]] {
        // The state is still loading (or its parked messages are being handled): in line.
        parked = true;
        overflow = rec.load.parked.size() >= max_parked;
        if (!overflow) rec.load.parked.push_back(std::move(in));
      } else {
        hello = rec.session.hello;
        if (hello && fits && (fast || binary)) {
          if (fast && fast->id) admitted = admit_locked(rec, *fast->id);
          number = admitted == admission::yes ? ++rec.messages_sent : rec.messages_sent;
        }
      }
    }
    if (parked) [[unlikely]] {
      if (overflow) {
        transport_.close(s, close_code::try_again_later, "device state is loading; retry later");
      }
      return;
    }
    if (admitted != admission::yes) [[unlikely]] {
      refuse(rec, s, admitted, *fast->id, number, r);
      return;
    }
    if (number != 0) [[likely]] {
      if (binary) {
        add(in, std::move(in.payload), payload_kind::binary, std::nullopt, number, r);
      } else {
        add(in, std::move(fast->data), payload_kind::text, fast->id, number, r);
      }
      return;
    }
    if (binary) {
      push_run(rec, r);
      reply_error(rec, s, hello ? error::too_big : error::hello_required, "binary");
      return;
    }
    if (!fits) {
      push_run(rec, r);
      reply_error(rec, s, error::too_big, {});
      return;
    }
    if (fast) {  // a `send` before hello
      push_run(rec, r);
      reply_error(rec, s, error::hello_required, "send");
      return;
    }
    auto parsed = parse_json(in.payload.view());
    if (!parsed) {
      push_run(rec, r);
      reply_error(rec, s, error::bad_json, {});
      return;
    }
    const nlohmann::json& j = *parsed;
    const auto type = j.is_object() ? get_string(j, "type") : std::nullopt;
    if (type && *type == "send" && hello) {
      on_send(rec, in, j, r);
      return;
    }
    push_run(rec, r);  // whatever comes next is answered after the device messages before it
    if (!type) {
      reply_error(rec, s, error::bad_message, {});
      return;
    }
    if (*type == "hello") {
      if (hello) {
        reply_error(rec, s, error::duplicate_hello, *type);
      } else {
        on_hello(rec, s, j);
      }
      return;
    }
    static constexpr std::string_view known[] = {"send",   "ack",       "subscribe", "unsubscribe",
                                                 "fw_ack", "fw_result", "fw_restart"};
    if (std::find(std::begin(known), std::end(known), *type) == std::end(known)) {
      reply_error(rec, s, error::unknown_type, *type);
      return;
    }
    if (!hello) {
      reply_error(rec, s, error::hello_required, *type);
      return;
    }
    if (*type == "ack") {
      on_ack(rec, s, j);
    } else if (*type == "subscribe" || *type == "unsubscribe") {
      on_subscribe(rec, s, j, *type == "subscribe");
    } else if (*type == "fw_ack") {
      on_fw_ack(rec, s, j);
    } else if (*type == "fw_restart") {
      on_fw_restart(rec, s, j);
    } else {
      on_fw_result(rec, s, j);
    }
  }

  // ---- loading a device's state off the network thread ------------------------------------

 public:
  /// Waits until the stored state of `rec` (made unloaded for a session) is in, queuing its
  /// load if no session did: a delivery numbered before it would reuse a number the store
  /// has. Returns at once for a loaded record; without waiting if the store's queue is full
  /// (counted as a store error). Blocks: not for a network thread, nor for the store thread
  /// (a store callback), which is the one that loads.
  void await_state(const registry::record_ptr& rec) {
    if (rec->load.state_in.load(std::memory_order_acquire)) return;
    bool queue = false;
    {
      std::lock_guard lock(rec->mutex);
      if (!rec->load.requested) queue = rec->load.requested = true;
    }
    if (queue &&
        !store_.load_async(rec->id, [this, rec](store::device_state&& st) { loaded(*rec, st); })) {
      std::lock_guard lock(rec->mutex);
      rec->load.requested = false;
      return;
    }
    rec->load.state_in.wait(false, std::memory_order_acquire);
  }

 private:
  // Messages a session may send before its device's state is in; past them it is closed with
  // 1013 (a store that slow is overloaded).
  static constexpr std::size_t max_parked = 256;

  // Queues the load of a record made unloaded, once; a full store queue closes the session
  // with 1013 and leaves the load to the device's next session.
  void request_load(const registry::record_ptr& rec, session_id s) {
    {
      std::lock_guard lock(rec->mutex);
      if (!rec->load.pending || rec->load.requested) return;
      rec->load.requested = true;
    }
    const bool queued =
        store_.load_async(rec->id, [this, rec](store::device_state&& st) { loaded(*rec, st); });
    if (queued) return;
    {
      std::lock_guard lock(rec->mutex);
      rec->load.requested = false;
    }
    transport_.close(s, close_code::try_again_later, "device state store is busy; retry later");
  }
  // On the store thread: the state is in; the parked messages are handled here, in order,
  // until none is left (new ones keep queueing behind them meanwhile).
  void loaded(device_record& rec, store::device_state& st) {
    {
      std::lock_guard lock(rec.mutex);
      registry::fill_locked(rec, st);
      restore_locked(rec, st);
    }
    rec.load.state_in.store(true, std::memory_order_release);
    rec.load.state_in.notify_all();
    std::vector<inbound_message> batch;
    for (;;) {
      {
        std::lock_guard lock(rec.mutex);
        batch.clear();
        if (rec.load.parked.empty()) {
          rec.load.pending = false;
          rec.load.replayer = {};
          return;
        }
        batch.swap(rec.load.parked);
        // Only the live session's count: one replaced meanwhile is closed, and `intake` stops
        // at the first message of a session it cannot find (the live one's would be lost).
        std::erase_if(batch, [&](const inbound_message& m) { return m.session != rec.session.id; });
        rec.load.replayer = std::this_thread::get_id();
      }
      try {
        (void)intake(batch);  // messages of a session that closed meanwhile are ignored
      } catch (...) {         // contained as a transport contains its handlers
      }
    }
  }

  // ---- device messages ------------------------------------------------------------------

  void on_hello(device_record& rec, session_id s, const nlohmann::json& j) {
    const auto proto = get_uint(j, "protocol");
    const bool has_last = j.contains("last_seq");
    const auto last = get_uint(j, "last_seq");
    const bool has_version = j.contains("firmware_version");
    const auto version = get_string(j, "firmware_version");
    const bool has_attributes = j.contains("attributes");
    auto attributes = get_attributes(j);
    if (!proto || (has_last && !last) || (has_version && !version) || !attributes) {
      reply_error(rec, s, error::bad_message, "hello");
      return;
    }
    if (*proto != static_cast<std::uint64_t>(protocol_version)) {
      reply_error(rec, s, error::unsupported_version, "hello");
      transport_.close(s, close_unsupported_version, "unsupported protocol version; speak 1");
      return;
    }
    if (version) store_.set_firmware_version(rec.id, *version);
    const auto now = unix_ms();
    const bool live = out_.resume(
        rec, s, last.value_or(0),
        [&](device_record& r, const auto& info) {
          if (version) r.firmware_version = *version;
          if (has_attributes) r.attributes = std::move(*attributes);
          auto w = welcome(r, s, info, r.last_seen_ms);  // when it was seen before this hello
          r.last_seen_ms = now;
          return w;
        },
        journal_);
    if (!live) return;
    bus_.subscribe(topics::fleet, s);
    store_.touch(rec.id, now);
    // Firmware: join the current rollout (offline at publish, or reconnecting mid-transfer).
    rollout_.join(rec, s);
  }
  // The welcome: the device's state and what delivery is about to send again.
  template <class Info>
  static shared_bytes welcome(const device_record& rec, session_id s, const Info& info,
                              std::int64_t last_seen_ms) {
    const auto t = firmware::rollout_engine<Transport, Store>::state_locked(rec);
    nlohmann::json w{{"type", "welcome"},
                     {"protocol", protocol_version},
                     {"device", rec.id},
                     {"session", s},
                     {"last_seq", info.last_seq},
                     {"replay", info.replay},
                     {"replay_dropped", info.replay_dropped},
                     {"state",
                      {{"messages_sent", rec.messages_sent},
                       {"last_seen_ms", last_seen_ms},
                       {"firmware_version", rec.firmware_version},
                       {"firmware",
                        {{"rollout", t.rollout},
                         {"version", t.version},
                         {"status", store::to_string(t.status)},
                         {"offset", t.offset},
                         {"reason", t.reason}}}}}};
    if (!rec.epoch.empty()) w["epoch"] = rec.epoch;
    return to_payload(w);
  }

  void on_send(device_record& rec, inbound_message& in, const nlohmann::json& j, run& r) {
    const auto it = j.find("data");
    const bool has_id = j.contains("id");
    const auto ref = get_uint(j, "id");
    if (it == j.end() || (has_id && !ref)) {
      push_run(rec, r);
      reply_error(rec, in.session, error::bad_message, "send");
      return;
    }
    shared_bytes payload =
        it->is_string() ? shared_bytes::copy_of(std::string_view(it->get_ref<const std::string&>()))
                        : shared_bytes::copy_of(std::string_view(it->dump()));
    stage(rec, in, std::move(payload), payload_kind::text, ref, r);
  }

  void on_ack(device_record& rec, session_id s, const nlohmann::json& j) {
    const auto seq = get_uint(j, "seq");
    if (!seq) {
      reply_error(rec, s, error::bad_message, "ack");
      return;
    }
    if (out_.ack(rec, s, *seq, journal_) == delivery<Transport>::ack_result::out_of_range) {
      reply_error(rec, s, error::bad_ack, "ack");
    }
  }

  void on_subscribe(device_record& rec, session_id s, const nlohmann::json& j, bool sub) {
    const auto topic = get_string(j, "topic");
    const char* type = sub ? "subscribe" : "unsubscribe";
    if (!topic) {
      reply_error(rec, s, error::bad_message, type);
      return;
    }
    if (*topic != topics::server && *topic != topics::stats && *topic != topics::fleet) {
      reply_error(rec, s, error::bad_topic, type);
      return;
    }
    if (sub && !(may_subscribe_ ? may_subscribe_(rec.id, *topic) : *topic == topics::fleet)) {
      reply_error(rec, s, error::topic_not_allowed, type);
      return;
    }
    // `batch: true` on the server log: one `events` frame per dispatch batch.
    const auto batch_field = j.find("batch");
    if (batch_field != j.end() && !batch_field->is_boolean()) {
      reply_error(rec, s, error::bad_message, type);
      return;
    }
    const bool batched =
        *topic == topics::server && batch_field != j.end() && batch_field->get<bool>();
    if (sub) {
      // One form at a time: subscribing again switches it.
      bus_.unsubscribe(batched ? topics::server : topics::server_batched, s);
      bus_.subscribe(batched ? topics::server_batched : *topic, s);
    } else {
      bus_.unsubscribe(*topic, s);
      if (*topic == topics::server) bus_.unsubscribe(topics::server_batched, s);
    }
    nlohmann::json ok{{"type", sub ? "subscribed" : "unsubscribed"}, {"topic", *topic}};
    if (sub && batched) ok["batch"] = true;
    out_.post(rec, s, payload_kind::text, to_payload(ok));
  }

  void on_fw_ack(device_record& rec, session_id s, const nlohmann::json& j) {
    const auto rollout = get_uint(j, "rollout");
    const auto offset = get_uint(j, "offset");
    if (!rollout || !offset) {
      reply_error(rec, s, error::bad_message, "fw_ack");
      return;
    }
    if (const auto e = rollout_.on_ack(rec, s, *rollout, *offset)) {
      // A late ack of a superseded rollout is a benign race, not counted toward max_errors.
      reply_error(rec, s, *e, "fw_ack", *e != error::unknown_rollout);
    }
  }

  void on_fw_restart(device_record& rec, session_id s, const nlohmann::json& j) {
    const auto rollout = get_uint(j, "rollout");
    if (!rollout) {
      reply_error(rec, s, error::bad_message, "fw_restart");
      return;
    }
    if (rollout_.on_restart(rec, s, *rollout)) {
      reply_error(rec, s, error::unknown_rollout, "fw_restart", false);
    }
  }

  void on_fw_result(device_record& rec, session_id s, const nlohmann::json& j) {
    const auto rollout = get_uint(j, "rollout");
    const auto ok = j.find("ok");
    if (!rollout || ok == j.end() || !ok->is_boolean()) {
      reply_error(rec, s, error::bad_message, "fw_result");
      return;
    }
    const auto sha = get_string(j, "sha256");
    const auto reason = get_string(j, "reason");
    if (rollout_.on_result(rec, s, *rollout, ok->get<bool>(), sha, reason)) {
      reply_error(rec, s, error::unknown_rollout, "fw_result", false);
    }
  }

  // ---- into the pipeline ----------------------------------------------------------------

  // Numbers a device message with the device's lifetime count and adds it to the run.
  void stage(device_record& rec, inbound_message& in, shared_bytes payload, payload_kind kind,
             std::optional<std::uint64_t> ref, run& r) {
    std::uint64_t number = 0;
    admission admitted = admission::yes;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != in.session) return;
      if (ref) admitted = admit_locked(rec, *ref);
      number = admitted == admission::yes ? ++rec.messages_sent : rec.messages_sent;
    }
    if (admitted != admission::yes) {
      refuse(rec, in.session, admitted, *ref, number, r);
      return;
    }
    add(in, std::move(payload), kind, ref, number, r);
  }
  // Adds a device message numbered `number` to the run.
  static void add(inbound_message& in, shared_bytes payload, payload_kind kind,
                  std::optional<std::uint64_t> ref, std::uint64_t number, run& r) {
    message& m = r.messages.emplace_back();
    m.session = in.session;
    m.device_id = std::move(in.device_id);
    m.sequence = number;
    m.kind = kind;
    m.has_reference = ref.has_value();
    m.reference = ref.value_or(0);
    m.payload = std::move(payload);
    m.received = in.received;
    r.refs.push_back(ref);
  }
  // Pushes the run into the pipeline, then answers each message: `sent` for an accepted one
  // that asked, `queue_full` or `closed` for each refused one (whose number is given back).
  void push_run(device_record& rec, run& r) {
    const std::size_t n = r.messages.size();
    if (n == 0) return;
    const auto result = gateway_.push(std::span<message>(r.messages));
    const std::size_t accepted = result.accepted;
    const session_id s = r.messages.front().session;
    const bool on_dispatch = ack_ == ack_policy::on_dispatch;
    // Under on_dispatch the store counts a message once the sink took it (record_dispatched).
    if (accepted != 0 && !on_dispatch) store_.add_messages_sent(rec.id, accepted);
    const auto refusal = result.error == errc::queue_full ? error::queue_full : error::closed;
    std::size_t refused = 0;
    bool queued = false;
    {
      std::lock_guard lock(rec.mutex);
      if (accepted < n && rec.messages_sent == r.messages.back().sequence) {
        rec.messages_sent = r.messages[accepted].sequence - 1;
      }
      if (on_dispatch && accepted < n && rec.dispatch) {
        for (std::size_t i = accepted; i < n; ++i) {
          if (r.refs[i]) std::erase(rec.dispatch->in_flight, *r.refs[i]);
        }
      }
      if (rec.session.id == s) {
        for (std::size_t i = 0; i < n; ++i) {
          if (i >= accepted) {
            const char* ref = r.messages[i].kind == payload_kind::binary ? "binary" : "send";
            delivery<Transport>::queue_locked(rec, s, payload_kind::text,
                                              make_error(refusal, ref, r.refs[i]));
            ++refused;
          } else if (r.refs[i] && !on_dispatch) {
            delivery<Transport>::queue_locked(rec, s, payload_kind::text,
                                              make_sent(*r.refs[i], r.messages[i].sequence));
            queued = true;
          }
        }
      }
    }
    r.messages.clear();
    r.refs.clear();
    if (refused != 0) errors_.fetch_add(refused, std::memory_order_relaxed);
    if (queued || refused != 0) out_.flush(rec);
  }

  // ---- at least once, exactly once (ack policy on_dispatch) ------------------------------

  // What becomes of a `send` with an id.
  enum class admission : std::uint8_t {
    yes,        // new: into the pipeline (and the in-flight list under on_dispatch)
    duplicate,  // the sink took it already: answered `sent` at once
    in_flight,  // on its way to the sink: its recording answers the live session
    too_many,   // the in-flight list is full: refused
  };
  // Under on_dispatch, whether the send `id` goes into the pipeline (caller holds the mutex).
  admission admit_locked(device_record& rec, std::uint64_t id) {
    if (ack_ != ack_policy::on_dispatch) return admission::yes;
    if (!rec.dispatch) rec.dispatch = std::make_unique<device_record::dispatch_part>();
    auto& d = *rec.dispatch;
    if (d.window.contains(id)) return admission::duplicate;
    if (std::find(d.in_flight.begin(), d.in_flight.end(), id) != d.in_flight.end()) {
      return admission::in_flight;
    }
    if (d.in_flight.size() >= store::dispatch_window::span) return admission::too_many;
    d.in_flight.push_back(id);
    return admission::yes;
  }
  // A send that does not go into the pipeline, answered after the run before it.
  void refuse(device_record& rec, session_id s, admission a, std::uint64_t id,
              std::uint64_t messages_sent, run& r) {
    push_run(rec, r);
    if (a == admission::duplicate) {
      out_.post(rec, s, payload_kind::text, make_sent(id, messages_sent));
    } else if (a == admission::too_many) {
      reply_error(rec, s, error::too_many_in_flight, "send", false, id);
    }
  }

  // ---- answers --------------------------------------------------------------------------

  void reply_error(device_record& rec, session_id s, error e, std::string_view ref,
                   bool counts = true, std::optional<std::uint64_t> id = std::nullopt) {
    bool close_now = false;
    {
      std::lock_guard lock(rec.mutex);
      if (rec.session.id != s) return;
      delivery<Transport>::queue_locked(rec, s, payload_kind::text, make_error(e, ref, id));
      if (counts && ++rec.session.errors > max_errors_) close_now = true;
    }
    errors_.fetch_add(1, std::memory_order_relaxed);
    out_.flush(rec);
    if (close_now) transport_.close(s, close_too_many_errors, "too many bad messages");
  }

  static std::int64_t unix_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  Transport& transport_;
  Gateway& gateway_;
  registry& devices_;
  delivery<Transport>& out_;
  firmware::rollout_engine<Transport, Store>& rollout_;
  pubsub& bus_;
  Store& store_;
  const std::size_t max_message_bytes_;
  const unsigned max_errors_;
  const topic_policy may_subscribe_;
  const bool require_authentication_;
  const ack_policy ack_;
  const store_journal<Store> journal_{store_};

  // The journal of routed messages being numbered (store thread): each kept message is
  // collected, held until `keep_routed` has it, instead of queued to the store; the rest
  // goes to the store's journal.
  struct routed_journal {
    const store_journal<Store>& store;
    std::vector<store::replay_entry>& collected;
    bool kept(device_record& /*rec*/, std::uint64_t seq, std::string_view frame) const {
      collected.push_back({seq, std::string(frame)});
      return true;
    }
    void forgot(device_record& rec, std::uint64_t seq) const { store.forgot(rec, seq); }
    void numbered(device_record& rec, std::uint64_t seq) const { store.numbered(rec, seq); }
  };
  std::atomic<std::uint64_t> errors_{0};
};

}  // namespace devgate::device
