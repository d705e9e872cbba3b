#pragma once

#include <asio/io_context.hpp>    // the connections' loop
#include <asio/post.hpp>          // interest changes handed to the loop
#include <asio/steady_timer.hpp>  // the interest refresh
#include <atomic>                 // counters, per-topic interest
#include <chrono>                 // the refresh period, the stop wait
#include <cstdint>                // counters
#include <functional>             // transparent hashing
#include <memory>                 // topic states, the shared core
#include <mutex>                  // the topic table
#include <shared_mutex>           // the topic table: publishers share it
#include <stdexcept>              // std::invalid_argument at set-up
#include <string>                 // names, channels
#include <string_view>            // topics, payloads
#include <system_error>           // reply outcomes
#include <thread>                 // the stop wait
#include <unordered_map>          // the topic table
#include <utility>                // std::move
#include <vector>                 // the refresh's channel list

#include "devgate/core/bytes.hpp"
#include "devgate/device/pubsub.hpp"
#include "devgate/redis/connection.hpp"

namespace devgate::redis {

/// How a `topic_bridge` names this node and its channels.
struct topic_bridge_options {
  /// This node's name, unique in the cluster: 1 to 64 characters, no newline. A node skips
  /// what it published itself when Redis hands it back.
  std::string node_id;
  /// Topic T travels on the Redis channel `<channel_prefix>T`.
  std::string channel_prefix = "devgate:topic:";
  /// How often the other nodes' interest in each known topic is re-read (`PUBSUB NUMSUB`): a
  /// subscriber on another node receives this node's publishes at most this long after it
  /// subscribed.
  std::chrono::milliseconds interest_refresh{100};
  /// Only these topics cross nodes (empty: every topic). A node's own figures (the hub's
  /// `stats`) usually stay on the node.
  std::vector<std::string> topics;
};

/// Carries a hub's topics across gateway nodes on Redis pub/sub (a `device::relay`): a publish
/// on any node reaches the subscribers of every node. Each node subscribes to a topic's channel
/// while it has local subscribers to the topic; a publish goes to Redis (`PUBLISH`, one per
/// node, the payload encoded once by its publisher) only while another node subscribes, as
/// last read with `PUBSUB NUMSUB` (an unknown topic counts as wanted until then). Each node
/// copies what it receives once and hands it to its local subscribers. The message on the
/// channel is `<node id>\n<t|b><payload>` (text or binary).
///
/// Faults: with Redis down, publishes still reach this node's subscribers; what other nodes
/// would have received is counted in `forward_failed()` (Redis pub/sub keeps nothing for later:
/// a node that was cut off misses what was published meanwhile, as with every pub/sub). The
/// subscription connection resubscribes after every reconnect.
///
/// Lifetime: construct it before starting `subscriptions` (it sets its message handler), and
/// destroy it after everything that publishes on `bus` stopped (the hub) and before the
/// connections, while their loop still runs.
class topic_bridge final : public device::relay {
 public:
  /// Bridges `bus` through `commands` (PUBLISH, PUBSUB NUMSUB; may be shared with other users)
  /// and `subscriptions` (SUBSCRIBE; this bridge's alone), both driven by `io`. Throws
  /// std::invalid_argument for a bad `node_id`.
  topic_bridge(asio::io_context& io, connection& commands, connection& subscriptions,
               device::pubsub& bus, topic_bridge_options options)
      : core_(std::make_shared<core>(io, commands, subscriptions, bus, std::move(options))) {
    const auto& id = core_->options.node_id;
    if (id.empty() || id.size() > 64 || id.find('\n') != std::string::npos) {
      throw std::invalid_argument(
          "devgate::redis::topic_bridge: node_id must be 1 to 64 "
          "characters without a newline");
    }
    // The handler keeps the core alive: the connection may outlive the bridge.
    subscriptions.on_message([c = core_](std::string_view channel, std::string_view body) {
      c->received(channel, body);
    });
  }
  /// Stops (see `stop`).
  ~topic_bridge() override { stop(); }
  topic_bridge(const topic_bridge&) = delete;
  topic_bridge& operator=(const topic_bridge&) = delete;

