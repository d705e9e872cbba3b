#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>      // std::min
#include <atomic>         // counters
#include <chrono>         // wall-clock times for devices
#include <cstddef>        // std::size_t
#include <cstdint>        // sequence numbers
#include <deque>          // outboxes, replay buffers
#include <memory>         // device records, images
#include <mutex>          // per-device lock
#include <optional>       // lookups
#include <shared_mutex>   // device and session tables
#include <span>           // firmware bytes
#include <stdexcept>      // std::invalid_argument for bad options
#include <string>         // ids, topics
#include <string_view>    // ids, topics
#include <system_error>   // results
#include <unordered_map>  // device and session tables
#include <utility>        // std::move
#include <vector>         // snapshots

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/device/pubsub.hpp"
#include "devgate/firmware/rollout.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/pipeline.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/store/memory_state_store.hpp"
#include "devgate/store/state_store.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// The device hub's knobs. Each bounds a resource per device or per fleet.
struct hub_options {
  /// The pipeline that dispatches device messages (capacity, workers, overflow...).
  pipeline_options pipeline;
  /// Sequenced messages kept per device until acknowledged (offline devices included). Past
  /// it (or past `max_replay_bytes`) the oldest is dropped and counted; the device sees the
  /// gap in sequence numbers and the count in its next welcome (`replay_dropped`). The newest
  /// message is always kept.
  std::size_t max_replay_messages = 256;
  /// Bytes of sequenced messages kept per device (see `max_replay_messages`).
  std::size_t max_replay_bytes = 1u << 20;
  /// Largest message (text or binary) a device may send (error `too_big` past it). The
  /// WebSocket layer's own limit (reader_limits::max_message_size, close 1009) applies first.
  std::size_t max_message_bytes = 64u << 10;
  /// Bad messages tolerated per session; one more closes it with 4002.
  unsigned max_errors = 16;
  /// Firmware chunk size: larger chunks mean fewer acks, smaller ones finer resume points.
  std::size_t chunk_size = 16u << 10;
  /// Unacknowledged chunks in flight per device (window * chunk_size bytes of buffering).
  std::size_t window = 8;
  /// At most this many devices receive firmware at once; the rest wait their turn.
  std::size_t max_concurrent_transfers = 16;
};

/// Gateway figures (also what `publish_stats` sends on the stats topic).
struct hub_stats {
  std::size_t connected = 0;          ///< Sessions open now.
  std::size_t devices = 0;            ///< Devices seen since start.
  std::uint64_t enqueued = 0;         ///< Device messages accepted by the pipeline.
  std::uint64_t dispatched = 0;       ///< Device messages dispatched.
  std::uint64_t queue_depth = 0;      ///< Accepted, not yet dispatched.
  std::uint64_t workers_alive = 0;    ///< Pipeline workers running.
  std::uint64_t replay_dropped = 0;   ///< Sequenced messages dropped by replay overflow.
  std::uint64_t protocol_errors = 0;  ///< Error replies sent to devices (bad_resume excepted).
  std::uint64_t takeovers = 0;        ///< Sessions replaced by a newer one (closed with 4000).
  firmware::rollout_totals rollout;   ///< Current firmware rollout.
};

/// The pipeline sink of a hub: the user's sink, then (on success) one line on the server topic
/// per dispatched message, encoded once for every subscriber.
template <class Sink>
class hub_sink {
 public:
  /// Wraps `user`; `bus` receives the server log.
  hub_sink(Sink user, pubsub* bus) : user_(std::move(user)), bus_(bus) {}
  /// Dispatches to the user's sink, then logs.
  std::error_code consume(const message& m, dispatch_context& ctx) {
    auto ec = user_.consume(m, ctx);
    if (!ec && bus_->has_subscribers(topics::server)) {
      const auto now = clock::now();
      const auto wall = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
      nlohmann::json data{
          {"device", m.device_id.view()},
          {"seq", m.sequence},
          {"worker", ctx.worker_id},
          {"partition", ctx.partition},
          {"time_ms", wall},
          {"latency_us",
           std::chrono::duration_cast<std::chrono::microseconds>(now - m.received).count()}};
      bus_->publish(topics::server, make_envelope("event", 0, topics::server, data.dump()));
    }
    return ec;
  }
  /// The user's sink.
  Sink& user() noexcept { return user_; }

