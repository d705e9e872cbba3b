#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>     // campaign targets in id order
#include <chrono>        // stats rate
#include <cstddef>       // std::size_t, std::byte
#include <cstdint>       // sequence numbers, rollout ids
#include <iterator>      // the fleet's devices moved in
#include <limits>        // the routed answer
#include <memory>        // images
#include <mutex>         // stats rate
#include <optional>      // lookups
#include <span>          // firmware bytes, batches
#include <stdexcept>     // a campaign kept without its image
#include <string>        // ids, topics
#include <string_view>   // ids, topics
#include <system_error>  // results
#include <utility>       // std::move
#include <vector>        // handed-back messages

#include "devgate/device/delivery.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/dispatch.hpp"
#include "devgate/device/hub_options.hpp"
#include "devgate/device/hub_sink.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/device/pubsub.hpp"
#include "devgate/device/registry.hpp"
#include "devgate/firmware/campaign.hpp"
#include "devgate/firmware/campaign_record.hpp"
#include "devgate/firmware/campaign_runner.hpp"
#include "devgate/firmware/image.hpp"
#include "devgate/firmware/rollout.hpp"
#include "devgate/firmware/slots.hpp"
#include "devgate/pipeline/gateway.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/pipeline.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/store/memory_state_store.hpp"
#include "devgate/store/state_store.hpp"
#include "devgate/store/write_behind.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// The device gateway: a `gateway` (transport and pipeline) whose intake speaks the device
/// protocol (docs/PROTOCOL.md) with every session, composed with a device registry, delivery,
/// pub/sub, a state store and a firmware rollout engine.
///
///     devgate::websocket::server ws(opts);               // opts.identify = identify_device
///     devgate::device::hub hub(ws, my_sink);
///     hub.start();
///     hub.publish_firmware("2.0.0", image_bytes);
///
/// Threads: transport threads run the protocol; pipeline workers run the sink; any thread may
/// publish, send or roll out firmware. No hub lock is held while calling the transport or the
/// store; each device's outgoing messages leave in order through its outbox.
template <class Transport, class Sink = null_sink, class Store = store::memory_state_store,
          class Traits = pipeline_traits>
class hub {
  static_assert(devgate::transport<Transport>,
                "device::hub: Transport must satisfy devgate::transport (transport/transport.hpp)");
  static_assert(devgate::sink<Sink>,
                "device::hub: Sink needs `std::error_code consume(const devgate::message&, "
                "devgate::dispatch_context&)` (wrap a lambda in devgate::callback_sink)");
  static_assert(store::state_store<Store>,
                "device::hub: Store must satisfy devgate::store::state_store (load, "
                "add_messages_sent, touch, set_firmware_version, set_transfer, set_last_seq, "
                "forget; errors as "
                "values)");
  using writer_type = store::write_behind<Store>;
  struct campaign_engine;  // what the campaign runner drives (below)

 public:
  /// The gateway the hub is built on: its transport feeding a pipeline of the hub's sink.
  using gateway_type = gateway<Transport, hub_sink<Sink>, Traits>;

  /// Composes the hub over `transport` (referenced: it must outlive the hub). Throws
  /// std::invalid_argument for options out of range.
  explicit hub(Transport& transport, Sink sink = Sink{}, hub_options options = {},
               Store store = Store{})
      : options_(std::move(options)),
        store_(std::move(store)),
        writer_(
            store_, options_.store_queue_capacity, options_.on_store_error,
            [this](const std::string& id, const store::dispatch_record& r, bool ok) {
              dispatch_.recorded(id, r, ok);
            },
            [this](const std::string& id, std::uint64_t seq, bool ok) {
              deliver_stored(id, seq, ok);
            },
            options_.store_group_commit),
        devices_(options_.max_devices),
        delivery_(transport, options_.max_replay_messages, options_.max_replay_bytes),
        rollout_(
            devices_, delivery_, writer_,
            {options_.chunk_size, options_.window, options_.max_concurrent_transfers,
             options_.stall_timeout, options_.max_transfer_retries, options_.transfer_retry_backoff,
             options_.leased_transfer_slots, options_.on_slot_demand,
             [this](const std::string& id, const store::transfer_state& t) {
               campaigns_.on_status(id, t);
               fleet_news(id, t);
             },
             [this](const std::string& id) { campaign_hello(id); }}),
        dispatch_(transport, gateway_, devices_, delivery_, rollout_, bus_, writer_,
                  options_.max_message_bytes, options_.max_errors, options_.may_subscribe,
                  options_.require_authentication, options_.ack),
        gateway_(transport, make_sink(std::move(sink)), pipeline_options_for_ack()) {
    bus_.set_channel(&gateway_.channel());
    if constexpr (store::campaign_store<Store>) {
      campaigns_.on_change(
          [this](const firmware::campaign& c, std::uint32_t rollout,
                 std::span<const std::uint32_t> changed) { keep_campaign(c, rollout, changed); });
    }
  }
  hub(const hub&) = delete;
  hub& operator=(const hub&) = delete;
  /// Stops if still running, then lets the store thread finish what is queued while every part
  /// its callbacks reach (dispatch, registry, delivery) is still alive.
  ~hub() {
    campaigns_.stop();  // before the rollout engine it drives
    stop();
    writer_.drain();
  }

