// demo_server: the device-gateway demo. Every browser tab at http://localhost:4000/<device_id>
// is a device (it speaks docs/PROTOCOL.md over a WebSocket) and a window on the gateway (the
// live server log, figures, and the fleet's firmware rollout).
//
//   demo_server [--listen 127.0.0.1] [--port 4000] [--threads N] [--workers-min N]
//               [--workers-max N] [--queue-capacity N] [--max-devices N]
//               [--firmware-size BYTES] [--max-image-size BYTES] [--max-transfers N]
//               [--state-dir DIR]
//               [--ack on_dispatch|on_accept]
//               [--operator-token-file FILE] [--tls-cert FILE --tls-key FILE]
//               [--redis redis://HOST:PORT --node-id NAME] ...
//
// Routes: GET /<device_id> (the page), /static/* (its CSS and JS), /ws/<device_id> (the
// device WebSocket), /metrics (Prometheus), /healthz, /api/info, /api/log (recent server log).
// The operator API changes state, so it takes only POST with `Authorization: Bearer <operator
// token>` (see operator_admission below and docs/SECURITY.md "Operator API"):
// POST /api/firmware (the request body is the image) and POST /api/firmware/release (a
// synthetic image of --firmware-size bytes, what the page's UPDATE DEVICE button asks for).
// Ctrl-C (SIGINT) or SIGTERM: intake closes, the pipeline drains, sessions close with 1001,
// every state write behind reaches the SQLite database (DIR/devgate.db).
// With --redis (built with hiredis) the demo is a node of a cluster: every node's server log
// reaches the pages of every node, through Redis pub/sub (devgate::redis::topic_bridge); the
// devices' state lives in Redis (devgate::redis::state_store), and a release published on any
// node rolls out to every node's devices under one cap (--max-transfers, leased across nodes).

#include <openssl/crypto.h>  // CRYPTO_memcmp
#include <CLI/CLI.hpp>

#include <atomic>              // the hub pointer the routes read
#include <chrono>              // control loop period, simulated work
#include <condition_variable>  // control thread wake-ups
#include <csignal>             // SIGHUP (certificate reload)
#include <cstddef>             // std::byte
#include <cstdint>             // sizes, counters
#include <cstdio>              // std::printf
#include <deque>               // log ring, release jobs
#include <filesystem>          // web root, state directory
#include <fstream>             // the device key and operator token files
#include <functional>          // the SIGHUP loop
#include <iterator>            // reading the token file
#include <limits>              // campaign ids
#include <memory>              // the authenticator
#include <mutex>               // log ring, jobs
#include <optional>            // admission replies, the SIGHUP set (with TLS only)
#include <sstream>             // the device key file
#include <string>              // texts
#include <string_view>         // routes
#include <system_error>        // store errors
#include <thread>              // the control thread
#include <vector>              // firmware images

#include "devgate/devgate.hpp"
#include "devgate/store/sqlite_state_store.hpp"  // the optional SQLite part: device states
#ifdef DEVGATE_DEMO_REDIS
#include "devgate/redis/state_store.hpp"   // the optional Redis part: device states shared
#include "devgate/redis/topic_bridge.hpp"  // and topics across nodes
#include "devgate/redis/url.hpp"
#endif
#include <variant>  // the store: SQLite or Redis

#ifndef DEVGATE_DEMO_WEB_ROOT
#define DEVGATE_DEMO_WEB_ROOT "web"
#endif

namespace {

/// Command-line settings.
struct demo_config {
  std::string address = "127.0.0.1";
  std::uint16_t port = 4000;
  unsigned threads = 2;
  std::size_t workers_min = 1;
  std::size_t workers_max = 8;
  std::size_t queue_capacity = 1u << 16;
  std::size_t max_devices = 100'000;
  std::size_t firmware_size = 4u << 20;
  std::size_t max_image_size = 32u << 20;
  std::size_t max_transfers = 16;  // firmware transfers at once (the cluster's, with --redis)
  std::string operator_token_file;
  unsigned dispatch_us = 2000;
  std::string state_dir = "./devgate-data";
  std::size_t max_stored_devices = 1'000'000;
  std::string ack = "on_dispatch";
  std::string web_root = DEVGATE_DEMO_WEB_ROOT;
  std::string device_key_file;               // HS256 secret: token authentication on /ws/<id>
  std::vector<std::string> allowed_origins;  // browser origins allowed to open WebSockets
  std::string tls_cert;                      // with tls_key: https and wss on the same port
  std::string tls_key;
  std::string redis_url;  // with node_id: a cluster node sharing the server log through Redis
  std::string node_id;
};

#ifdef DEVGATE_DEMO_REDIS
/// This node's link to the other nodes (--redis): the devices' state lives in Redis, shared by
/// the nodes (devgate::redis::state_store: ownership, takeover, replay), and the server log
/// crosses nodes on Redis pub/sub. Its own loop thread runs the three Redis connections
/// (commands, the topics' subscriptions, the store's control channel).
class cluster_link {
 public:
  /// A link for node `node_id` of the cluster sharing `server`.
  cluster_link(const devgate::redis::endpoint& server, std::string node_id)
      : node_id_(std::move(node_id)),
        commands_(io_, connection_options(server)),
        subscriptions_(io_, connection_options(server)),
        control_(io_, connection_options(server)),
        store_(io_, commands_, control_, store_options(node_id_)) {}
  /// Stops (see `stop`).
  ~cluster_link() { stop(); }
  cluster_link(const cluster_link&) = delete;
  cluster_link& operator=(const cluster_link&) = delete;
  /// Connects the store's connections (in the background: a node serves its own devices while
  /// Redis is away) and waits up to `wait` for the first connect.
  bool connect(std::chrono::milliseconds wait) {
    commands_.start();
    control_.start();
    thread_ = std::thread([this] { io_.run(); });
    return commands_.wait_connected(wait);
  }
  /// The shared device store (hand a copy to the hub).
  devgate::redis::state_store& store() { return store_; }
  /// Starts the heartbeat and the takeover channel, and links `bus` to the other nodes.
  void start(devgate::device::pubsub& bus) {
    bridge_.emplace(io_, commands_, subscriptions_, bus, bridge_options(node_id_));
    subscriptions_.start();
    bridge_->start();
    store_.start();
  }
  /// Stops (after the hub stopped and its writes were drained). Idempotent.
  void stop() {
    if (!thread_.joinable()) return;
    store_.stop();
    if (bridge_) bridge_->stop();
    commands_.stop();
    subscriptions_.stop();
    control_.stop();
    guard_.reset();
    thread_.join();
  }
  /// True while every connection is up.
  bool up() const {
    return commands_.connected() && subscriptions_.connected() && control_.connected();
  }
  /// Appends the link's state and counters in Prometheus text.
  void metrics(std::string& out) const {
    auto metric = [&out](const char* name, const char* type, const char* help, std::uint64_t v) {
      devgate::append_prometheus_metric(out, name, type, help, v);
    };
    metric("cluster_redis_up", "gauge", "1 while this node's Redis connections are up.",
           up() ? 1 : 0);
    metric("cluster_redis_drops_total", "counter", "Redis connections that dropped.",
           commands_.drops() + subscriptions_.drops() + control_.drops());
    if (bridge_) {
      metric("cluster_published_total", "counter",
             "Server log events sent to the other nodes through Redis.", bridge_->forwarded());
      metric("cluster_publish_failed_total", "counter",
             "Server log events the other nodes missed (Redis down or refusing).",
             bridge_->forward_failed());
      metric("cluster_received_total", "counter",
             "Server log events from the other nodes handed to this node's pages.",
             bridge_->received());
    }
    metric("cluster_claims_total", "counter", "Devices this node took ownership of.",
           store_.claims());
    metric("cluster_takeovers_total", "counter",
           "Claims that took a device from another node (which closed its session with 4000).",
           store_.takeovers());
    metric("cluster_lost_total", "counter", "Devices this node lost to another node's claim.",
           store_.lost());
    metric("cluster_fenced_writes_total", "counter",
           "State writes refused because another node owned the device by then.", store_.fenced());
    metric("cluster_reaped_total", "counter", "Devices of dead nodes this node released.",
           store_.reaped());
    metric("cluster_routed_out_total", "counter",
           "Messages for devices on other nodes sent there through Redis.", store_.routed_out());
    metric("cluster_routed_in_total", "counter",
           "Messages other nodes routed to devices on this node, numbered and sent here.",
           store_.routed_in());
    metric("cluster_routed_refused_total", "counter",
           "Messages refused because too many waited for their device's node.",
           store_.routed_refused());
    metric("cluster_transfer_slots_leased", "gauge",
           "Firmware transfer slots this node holds of the cluster's cap.", store_.leased_slots());
  }

