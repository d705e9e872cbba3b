// Topic fan-out over several nodes against one node (issue 16, point 10): --devices devices are
// on the `fleet` topic (every device joins it on hello) and node A's host publishes --messages
// events of --payload bytes on it (`hub::publish`). First all devices on one hub; then the same
// devices spread over --nodes hubs (in this process, each with its own in-process transport,
// Redis connections, loop thread and `redis::topic_bridge`), the publishes still on node A.
// Printed: deliveries per second (events that reached a device) for each, and their ratio.
// Devices are in-process sessions drained by one thread, so the figure is the gateway's fan-out
// cost without sockets (which cost the same per delivery on one node or three). At most
// --window events per device are on their way. Pin it to one CPU (taskset) to compare the work,
// not the extra threads the cluster brings.
//
//   devgate_redis_fanout_driver --url redis://127.0.0.1:6379 [--devices N] [--nodes K]
//                               [--messages M] [--payload B] [--window W]
#include <CLI/CLI.hpp>

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "devgate/device/hub.hpp"
#include "devgate/redis/connection.hpp"
#include "devgate/redis/topic_bridge.hpp"
#include "devgate/redis/url.hpp"
#include "devgate/transport/in_process.hpp"

namespace {

using devgate::in_process_transport;
using hub_t = devgate::device::hub<in_process_transport>;
constexpr const char* topic = "fleet";  // every device is on it after hello

// One gateway node: a hub on an in-process transport and, in a cluster, its bridge to Redis.
struct node {
  explicit node(const std::string& name) : name(name), hub(transport) { (void)hub.start(); }
  ~node() {
    if (bridge) bridge->stop();
    hub.stop();
    bridge.reset();
    if (commands) commands->stop();
    if (subscriptions) subscriptions->stop();
    if (loop.joinable()) {
      guard.reset();
      loop.join();
    }
  }
  void join_cluster(const devgate::redis::endpoint& server) {
    devgate::redis::connection_options co;
    co.server = server;
    commands.emplace(io, co);
    subscriptions.emplace(io, co);
    devgate::redis::topic_bridge_options bo;
    bo.node_id = name;
    bridge.emplace(io, *commands, *subscriptions, hub.bus(), bo);
    commands->start();
    subscriptions->start();
    bridge->start();
    loop = std::thread([this] { io.run(); });
  }
  void connect(const std::string& id) {
    auto s = transport.connect(id);
    (void)s.push(R"({"type":"hello","protocol":1})");
    devices.push_back(std::move(s));
  }

  std::string name;
  in_process_transport transport;
  hub_t hub;
  std::vector<in_process_transport::session> devices;
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> guard = asio::make_work_guard(io);
  std::optional<devgate::redis::connection> commands;
  std::optional<devgate::redis::connection> subscriptions;
  std::optional<devgate::redis::topic_bridge> bridge;
  std::thread loop;
};

// Takes every device's inbox until `events` events arrived in all (or 60 s passed); counts
// the events in `got` as it goes. Returns the seconds from `start`.
struct drainer {
  std::vector<node*> nodes;
  std::atomic<unsigned long> got{0};
  std::atomic<bool> done{false};
  std::thread thread;
  void run() {
    thread = std::thread([this] {
      while (!done.load(std::memory_order_relaxed)) {
        unsigned long n = 0;
        for (auto* nd : nodes) {
          for (auto& d : nd->devices) {
            for (auto& o : d.take_inbox()) {
              if (o.payload.view().find(R"("type":"event")") != std::string_view::npos) ++n;
            }
          }
        }
        if (n != 0) {
          got.fetch_add(n, std::memory_order_relaxed);
        } else {
          std::this_thread::yield();
        }
      }
    });
  }
  void stop() {
    done.store(true);
    if (thread.joinable()) thread.join();
  }
};

// Publishes `messages` events on node `from` and waits until every device of `all` has them.
double run(node& from, const std::vector<node*>& all, unsigned long devices, unsigned long messages,
           const std::string& payload, unsigned long window) {
  drainer d;
  d.nodes = all;
  // Drain the welcomes first.
  for (auto* n : all) {
    for (auto& s : n->devices) (void)s.take_inbox();
  }
  d.run();
  const nlohmann::json data = payload;
  const auto start = std::chrono::steady_clock::now();
  for (unsigned long i = 0; i < messages; ++i) {
    while ((i - d.got.load(std::memory_order_relaxed) / devices) >= window) {
      std::this_thread::yield();
    }
    from.hub.publish(topic, data);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (d.got.load() < devices * messages && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  d.stop();
  const auto got = d.got.load();
  if (got != devices * messages) {
    std::fprintf(stderr, "only %lu of %lu deliveries arrived\n", got, devices * messages);
    return 0;
  }
  return static_cast<double>(got) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  std::string url = "redis://127.0.0.1:6379";
  unsigned long devices = 1000;
  unsigned long nodes = 3;
  unsigned long messages = 2000;
  unsigned long payload = 64;
  unsigned long window = 100;
  CLI::App app{"Topic fan-out over several nodes (Redis pub/sub) against one node"};
  app.add_option("--url", url, "The Redis server")->capture_default_str();
  app.add_option("--devices", devices, "Subscribed devices")->check(CLI::PositiveNumber);
  app.add_option("--nodes", nodes, "Nodes in the cluster")->check(CLI::Range(2, 16));
  app.add_option("--messages", messages, "Events published")->check(CLI::PositiveNumber);
  app.add_option("--payload", payload, "Payload bytes")->capture_default_str();
  app.add_option("--window", window, "Most events per device on their way")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  const auto parsed = devgate::redis::parse_url(url);
  if (!parsed) {
    std::fprintf(stderr, "%s\n", parsed.error.c_str());
    return 2;
  }
  const std::string body(payload, 'x');

  double single = 0;
  {
    node one("single");
    for (unsigned long i = 0; i < devices; ++i) one.connect("d" + std::to_string(i));
    single = run(one, {&one}, devices, messages, body, window);
  }

  double cluster = 0;
  {
    std::vector<std::unique_ptr<node>> ns;
    std::vector<node*> all;
    for (unsigned long k = 0; k < nodes; ++k) {
      ns.push_back(std::make_unique<node>("n" + std::to_string(k)));
      ns.back()->join_cluster(parsed.value);
      all.push_back(ns.back().get());
    }
    for (unsigned long i = 0; i < devices; ++i) ns[i % nodes]->connect("d" + std::to_string(i));
    // Node 0 learns that the others subscribe (PUBSUB NUMSUB, every 100 ms).
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (ns[0]->bridge->remote_subscribers(topic) != static_cast<long long>(nodes - 1) &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (ns[0]->bridge->remote_subscribers(topic) != static_cast<long long>(nodes - 1)) {
      std::fprintf(stderr, "the other nodes' subscriptions never showed (is Redis at %s?)\n",
                   url.c_str());
      return 1;
    }
    cluster = run(*ns[0], all, devices, messages, body, window);
  }
  std::printf(
      "devgate fan-out: %lu events of %lu bytes to %lu devices: one node %.0f deliveries/s, "
      "%lu nodes through Redis %.0f deliveries/s, ratio %.2f\n",
      messages, payload, devices, single, nodes, cluster, single > 0 ? cluster / single : 0.0);
  return single > 0 && cluster > 0 ? 0 : 1;
}