  /// Starts the gateway with the hub's protocol as its intake: handlers, workers, transport.
  std::error_code start() {
    // A durable store's rollout resumes before any device can say hello.
    if (!started_) {
      started_ = true;
      if (auto kept = writer_.load_rollout()) {
        rollout_.restore(*kept, kept->gated);
        // A campaign of the fleet: the devices it admitted so far may join here.
        if constexpr (store::fleet_campaign_store<Store>) {
          if (kept->gated && writer_.shared()) {
            for (const auto& id : store_.campaign_admitted(kept->rollout)) {
              (void)rollout_.admit(id, kept->rollout, false);
            }
          }
        }
      }
      if constexpr (store::campaign_store<Store>) restore_campaigns();
    }
    session_hooks hooks;
    hooks.on_open = [this](const session_info& info) {
      dispatch_.open(info);
      bound();
    };
    hooks.on_close = [this](session_id s, close_code c) {
      dispatch_.close(s, c);
      bound();
    };
    return gateway_.start(
        [this](std::span<inbound_message> batch) { return dispatch_.intake(batch); },
        std::move(hooks));
  }
  /// Stops intake, drains the pipeline, then stops the transport (sessions close with 1001) and
  /// the campaign runner (its last changes queued for the store: drain `store_writer()` to
  /// have them written before the store goes).
  void stop() {
    gateway_.stop();
    campaigns_.stop();
  }
  /// Like `stop()`, but returns the device messages not dispatched by `deadline`.
  [[nodiscard]] std::vector<message> stop(clock::time_point deadline) {
    auto left = gateway_.stop(deadline);
    campaigns_.stop();
    return left;
  }

  // ---- pub/sub ------------------------------------------------------------------------

  /// Publishes `data` on `topic` from any thread. `device/<id>`: a sequenced message to that
  /// device, kept until acknowledged (returns 1). Any other topic: one shared frame
  /// `{"type":"event","topic":..,"data":..}` to every subscriber (returns how many).
  std::size_t publish(std::string_view topic, const nlohmann::json& data) {
    if (!is_valid_topic(topic)) return 0;
    if (topic.starts_with(topics::device_prefix)) {
      return send_to(topic.substr(topics::device_prefix.size()), data) != 0 ? 1 : 0;
    }
    return bus_.publish(topic, make_envelope("event", 0, topic, data.dump()));
  }
  /// What `send_to` answers for a message it routed to the node that holds the device (that
  /// node numbers it).
  static constexpr std::uint64_t routed = std::numeric_limits<std::uint64_t>::max();

  /// Sends `data` to one device as a sequenced `deliver` message (kept while it is offline or
  /// until it acknowledges). Returns the sequence number, 0 for an invalid device id. With a
  /// durable store it is sent once stored (`hub_options::on_deliver_stored`). May wait for the
  /// store (a device it must load): not from a network thread, nor from a store callback.
  ///
  /// On a store that carries deliveries between nodes (`store::fleet_delivery_store`), a
  /// device this hub does not hold that another live node owns gets the message through the
  /// store from that node (which numbers it: `routed` is returned), instead of being taken
  /// over; 0 when the store could not take it (Redis away, or too many waiting for that node:
  /// counted as a store error).
  std::uint64_t send_to(std::string_view device_id, const nlohmann::json& data) {
    if (!is_valid_device_id(device_id)) return 0;
    const std::string id(device_id);
    if constexpr (writer_type::routes) {
      if (writer_.shared() && !devices_.find(id)) {
        const auto r = writer_.route(id, data.dump());
        if (r.error) return 0;
        if (r.routed) return routed;
      }
    }
    std::uint64_t seq = 0;
    {
      auto rec = devices_.get_or_create(
          id, [&] { return writer_.load(id); },
          [this](device_record& r, store::device_state& st) { dispatch_.restore_locked(r, st); });
      // A device whose session made its record while the store loads it: numbering continues
      // from the store's, so its state must be in first.
      if constexpr (!writer_type::calls_inline) dispatch_.await_state(rec);
      seq = delivery_.deliver(*rec, data.dump(), journal());
    }
    bound();
    return seq;
  }
  /// Subscribes a host callback to `topic` (e.g. the server log for a dashboard).
  pubsub::token subscribe(std::string_view topic, pubsub::callback cb) {
    return bus_.subscribe(topic, std::move(cb));
  }
  /// Removes a host subscription.
  void unsubscribe(pubsub::token t) { bus_.unsubscribe(t); }
  /// The topic registry.
  [[nodiscard]] pubsub& bus() noexcept { return bus_; }