 private:
  static devgate::redis::connection_options connection_options(const devgate::redis::endpoint& e) {
    devgate::redis::connection_options o;
    o.server = e;
    return o;
  }
  static devgate::redis::state_store_options store_options(const std::string& node_id) {
    devgate::redis::state_store_options o;
    o.node_id = node_id;
    return o;
  }
  static devgate::redis::topic_bridge_options bridge_options(std::string node_id) {
    devgate::redis::topic_bridge_options o;
    o.node_id = std::move(node_id);
    // The server log crosses nodes; each node's figures and fleet stay its own.
    o.topics = {std::string(devgate::device::topics::server),
                std::string(devgate::device::topics::server_batched)};
    return o;
  }
  std::string node_id_;
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> guard_ = asio::make_work_guard(io_);
  devgate::redis::connection commands_;
  devgate::redis::connection subscriptions_;
  devgate::redis::connection control_;
  devgate::redis::state_store store_;
  std::optional<devgate::redis::topic_bridge> bridge_;
  std::thread thread_;
};
#endif

/// The demo's device store: SQLite on a single node (--state-dir), Redis shared by the nodes of
/// a cluster (--redis). Each call goes to the one it holds.
class demo_store {
  template <class F>
  decltype(auto) visit(F&& f) {
    return std::visit(std::forward<F>(f), s_);
  }

 public:
  /// The single node's store.
  explicit demo_store(devgate::store::sqlite_state_store s) : s_(std::move(s)) {}
#ifdef DEVGATE_DEMO_REDIS
  /// The cluster's store.
  explicit demo_store(devgate::redis::state_store s) : s_(std::move(s)) {}
#endif
  /// True on a cluster node: other nodes change the devices' state too.
  [[nodiscard]] bool shared() const noexcept { return s_.index() != 0; }
  /// See store::state_store.
  devgate::store::load_result load(const std::string& id) {
    return visit([&](auto& s) { return s.load(id); });
  }
  /// Reads without claiming the device (Redis); SQLite's load.
  devgate::store::load_result peek(const std::string& id) {
    return visit([&](auto& s) {
      if constexpr (requires { s.peek(id); }) {
        return s.peek(id);
      } else {
        return s.load(id);
      }
    });
  }
  /// See store::state_store.
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n) {
    return visit([&](auto& s) { return s.add_messages_sent(id, n); });
  }
  /// See store::state_store.
  std::error_code touch(const std::string& id, std::int64_t ms) {
    return visit([&](auto& s) { return s.touch(id, ms); });
  }
  /// See store::state_store.
  std::error_code set_firmware_version(const std::string& id, const std::string& v) {
    return visit([&](auto& s) { return s.set_firmware_version(id, v); });
  }
  /// See store::state_store.
  std::error_code set_transfer(const std::string& id, const devgate::store::transfer_state& t) {
    return visit([&](auto& s) { return s.set_transfer(id, t); });
  }
  /// See store::state_store.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq) {
    return visit([&](auto& s) { return s.set_last_seq(id, seq); });
  }
  /// See store::state_store.
  std::error_code forget(const std::string& id) {
    return visit([&](auto& s) { return s.forget(id); });
  }
  /// See store::durable_state_store.
  std::error_code append_replay(const std::string& id, std::uint64_t seq, std::string_view f) {
    return visit([&](auto& s) { return s.append_replay(id, seq, f); });
  }
  /// See store::durable_state_store.
  std::error_code forget_replay(const std::string& id, std::uint64_t seq) {
    return visit([&](auto& s) { return s.forget_replay(id, seq); });
  }
  /// See store::durable_state_store.
  std::error_code record_dispatched(const std::string& id,
                                    const devgate::store::dispatch_record& r) {
    return visit([&](auto& s) { return s.record_dispatched(id, r); });
  }
  /// See store::durable_state_store.
  std::error_code save_rollout(const devgate::store::rollout_record& r) {
    return visit([&](auto& s) { return s.save_rollout(r); });
  }
  /// See store::fleet_rollout_store: Redis numbers, keeps and announces it; SQLite leaves it
  /// to the hub (rollout 0).
  devgate::store::rollout_publish_result publish_rollout(const devgate::store::rollout_record& r) {
    return visit([&](auto& s) -> devgate::store::rollout_publish_result {
      if constexpr (requires { s.publish_rollout(r); }) {
        return s.publish_rollout(r);
      } else {
        return {};
      }
    });
  }
  /// See store::fleet_delivery_store: Redis carries a message to the node holding the device;
  /// SQLite (one node) routes nothing.
  devgate::store::route_result route(const std::string& id, std::string_view data) {
    return visit([&](auto& s) -> devgate::store::route_result {
      if constexpr (requires { s.route(id, data); }) {
        return s.route(id, data);
      } else {
        return {};
      }
    });
  }
  /// See store::fleet_delivery_store.
  devgate::store::routed_messages routed(const std::string& id) {
    return visit([&](auto& s) -> devgate::store::routed_messages {
      if constexpr (requires { s.routed(id); }) {
        return s.routed(id);
      } else {
        return {};
      }
    });
  }
  /// See store::fleet_delivery_store.
  devgate::store::keep_routed_result keep_routed(
      const std::string& id, const std::vector<devgate::store::replay_entry>& entries) {
    return visit([&](auto& s) -> devgate::store::keep_routed_result {
      if constexpr (requires { s.keep_routed(id, entries); }) {
        return s.keep_routed(id, entries);
      } else {
        return {};
      }
    });
  }
  /// See store::durable_state_store.
  devgate::store::rollout_load_result load_rollout() {
    return visit([&](auto& s) { return s.load_rollout(); });
  }
  /// See store::campaign_store: SQLite keeps the campaigns, Redis those this node runs.
  std::error_code save_campaign(const devgate::store::campaign_record& c,
                                const std::vector<devgate::store::campaign_device_record>& d) {
    return visit([&](auto& s) -> std::error_code {
      if constexpr (requires { s.save_campaign(c, d); }) {
        return s.save_campaign(c, d);
      } else {
        return {};
      }
    });
  }
  /// See store::campaign_store.
  devgate::store::campaign_load_result load_campaigns() {
    return visit([&](auto& s) -> devgate::store::campaign_load_result {
      if constexpr (requires { s.load_campaigns(); }) {
        return s.load_campaigns();
      } else {
        return {};
      }
    });
  }
  /// See store::fleet_campaign_store: Redis carries a campaign between the nodes; SQLite (one
  /// node, never `shared`) is never asked.
  void campaign_admit(std::uint32_t r, const std::vector<std::string>& ids) {
    visit([&](auto& s) {
      if constexpr (requires { s.campaign_admit(r, ids); }) s.campaign_admit(r, ids);
    });
  }
  /// See store::fleet_campaign_store.
  void campaign_stop(std::uint32_t r, const std::string& id, const std::string& reason) {
    visit([&](auto& s) {
      if constexpr (requires { s.campaign_stop(r, id, reason); }) s.campaign_stop(r, id, reason);
    });
  }
  /// See store::fleet_campaign_store.
  void campaign_news(std::uint32_t r, const std::string& id,
                     const devgate::store::transfer_state& t) {
    visit([&](auto& s) {
      if constexpr (requires { s.campaign_news(r, id, t); }) s.campaign_news(r, id, t);
    });
  }
  /// See store::fleet_campaign_store.
  void campaign_seen(std::uint32_t r, const std::string& id, const std::string& attributes) {
    visit([&](auto& s) {
      if constexpr (requires { s.campaign_seen(r, id, attributes); }) {
        s.campaign_seen(r, id, attributes);
      }
    });
  }
  /// See store::fleet_campaign_store.
  std::vector<std::string> campaign_admitted(std::uint32_t r) {
    return visit([&](auto& s) -> std::vector<std::string> {
      if constexpr (requires { s.campaign_admitted(r); }) {
        return s.campaign_admitted(r);
      } else {
        return {};
      }
    });
  }
  /// See store::fleet_campaign_store.
  std::vector<std::string> fleet_devices() {
    return visit([&](auto& s) -> std::vector<std::string> {
      if constexpr (requires { s.fleet_devices(); }) {
        return s.fleet_devices();
      } else {
        return {};
      }
    });
  }
  /// See store::transactional_store.
  std::error_code begin_batch() {
    return visit([&](auto& s) { return s.begin_batch(); });
  }
  /// See store::transactional_store.
  std::error_code commit_batch() {
    return visit([&](auto& s) { return s.commit_batch(); });
  }

 private:
