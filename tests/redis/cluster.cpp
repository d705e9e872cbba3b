// Several device hubs ("nodes") sharing one real redis-server through redis::state_store: device
// ownership with fencing, takeover across nodes, replay that follows a device, dead nodes'
// devices released, and the epoch that tells a device its history was lost.
#include "devgate/redis/state_store.hpp"

#include <asio/io_context.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "devgate/device/hub.hpp"
#include "devgate/transport/in_process.hpp"
#include "redis_support.hpp"
#include "support.hpp"

namespace {

using namespace std::chrono_literals;
using devgate::in_process_transport;
using devgate::testing::eventually;
using devgate::testing::loop;
using devgate::testing::options_for;
using devgate::testing::redis_server;
using json = nlohmann::json;
namespace redis = devgate::redis;
namespace dev = devgate::device;

using node_hub = dev::hub<in_process_transport, devgate::null_sink, redis::state_store>;

redis::state_store_options store_options(const std::string& node,
                                         std::chrono::milliseconds ttl = 10s) {
  redis::state_store_options o;
  o.node_id = node;
  o.heartbeat_period = 50ms;
  o.heartbeat_ttl = ttl;
  return o;
}

// One gateway node: its connections, its store, an in-process transport and a hub on them.
struct node {
  node(loop& l, const std::string& url, const std::string& id, std::chrono::milliseconds ttl = 10s)
      : commands(l.io, options_for(url)),
        control(l.io, options_for(url)),
        store(l.io, commands, control, store_options(id, ttl)),
        hub(transport, devgate::null_sink{}, {}, store) {
    store.on_release([this](const std::string& device, bool fenced) {
      if (fenced) {
        hub.release_device(device, devgate::close_code::try_again_later,
                           "this node lost the device to another; reconnect");
      } else {
        hub.release_device(device);
      }
    });
    commands.start();
    control.start();
    store.start();
    REQUIRE(commands.wait_connected(5s));
    REQUIRE(control.wait_connected(5s));
    REQUIRE(eventually([&] { return store.heartbeats() > 0; }, 5s));  // alive for the others
    REQUIRE_FALSE(hub.start());
  }
  ~node() {
    hub.stop();
    store.stop();
  }
  // Waits until the hub's store thread applied every write queued so far.
  void settle() {
    auto& w = hub.store_writer();
    const auto ticket = w.submitted();
    REQUIRE(eventually([&] { return w.applied_through(ticket); }, 5s));
  }

  redis::connection commands;
  redis::connection control;
  redis::state_store store;
  in_process_transport transport;
  node_hub hub;
};

// A scripted device: it remembers the highest sequence number it saw and drops what it saw
// before, as a device following docs/PROTOCOL.md does.
struct device {
  std::string id;
  std::optional<in_process_transport::session> s;
  std::uint64_t last_seq = 0;
  std::vector<int> got;  // the `n` of every deliver taken, in order
  std::vector<json> welcomes;
  std::vector<json> errors;

  void connect(node& n) {
    s.emplace(n.transport.connect(id));
    REQUIRE_FALSE(s->push(json{{"type", "hello"}, {"protocol", 1}, {"last_seq", last_seq}}.dump()));
  }
  // Takes what arrived; acknowledges every new deliver when `ack`.
  void poll(bool ack = true) {
    for (auto& o : s->take_inbox()) {
      const auto j = json::parse(o.payload.view());
      const auto type = j.value("type", "");
      if (type == "welcome") welcomes.push_back(j);
      if (type == "error") errors.push_back(j);
      if (type != "deliver") continue;
      const auto seq = j.at("seq").get<std::uint64_t>();
      if (seq <= last_seq) continue;  // seen before: dropped
      last_seq = seq;
      got.push_back(j.at("data").at("n").get<int>());
      if (ack) REQUIRE_FALSE(s->push(json{{"type", "ack"}, {"seq", seq}}.dump()));
    }
  }
  bool has(std::size_t n, bool ack = true) {
    poll(ack);
    return got.size() >= n;
  }
};

}  // namespace