  // ---- firmware -----------------------------------------------------------------------

  /// Rolls `bytes` out as `version` to every device: announces it on the fleet topic, then
  /// transfers it (at most max_concurrent_transfers at once). Devices offline now get it when
  /// they connect; devices reporting `version` are skipped. The image is copied once and
  /// shared by every transfer. Returns the rollout id. Throws std::invalid_argument for an
  /// empty version, an empty image or one over `max_firmware_size`.
  ///
  /// On a store shared by several nodes (`store::fleet_rollout_store`) the store numbers the
  /// rollout fleet-wide, keeps the image once and tells the other nodes, which `adopt_firmware`
  /// it; a failure there throws std::system_error and starts nothing.
  /// A campaign running ends `superseded`.
  std::uint32_t publish_firmware(std::string version, std::span<const std::byte> bytes) {
    const auto id = rollout_.publish(
        std::move(version), bytes, [this](const firmware::image& img) { announce_firmware(img); });
    campaigns_.supersede("superseded by release " + std::to_string(id) + " to the whole fleet");
    return id;
  }
  /// Makes rollout `r`, published by another node of the fleet, current here (as
  /// `publish_firmware` would have, without keeping it again): hand it the rollouts that
  /// `redis::state_store::on_rollout` reports. False when it is not newer than the current one.
  /// A gated rollout (a campaign run by another node) is not announced: its devices join as
  /// that node admits them (`take_campaign_event`).
  bool adopt_firmware(const store::rollout_record& r) {
    const bool adopted =
        r.gated ? rollout_.adopt(r, [](const firmware::image&) {})
                : rollout_.adopt(r, [this](const firmware::image& img) { announce_firmware(img); });
    if (!adopted) return false;
    campaigns_.supersede(r.gated ? "superseded by the campaign of rollout " +
                                       std::to_string(r.rollout) + " on another node"
                                 : "superseded by release " + std::to_string(r.rollout) +
                                       " of the fleet");
    return true;
  }
  /// Takes what another node said of the campaign on the fleet's gated rollout (hand it what
  /// `redis::state_store::on_campaign` reports; any thread): admissions and stops from the node
  /// running it reach the devices this node holds; progress and hellos of the devices other
  /// nodes hold reach the campaign when it runs here.
  void take_campaign_event(const store::campaign_event& e) {
    using kind = store::campaign_event::kind;
    for (const auto& id : e.ids) {
      if (!is_valid_device_id(id)) return;
    }
    switch (e.what) {
      case kind::admit:
        for (const auto& id : e.ids) (void)rollout_.admit(id, e.rollout, e.retry);
        break;
      case kind::stop:
        rollout_.stop(e.ids.front(), e.rollout, e.reason);
        break;
      case kind::news: {
        store::transfer_state t;
        t.rollout = e.rollout;
        t.status = e.status;
        t.reason = e.reason;
        campaigns_.on_status(e.ids.front(), t);
        break;
      }
      case kind::seen: {
        if (campaigns_.active_rollout() != e.rollout) return;
        std::vector<std::pair<std::string, std::string>> attrs;
        const auto j = nlohmann::json::parse(e.attributes, nullptr, false);
        if (j.is_object()) {
          for (auto it = j.begin(); it != j.end(); ++it) {
            if (it->is_string()) attrs.emplace_back(it.key(), it->get_ref<const std::string&>());
          }
        }
        (void)campaigns_.seen(e.ids.front(), [&](const firmware::campaign_target& t) {
          return t.ids.empty() && (t.attributes.empty() || t.matches(attrs));
        });
        break;
      }
    }
  }
  /// Takes the messages other nodes routed to device `id`, which this node holds (on the store
  /// thread): hand it what `redis::state_store::on_routed` reports. Any thread.
  void take_routed(const std::string& id) { (void)dispatch_.take_routed(id); }
  /// Writes every held device's part in the current rollout to the store again, for a store
  /// that lost writes meanwhile (`redis::state_store::on_reconnect`): the fleet's totals and
  /// each device's status catch up with what happened while it was away.
  void rewrite_transfers() { rollout_.rewrite(); }
  /// With `hub_options::leased_transfer_slots`: this node's lease of the fleet's transfer
  /// slots; devices waiting start if it grew. For the lease holder.
  void set_transfer_limit(std::size_t n) { rollout_.set_slot_limit(n); }
  /// Totals of the current rollout: the fleet's (`hub_options::fleet_rollout_totals`) when
  /// they are for it, else this hub's own counts.
  [[nodiscard]] firmware::rollout_totals rollout() const {
    auto own = rollout_.totals();
    if (options_.fleet_rollout_totals && own.rollout != 0) {
      if (auto fleet = options_.fleet_rollout_totals(); fleet && fleet->rollout == own.rollout) {
        fleet->version = std::move(own.version);
        fleet->size = own.size;
        fleet->retries = own.retries;  // this node's: retries are not kept in the store
        return *fleet;
      }
    }
    return own;
  }
  /// One device's part in the current rollout (std::nullopt for a device never seen).
  [[nodiscard]] std::optional<store::transfer_state> device_transfer(std::string_view id) const {
    return rollout_.transfer_of(id);
  }
  /// The transfer slots (limit, active, waiting, peak): this node's.
  [[nodiscard]] const firmware::transfer_slots& slots() const noexcept { return rollout_.slots(); }
  /// The image being rolled out (nullptr before the first publish_firmware).
  [[nodiscard]] std::shared_ptr<const firmware::image> current_image() const {
    return rollout_.current();
  }