#ifdef DEVGATE_DEMO_REDIS
  std::variant<devgate::store::sqlite_state_store, devgate::redis::state_store> s_;
#else
  std::variant<devgate::store::sqlite_state_store> s_;
#endif
};

/// The last dispatched messages (the `server` topic's events, as sent), so that a page that
/// opens or reconnects can show the log it missed. Bounded; lost on restart.
class server_log {
 public:
  static constexpr std::size_t capacity = 500;
  /// Keeps one event payload.
  void add(devgate::shared_bytes event) {
    std::lock_guard lock(m_);
    entries_.push_back(std::move(event));
    if (entries_.size() > capacity) entries_.pop_front();
  }
  /// The kept events as one JSON array (oldest first).
  [[nodiscard]] std::string render() const {
    std::lock_guard lock(m_);
    std::string out = "[";
    for (const auto& e : entries_) {
      if (out.size() > 1) out += ',';
      out.append(reinterpret_cast<const char*>(e.data()), e.size());
    }
    out += "]\n";
    return out;
  }

 private:
  mutable std::mutex m_;
  std::deque<devgate::shared_bytes> entries_;
};

/// Shared between the sink (worker threads) and main: what a dispatch does besides logging.
struct dispatch_effects {
  /// Simulated downstream call per message (what makes the dynamic pool grow under load).
  std::chrono::microseconds work{0};
  /// Sends the device a sequenced receipt; set once the hub exists, before start().
  std::function<void(std::string_view device, std::uint64_t number, std::size_t worker)> receipt;
};

/// The demo's sink: "dispatches" a device message (a simulated downstream call), then sends
/// the device a sequenced receipt, which it gets even if it was offline at that moment.
struct demo_sink {
  std::shared_ptr<dispatch_effects> fx;
  /// Dispatches one message.
  std::error_code consume(const devgate::message& m, devgate::dispatch_context& ctx) {
    if (fx->work.count() > 0) std::this_thread::sleep_for(fx->work);
    if (fx->receipt) fx->receipt(m.device_id.view(), m.sequence, ctx.worker_id);
    return {};
  }
};

using demo_hub = devgate::device::hub<devgate::websocket::server, demo_sink, demo_store>;

/// devgate's version, "major.minor.patch".
std::string devgate_version() {
  return std::to_string(DEVGATE_VERSION_MAJOR) + "." + std::to_string(DEVGATE_VERSION_MINOR) + "." +
         std::to_string(DEVGATE_VERSION_PATCH);
}

/// The version string of release `n` (the factory version is 1.0.0).
std::string release_version(std::uint64_t n) { return "1." + std::to_string(n) + ".0"; }

/// The release number of a version `release_version` made (0 for any other).
std::uint64_t release_of(std::string_view version) {
  if (!version.starts_with("1.") || !version.ends_with(".0")) return 0;
  std::uint64_t n = 0;
  for (const char c : version.substr(2, version.size() - 4)) {
    if (c < '0' || c > '9') return 0;
    n = n * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return n;
}

/// A synthetic firmware image: `size` pseudo-random bytes, the same for the same release.
std::vector<std::byte> release_image(std::uint64_t n, std::size_t size) {
  std::vector<std::byte> out(size);
  std::uint64_t x = 0x9E3779B97F4A7C15ull ^ (n * 0xBF58476D1CE4E5B9ull);  // xorshift64 seed
  for (std::size_t i = 0; i < size; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    for (std::size_t b = 0; b < 8 && i + b < size; ++b) {
      out[i + b] = static_cast<std::byte>(x >> (8 * b));
    }
  }
  return out;
}

/// The control thread: publishes gateway figures and firmware releases (cutting and hashing a
/// 4 MiB image does not belong on a network thread). The hub keeps each release with its image
/// in the state store and resumes it after a restart; release numbers go on from it.
/// One release at a time: while one is being prepared, another is refused (409), never queued.
class control_loop {
 public:
  /// `last_release`: the number of the last release published before (0: none).
  control_loop(demo_hub& hub, std::size_t firmware_size, std::uint64_t last_release)
      : hub_(hub), size_(firmware_size), releases_(last_release) {}
  ~control_loop() { stop(); }
  /// Starts the thread.
  void start() {
    thread_ = std::thread([this] { run(); });
  }
  /// Takes a release to publish: `image` (an uploaded one), or the synthetic image of release
  /// `n` when empty; with `campaign`, it rolls out as campaign `campaign_id` (reserved) instead
  /// of to the whole fleet at once. Returns the release number, or 0 when one is still being
  /// prepared.
  std::uint64_t try_release(std::vector<std::byte> image,
                            std::optional<devgate::firmware::campaign_spec> campaign = {},
                            std::uint64_t campaign_id = 0) {
    std::uint64_t n = 0;
    {
      std::lock_guard lock(m_);
      if (busy_ || stopping_) return 0;
      busy_ = true;
      // On a cluster another node may have published since: numbers go on from the newest.
      if (const auto img = hub_.current_image()) {
        releases_ = std::max(releases_, release_of(img->version()));
      }
      n = ++releases_;
      jobs_.push_back(job{n, std::move(image), std::move(campaign), campaign_id});
    }
    cv_.notify_one();
    return n;
  }
  /// Whether a release is queued or being published (a new one would get 409).
  [[nodiscard]] bool busy() {
    std::lock_guard lock(m_);
    return busy_;
  }
  /// Why campaign `id` could not start (std::nullopt: it started, or is still being prepared).
  [[nodiscard]] std::optional<std::string> refused(std::uint64_t id) {
    std::lock_guard lock(m_);
    for (const auto& [n, why] : refused_) {
      if (n == id) return why;
    }
    return std::nullopt;
  }
  /// Stops the thread (pending releases are dropped; they are in the release counter).
  void stop() {
    {
      std::lock_guard lock(m_);
      stopping_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    std::unique_lock lock(m_);
    while (!stopping_) {
      cv_.wait_for(lock, std::chrono::milliseconds(250),
                   [this] { return stopping_ || !jobs_.empty(); });
      while (!jobs_.empty() && !stopping_) {
        job j = std::move(jobs_.front());
        jobs_.pop_front();
        lock.unlock();
        const auto said =
            publish(j.release, std::move(j.image), std::move(j.campaign), j.campaign_id);
        lock.lock();
        busy_ = !jobs_.empty();
        // Said once the next release may come: whoever reads it may ask for one at once.
        if (!said.empty()) {
          lock.unlock();
          std::printf("%s\n", said.c_str());
          std::fflush(stdout);
          lock.lock();
        }
      }
      lock.unlock();
      hub_.publish_stats();
      lock.lock();
    }
  }
  // Publishes release `n` (or starts it as a campaign); returns the line to print (empty: it
  // did not happen, and why went to stderr or to the refused campaigns).
  std::string publish(std::uint64_t n, std::vector<std::byte> uploaded,
                      std::optional<devgate::firmware::campaign_spec> campaign, std::uint64_t id) {
    auto image = uploaded.empty() ? release_image(n, size_) : std::move(uploaded);
    const auto version = release_version(n);
    std::uint32_t rollout = 0;
    if (campaign) {
      campaign->version = version;
      try {
        hub_.start_campaign(std::move(*campaign), image, id);
      } catch (const std::exception& e) {  // no device matches its target
        std::lock_guard lock(m_);
        refused_.emplace_back(id, e.what());
        while (refused_.size() > 16) refused_.pop_front();
        return {};
      }
      return "firmware " + version + ": campaign " + std::to_string(id) + " started (" +
             std::to_string(image.size()) + " bytes)";
    }
    std::string as;
    try {
      // UPDATE DEVICE is a default campaign for the whole fleet, those that connect later too
      // (one wave, no rate, no threshold): the prototype's push to every device, with a
      // campaign's records (kept across a restart on SQLite). On a cluster this node runs it
      // over every node's devices. The next release supersedes it.
      devgate::firmware::campaign_spec spec;
      spec.name = "release " + std::to_string(n);
      spec.version = version;
      spec.target.continuous = true;
      spec.success_threshold = 0;
      const auto id = hub_.start_campaign(std::move(spec), image);
      rollout = hub_.current_image()->rollout();
      as = " as campaign " + std::to_string(id);
    } catch (const std::exception& e) {  // a cluster's Redis away: nothing was published
      std::fprintf(stderr, "demo_server: firmware %s not published: %s\n", version.c_str(),
                   e.what());
      return {};
    }
    return "firmware " + version + " published (rollout " + std::to_string(rollout) + ", " +
           std::to_string(image.size()) + " bytes, sha256 " + hub_.current_image()->sha256() + ")" +
           as;
  }

  demo_hub& hub_;
  std::size_t size_;
  std::uint64_t releases_;  // the last release number handed out (behind m_)
  std::thread thread_;
  std::mutex m_;
  std::condition_variable cv_;
  struct job {
    std::uint64_t release;
    std::vector<std::byte> image;                              // empty: the synthetic image
    std::optional<devgate::firmware::campaign_spec> campaign;  // roll out as this campaign
    std::uint64_t campaign_id = 0;
  };
  std::deque<std::pair<std::uint64_t, std::string>> refused_;  // campaigns that did not start
  std::deque<job> jobs_;  // at most one: try_release refuses while busy_
  bool busy_ = false;     // a release is queued or being published
  bool stopping_ = false;
};

/// The operator's bearer token, compared in constant time. Its SHA-256 is kept and the
/// presented token hashed the same way, so the comparison neither depends on where the bytes
/// first differ nor tells the token's length.
class operator_token {
 public:
  /// No token: the operator API is off (403).
  operator_token() = default;
  /// `token` (already trimmed) is the only one accepted.
  explicit operator_token(std::string_view token)
      : digest_(devgate::detail::sha256(std::as_bytes(std::span(token.data(), token.size())))),
        set_(true) {}
  /// Whether a token was configured.
  [[nodiscard]] bool set() const noexcept { return set_; }
  /// Whether `presented` is the token.
  [[nodiscard]] bool matches(std::string_view presented) const {
    if (!set_) return false;
    const auto d =
        devgate::detail::sha256(std::as_bytes(std::span(presented.data(), presented.size())));
    return CRYPTO_memcmp(d.data(), digest_.data(), d.size()) == 0;
  }

 private:
  devgate::detail::sha256_digest digest_{};
  bool set_ = false;
};

/// The file's bytes without surrounding whitespace, or nullopt (with a message) when the file
/// cannot be read or holds nothing else.
std::optional<std::string> read_token_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "demo_server: cannot read --operator-token-file %s\n", path.c_str());
    return std::nullopt;
  }
  std::string token((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto first = token.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) {
    std::fprintf(stderr, "demo_server: --operator-token-file %s is empty\n", path.c_str());
    return std::nullopt;
  }
  token = token.substr(first, token.find_last_not_of(" \t\r\n") - first + 1);
  return token;
}