 private:
  Sink user_;
  pubsub* bus_;
};

/// The device gateway: a transport, a pipeline, a state store, pub/sub and firmware rollouts,
/// speaking the device protocol (docs/PROTOCOL.md) with every session.
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
                "add_messages_sent, touch, set_firmware_version, set_transfer)");

 public:
  /// Composes the hub over `transport` (referenced: it must outlive the hub).
  explicit hub(Transport& transport, Sink sink = Sink{}, hub_options options = {},
               Store store = Store{})
      : transport_(transport),
        options_(std::move(options)),
        store_(std::move(store)),
        slots_(options_.max_concurrent_transfers),
        pipeline_(hub_sink<Sink>(std::move(sink), &bus_), options_.pipeline) {
    if (options_.window == 0) throw std::invalid_argument("hub_options::window must be >= 1");
    if (options_.chunk_size == 0) {
      throw std::invalid_argument("hub_options::chunk_size must be >= 1");
    }
    channel_ = reply_channel::to(transport_);
    pipeline_.set_reply_channel(&channel_);
    bus_.set_channel(&channel_);
  }
  hub(const hub&) = delete;
  hub& operator=(const hub&) = delete;
  /// Stops if still running.
  ~hub() { stop(); }

  /// Installs the transport handlers, starts the pipeline, then the transport.
  std::error_code start() {
    transport_handlers h;
    h.on_open = [this](const session_info& info) { on_open(info); };
    h.on_message = [this](inbound_message&& in) { return on_message(std::move(in)); };
    h.on_close = [this](session_id s, close_code c) { on_close(s, c); };
    transport_.set_handlers(std::move(h));
    if (auto ec = pipeline_.start(); ec) return ec;
    started_ = true;
    return transport_.start();
  }
  /// Stops intake, drains the pipeline, then stops the transport (sessions close with 1001).
  void stop() {
    pipeline_.stop();
    if (started_) {
      started_ = false;
      transport_.stop();
    }
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
  /// Sends `data` to one device as a sequenced `deliver` message (kept while it is offline or
  /// until it acknowledges). Returns the sequence number, 0 for an invalid device id.
  std::uint64_t send_to(std::string_view device_id, const nlohmann::json& data) {
    if (!is_valid_device_id(device_id)) return 0;
    auto rec = get_or_create(std::string(device_id));
    const std::string text = data.dump();
    std::uint64_t seq = 0;
    {
      std::lock_guard lock(rec->m);
      seq = rec->next_seq++;
      auto frame = make_envelope("deliver", seq, rec->topic, text);
      rec->replay_bytes += frame.size();
      rec->replay.emplace_back(seq, frame);
      while (rec->replay.size() > 1 && (rec->replay.size() > options_.max_replay_messages ||
                                        rec->replay_bytes > options_.max_replay_bytes)) {
        rec->replay_bytes -= rec->replay.front().second.size();
        rec->replay.pop_front();
        ++rec->replay_dropped;
        replay_dropped_.fetch_add(1, std::memory_order_relaxed);
      }
      if (rec->session != 0 && rec->hello) {
        rec->outbox.push_back({rec->session, payload_kind::text, std::move(frame)});
      }
    }
    drain(*rec);
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
  std::uint32_t publish_firmware(std::string version, std::span<const std::byte> bytes) {
    if (version.empty()) throw std::invalid_argument("publish_firmware: empty version");
    const auto id = next_rollout_.fetch_add(1, std::memory_order_relaxed) + 1;
    auto img =
        std::make_shared<const firmware::image>(id, std::move(version), bytes, options_.chunk_size);
    {
      std::lock_guard lock(fw_mutex_);
      current_ = img;
    }
    slots_.clear();
    std::vector<std::shared_ptr<device_rec>> online;
    for (auto& rec : snapshot_devices()) {
      bool want = false;
      store::transfer_state t;
      {
        std::lock_guard lock(rec->m);
        join_rollout_locked(*rec, img);
        want = rec->fw_status == store::transfer_status::pending && rec->session != 0 && rec->hello;
        t = transfer_locked(*rec);
      }
      store_.set_transfer(rec->id, t);
      if (want) online.push_back(std::move(rec));
    }
    nlohmann::json announce{{"type", "firmware_available"}, {"rollout", id},
                            {"version", img->version()},    {"size", img->size()},
                            {"sha256", img->sha256()},      {"chunk_size", img->chunk_size()}};
    bus_.publish(topics::fleet, to_payload(announce));
    for (auto& rec : online) {
      if (slots_.acquire(rec->id) && !start_transfer(*rec)) start_next(slots_.release(rec->id));
    }
    return id;
  }
  /// Fleet totals of the current rollout.
  [[nodiscard]] firmware::rollout_totals rollout() const {
    firmware::rollout_totals out;
    auto img = current_image();
    if (!img) return out;
    out.rollout = img->rollout();
    out.version = img->version();
    out.size = img->size();
    for (const auto& rec : snapshot_devices()) {
      std::lock_guard lock(rec->m);
      if (rec->fw != img) continue;
      switch (rec->fw_status) {
        case store::transfer_status::pending:
          ++out.pending;
          break;
        case store::transfer_status::transferring:
          ++out.transferring;
          break;
        case store::transfer_status::verified:
          ++out.verified;
          break;
        case store::transfer_status::failed:
          ++out.failed;
          break;
        case store::transfer_status::skipped:
          ++out.skipped;
          break;
        case store::transfer_status::none:
          break;
      }
      out.bytes_acked += rec->fw_acked;
    }
    out.peak_transferring = slots_.peak();
    return out;
  }
  /// One device's part in the current rollout (std::nullopt for a device never seen).
  [[nodiscard]] std::optional<store::transfer_state> device_transfer(std::string_view id) const {
    auto rec = find_device(id);
    if (!rec) return std::nullopt;
    std::lock_guard lock(rec->m);
    return transfer_locked(*rec);
  }
  /// The transfer slots (limit, active, waiting, peak).
  [[nodiscard]] const firmware::transfer_slots& slots() const noexcept { return slots_; }
  /// The image being rolled out (nullptr before the first publish_firmware).
  [[nodiscard]] std::shared_ptr<const firmware::image> current_image() const {
    std::lock_guard lock(fw_mutex_);
    return current_;
  }

  // ---- state and figures --------------------------------------------------------------

  /// A device's stored state.
  [[nodiscard]] store::device_state device_state(const std::string& id) const {
    return store_.load(id);
  }
  /// The state store.
  [[nodiscard]] Store& state_store() noexcept { return store_; }
  /// Sessions open now.
  [[nodiscard]] std::size_t connected() const {
    std::shared_lock lock(sessions_mutex_);
    return sessions_.size();
  }
  /// Current figures.
  [[nodiscard]] hub_stats stats() const {
    hub_stats s;
    s.connected = connected();
    {
      std::shared_lock lock(devices_mutex_);
      s.devices = devices_.size();
    }
    const auto m = pipeline_.metrics();
    s.enqueued = m.enqueued;
    s.dispatched = m.dispatched;
    s.queue_depth = m.queue_depth;
    s.workers_alive = m.workers_alive;
    s.replay_dropped = replay_dropped_.load(std::memory_order_relaxed);
    s.protocol_errors = errors_.load(std::memory_order_relaxed);
    s.takeovers = takeovers_.load(std::memory_order_relaxed);
    s.rollout = rollout();
    return s;
  }
  /// Publishes `stats()` on the stats topic (call it periodically, e.g. once a second), with
  /// `msgs_per_s` computed from the previous call. Returns the recipients.
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
    return bus_.publish(topics::stats, make_envelope("event", 0, topics::stats, data.dump()));
  }
  /// The pipeline (metrics, Prometheus text).
  [[nodiscard]] pipeline<hub_sink<Sink>, Traits>& engine() noexcept { return pipeline_; }
  /// The options in force.
  [[nodiscard]] const hub_options& options() const noexcept { return options_; }

 private:
  struct out_item {
    session_id session;
    payload_kind kind;
    shared_bytes bytes;
  };

  // Everything the hub knows about one device; every field below `m` is guarded by it.
  struct device_rec {
    device_rec(std::string device, std::uint64_t sent, std::string version)
        : id(std::move(device)),
          topic(std::string(topics::device_prefix) + id),
          messages_sent(sent),
          reported_version(std::move(version)) {}
    const std::string id;
    const std::string topic;
    mutable std::mutex m;
    session_id session = 0;  // the live session (0: offline)
    bool hello = false;
    unsigned errors = 0;
    std::uint64_t messages_sent;
    std::string reported_version;
    // Sequenced delivery: seq numbers next_seq-1 and below were assigned; acked and below
    // were acknowledged; replay holds the rest (bounded).
    std::uint64_t next_seq = 1;
    std::uint64_t acked = 0;
    std::deque<std::pair<std::uint64_t, shared_bytes>> replay;
    std::size_t replay_bytes = 0;
    std::uint64_t replay_dropped = 0;  // since the last welcome
    // Outgoing messages in order; one thread at a time drains them with no lock held.
    std::deque<out_item> outbox;
    bool draining = false;
    // Firmware.
    std::shared_ptr<const firmware::image> fw;
    store::transfer_status fw_status = store::transfer_status::none;
    std::uint64_t fw_acked = 0;
    std::uint64_t fw_sent = 0;
    std::string fw_reason;
  };
  using rec_ptr = std::shared_ptr<device_rec>;

  static std::int64_t unix_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  // ---- tables ---------------------------------------------------------------------------

  rec_ptr find_device(std::string_view id) const {
    std::shared_lock lock(devices_mutex_);
    auto it = devices_.find(std::string(id));
    return it == devices_.end() ? nullptr : it->second;
  }
  rec_ptr get_or_create(const std::string& id) {
    if (auto rec = find_device(id)) return rec;
    const auto st = store_.load(id);  // no hub lock held while calling the store
    auto fresh = std::make_shared<device_rec>(id, st.messages_sent, st.firmware_version);
    std::unique_lock lock(devices_mutex_);
    auto [it, inserted] = devices_.emplace(id, fresh);
    return it->second;
  }
  std::vector<rec_ptr> snapshot_devices() const {
    std::shared_lock lock(devices_mutex_);
    std::vector<rec_ptr> out;
    out.reserve(devices_.size());
    for (const auto& [id, rec] : devices_) out.push_back(rec);
    return out;
  }
  rec_ptr find_session(session_id s) const {
    std::shared_lock lock(sessions_mutex_);
    auto it = sessions_.find(s);
    return it == sessions_.end() ? nullptr : it->second;
  }

  // ---- outbox -----------------------------------------------------------------------------

  // Sends the device's queued messages in order. Whoever finds the outbox idle drains it,
  // including what other threads add meanwhile; the transport is called with no lock held.
  void drain(device_rec& rec) {
    std::unique_lock lock(rec.m);
    if (rec.draining) return;
    rec.draining = true;
    while (!rec.outbox.empty()) {
      std::deque<out_item> batch;
      batch.swap(rec.outbox);
      lock.unlock();
      for (auto& o : batch) (void)transport_.send(o.session, o.kind, std::move(o.bytes));
      lock.lock();
    }
    rec.draining = false;
  }
  void reply(device_rec& rec, session_id s, shared_bytes payload) {
    {
      std::lock_guard lock(rec.m);
      if (rec.session != s) return;
      rec.outbox.push_back({s, payload_kind::text, std::move(payload)});
    }
    drain(rec);
  }
  void reply_error(device_rec& rec, session_id s, error e, std::string_view ref,
                   bool counts = true) {
    bool close_now = false;
    {
      std::lock_guard lock(rec.m);
      if (rec.session != s) return;
      rec.outbox.push_back({s, payload_kind::text, make_error(e, ref)});
      if (counts && ++rec.errors > options_.max_errors) close_now = true;
    }
    errors_.fetch_add(1, std::memory_order_relaxed);
    drain(rec);
    if (close_now) transport_.close(s, close_too_many_errors, "too many bad messages");
  }

  // ---- transport handlers ---------------------------------------------------------------

  void on_open(const session_info& info) {
    if (!is_valid_device_id(info.device_id)) {
      // Transports other than the WebSocket server (which answers 400) may not validate ids.
      transport_.close(info.id, close_code::policy_violation, "invalid device id");
      return;
    }
    auto rec = get_or_create(info.device_id);
    session_id old = 0;
    bool release = false;
    {
      std::lock_guard lock(rec->m);
      old = rec->session;
      rec->session = info.id;
      rec->hello = false;
      rec->errors = 0;
      std::erase_if(rec->outbox, [&](const out_item& o) { return o.session == old; });
      if (rec->fw_status == store::transfer_status::transferring) {
        rec->fw_status = store::transfer_status::pending;
        release = true;
      }
    }
    {
      std::unique_lock lock(sessions_mutex_);
      sessions_[info.id] = rec;
    }
    if (old != 0) {
      takeovers_.fetch_add(1, std::memory_order_relaxed);
      bus_.unsubscribe_all(old);
      transport_.close(old, close_replaced, "replaced by a newer session for this device");
    }
    if (release) start_next(slots_.release(rec->id));
  }

  void on_close(session_id s, close_code /*code*/) {
    rec_ptr rec;
    {
      std::unique_lock lock(sessions_mutex_);
      auto it = sessions_.find(s);
      if (it == sessions_.end()) return;
      rec = std::move(it->second);
      sessions_.erase(it);
    }
    bus_.unsubscribe_all(s);
    bool release = false;
    bool was_current = false;
    {
      std::lock_guard lock(rec->m);
      if (rec->session == s) {
        was_current = true;
        rec->session = 0;
        rec->hello = false;
        std::erase_if(rec->outbox, [&](const out_item& o) { return o.session == s; });
        if (rec->fw_status == store::transfer_status::transferring) {
          rec->fw_status = store::transfer_status::pending;  // resumes from fw_acked
        }
        release = true;  // frees its slot, or takes it off the queue
      }
    }
    if (!was_current) return;
    store_.touch(rec->id, unix_ms());
    if (release) start_next(slots_.release(rec->id));
  }

  std::error_code on_message(inbound_message&& in) {
    auto rec = find_session(in.session);
    if (!rec) return errc::unknown_session;
    const session_id s = in.session;
    bool hello = false;
    {
      std::lock_guard lock(rec->m);
      if (rec->session != s) return {};  // replaced: the old session's messages are ignored
      hello = rec->hello;
    }
    if (in.kind == payload_kind::binary) {
      if (!hello) {
        reply_error(*rec, s, error::hello_required, "binary");
        return {};
      }
      if (in.payload.size() > options_.max_message_bytes) {
        reply_error(*rec, s, error::too_big, "binary");
        return {};
      }
      push_message(*rec, s, in, in.payload, payload_kind::binary, std::nullopt);
      return {};
    }
    if (in.payload.size() > options_.max_message_bytes) {
      reply_error(*rec, s, error::too_big, {});
      return {};
    }
    auto parsed = parse_json(in.payload.view());
    if (!parsed) {
      reply_error(*rec, s, error::bad_json, {});
      return {};
    }
    const nlohmann::json& j = *parsed;
    const auto type = j.is_object() ? get_string(j, "type") : std::nullopt;
    if (!type) {
      reply_error(*rec, s, error::bad_message, {});
      return {};
    }
    if (*type == "hello") {
      if (hello) {
        reply_error(*rec, s, error::duplicate_hello, *type);
      } else {
        on_hello(rec, s, j);
      }
      return {};
    }
    static constexpr std::string_view known[] = {"send",        "ack",    "subscribe",
                                                 "unsubscribe", "fw_ack", "fw_result"};
    if (std::find(std::begin(known), std::end(known), *type) == std::end(known)) {
      reply_error(*rec, s, error::unknown_type, *type);
      return {};
    }
    if (!hello) {
      reply_error(*rec, s, error::hello_required, *type);
      return {};
    }
    if (*type == "send") {
      on_send(*rec, s, in, j);
    } else if (*type == "ack") {
      on_ack(*rec, s, j);
    } else if (*type == "subscribe" || *type == "unsubscribe") {
      on_subscribe(*rec, s, j, *type == "subscribe");
    } else if (*type == "fw_ack") {
      on_fw_ack(*rec, s, j);
    } else {
      on_fw_result(*rec, s, j);
    }
    return {};
  }

  // ---- device messages ------------------------------------------------------------------

  void on_hello(const rec_ptr& rec, session_id s, const nlohmann::json& j) {
    const auto proto = get_uint(j, "protocol");
    const bool has_last = j.contains("last_seq");
    const auto last = get_uint(j, "last_seq");
    const bool has_version = j.contains("firmware_version");
    const auto version = get_string(j, "firmware_version");
    if (!proto || (has_last && !last) || (has_version && !version)) {
      reply_error(*rec, s, error::bad_message, "hello");
      return;
    }
    if (*proto != static_cast<std::uint64_t>(protocol_version)) {
      reply_error(*rec, s, error::unsupported_version, "hello");
      transport_.close(s, close_unsupported_version, "unsupported protocol version; speak 1");
      return;
    }
    if (version) store_.set_firmware_version(rec->id, *version);
    auto st = store_.load(rec->id);
    const std::uint64_t last_seq = last.value_or(0);
    {
      std::lock_guard lock(rec->m);
      if (rec->session != s) return;
      if (version) rec->reported_version = *version;
      const bool bad_resume = last_seq >= rec->next_seq;
      if (!bad_resume) {
        while (!rec->replay.empty() && rec->replay.front().first <= last_seq) {
          rec->replay_bytes -= rec->replay.front().second.size();
          rec->replay.pop_front();
        }
        rec->acked = std::max(rec->acked, last_seq);
      }
      const auto t = transfer_locked(*rec);
      nlohmann::json welcome{{"type", "welcome"},
                             {"protocol", protocol_version},
                             {"device", rec->id},
                             {"session", s},
                             {"last_seq", rec->next_seq - 1},
                             {"replay", rec->replay.size()},
                             {"replay_dropped", rec->replay_dropped},
                             {"state",
                              {{"messages_sent", rec->messages_sent},
                               {"last_seen_ms", st.last_seen_ms},
                               {"firmware_version", rec->reported_version},
                               {"firmware",
                                {{"rollout", t.rollout},
                                 {"version", t.version},
                                 {"status", store::to_string(t.status)},
                                 {"offset", t.offset},
                                 {"reason", t.reason}}}}}};
      rec->replay_dropped = 0;
      rec->outbox.push_back({s, payload_kind::text, to_payload(welcome)});
      if (bad_resume)
        rec->outbox.push_back({s, payload_kind::text, make_error(error::bad_resume, "hello")});
      for (const auto& [seq, frame] : rec->replay) {
        rec->outbox.push_back({s, payload_kind::text, frame});
      }
      rec->hello = true;
    }
    drain(*rec);
    bus_.subscribe(topics::fleet, s);
    store_.touch(rec->id, unix_ms());
    // Firmware: join the current rollout (offline at publish, or reconnecting mid-transfer).
    auto img = current_image();
    if (!img) return;
    bool want = false;
    store::transfer_state t;
    {
      std::lock_guard lock(rec->m);
      if (rec->session != s) return;
      join_rollout_locked(*rec, img);
      want = rec->fw_status == store::transfer_status::pending;
      t = transfer_locked(*rec);
    }
    store_.set_transfer(rec->id, t);
    if (want && slots_.acquire(rec->id) && !start_transfer(*rec)) {
      start_next(slots_.release(rec->id));
    }
  }

  void on_send(device_rec& rec, session_id s, const inbound_message& in, const nlohmann::json& j) {
    const auto it = j.find("data");
    const bool has_id = j.contains("id");
    const auto ref = get_uint(j, "id");
    if (it == j.end() || (has_id && !ref)) {
      reply_error(rec, s, error::bad_message, "send");
      return;
    }
    shared_bytes payload =
        it->is_string() ? shared_bytes::copy_of(std::string_view(it->get_ref<const std::string&>()))
                        : shared_bytes::copy_of(std::string_view(it->dump()));
    push_message(rec, s, in, std::move(payload), payload_kind::text, ref);
  }

  // Pushes a device message into the pipeline, numbered with the device's lifetime count.
  void push_message(device_rec& rec, session_id s, const inbound_message& in, shared_bytes payload,
                    payload_kind kind, std::optional<std::uint64_t> ref) {
    std::uint64_t number = 0;
    {
      std::lock_guard lock(rec.m);
      if (rec.session != s) return;
      number = ++rec.messages_sent;
    }
    message m;
    m.session = s;
    m.device_id = in.device_id;
    m.sequence = number;
    m.kind = kind;
    m.payload = std::move(payload);
    m.received = in.received;
    const auto ec = pipeline_.push(std::move(m));
    if (ec) {
      {
        std::lock_guard lock(rec.m);
        if (rec.messages_sent == number) --rec.messages_sent;
      }
      reply_error(rec, s, ec == errc::queue_full ? error::queue_full : error::closed,
                  kind == payload_kind::binary ? "binary" : "send", false);
      return;
    }
    store_.add_messages_sent(rec.id, 1);
    if (ref) {
      nlohmann::json sent{{"type", "sent"}, {"id", *ref}, {"messages_sent", number}};
      reply(rec, s, to_payload(sent));
    }
  }

  void on_ack(device_rec& rec, session_id s, const nlohmann::json& j) {
    const auto seq = get_uint(j, "seq");
    if (!seq) {
      reply_error(rec, s, error::bad_message, "ack");
      return;
    }
    bool bad = false;
    {
      std::lock_guard lock(rec.m);
      if (rec.session != s) return;
      if (*seq >= rec.next_seq || *seq < rec.acked) {
        bad = true;
      } else {
        rec.acked = *seq;
        while (!rec.replay.empty() && rec.replay.front().first <= *seq) {
          rec.replay_bytes -= rec.replay.front().second.size();
          rec.replay.pop_front();
        }
      }
    }
    if (bad) reply_error(rec, s, error::bad_ack, "ack");
  }

  void on_subscribe(device_rec& rec, session_id s, const nlohmann::json& j, bool sub) {
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
    if (sub) {
      bus_.subscribe(*topic, s);
    } else {
      bus_.unsubscribe(*topic, s);
    }
    nlohmann::json ok{{"type", sub ? "subscribed" : "unsubscribed"}, {"topic", *topic}};
    reply(rec, s, to_payload(ok));
  }

  // ---- firmware -------------------------------------------------------------------------

  // Puts the device into `img`'s rollout (once per rollout).
  void join_rollout_locked(device_rec& rec, const std::shared_ptr<const firmware::image>& img) {
    if (rec.fw != img) {
      rec.fw = img;
      rec.fw_acked = 0;
      rec.fw_sent = 0;
      rec.fw_reason.clear();
      rec.fw_status = store::transfer_status::pending;
    }
    if (rec.fw_status == store::transfer_status::pending &&
        rec.reported_version == img->version()) {
      rec.fw_status = store::transfer_status::skipped;
    }
  }
  static store::transfer_state transfer_locked(const device_rec& rec) {
    store::transfer_state t;
    if (!rec.fw) return t;
    t.rollout = rec.fw->rollout();
    t.version = rec.fw->version();
    t.status = rec.fw_status;
    t.offset = rec.fw_acked;
    t.reason = rec.fw_reason;
    return t;
  }
  // Queues chunks until `window` are unacknowledged (caller holds rec.m).
  void fill_window_locked(device_rec& rec) {
    const auto& img = *rec.fw;
    const std::uint64_t window = options_.window * img.chunk_size();
    while (rec.fw_sent < img.size() && rec.fw_sent - rec.fw_acked < window) {
      rec.outbox.push_back({rec.session, payload_kind::binary, img.chunk_at(rec.fw_sent)});
      rec.fw_sent += std::min<std::uint64_t>(img.chunk_size(), img.size() - rec.fw_sent);
    }
  }
  // Starts (or resumes) the device's transfer; false if it cannot start now (offline).
  bool start_transfer(device_rec& rec) {
    store::transfer_state t;
    {
      std::lock_guard lock(rec.m);
      if (rec.session == 0 || !rec.hello || !rec.fw ||
          rec.fw_status != store::transfer_status::pending) {
        return false;
      }
      rec.fw_status = store::transfer_status::transferring;
      rec.fw_sent = rec.fw_acked;
      const auto& img = *rec.fw;
      nlohmann::json start{{"type", "firmware"},          {"rollout", img.rollout()},
                           {"version", img.version()},    {"size", img.size()},
                           {"sha256", img.sha256()},      {"chunk_size", img.chunk_size()},
                           {"chunks", img.chunk_count()}, {"offset", rec.fw_acked},
                           {"window", options_.window}};
      rec.outbox.push_back({rec.session, payload_kind::text, to_payload(start)});
      fill_window_locked(rec);
      t = transfer_locked(rec);
    }
    drain(rec);
    store_.set_transfer(rec.id, t);
    return true;
  }
  // Gives a freed slot to the next waiting device that can start.
  void start_next(std::optional<std::string> next) {
    while (next) {
      auto rec = find_device(*next);
      if (rec && start_transfer(*rec)) return;
      next = slots_.release(*next);
    }
  }

  void on_fw_ack(device_rec& rec, session_id s, const nlohmann::json& j) {
    const auto rollout = get_uint(j, "rollout");
    const auto offset = get_uint(j, "offset");
    if (!rollout || !offset) {
      reply_error(rec, s, error::bad_message, "fw_ack");
      return;
    }
    std::optional<error> bad;
    store::transfer_state t;
    {
      std::lock_guard lock(rec.m);
      if (rec.session != s) return;
      if (!rec.fw || rec.fw->rollout() != *rollout ||
          rec.fw_status != store::transfer_status::transferring) {
        bad = error::unknown_rollout;
      } else if (*offset < rec.fw_acked || *offset > rec.fw_sent ||
                 (*offset % rec.fw->chunk_size() != 0 && *offset != rec.fw->size())) {
        bad = error::bad_fw_ack;
      } else {
        rec.fw_acked = *offset;
        fill_window_locked(rec);
        t = transfer_locked(rec);
      }
    }
    if (bad) {
      // A late ack of a superseded rollout is a benign race, not counted toward max_errors.
      reply_error(rec, s, *bad, "fw_ack", *bad != error::unknown_rollout);
      return;
    }
    drain(rec);
    store_.set_transfer(rec.id, t);
  }

  void on_fw_result(device_rec& rec, session_id s, const nlohmann::json& j) {
    const auto rollout = get_uint(j, "rollout");
    const auto ok = j.find("ok");
    if (!rollout || ok == j.end() || !ok->is_boolean()) {
      reply_error(rec, s, error::bad_message, "fw_result");
      return;
    }
    const auto sha = get_string(j, "sha256");
    const auto reason = get_string(j, "reason");
    bool unknown = false;
    bool verified = false;
    store::transfer_state t;
    std::string version;
    {
      std::lock_guard lock(rec.m);
      if (rec.session != s) return;
      if (!rec.fw || rec.fw->rollout() != *rollout ||
          rec.fw_status != store::transfer_status::transferring) {
        unknown = true;
      } else {
        const auto& img = *rec.fw;
        if (!ok->get<bool>()) {
          rec.fw_reason = reason.value_or("device reported a failure");
        } else if (rec.fw_acked != img.size()) {
          rec.fw_reason = "result before every byte was acknowledged";
        } else if (!sha || *sha != img.sha256()) {
          rec.fw_reason = "sha256 mismatch";
        } else {
          verified = true;
          rec.reported_version = img.version();
          version = img.version();
        }
        rec.fw_status =
            verified ? store::transfer_status::verified : store::transfer_status::failed;
        t = transfer_locked(rec);
        nlohmann::json status{{"type", "fw_status"},
                              {"rollout", img.rollout()},
                              {"status", store::to_string(rec.fw_status)},
                              {"reason", rec.fw_reason}};
        rec.outbox.push_back({s, payload_kind::text, to_payload(status)});
      }
    }
    if (unknown) {
      reply_error(rec, s, error::unknown_rollout, "fw_result", false);
      return;
    }
    drain(rec);
    store_.set_transfer(rec.id, t);
    if (verified) store_.set_firmware_version(rec.id, version);
    start_next(slots_.release(rec.id));
  }

  Transport& transport_;
  hub_options options_;
  Store store_;
  reply_channel channel_;
  pubsub bus_;
  firmware::transfer_slots slots_;
  mutable std::shared_mutex devices_mutex_;
  std::unordered_map<std::string, rec_ptr> devices_;
  mutable std::shared_mutex sessions_mutex_;
  std::unordered_map<session_id, rec_ptr> sessions_;
  mutable std::mutex fw_mutex_;
  std::shared_ptr<const firmware::image> current_;
  std::atomic<std::uint32_t> next_rollout_{0};
  std::atomic<std::uint64_t> replay_dropped_{0};
  std::atomic<std::uint64_t> errors_{0};
  std::atomic<std::uint64_t> takeovers_{0};
  std::mutex rate_mutex_;
  clock::time_point last_rate_time_{};
  std::uint64_t last_dispatched_ = 0;
  bool started_ = false;
  pipeline<hub_sink<Sink>, Traits> pipeline_;  // last: stopped and destroyed first
};

}  // namespace devgate::device