  // ---- rollout campaigns -------------------------------------------------------------------

  /// Starts a rollout campaign of `bytes` as `spec.version` (docs/ROLLOUTS.md): its devices are
  /// the target's, known now (listed ids in their order; otherwise the devices this hub holds,
  /// by id, whose attributes match), split into waves and admitted wave by wave at the rate,
  /// while thresholds hold. A campaign running is superseded. Returns the campaign's id.
  /// Throws firmware::campaign_spec_error when the target matches no device, and what
  /// `publish_firmware` throws for a bad image. A store that keeps campaigns
  /// (`store::campaign_store`, SQLite) keeps it with its image, and a restarted hub continues
  /// it where it was. On a store that carries campaigns between nodes
  /// (`store::fleet_campaign_store`, Redis) the campaign runs on this node for the whole
  /// fleet: a target without ids or attributes takes the devices every live node holds, the
  /// other nodes transfer to theirs as this one admits them and report back (a target by
  /// attributes matches the devices this node holds, and with `continuous` any node's at
  /// hello). It calls the store: not from a network thread.
  /// `id`: one `reserve_campaign_id` handed out (0: the next).
  std::uint64_t start_campaign(firmware::campaign_spec spec, std::span<const std::byte> bytes,
                               std::uint64_t id = 0) {
    if (spec.version.empty()) throw firmware::campaign_spec_error("version: must not be empty");
    firmware::image::check(bytes);
    auto ids = campaign_targets(spec.target);
    const auto version = spec.version;
    return campaigns_.start(
        std::move(spec), ids,
        [&] {
          // Not announced on the fleet topic: the devices it admits hear of it one by one.
          return rollout_.publish(
              version, bytes, [](const firmware::image&) {}, true);
        },
        id);
  }
  /// Reserves the id of a campaign to start later (`start_campaign(..., id)`): an operator
  /// API answers with it at once and starts the campaign off the network thread.
  std::uint64_t reserve_campaign_id() { return campaigns_.reserve(); }
  /// Pauses campaign `id` with the operator's `reason`: nobody more starts; transfers running
  /// finish. False if it is not the active campaign or not running.
  bool pause_campaign(std::uint64_t id, std::string reason = "paused by the operator") {
    return campaigns_.pause(id, std::move(reason));
  }
  /// Resumes paused campaign `id`; with `retry_failed` its failed and timed-out devices start
  /// again. False if it is not the active campaign or not paused.
  bool resume_campaign(std::uint64_t id, bool retry_failed = true) {
    return campaigns_.resume(id, retry_failed);
  }
  /// Cancels campaign `id`: transfers running stop (the devices are told, reason `cancelled`)
  /// and devices not done end `cancelled`. False if it is not the active campaign.
  bool cancel_campaign(std::uint64_t id, std::string reason = "cancelled by the operator") {
    return campaigns_.cancel(id, std::move(reason));
  }
  /// The campaigns: the active one and the last ended ones (describe, devices, each).
  [[nodiscard]] const firmware::campaign_runner<campaign_engine>& campaigns() const noexcept {
    return campaigns_;
  }
  /// Sets device `id`'s attributes (as its hello would), for campaigns that target them.
  /// False when the hub does not hold the device.
  bool set_attributes(std::string_view id, std::vector<std::pair<std::string, std::string>> a) {
    auto rec = devices_.find(id);
    if (!rec) return false;
    std::lock_guard lock(rec->mutex);
    rec->attributes = std::move(a);
    return true;
  }