  /// Attaches to the bus (subscribing to the channels of the topics it has subscribers for) and
  /// starts the interest refresh.
  void start() {
    core_->bus->set_relay(this);
    asio::post(core_->io, [c = core_] { c->tick(); });
  }
  /// Detaches from the bus (nothing received reaches it any more), unsubscribes its channels,
  /// stops the refresh and waits (at most two seconds) for the replies to its commands still in
  /// flight. Idempotent.
  void stop() {
    {
      std::lock_guard lock(core_->receive_m);
      if (core_->stopped.exchange(true)) return;
    }
    core_->bus->set_relay(nullptr);
    asio::post(core_->io, [c = core_] {
      c->timer.cancel();
      std::shared_lock lock(c->table_m);
      for (auto& [name, t] : c->topics) {
        if (!t->subscribed) continue;
        t->subscribed = false;
        c->subscriptions->unsubscribe(t->channel);
      }
      c->detached.store(true);
    });
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while ((core_->in_flight.load() != 0 || core_->ticking.load() || !core_->detached.load()) &&
           std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  /// True while another node subscribes to `topic` (or it is not known yet).
  [[nodiscard]] bool remote_interest(std::string_view topic) const override {
    return core_->relayed(topic) &&
           core_->state_of(topic).remote.load(std::memory_order_relaxed) != 0;
  }
  /// How many other nodes subscribe to `topic`, as last read; -1 before the first reading.
  [[nodiscard]] long long remote_subscribers(std::string_view topic) const {
    return core_->state_of(topic).remote.load(std::memory_order_relaxed);
  }
  /// PUBLISHes a local publish for the other nodes (from the publishing thread: encoded there,
  /// handed to the loop; never blocks).
  void forward(std::string_view topic, const shared_bytes& payload, payload_kind kind) override {
    core_->forward(topic, payload, kind);
  }
  /// Re-reads `topic`'s local subscribers on the loop and (un)subscribes its channel.
  void interest_changed(std::string_view topic) override {
    if (core_->stopped.load() || !core_->relayed(topic)) return;
    asio::post(core_->io, [c = core_, t = std::string(topic)] { c->recheck(t); });
  }

  /// Publishes sent to Redis and taken by it.
  [[nodiscard]] std::uint64_t forwarded() const noexcept { return core_->forwarded.load(); }
  /// Publishes Redis did not take (down, dropped, or an error reply): missed by other nodes.
  [[nodiscard]] std::uint64_t forward_failed() const noexcept {
    return core_->forward_failed.load();
  }
  /// Messages from other nodes handed to this node's subscribers.
  [[nodiscard]] std::uint64_t received() const noexcept { return core_->delivered.load(); }
  /// Messages on the channels that were not for this node: its own, or malformed.
  [[nodiscard]] std::uint64_t ignored() const noexcept { return core_->ignored.load(); }

 private:
  // One topic: how many other nodes subscribe (-1: not read yet), and whether this node does.
  struct topic_state {
    std::string channel;
    std::atomic<long long> remote{-1};
    bool subscribed = false;  // the loop's view: SUBSCRIBE sent and not UNSUBSCRIBE since
  };
  // Lets the topic table be searched by string_view without building a string.
  struct name_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };

  // Everything the loop's handlers touch, kept alive by them (the timer's handler too: a wait
  // that completed just before `stop` cancelled it still runs, and finds `stopped`).
  struct core : std::enable_shared_from_this<core> {
    core(asio::io_context& i, connection& cmd, connection& sub, device::pubsub& b,
         topic_bridge_options o)
        : io(i), commands(&cmd), subscriptions(&sub), bus(&b), options(std::move(o)), timer(i) {}

    // True when `topic` crosses nodes (the option's list, if any).
    [[nodiscard]] bool relayed(std::string_view topic) const {
      if (options.topics.empty()) return true;
      for (const auto& t : options.topics) {
        if (t == topic) return true;
      }
      return false;
    }

    topic_state& state_of(std::string_view topic) {
      {
        std::shared_lock lock(table_m);
        if (auto it = topics.find(topic); it != topics.end()) return *it->second;
      }
      std::unique_lock lock(table_m);
      auto& slot = topics[std::string(topic)];
      if (!slot) {
        slot = std::make_unique<topic_state>();
        slot->channel = options.channel_prefix;
        slot->channel.append(topic);
      }
      return *slot;
    }

    void forward(std::string_view topic, const shared_bytes& payload, payload_kind kind) {
      if (stopped.load(std::memory_order_relaxed)) return;
      topic_state& t = state_of(topic);
      // The calling thread's buffer: the command is encoded before `command` returns.
      thread_local std::string body;
      body.assign(options.node_id);
      body.push_back('\n');
      body.push_back(kind == payload_kind::binary ? 'b' : 't');
      body.append(payload.view());
      const std::string_view argv[3] = {"PUBLISH", t.channel, body};
      in_flight.fetch_add(1, std::memory_order_relaxed);
      commands->command(std::span<const std::string_view>(argv, 3), &core::on_published, this);
    }
    static void on_published(void* user, std::error_code ec, const redisReply* /*r*/) {
      auto* self = static_cast<core*>(user);
      (ec ? self->forward_failed : self->forwarded).fetch_add(1, std::memory_order_relaxed);
      self->in_flight.fetch_sub(1, std::memory_order_release);
    }

    // A message on a channel: another node's publish goes to this node's subscribers (not once
    // `stop` began: the bus may be gone).
    void received(std::string_view channel, std::string_view body) {
      std::lock_guard lock(receive_m);
      if (stopped.load(std::memory_order_relaxed)) return;
      const std::string_view prefix = options.channel_prefix;
      const auto nl = body.find('\n');
      if (!channel.starts_with(prefix) || nl == std::string_view::npos || nl + 1 >= body.size() ||
          body.substr(0, nl) == options.node_id || !relayed(channel.substr(prefix.size()))) {
        ignored.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      const char k = body[nl + 1];
      if (k != 't' && k != 'b') {
        ignored.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      bus->publish_local(channel.substr(prefix.size()), shared_bytes::copy_of(body.substr(nl + 2)),
                         k == 'b' ? payload_kind::binary : payload_kind::text);
      delivered.fetch_add(1, std::memory_order_relaxed);
    }

    // On the loop: (un)subscribes `topic`'s channel to match its local subscribers now.
    void recheck(const std::string& topic) {
      if (stopped.load()) return;
      topic_state& t = state_of(topic);
      const bool local = bus->has_local_subscribers(topic);
      if (local == t.subscribed) return;
      t.subscribed = local;
      if (local) {
        subscriptions->subscribe(t.channel);
      } else {
        subscriptions->unsubscribe(t.channel);
      }
    }

    // On the loop, every `interest_refresh`: one PUBSUB NUMSUB for every known topic.
    void tick() {
      if (stopped.load()) return;
      if (!ticking.exchange(true)) {
        refresh.clear();
        refresh_argv.assign({"PUBSUB", "NUMSUB"});
        {
          std::shared_lock lock(table_m);
          for (auto& [name, t] : topics) refresh.push_back(t.get());
        }
        for (auto* t : refresh) refresh_argv.push_back(t->channel);
        if (refresh.empty()) {
          ticking.store(false);
        } else {
          commands->command(std::span<const std::string_view>(refresh_argv), &core::on_numsub,
                            this);
        }
      }
      timer.expires_after(options.interest_refresh);
      timer.async_wait([self = shared_from_this()](const std::error_code& ec) {
        if (!ec) self->tick();
      });
    }
    // [channel, count, channel, count, ...] in the order asked. A node's own subscription is
    // in the count while it subscribes; an error keeps what was known.
    static void on_numsub(void* user, std::error_code ec, const redisReply* r) {
      auto* self = static_cast<core*>(user);
      if (!ec && r != nullptr && r->type == REDIS_REPLY_ARRAY &&
          r->elements == 2 * self->refresh.size()) {
        for (std::size_t i = 0; i < self->refresh.size(); ++i) {
          const redisReply* n = r->element[2 * i + 1];
          if (n->type != REDIS_REPLY_INTEGER) continue;
          topic_state& t = *self->refresh[i];
          t.remote.store(n->integer - (t.subscribed ? 1 : 0), std::memory_order_relaxed);
        }
      }
      self->ticking.store(false);
    }

    asio::io_context& io;
    connection* commands;
    connection* subscriptions;
    device::pubsub* bus;
    const topic_bridge_options options;
    asio::steady_timer timer;
    mutable std::shared_mutex table_m;
    std::unordered_map<std::string, std::unique_ptr<topic_state>, name_hash, std::equal_to<>>
        topics;
    std::vector<topic_state*> refresh;           // the topics of the NUMSUB in flight
    std::vector<std::string_view> refresh_argv;  // its command
    std::atomic<bool> ticking{false};            // a NUMSUB is in flight
    std::atomic<bool> stopped{false};
    std::atomic<bool> detached{false};  // stop's work on the loop is done
    std::mutex receive_m;               // `received` against `stop`
    std::atomic<std::uint64_t> in_flight{0};
    std::atomic<std::uint64_t> forwarded{0};
    std::atomic<std::uint64_t> forward_failed{0};
    std::atomic<std::uint64_t> delivered{0};
    std::atomic<std::uint64_t> ignored{0};
  };

  std::shared_ptr<core> core_;
};

}  // namespace devgate::redis