/// Everything the HTTP routes need; the hub pointer is set before the server starts.
/// What the routes read of this node's cluster link (--redis): set before the server starts.
struct cluster_view {
  std::function<bool()> up;                   ///< Both Redis connections are up.
  std::function<void(std::string&)> metrics;  ///< Appends the link's Prometheus lines.
};

struct route_context {
  demo_config cfg;
  std::optional<cluster_view> cluster;
  std::function<devgate::websocket::http_reply(const devgate::websocket::http_request&)> files;
  server_log log;
  std::atomic<demo_hub*> hub{nullptr};
  std::atomic<control_loop*> control{nullptr};
  std::atomic<bool> stopping{false};
  operator_token token;
  std::mutex staged_mutex;
  std::vector<std::byte> staged;  // POST /api/firmware?stage=1: the image a campaign may use
};

devgate::websocket::http_reply text_reply(int status, std::string_view content_type,
                                          std::string body) {
  devgate::websocket::http_reply r;
  r.status = status;
  r.content_type = std::string(content_type);
  r.body = devgate::shared_bytes::copy_of(std::string_view(body));
  r.extra_headers = "Cache-Control: no-store\r\n";
  return r;
}

/// Serves `path` from the web root (the request's other fields are kept).
devgate::websocket::http_reply serve_file(route_context& rc,
                                          const devgate::websocket::http_request& req,
                                          std::string_view path) {
  auto copy = req;
  copy.target = path;
  auto reply = rc.files(copy);
  // Always revalidate: the page and its script must match the running server.
  reply.extra_headers += "Cache-Control: no-cache\r\n";
  return reply;
}

/// Prometheus text: the pipeline's metrics plus the hub's figures.
std::string render_metrics(demo_hub& hub) {
  std::string out;
  hub.engine().render_prometheus(out);
  const auto s = hub.stats();
  auto gauge = [&out](const char* name, const char* help, const char* type, auto value) {
    devgate::append_prometheus_metric(out, name, type, help, static_cast<std::uint64_t>(value));
  };
  gauge("connected_devices", "Device sessions open now.", "gauge", s.connected);
  gauge("devices_held", "Device records held in memory (bounded by --max-devices).", "gauge",
        s.devices);
  gauge("devices_evicted_total", "Offline device records evicted to stay within --max-devices.",
        "counter", s.devices_evicted);
  gauge("replay_bytes", "Bytes of sequenced messages kept for devices, fleet-wide.", "gauge",
        s.replay_bytes);
  gauge("store_errors_total", "State store calls that failed (or writes dropped).", "counter",
        s.store_errors);
  gauge("replay_dropped_total", "Sequenced messages dropped by replay overflow.", "counter",
        s.replay_dropped);
  gauge("protocol_errors_total", "Error replies sent to devices.", "counter", s.protocol_errors);
  gauge("takeovers_total", "Sessions replaced by a newer one.", "counter", s.takeovers);
  gauge("firmware_rollout", "Current rollout id (0: none).", "gauge", s.rollout.rollout);
  gauge("firmware_rollout_pending", "Devices waiting for the current image.", "gauge",
        s.rollout.pending);
  gauge("firmware_rollout_transferring", "Devices receiving the current image.", "gauge",
        s.rollout.transferring);
  gauge("firmware_rollout_verified", "Devices that verified the current image.", "gauge",
        s.rollout.verified);
  gauge("firmware_rollout_failed", "Devices that failed the current image.", "gauge",
        s.rollout.failed);
  gauge("firmware_rollout_skipped", "Devices that already ran the current version.", "gauge",
        s.rollout.skipped);
  hub.campaigns().render_prometheus(out);
  return out;
}

/// The request target without its query.
std::string_view path_of(const devgate::websocket::http_request& req) {
  std::string_view path = req.target;
  if (const auto q = path.find('?'); q != std::string_view::npos) path = path.substr(0, q);
  return path;
}

/// Largest body a campaign route takes (a target of many ids).
constexpr std::size_t campaign_body_limit = 1u << 20;