  // ---- state and figures --------------------------------------------------------------

  /// A device's state: its record's live figures while the hub holds it, else what the store
  /// has (a store call: not for a network thread when the store may block).
  [[nodiscard]] store::device_state device_state(const std::string& id) {
    if (auto rec = devices_.find(id)) {
      std::lock_guard lock(rec->mutex);
      store::device_state st;
      st.messages_sent = rec->messages_sent;
      st.last_seen_ms = rec->last_seen_ms;
      st.firmware_version = rec->firmware_version;
      st.transfer = decltype(rollout_)::state_locked(*rec);
      return st;
    }
    return writer_.peek(id);
  }
  /// Forgets an offline device: its record and everything the store keeps about it (its
  /// kept deliveries are dropped). False, with nothing changed, while it is online or in use.
  bool forget_device(std::string_view id) {
    std::uint32_t rollout = 0;
    if (!devices_.remove(id, [&](device_record& r) {
          delivery_.drop_replay_locked(r);
          rollout = rollout_.forget_locked(r);
        })) {
      if (devices_.find(id)) return false;
    }
    rollout_.release_forgotten(std::string(id), rollout);
    return !writer_.forget(std::string(id));
  }
  /// Lets go of device `id` on this hub, for a store shared by several gateway nodes when
  /// another node took the device over: its live session, if any, is closed with `code` and
  /// `reason`, and its record leaves memory, so that its next session here loads its state
  /// from the store again (this hub's copy is stale). False if the hub held no record of it.
  bool release_device(std::string_view id, close_code code = close_replaced,
                      std::string_view reason = "the device connected to another node") {
    auto rec = dispatch_.let_go(id);
    if (!rec) return false;
    session_id live = 0;
    {
      std::lock_guard lock(rec->mutex);
      live = rec->session.id;
    }
    if (live != 0) gateway_.get_transport().close(live, code, reason);
    return true;
  }
  /// The state store.
  [[nodiscard]] Store& state_store() noexcept { return store_; }
  /// The hub's way to the store (write-behind queue, error counts).
  [[nodiscard]] writer_type& store_writer() noexcept { return writer_; }
  /// Sessions open now.
  [[nodiscard]] std::size_t connected() const { return devices_.connected(); }
  /// Current figures.
  [[nodiscard]] hub_stats stats() const {
    hub_stats s;
    s.connected = devices_.connected();
    s.devices = devices_.devices();
    s.devices_evicted = devices_.evicted();
    s.devices_released = devices_.released();
    s.store_errors = writer_.errors();
    s.replay_bytes = delivery_.replay_bytes();
    const auto m = gateway_.metrics();
    s.enqueued = m.enqueued;
    s.dispatched = m.dispatched;
    s.queue_depth = m.queue_depth;
    s.workers_alive = m.workers_alive;
    s.replay_dropped = delivery_.replay_dropped();
    s.protocol_errors = dispatch_.protocol_errors();
    s.takeovers = devices_.takeovers();
    s.rollout = rollout();
    return s;
  }
  /// This node's figures as a fleet shares them (`redis::state_store::share_figures`; the
  /// store computes `msgs_per_s`).
  [[nodiscard]] store::gateway_figures figures() const {
    const auto s = stats();
    return {1, s.connected, s.devices, s.enqueued, s.dispatched, s.queue_depth, s.workers_alive, 0};
  }
  /// Publishes `stats()` on the stats topic (call it periodically, e.g. once a second), with
  /// `msgs_per_s` computed from the previous call. With `hub_options::fleet_figures` the
  /// gateway figures are the fleet's (and `nodes` says over how many nodes). Returns the
  /// recipients.
  std::size_t publish_stats() {
    const auto s = stats();
    double rate = 0;
    {
      std::lock_guard lock(rate_mutex_);
      const auto now = clock::now();
      if (last_rate_time_ != clock::time_point{}) {
        const double secs = std::chrono::duration<double>(now - last_rate_time_).count();
        if (secs > 0) rate = static_cast<double>(s.dispatched - last_dispatched_) / secs;
      }
      last_rate_time_ = now;
      last_dispatched_ = s.dispatched;
    }
    nlohmann::json data{{"connected", s.connected},
                        {"devices", s.devices},
                        {"queue_depth", s.queue_depth},
                        {"workers_alive", s.workers_alive},
                        {"dispatched", s.dispatched},
                        {"msgs_per_s", rate},
                        {"replay_dropped", s.replay_dropped},
                        {"rollout",
                         {{"rollout", s.rollout.rollout},
                          {"version", s.rollout.version},
                          {"size", s.rollout.size},
                          {"pending", s.rollout.pending},
                          {"transferring", s.rollout.transferring},
                          {"verified", s.rollout.verified},
                          {"failed", s.rollout.failed},
                          {"skipped", s.rollout.skipped},
                          {"bytes_acked", s.rollout.bytes_acked}}}};
    // The newest campaign (running, or the last that ended), for a fleet view.
    if (auto c = campaigns_.latest()) {
      c->erase("spec");
      data["campaign"] = std::move(*c);
    }
    if (options_.fleet_figures) {
      if (const auto f = options_.fleet_figures(); f && f->nodes > 0) {
        data["nodes"] = f->nodes;
        data["connected"] = f->connected;
        data["devices"] = f->devices;
        data["queue_depth"] = f->queue_depth;
        data["workers_alive"] = f->workers_alive;
        data["dispatched"] = f->dispatched;
        data["msgs_per_s"] = f->msgs_per_s;
      }
    }
    return bus_.publish(topics::stats, make_envelope("event", 0, topics::stats, data.dump()));
  }
  /// The pipeline (metrics, Prometheus text).
  [[nodiscard]] typename gateway_type::pipeline_type& engine() noexcept {
    return gateway_.engine();
  }
  /// The gateway the hub is built on (transport, pipeline, lifecycle).
  [[nodiscard]] gateway_type& get_gateway() noexcept { return gateway_; }
  /// The options in force.
  [[nodiscard]] const hub_options& options() const noexcept { return options_; }