TEST_CASE(
    "redis state store: a device moving A -> B -> C with deliveries pending gets each "
    "exactly once, in order; the old node's session is closed with 4000",
    "[redis][cluster]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a"), b(l, server.url(), "b"), c(l, server.url(), "c");
  device d{"mover", {}, 0, {}, {}, {}};

  d.connect(a);
  REQUIRE(eventually([&] { return d.welcomes.size() == 1 || (d.poll(), false); }));
  const auto epoch = d.welcomes.at(0).value("epoch", "");
  CHECK(epoch.size() == 16);
  for (int n = 1; n <= 3; ++n) a.hub.send_to("mover", {{"n", n}});
  REQUIRE(eventually([&] { return d.has(3); }));
  // Offline: A keeps 4 and 5 for it, in Redis.
  d.s->disconnect();
  for (int n = 4; n <= 5; ++n) a.hub.send_to("mover", {{"n", n}});
  a.settle();
  CHECK(a.store.owner("mover") == std::optional<std::string>("a"));

  // B: the replay follows the device.
  d.connect(b);
  REQUIRE(eventually([&] { return d.has(5); }));
  CHECK(b.store.owner("mover") == std::optional<std::string>("b"));
  CHECK(b.store.takeovers() == 1);
  REQUIRE(eventually([&] { return a.store.lost() == 1; }));
  CHECK(a.hub.stats().devices_released == 1);
  // Unacknowledged 6 and 7 on B, then the device moves to C while still connected to B.
  for (int n = 6; n <= 7; ++n) b.hub.send_to("mover", {{"n", n}});
  REQUIRE(eventually([&] {
    d.poll(false);  // seen, not acknowledged
    return d.got.size() == 7;
  }));
  d.last_seq = 5;  // as if 6 and 7 were lost on the way: the device resumes from 5
  d.got.resize(5);
  b.settle();
  auto on_b = std::move(*d.s);
  d.connect(c);
  REQUIRE(eventually([&] { return d.has(7); }));
  // B was told and closed its session with 4000 (replaced).
  REQUIRE(eventually([&] { return on_b.close_status().has_value(); }));
  CHECK(*on_b.close_status() == dev::close_replaced);
  for (int n = 8; n <= 10; ++n) c.hub.send_to("mover", {{"n", n}});
  REQUIRE(eventually([&] { return d.has(10); }));
  CHECK(d.got == std::vector<int>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  CHECK(d.welcomes.back().value("epoch", "") == epoch);  // nothing was lost
  CHECK(d.errors.empty());
  c.settle();
  // Everything acknowledged: nothing kept; numbering continued across the nodes.
  const auto st = c.hub.device_state("mover");
  CHECK(st.replay.empty());
  const auto peeked = c.store.peek("mover");
  REQUIRE_FALSE(peeked.error);
  CHECK(peeked.state.last_seq == 10);
  CHECK(peeked.state.replay.empty());
  CHECK(a.store.fenced() + b.store.fenced() + c.store.fenced() == 0);
}

TEST_CASE(
    "redis state store: a node that missed the takeover is fenced on its next write and "
    "lets the device go",
    "[redis][cluster][fault]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a"), b(l, server.url(), "b");
  device d{"fenced", {}, 0, {}, {}, {}};
  d.connect(a);
  REQUIRE(eventually([&] { return d.welcomes.size() == 1 || (d.poll(), false); }));
  a.settle();
  // B claims the device while A cannot hear it: A's control connection is stopped first, so the
  // claim's PUBLISH on A's channel is lost, as pub/sub messages are when a connection is down.
  a.control.stop();
  std::this_thread::sleep_for(50ms);
  REQUIRE_FALSE(b.store.load("fenced").error);
  CHECK(b.store.takeovers() == 1);
  // A still believes it owns the device: its write is refused by the fence, not applied.
  const auto before = b.store.peek("fenced").state.messages_sent;
  REQUIRE_FALSE(a.store.add_messages_sent("fenced", 5));
  CHECK(a.store.fenced() == 1);
  CHECK(b.store.peek("fenced").state.messages_sent == before);
  // ... and A let the device go: its session closed with 1013 (reconnect), its record dropped.
  REQUIRE(eventually([&] { return d.s->close_status().has_value(); }));
  CHECK(*d.s->close_status() == devgate::close_code::try_again_later);
  CHECK(a.hub.stats().devices_released == 1);
  // A later write from A is not even sent: A no longer owns it.
  CHECK(a.store.add_messages_sent("fenced", 1) == redis::errc::not_owner);
  CHECK(a.store.not_owned() == 1);
  // B's writes go in.
  REQUIRE_FALSE(b.store.add_messages_sent("fenced", 2));
  CHECK(b.store.peek("fenced").state.messages_sent == before + 2);
}