/// Whether `path` is a campaign route of the operator API (GET reads, POST changes).
bool is_campaign_path(std::string_view path) {
  return path == "/api/campaigns" || path.starts_with("/api/campaigns/");
}
/// Whether `path` is an operator route (bearer token required).
bool is_operator_path(std::string_view path) {
  return path == "/api/firmware" || path == "/api/firmware/release" || is_campaign_path(path);
}
/// The value of query parameter `name` in the request target (std::nullopt: absent). The
/// values the operator API takes are plain (digits, status names): no percent-decoding.
std::optional<std::string_view> query_param(const devgate::websocket::http_request& req,
                                            std::string_view name) {
  std::string_view target = req.target;
  const auto q = target.find('?');
  if (q == std::string_view::npos) return std::nullopt;
  std::string_view rest = target.substr(q + 1);
  while (!rest.empty()) {
    const auto amp = rest.find('&');
    const auto pair = rest.substr(0, amp);
    const auto eq = pair.find('=');
    if (pair.substr(0, eq) == name) {
      return eq == std::string_view::npos ? std::string_view{} : pair.substr(eq + 1);
    }
    if (amp == std::string_view::npos) break;
    rest = rest.substr(amp + 1);
  }
  return std::nullopt;
}
/// `text` as a decimal number no larger than `max` (std::nullopt: anything else).
std::optional<std::uint64_t> decimal(std::string_view text, std::uint64_t max) {
  if (text.empty() || text.size() > 19) return std::nullopt;
  std::uint64_t n = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + static_cast<std::uint64_t>(c - '0');
  }
  if (n > max) return std::nullopt;
  return n;
}

/// Decides on every plain request from its header section, before any body byte is read.
/// Operator routes: POST only (405 with `Allow: POST` otherwise, so no link, image or stray GET
/// starts anything), then the bearer token (401 without one, 403 when wrong or when the demo
/// runs without --operator-token-file; cookies are never looked at, so a cross-site form, which
/// cannot set Authorization, gets 401), then one release at a time (409), and only then may
/// POST /api/firmware send up to --max-image-size bytes. Every other route: GET and HEAD, no
/// body.
devgate::websocket::http_admission operator_admission(route_context& rc,
                                                      const devgate::websocket::http_request& req) {
  devgate::websocket::http_admission a;
  const std::string_view path = path_of(req);
  auto refuse = [&a](int status, std::string_view why, std::string_view extra = {}) {
    a.reply = text_reply(status, "text/plain; charset=utf-8", std::string(why));
    a.reply->extra_headers += extra;
  };
  if (!is_operator_path(path)) {
    if (req.method != "GET" && req.method != "HEAD") {
      refuse(405, "only GET and HEAD are served here\n", "Allow: GET, HEAD\r\n");
    }
    return a;
  }
  const bool campaign = is_campaign_path(path);
  if (campaign && req.method != "GET" && req.method != "POST") {
    refuse(405, "campaigns: GET reads, POST changes (with Authorization: Bearer <token>)\n",
           "Allow: GET, POST\r\n");
    return a;
  }
  if (!campaign && req.method != "POST") {
    refuse(405, "the operator API changes state: use POST with Authorization: Bearer <token>\n",
           "Allow: POST\r\n");
    return a;
  }
  if (!rc.token.set()) {
    refuse(403, "operator API off: start the demo with --operator-token-file FILE\n");
    return a;
  }
  const std::string_view auth = req.header("Authorization");
  constexpr std::string_view scheme = "Bearer ";
  if (auth.size() <= scheme.size() ||
      !devgate::websocket::detail_http::iequals(auth.substr(0, scheme.size()), scheme)) {
    refuse(401, "send Authorization: Bearer <operator token>\n",
           "WWW-Authenticate: Bearer realm=\"devgate operator\"\r\n");
    return a;
  }
  if (!rc.token.matches(auth.substr(scheme.size()))) {
    refuse(403, "wrong operator token\n");
    return a;
  }
  auto* control = rc.control.load();
  if (rc.hub.load() == nullptr || control == nullptr || rc.stopping) {
    refuse(503, "stopping\n");
    return a;
  }
  if (campaign) {
    if (req.method == "POST") a.max_body = campaign_body_limit;
    return a;
  }
  if (control->busy()) {
    refuse(409, "a release is being prepared: try again when it is published\n");
    return a;
  }
  if (path == "/api/firmware") a.max_body = rc.cfg.max_image_size;
  return a;
}

/// POST /api/firmware (the body is the image) and POST /api/firmware/release (a synthetic one),
/// admitted by operator_admission: hands the image to the control thread, which hashes and
/// publishes it; 202 with the release's number and version.
devgate::websocket::http_reply release_route(route_context& rc,
                                             const devgate::websocket::http_request& req) {
  auto* control = rc.control.load();
  if (control == nullptr || rc.stopping) {
    return text_reply(503, "text/plain; charset=utf-8", "stopping\n");
  }
  const bool upload = path_of(req) == "/api/firmware";
  if (upload && req.body.empty()) {
    return text_reply(400, "text/plain; charset=utf-8",
                      "send the image as the request body, with a Content-Length\n");
  }
  const auto* bytes = reinterpret_cast<const std::byte*>(req.body.data());
  if (upload && query_param(req, "stage") == std::string_view("1")) {
    // Kept for a campaign ("firmware": "staged"), not published.
    std::lock_guard lock(rc.staged_mutex);
    rc.staged.assign(bytes, bytes + req.body.size());
    nlohmann::json j{{"staged", true}, {"size", req.body.size()}};
    return text_reply(200, "application/json", j.dump() + "\n");
  }
  const std::size_t size = upload ? req.body.size() : rc.cfg.firmware_size;
  const auto n = control->try_release(std::vector<std::byte>(bytes, bytes + req.body.size()));
  if (n == 0) {  // another release got in between admission and this body's end
    return text_reply(409, "text/plain; charset=utf-8",
                      "a release is being prepared: try again when it is published\n");
  }
  nlohmann::json j{{"release", n}, {"version", release_version(n)}, {"size", size}};
  return text_reply(202, "application/json", j.dump() + "\n");
}