 private:
  // The devices of a campaign with target `t`, in wave order (see start_campaign).
  std::vector<std::string> campaign_targets(const firmware::campaign_target& t) {
    std::vector<std::string> ids;
    if (!t.ids.empty()) {
      for (const auto& id : t.ids) {
        if (t.attributes.empty() || attributes_match(devices_.find(id), t)) ids.push_back(id);
      }
      return ids;
    }
    for (const auto& rec : devices_.snapshot()) {
      if (attributes_match(rec, t)) ids.push_back(rec->id);
    }
    if constexpr (store::fleet_campaign_store<Store>) {
      if (t.attributes.empty() && writer_.shared()) {
        auto fleet = store_.fleet_devices();
        ids.insert(ids.end(), std::make_move_iterator(fleet.begin()),
                   std::make_move_iterator(fleet.end()));
      }
    }
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    return ids;
  }
  // What the campaign runner drives: this node's rollout engine and, on a store that carries
  // campaigns between nodes, every other node's (admissions and stops go to the fleet).
  struct campaign_engine {
    hub* h;
    bool admit(const std::string& id, std::uint32_t rollout) {
      const bool ok = h->rollout_.admit(id, rollout);
      if constexpr (store::fleet_campaign_store<Store>) {
        if (ok && h->writer_.shared()) h->store_.campaign_admit(rollout, {id});
      }
      return ok;
    }
    void stop(const std::string& id, std::uint32_t rollout, const std::string& reason) {
      h->rollout_.stop(id, rollout, reason);
      if constexpr (store::fleet_campaign_store<Store>) {
        if (h->writer_.shared()) h->store_.campaign_stop(rollout, id, reason);
      }
    }
  };
  // A device's part in the fleet's gated rollout changed here: the node running its campaign
  // hears of it (a store that carries campaigns between nodes; this node's own campaign heard
  // it already).
  void fleet_news(const std::string& id, const store::transfer_state& t) {
    if constexpr (store::fleet_campaign_store<Store>) {
      if (t.rollout != 0 && campaigns_.active_rollout() != t.rollout && writer_.shared() &&
          rollout_.gated() == t.rollout) {
        store_.campaign_news(t.rollout, id, t);
      }
    }
  }
  static bool attributes_match(const registry::record_ptr& rec,
                               const firmware::campaign_target& t) {
    if (!rec) return false;
    if (t.attributes.empty()) return true;
    std::lock_guard lock(rec->mutex);
    return t.matches(rec->attributes);
  }
  // The campaign runner's news of a change (run lock held): the campaign and its changed
  // devices go to the store thread; the first save of a campaign, or the one after a write the
  // full queue refused, writes it whole with its image.
  void keep_campaign(const firmware::campaign& c, std::uint32_t rollout,
                     std::span<const std::uint32_t> changed) {
    auto rec = firmware::to_record(c, rollout);
    std::vector<store::campaign_device_record> rows;
    const bool whole = kept_campaign_ != c.id();
    if (whole) {
      if (auto img = rollout_.current(); img && img->rollout() == rollout && !rec.ended) {
        rec.image = img->bytes();
      }
      rows.reserve(c.devices().size());
      for (std::uint32_t i = 0; i < c.devices().size(); ++i)
        rows.push_back(firmware::to_device_record(c, i));
    } else {
      rows.reserve(changed.size());
      for (const auto i : changed) rows.push_back(firmware::to_device_record(c, i));
    }
    kept_campaign_ = c.id();
    if (!writer_.post("campaign " + std::to_string(c.id()),
                      [rec = std::move(rec), rows = std::move(rows)](Store& s) {
                        return s.save_campaign(rec, rows);
                      })) {
      kept_campaign_ = 0;  // counted by the writer; the next change writes it whole
    }
  }
  // At start: the campaigns the store kept come back, the newest unfinished one running again
  // over its gated rollout (restored before any device says hello).
  void restore_campaigns() {
    const auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::system_clock::now().time_since_epoch())
                         .count();
    for (auto& k : writer_.load_campaigns()) {
      try {
        auto revived = firmware::revive(k, now);
        if (!is_over(revived.c->state())) {
          if (k.campaign.image.empty()) throw std::runtime_error("no image kept");
          rollout_.restore({k.campaign.rollout, k.campaign.version, std::move(k.campaign.image)},
                           true);
        }
        const bool active = !is_over(revived.c->state());
        kept_campaign_ = revived.c->id();
        campaigns_.restore(std::move(revived.c), k.campaign.rollout, std::move(revived.readmit));
        // A release to the whole fleet came after it (its news lost in a crash).
        if (auto cur = rollout_.current(); active && cur && cur->rollout() != k.campaign.rollout) {
          campaigns_.supersede("superseded by release " + std::to_string(cur->rollout()));
        }
      } catch (const std::exception&) {
        if (options_.on_store_error) {
          try {
            options_.on_store_error("restore_campaign", "campaign " + std::to_string(k.campaign.id),
                                    std::make_error_code(std::errc::bad_message));
          } catch (...) {
          }
        }
      }
    }
  }
  // A device said hello while a campaign's rollout had not admitted it: a continuous target
  // whose attributes it matches takes it in.
  // On a store that carries campaigns between nodes, the node running it hears of the hello.
  void campaign_hello(const std::string& id) {
    if (campaigns_.seen(id, [&](const firmware::campaign_target& t) {
          return t.ids.empty() && attributes_match(devices_.find(id), t);
        })) {
      return;
    }
    if constexpr (store::fleet_campaign_store<Store>) {
      const auto gated = rollout_.gated();
      if (gated == 0 || campaigns_.active_rollout() == gated || !writer_.shared()) return;
      nlohmann::json attrs = nlohmann::json::object();
      if (auto rec = devices_.find(id)) {
        std::lock_guard lock(rec->mutex);
        for (const auto& [k, v] : rec->attributes) attrs[k] = v;
      }
      // A host's set_attributes may hold bytes that are not UTF-8: replaced, never thrown on
      // the network thread that runs a hello.
      store_.campaign_seen(gated, id,
                           attrs.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    }
  }
  // Tells the fleet topic of this node that rollout `img` is available.
  void announce_firmware(const firmware::image& img) {
    nlohmann::json announce{{"type", "firmware_available"}, {"rollout", img.rollout()},
                            {"version", img.version()},     {"size", img.size()},
                            {"sha256", img.sha256()},       {"chunk_size", img.chunk_size()}};
    bus_.publish(topics::fleet, to_payload(announce));
  }
  // Keeps the records held within max_devices and the kept deliveries within the fleet
  // budget, O(1) per call (after each session opens or closes and each delivery).
  void bound() {
    // Slots and queue places of evicted devices, given up once the registry's locks are free.
    std::vector<std::pair<std::string, std::uint32_t>> released;
    devices_.trim(
        [this](const device_record& r) { return writer_.applied_through(r.store_ticket); },
        [&](device_record& r) {
          // A durable store keeps its replay: it comes back with the record.
          delivery_.drop_replay_locked(r, !writer_type::durable);
          if (const auto rollout = rollout_.forget_locked(r)) released.emplace_back(r.id, rollout);
          // Queued (or a non-blocking store's short call): numbering resumes above it.
          (void)writer_.set_last_seq(r.id, r.delivery.next_seq - 1);
        },
        [this] { return delivery_.replay_bytes() > options_.max_replay_bytes_total; },
        [this](device_record& r) {
          if (!r.delivery.replay.empty()) journal().forgot(r, r.delivery.replay.back().first);
          delivery_.drop_replay_locked(r);
        });
    for (const auto& [id, rollout] : released) rollout_.release_forgotten(id, rollout);
  }

  // A durable store committed the device's deliveries up to `seq` (store thread): those held
  // for it go to the device, then the host hears of it.
  void deliver_stored(const std::string& id, std::uint64_t seq, bool ok) {
    // Evicted meanwhile: the record that comes back loads them from the store.
    if (auto rec = devices_.find(id)) delivery_.stored(*rec, seq);
    if (options_.on_deliver_stored) options_.on_deliver_stored(id, seq, ok);
  }
  // The pipeline's sink: the user's, with (under on_dispatch) each batch's dispatched device
  // messages recorded in the store, whose commit answers them.
  hub_sink<Sink> make_sink(Sink sink) {
    if (options_.ack != ack_policy::on_dispatch) return hub_sink<Sink>(std::move(sink), &bus_);
    return hub_sink<Sink>(std::move(sink), &bus_, [this](std::span<const message> batch) {
      for (const auto& m : batch) {
        store::dispatch_record r;
        if (m.has_reference) r.id = m.reference;
        r.number = m.sequence;
        r.kind = m.kind;
        r.payload = m.payload;
        (void)writer_.record_dispatched(std::string(m.device_id.view()), std::move(r));
      }
    });
  }
  // The pipeline options, with (under on_dispatch) the messages that will not reach the sink
  // answered `not_dispatched` before the host's own handlers run.
  pipeline_options pipeline_options_for_ack() {
    pipeline_options o = options_.pipeline;
    if (options_.ack != ack_policy::on_dispatch) return o;
    o.dead_letter = [this, host = std::move(o.dead_letter)](const message& m, std::error_code ec) {
      dispatch_.not_dispatched(m);
      if (host) host(m, ec);
    };
    o.on_dropped = [this, host = std::move(o.on_dropped)](const message& m) {
      dispatch_.not_dispatched(m);
      if (host) host(m);
    };
    return o;
  }
  // The store's journal of kept deliveries.
  [[nodiscard]] store_journal<writer_type> journal() noexcept { return {writer_}; }

  hub_options options_;
  bool started_ = false;
  Store store_;
  std::uint64_t kept_campaign_ = 0;  // the campaign the store has whole (under the run lock)
  writer_type writer_;
  pubsub bus_;
  registry devices_;
  delivery<Transport> delivery_;
  // Before the rollout engine, whose threads report to it until they stop.
  campaign_engine campaign_engine_{this};
  firmware::campaign_runner<campaign_engine> campaigns_{campaign_engine_};
  firmware::rollout_engine<Transport, writer_type> rollout_;
  protocol_dispatch<Transport, writer_type, gateway_type> dispatch_;
  std::mutex rate_mutex_;
  clock::time_point last_rate_time_{};
  std::uint64_t last_dispatched_ = 0;
  gateway_type gateway_;  // last: stopped and destroyed first
};

}  // namespace devgate::device