TEST_CASE("redis state store: a node that stops beating loses its devices to the live nodes",
          "[redis][cluster][fault]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a", 300ms), b(l, server.url(), "b", 300ms);
  REQUIRE_FALSE(a.store.load("orphan").error);
  REQUIRE(eventually([&] { return a.store.heartbeats() > 0; }));
  CHECK(b.store.owner("orphan") == std::optional<std::string>("a"));
  a.store.stop();  // as if killed: no more heartbeats
  REQUIRE(eventually([&] { return b.store.reaped() == 1; }, 5s));
  CHECK_FALSE(b.store.owner("orphan").has_value());
  CHECK(devgate::testing::integer_of(b.commands, {"SISMEMBER", "devgate:nodes", "a"}) == 0);
  // Its state is still there for whoever claims it next, and B's claim tells nobody.
  REQUIRE_FALSE(b.store.load("orphan").error);
  CHECK(b.store.takeovers() == 0);
}

TEST_CASE(
    "redis state store: Redis restarted with its data keeps the epoch; restarted empty, "
    "the device is told its history is gone",
    "[redis][cluster][fault]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a");
  device d{"survivor", {}, 0, {}, {}, {}};
  d.connect(a);
  REQUIRE(eventually([&] { return d.welcomes.size() == 1 || (d.poll(), false); }));
  const auto epoch = d.welcomes.at(0).value("epoch", "");
  REQUIRE(epoch.size() == 16);
  for (int n = 1; n <= 2; ++n) a.hub.send_to("survivor", {{"n", n}});
  REQUIRE(eventually([&] { return d.has(2); }));
  d.s->disconnect();
  a.hub.send_to("survivor", {{"n", 3}});  // kept for it
  a.settle();

  // With its data (SAVE, restart from the dump): same epoch, the kept message replayed.
  REQUIRE(devgate::testing::integer_of(a.commands, {"DBSIZE"}) > 0);
  REQUIRE_FALSE(a.commands.call({"SAVE"}).ec);
  server.stop();
  server.start();
  REQUIRE(a.commands.wait_connected(5s));
  REQUIRE(eventually([&] { return a.commands.connected() && a.control.connected(); }, 5s));
  d.connect(a);
  REQUIRE(eventually([&] { return d.has(3); }));
  CHECK(d.welcomes.back().value("epoch", "") == epoch);
  CHECK(d.errors.empty());
  d.s->disconnect();
  a.settle();

  // Empty (the dump removed): a new epoch in the welcome, and last_seq beyond the store's.
  server.stop();
  server.remove_data();
  server.start();
  REQUIRE(eventually([&] { return a.commands.connected() && a.control.connected(); }, 5s));
  d.connect(a);
  REQUIRE(eventually([&] {
    d.poll();
    return d.welcomes.size() == 3;
  }));
  const auto fresh = d.welcomes.back().value("epoch", "");
  CHECK(fresh.size() == 16);
  CHECK(fresh != epoch);
  REQUIRE(eventually([&] {
    d.poll();
    return !d.errors.empty();
  }));
  CHECK(d.errors.front().value("code", "") == "bad_resume");
}