/// The campaign routes of the operator API (docs/ROLLOUTS.md), admitted by operator_admission
/// (bearer token; GET reads, POST changes): create and list, get one, its devices (filtered by
/// status, paged), pause, resume, cancel. Every refusal is JSON {"error": "<field>: <why>"}.
devgate::websocket::http_reply campaign_route(route_context& rc,
                                              const devgate::websocket::http_request& req,
                                              demo_hub& hub) {
  namespace fw = devgate::firmware;
  const std::string_view path = path_of(req);
  auto reply = [](int status, const nlohmann::json& j) {
    return text_reply(status, "application/json", j.dump() + "\n");
  };
  auto refuse = [&](int status, std::string why) {
    auto r = reply(status, nlohmann::json{{"error", std::move(why)}});
    if (status == 405) r.extra_headers += "Allow: GET\r\n";
    return r;
  };
  // A POST body: empty, or a JSON object.
  auto body_of = [&]() -> std::optional<nlohmann::json> {
    if (req.body.empty()) return nlohmann::json::object();
    auto j = nlohmann::json::parse(req.body, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return std::nullopt;
    return j;
  };
  if (path == "/api/campaigns") {
    if (req.method == "GET") {
      nlohmann::json list = nlohmann::json::array();
      hub.campaigns().each([&](const fw::campaign& c, std::uint32_t rollout) {
        auto j = fw::to_json(c, rollout);
        j.erase("spec");
        list.push_back(std::move(j));
      });
      return reply(200, nlohmann::json{{"campaigns", list}});
    }
    auto body = body_of();
    if (!body) return refuse(400, "body: must be a JSON object");
    std::string firmware = "release";
    if (auto it = body->find("firmware"); it != body->end()) {
      if (!it->is_string() || (*it != "release" && *it != "staged")) {
        return refuse(400,
                      "firmware: must be \"release\" (a new synthetic release) or "
                      "\"staged\" (the image POSTed to /api/firmware?stage=1)");
      }
      firmware = it->get<std::string>();
      body->erase(it);
    }
    fw::campaign_spec spec;
    try {
      spec = fw::parse_campaign_spec(*body);
    } catch (const fw::campaign_spec_error& e) {
      return refuse(400, e.what());
    }
    std::vector<std::byte> image;
    if (firmware == "staged") {
      std::lock_guard lock(rc.staged_mutex);
      if (rc.staged.empty()) {
        return refuse(409, "firmware: nothing staged: POST the image to /api/firmware?stage=1");
      }
      image = rc.staged;
    }
    auto* control = rc.control.load();
    if (control == nullptr || rc.stopping) return refuse(503, "stopping");
    if (control->busy()) return refuse(409, "a release is being prepared: try again shortly");
    const auto id = hub.reserve_campaign_id();
    const auto n = control->try_release(std::move(image), std::move(spec), id);
    if (n == 0) return refuse(409, "a release is being prepared: try again shortly");
    return reply(202,
                 nlohmann::json{{"campaign", id}, {"release", n}, {"version", release_version(n)}});
  }
  // /api/campaigns/<id>[/devices | /pause | /resume | /cancel]
  std::string_view rest = path.substr(std::string_view("/api/campaigns/").size());
  const auto slash = rest.find('/');
  const auto id = decimal(rest.substr(0, slash), std::numeric_limits<std::int64_t>::max());
  if (!id) return refuse(404, "id: not a campaign number");
  const std::string_view action = slash == std::string_view::npos ? "" : rest.substr(slash + 1);
  const bool get = req.method == "GET";
  if (action.empty() || action == "devices") {
    if (!get) return refuse(405, "method: use GET here");
    if (action.empty()) {
      if (auto j = hub.campaigns().describe(*id)) return reply(200, *j);
    } else {
      std::optional<fw::campaign_device_status> status;
      if (auto s = query_param(req, "status")) {
        status = fw::device_status_from_string(*s);
        if (!status) {
          return refuse(400,
                        "status: one of queued, pending, transferring, verified, skipped, "
                        "failed, timed_out, cancelled, superseded");
        }
      }
      std::uint64_t offset = 0;
      std::uint64_t limit = 100;
      if (auto s = query_param(req, "offset")) {
        const auto v = decimal(*s, 100'000'000);
        if (!v) return refuse(400, "offset: a number from 0");
        offset = *v;
      }
      if (auto s = query_param(req, "limit")) {
        const auto v = decimal(*s, 1000);
        if (!v || *v == 0) return refuse(400, "limit: a number from 1 to 1000");
        limit = *v;
      }
      if (auto j = hub.campaigns().devices(*id, status, offset, limit)) return reply(200, *j);
    }
    if (auto* control = rc.control.load()) {
      if (auto why = control->refused(*id)) {
        return reply(422,
                     nlohmann::json{{"id", *id}, {"state", "refused"}, {"error", std::move(*why)}});
      }
    }
    return refuse(404, "id: no such campaign (or its image is still being prepared)");
  }
  if (get) return refuse(405, "method: use POST for " + std::string(action));
  auto body = body_of();
  if (!body) return refuse(400, "body: must be a JSON object (or empty)");
  auto text = [&](const char* field, std::string fallback) -> std::optional<std::string> {
    auto it = body->find(field);
    if (it == body->end()) return fallback;
    if (!it->is_string() || it->get_ref<const std::string&>().size() > 256) return std::nullopt;
    return it->get<std::string>();
  };
  for (const auto& [k, v] : body->items()) {
    if (k != "reason" && k != "retry_failed") return refuse(400, k + ": unknown field");
  }
  bool ok = false;
  if (action == "pause" || action == "cancel") {
    const auto reason =
        text("reason", action == "pause" ? "paused by the operator" : "cancelled by the operator");
    if (!reason) return refuse(400, "reason: a string of at most 256 bytes");
    ok = action == "pause" ? hub.pause_campaign(*id, *reason) : hub.cancel_campaign(*id, *reason);
  } else if (action == "resume") {
    bool retry = true;
    if (auto it = body->find("retry_failed"); it != body->end()) {
      if (!it->is_boolean()) return refuse(400, "retry_failed: true or false");
      retry = it->get<bool>();
    }
    ok = hub.resume_campaign(*id, retry);
  } else {
    return refuse(404, "action: one of pause, resume, cancel");
  }
  auto j = hub.campaigns().describe(*id);
  if (!j) return refuse(404, "id: no such campaign");
  if (!ok) {
    return refuse(409, "state: campaign " + std::to_string(*id) + " is " +
                           (*j)["state"].get<std::string>() + ", it cannot " + std::string(action));
  }
  return reply(200, *j);
}

devgate::websocket::http_reply route(route_context& rc,
                                     const devgate::websocket::http_request& req) {
  const std::string_view path = path_of(req);
  auto* hub = rc.hub.load();
  if (path == "/healthz") {
    if (hub == nullptr || rc.stopping) return text_reply(503, "text/plain", "stopping\n");
    if (rc.cluster && !rc.cluster->up()) {
      // Still serving its own devices: 200, so a load balancer keeps sending them here.
      return text_reply(200, "text/plain; charset=utf-8",
                        "degraded: redis unreachable; this node serves its own devices, the "
                        "other nodes' server log is not shared until it is back\n");
    }
    return text_reply(200, "text/plain; charset=utf-8", "ok\n");
  }
  if (path == "/metrics") {
    if (hub == nullptr) return text_reply(503, "text/plain", "starting\n");
    auto text = render_metrics(*hub);
    if (rc.cluster && !rc.stopping) rc.cluster->metrics(text);
    return text_reply(200, "text/plain; version=0.0.4; charset=utf-8", std::move(text));
  }
  if (path == "/api/log") return text_reply(200, "application/json", rc.log.render());
  if (path == "/api/info") {
    nlohmann::json j{
        {"workers_min", rc.cfg.workers_min},       {"workers_max", rc.cfg.workers_max},
        {"queue_capacity", rc.cfg.queue_capacity}, {"firmware_size", rc.cfg.firmware_size},
        {"dispatch_us", rc.cfg.dispatch_us},       {"devgate", devgate_version()},
        {"operator_api", rc.token.set()}};
    return text_reply(200, "application/json", j.dump() + "\n");
  }
  if (is_campaign_path(path)) {  // admitted: right token
    if (hub == nullptr || rc.stopping) return text_reply(503, "text/plain", "stopping\n");
    return campaign_route(rc, req, *hub);
  }
  if (is_operator_path(path)) return release_route(rc, req);  // admitted: POST, right token
  if (path.starts_with("/static/")) {
    return serve_file(rc, req, req.target.substr(std::string_view("/static").size()));
  }
  if (path == "/") {
    auto r = text_reply(302, "text/plain; charset=utf-8", "see /marco\n");
    r.extra_headers += "Location: /marco\r\n";
    return r;
  }
  // Any other single segment that is a valid device id: the device page.
  if (devgate::device::is_valid_device_id(path.substr(1))) {
    return serve_file(rc, req, "/index.html");
  }
  return text_reply(404, "text/plain; charset=utf-8",
                    "not found: open /<device id>, e.g. /marco (ids are [A-Za-z0-9._-])\n");
}

}  // namespace

int main(int argc, char** argv) {
  demo_config cfg;
  CLI::App app{
      "devgate demo: each browser tab at http://localhost:<port>/<device_id> is a device and a "
      "window on the gateway."};
  app.add_option("--port", cfg.port, "TCP port (0 picks a free one)")->capture_default_str();
  app.add_option("--listen,--address", cfg.address,
                 "Address to listen on (0.0.0.0 or :: serves other machines too)")
      ->capture_default_str();
  app.add_option("--threads", cfg.threads, "WebSocket threads (0 = one per core)")
      ->capture_default_str();
  app.add_option("--workers-min", cfg.workers_min, "Fewest pipeline workers")
      ->check(CLI::Range(std::size_t{1}, std::size_t{256}))
      ->capture_default_str();
  app.add_option("--workers-max", cfg.workers_max,
                 "Most pipeline workers (the pool grows under load)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{256}))
      ->capture_default_str();
  app.add_option("--queue-capacity", cfg.queue_capacity,
                 "Messages the pipeline holds at once; past it devices get queue_full")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-devices", cfg.max_devices,
                 "Device records held in memory; offline ones are evicted past it (0: no bound)")
      ->capture_default_str();
  app.add_option("--firmware-size", cfg.firmware_size, "Bytes of each synthetic firmware image")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 30))
      ->capture_default_str();
  app.add_option("--max-image-size", cfg.max_image_size,
                 "Largest firmware image POST /api/firmware takes (413 beyond it)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 30))
      ->capture_default_str();
  app.add_option("--max-transfers", cfg.max_transfers,
                 "Firmware transfers at once (with --redis: over the whole cluster)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 20))
      ->capture_default_str();
  app.add_option("--operator-token-file", cfg.operator_token_file,
                 "File holding the operator's bearer token (whitespace around it trimmed); "
                 "without it the operator API (POST /api/firmware...) answers 403");
  app.add_option("--dispatch-us", cfg.dispatch_us,
                 "Simulated downstream call per dispatched message, in microseconds")
      ->capture_default_str();
  app.add_option("--state-dir", cfg.state_dir,
                 "Directory of the SQLite database (devgate.db) that keeps device states and "
                 "the last release across restarts; created if missing")
      ->capture_default_str();
  app.add_option("--ack", cfg.ack,
                 "when a device's send is answered `sent`: on_dispatch (the sink took it and the "
                 "store recorded it; nothing acknowledged is lost by a crash) or on_accept (queued "
                 "in memory: faster)")
      ->check(CLI::IsMember({"on_accept", "on_dispatch"}))
      ->capture_default_str();
  app.add_option("--max-stored-devices", cfg.max_stored_devices,
                 "Devices the database keeps; the least recently seen go past it (0: no bound)")
      ->capture_default_str();
  app.add_option("--web-root", cfg.web_root, "Directory of index.html, app.js, style.css")
      ->check(CLI::ExistingDirectory)
      ->capture_default_str();
  app.add_option("--device-key-file", cfg.device_key_file,
                 "HS256 secret (the file's bytes, surrounding whitespace trimmed, at least 32): "
                 "devices must present a JWT signed with it (docs/SECURITY.md)")
      ->check(CLI::ExistingFile);
  app.add_option("--allowed-origin", cfg.allowed_origins,
                 "Browser origin allowed to open WebSockets, e.g. https://fleet.example.com "
                 "(repeatable; others get 403; requests without Origin are accepted)");
  app.add_option("--tls-cert", cfg.tls_cert,
                 "PEM certificate chain: serve https and wss (with --tls-key); SIGHUP reloads it")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", cfg.tls_key, "PEM private key of --tls-cert")
      ->check(CLI::ExistingFile);
  app.add_option("--redis", cfg.redis_url,
                 "redis://[[user]:password@]HOST[:PORT][/db]: be a node of a cluster whose "
                 "nodes share device state, the server log and firmware rollouts through Redis "
                 "(with --node-id)");
  app.add_option("--node-id", cfg.node_id, "This node's name in the cluster (1 to 64 characters)");
  CLI11_PARSE(app, argc, argv);
  if (cfg.redis_url.empty() != cfg.node_id.empty()) {
    std::fprintf(stderr, "demo_server: --redis and --node-id go together\n");
    return 2;
  }
#ifdef DEVGATE_DEMO_REDIS
  std::optional<devgate::redis::endpoint> redis_server;
  if (!cfg.redis_url.empty()) {
    const auto parsed = devgate::redis::parse_url(cfg.redis_url);
    if (!parsed) {
      std::fprintf(stderr, "demo_server: --redis %s: %s\n", cfg.redis_url.c_str(),
                   parsed.error.c_str());
      return 2;
    }
    if (cfg.node_id.size() > 64 || cfg.node_id.find('\n') != std::string::npos) {
      std::fprintf(stderr, "demo_server: --node-id must be 1 to 64 characters\n");
      return 2;
    }
    redis_server = parsed.value;
  }
#else
  if (!cfg.redis_url.empty()) {
    std::fprintf(stderr,
                 "demo_server: --redis: this demo was built without hiredis "
                 "(libhiredis-dev)\n");
    return 2;
  }
#endif
  if (cfg.tls_cert.empty() != cfg.tls_key.empty()) {
    std::fprintf(stderr, "demo_server: --tls-cert and --tls-key go together\n");
    return 2;
  }
  if (cfg.workers_min > cfg.workers_max) {
    std::fprintf(stderr, "demo_server: --workers-min (%zu) is above --workers-max (%zu)\n",
                 cfg.workers_min, cfg.workers_max);
    return 2;
  }
  if (!std::filesystem::exists(std::filesystem::path(cfg.web_root) / "index.html")) {
    std::fprintf(stderr,
                 "demo_server: no index.html in %s; pass --web-root <examples/demo_server/web>\n",
                 cfg.web_root.c_str());
    return 2;
  }

  devgate::stop_signals stop;  // caught from here on; main() waits for them below

  // The device store: SQLite on a single node, Redis on a cluster node (--redis).
#ifdef DEVGATE_DEMO_REDIS
  std::optional<cluster_link> cluster;  // before the hub, which holds a copy of its store
#endif
  std::optional<demo_store> loaded;
  const auto db_path = (std::filesystem::path(cfg.state_dir) / "devgate.db").string();
  std::string state_where = db_path;
#ifdef DEVGATE_DEMO_REDIS
  if (redis_server) {
    cluster.emplace(*redis_server, cfg.node_id);
    if (!cluster->connect(std::chrono::seconds(5))) {
      std::fprintf(stderr, "demo_server: --redis %s: not reachable yet; serving, and retrying\n",
                   cfg.redis_url.c_str());
    }
    loaded.emplace(cluster->store());
    state_where = cfg.redis_url + " (shared by the cluster's nodes)";
  }
#endif
  if (!loaded) {
    try {
      std::filesystem::create_directories(cfg.state_dir);
      devgate::store::sqlite_options so;
      so.path = db_path;
      so.max_devices = cfg.max_stored_devices;
      loaded.emplace(devgate::store::sqlite_state_store(std::move(so)));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "demo_server: --state-dir %s: %s\n", cfg.state_dir.c_str(), e.what());
      return 1;
    }
  }
  // The last release's number (the hub resumes the release itself when it starts).
  const auto kept = loaded->load_rollout();
  if (kept.error && !loaded->shared()) {
    std::fprintf(stderr, "demo_server: cannot read the last release from %s: %s\n",
                 state_where.c_str(), kept.error.message().c_str());
    return 1;
  }
  // Releases are numbered on from the last one kept: a release to the fleet, or a campaign's.
  std::uint64_t last_release = kept.rollout ? release_of(kept.rollout->version) : 0;
  for (const auto& k : loaded->load_campaigns().campaigns) {
    last_release = std::max(last_release, release_of(k.campaign.version));
  }

  route_context rc;
  rc.cfg = cfg;
  rc.files = devgate::websocket::static_files(cfg.web_root);
  if (!cfg.operator_token_file.empty()) {
    const auto token = read_token_file(cfg.operator_token_file);
    if (!token) return 2;
    rc.token = operator_token(*token);
  }

  devgate::websocket::server_options ws;
  ws.address = cfg.address;
  ws.port = cfg.port;
  ws.threads = cfg.threads;
  ws.identify = devgate::device::identify_device;
  ws.route = [&rc](const devgate::websocket::http_request& req) { return route(rc, req); };
  devgate::auth::origin_allow_list origins;
  try {
    for (const auto& o : cfg.allowed_origins) origins.add(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo_server: --allowed-origin: %s\n", e.what());
    return 2;
  }
  if (!cfg.device_key_file.empty()) {
    std::ifstream in(cfg.device_key_file, std::ios::binary);
    std::stringstream bytes;
    bytes << in.rdbuf();
    std::string secret = bytes.str();
    const auto not_space = secret.find_first_not_of(" \t\r\n");
    secret = not_space == std::string::npos
                 ? std::string()
                 : secret.substr(not_space, secret.find_last_not_of(" \t\r\n") - not_space + 1);
    auto tokens = std::make_shared<devgate::auth::token_authenticator>();
    try {
      tokens->add_key("", devgate::auth::signing_key::hs256(std::move(secret)));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "demo_server: --device-key-file %s: %s\n", cfg.device_key_file.c_str(),
                   e.what());
      return 2;
    }
    ws.authenticate = devgate::auth::gate(std::move(tokens), std::move(origins));
  } else if (!origins.empty()) {
    ws.authenticate = devgate::auth::gate(std::move(origins));
  }
  ws.admit = [&rc](const devgate::websocket::http_request& req) {
    return operator_admission(rc, req);
  };
  // Only an admitted upload gets that far; the whole request, its body included, must arrive
  // within handshake_timeout (5 s), so a trickled body is closed there.
  ws.http.max_body_bytes = cfg.max_image_size;
  // A page that stops reading (a backgrounded tab) is closed with 1013 and resumes later.
  ws.backpressure.max_buffered_bytes = 8u << 20;
  if (!cfg.tls_cert.empty())
    ws.tls = devgate::websocket::tls_options{cfg.tls_cert, cfg.tls_key, {}};
  devgate::websocket::server transport(ws);

  auto fx = std::make_shared<dispatch_effects>();
  fx->work = std::chrono::microseconds(cfg.dispatch_us);

  devgate::device::hub_options ho;
  ho.pipeline.capacity = cfg.queue_capacity;
  ho.pipeline.pool.min_workers = cfg.workers_min;
  ho.pipeline.pool.max_workers = cfg.workers_max;
  ho.max_devices = cfg.max_devices;
  ho.max_concurrent_transfers = cfg.max_transfers;
  ho.ack = cfg.ack == "on_accept" ? devgate::device::ack_policy::on_accept
                                  : devgate::device::ack_policy::on_dispatch;
  // The pages show the server log and the gateway's figures.
  ho.may_subscribe = devgate::device::allow_topics({"fleet", "server", "stats"});
  ho.require_authentication = !cfg.device_key_file.empty();
  ho.on_store_error = [](std::string_view op, const std::string& id, std::error_code ec) {
    std::fprintf(stderr, "demo_server: state store %.*s for %s failed: %s\n",
                 static_cast<int>(op.size()), op.data(), id.c_str(), ec.message().c_str());
  };
#ifdef DEVGATE_DEMO_REDIS
  if (cluster) {
    // One rollout for the whole cluster: the transfer cap is the fleet's, each node leasing
    // its share in Redis, and the totals shown are the fleet's.
    auto* link = &*cluster;
    ho.leased_transfer_slots = true;
    ho.on_slot_demand = [link] { link->store().want_slots(); };
    ho.fleet_rollout_totals = [link] { return link->store().rollout_totals(); };
    // The pages' gateway figures are the cluster's: each node's summed over the live nodes.
    ho.fleet_figures = [link] { return link->store().fleet_figures(); };
  }
#endif
  demo_hub hub(transport, demo_sink{fx}, ho, std::move(*loaded));

  fx->receipt = [&hub](std::string_view device, std::uint64_t number, std::size_t worker) {
    hub.send_to(device,
                nlohmann::json{{"kind", "dispatched"}, {"message", number}, {"worker", worker}});
  };
  auto log_token = hub.subscribe(
      devgate::device::topics::server,
      [&rc](std::string_view, const devgate::shared_bytes& payload) { rc.log.add(payload); });

#ifdef DEVGATE_DEMO_REDIS
  if (cluster) {
    // A device that connects to another node is let go here (its session closed with 4000); a
    // write refused because another node owns it by now closes its session with 1013, and the
    // device reconnects to whichever node it reaches.
    cluster->store().on_release([&hub](const std::string& id, bool fenced) {
      if (fenced) {
        hub.release_device(id, devgate::close_code::try_again_later,
                           "another node owns this device now; reconnect");
      } else {
        hub.release_device(id);
      }
    });
    // Messages another node's send_to routed to a device held here: numbered and sent here.
    cluster->store().on_routed([&hub](const std::string& id) { hub.take_routed(id); });
    // Rollouts published on other nodes run here too, within this node's lease of the cap.
    cluster->store().on_rollout([&hub](const devgate::store::rollout_record& r) {
      if (hub.adopt_firmware(r)) {
        std::printf("firmware %s adopted from the cluster (rollout %u, %zu bytes%s)\n",
                    r.version.c_str(), r.rollout, r.image.size(),
                    r.gated ? ", a campaign another node runs" : "");
        std::fflush(stdout);
      }
    });
    // A campaign another node runs: its admissions reach the devices held here, and their
    // progress goes back to it.
    cluster->store().on_campaign(
        [&hub](const devgate::store::campaign_event& e) { hub.take_campaign_event(e); });
    // Writes lost while Redis was away: the rollout's states and totals catch up.
    cluster->store().on_reconnect([&hub] { hub.rewrite_transfers(); });
    cluster->store().lease_transfer_slots(
        ho.max_concurrent_transfers, [&hub] { return hub.slots().usage(); },
        [&hub](std::size_t n) { hub.set_transfer_limit(n); });
    cluster->store().share_figures([&hub] { return hub.figures(); });
    cluster->start(hub.bus());
    auto* link = &*cluster;
    rc.cluster = cluster_view{[link] { return link->up(); },
                              [link](std::string& out) { link->metrics(out); }};
  }
#endif

  control_loop control(hub, cfg.firmware_size, last_release);
  rc.hub = &hub;
  rc.control = &control;
  if (const auto ec = hub.start()) {
    std::fprintf(stderr, "demo_server: cannot listen on %s:%u: %s\n", cfg.address.c_str(),
                 static_cast<unsigned>(cfg.port), ec.message().c_str());
    return 1;
  }
  // The current release survives a restart: the hub resumed it from the store (each device
  // where it had acknowledged), and late devices still get it.
  if (const auto img = hub.current_image()) {
    std::printf("firmware %s resumed (rollout %u, %zu bytes, sha256 %s)\n", img->version().c_str(),
                img->rollout(), img->size(), img->sha256().c_str());
  }
  control.start();

  const auto port = transport.local_port();
  const char* scheme = ws.tls ? "https" : "http";
  std::printf("devgate demo server (devgate %s)\n", devgate_version().c_str());
  std::printf("  open   %s://localhost:%u/marco   (any /<device id> is a device: /fridge, ...)\n",
              scheme, static_cast<unsigned>(port));
  std::printf("  also   %s://localhost:%u/metrics   %s://localhost:%u/healthz\n", scheme,
              static_cast<unsigned>(port), scheme, static_cast<unsigned>(port));
  std::printf("  state  %s   web root %s\n", state_where.c_str(), cfg.web_root.c_str());
  if (cfg.device_key_file.empty()) {
    std::printf(
        "  auth   OFF: any client may connect as any device (--device-key-file turns tokens on)\n");
  } else {
    std::printf(
        "  auth   devices need a JWT (HS256) for their id at /ws/<id> (docs/SECURITY.md)\n");
  }
  if (rc.token.set()) {
    std::printf("  operator API on: POST /api/firmware[/release] with the bearer token of %s\n",
                cfg.operator_token_file.c_str());
  } else {
    std::printf("  operator API off (403): pass --operator-token-file FILE to publish firmware\n");
  }
#ifdef DEVGATE_DEMO_REDIS
  if (cluster) {
    std::printf("  node   %s of the cluster on %s (the server log is shared)\n",
                cfg.node_id.c_str(), cfg.redis_url.c_str());
  }
#endif
  std::printf("listening on %u; Ctrl-C stops\n", static_cast<unsigned>(port));
  std::fflush(stdout);

  // With TLS, SIGHUP reloads the certificate and key files (new connections get them).
  asio::io_context hup_context{1};
  std::optional<asio::signal_set> hup;
  std::function<void()> wait_hup = [&] {
    hup->async_wait([&](const std::error_code& e, int) {
      if (e) return;
      const auto reloaded = transport.reload_tls();
      std::fprintf(stderr, "demo_server: SIGHUP: %s\n",
                   reloaded ? reloaded.message().c_str() : "TLS certificate reloaded");
      wait_hup();
    });
  };
  std::thread hup_thread;
  if (ws.tls) {
    hup.emplace(hup_context, SIGHUP);
    wait_hup();
    hup_thread = std::thread([&] { hup_context.run(); });
  }

  stop.wait();
  hup_context.stop();
  if (hup_thread.joinable()) hup_thread.join();
  std::printf("stopping: draining the pipeline, closing sessions (1001)...\n");
  std::fflush(stdout);
  rc.stopping = true;
  control.stop();
  hub.stop();  // intake closes, queued messages dispatch, then sessions close with 1001
  hub.unsubscribe(log_token);
  hub.store_writer().drain();  // every write behind has reached the database
#ifdef DEVGATE_DEMO_REDIS
  if (cluster) cluster->stop();
#endif
  const auto s = hub.stats();
  std::printf("stopped: %llu messages dispatched, state %s saved (%llu store errors)\n",
              static_cast<unsigned long long>(s.dispatched), state_where.c_str(),
              static_cast<unsigned long long>(s.store_errors));
  return 0;
}
