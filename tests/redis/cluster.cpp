// Several device hubs ("nodes") sharing one real redis-server through redis::state_store: device
// ownership with fencing, takeover across nodes, replay that follows a device, dead nodes'
// devices released, the epoch that tells a device its history was lost, and fleet-wide rollouts
// (one id and image for every node, a transfer cap leased across nodes, totals kept in Redis)
// and rollout campaigns run by one node over the devices of all of them.
#include "devgate/redis/state_store.hpp"

#include <algorithm>
#include <asio/io_context.hpp>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "devgate/detail/crypto.hpp"
#include "devgate/device/hub.hpp"
#include "devgate/device/protocol.hpp"
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
                                         std::chrono::milliseconds ttl = 10s,
                                         std::size_t max_routed = 1000) {
  redis::state_store_options o;
  o.node_id = node;
  o.max_routed = max_routed;
  o.heartbeat_period = 50ms;
  o.heartbeat_ttl = ttl;
  return o;
}

// One gateway node: its connections, its store, an in-process transport and a hub on them. With
// `fleet_cap`, the node takes part in fleet-wide rollouts: it adopts rollouts published on other
// nodes and leases its transfer slots from a fleet-wide cap of `fleet_cap`.
struct node {
  node(loop& l, const std::string& url, const std::string& id, std::chrono::milliseconds ttl = 10s,
       std::size_t fleet_cap = 0, std::size_t max_routed = 1000)
      : loop_(l),
        commands(l.io, options_for(url)),
        control(l.io, options_for(url)),
        store(l.io, commands, control, store_options(id, ttl, max_routed)),
        hub(transport, devgate::null_sink{}, hub_options(fleet_cap), store) {
    if (fleet_cap != 0) {
      store.on_rollout([this](const devgate::store::rollout_record& r) { hub.adopt_firmware(r); });
      store.on_campaign(
          [this](const devgate::store::campaign_event& e) { hub.take_campaign_event(e); });
      store.on_reconnect([this] { hub.rewrite_transfers(); });
      store.lease_transfer_slots(
          fleet_cap, [this] { return hub.slots().usage(); },
          [this](std::size_t n) { hub.set_transfer_limit(n); });
    }
    store.share_figures([this] { return hub.figures(); });
    store.on_routed([this](const std::string& device) { hub.take_routed(device); });
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
    store.stop();  // first: no handler reaches the hub once it stops
    hub.stop();
    loop_.sync();  // the store's stop ran on the loop while the connections are still here
  }
  dev::hub_options hub_options(std::size_t fleet_cap) {
    dev::hub_options o;
    o.fleet_figures = [this] { return store.fleet_figures(); };
    if (fleet_cap == 0) return o;
    o.max_concurrent_transfers = fleet_cap;
    o.leased_transfer_slots = true;
    o.on_slot_demand = [this] { store.want_slots(); };
    o.fleet_rollout_totals = [this] { return store.rollout_totals(); };
    o.chunk_size = 8192;
    o.window = 2;
    return o;
  }
  // Waits until the hub's store thread applied every write queued so far.
  void settle() {
    auto& w = hub.store_writer();
    const auto ticket = w.submitted();
    REQUIRE(eventually([&] { return w.applied_through(ticket); }, 5s));
  }

  loop& loop_;
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
    "redis state store: send_to on any node reaches a device held by another node there, "
    "numbered by that node, each message once; the device is not taken over",
    "[redis][cluster][routing]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a"), b(l, server.url(), "b"), c(l, server.url(), "c");
  device d{"routee", {}, 0, {}, {}, {}};
  d.connect(a);
  REQUIRE(eventually([&] { return d.welcomes.size() == 1 || (d.poll(), false); }));
  CHECK(a.hub.send_to("routee", {{"n", 1}}) == 1);
  CHECK(b.hub.send_to("routee", {{"n", 2}}) == node_hub::routed);
  CHECK(c.hub.send_to("routee", {{"n", 3}}) == node_hub::routed);
  REQUIRE(eventually([&] { return d.has(3); }));
  CHECK(d.got == std::vector<int>{1, 2, 3});
  // B and C at once, 50 each, while A sends too: every message once, each sender's in order,
  // numbered 4.. by A without a gap.
  std::atomic<int> refused{0};  // Catch's assertions are for the test's own thread
  std::thread from_b([&] {
    for (int n = 100; n < 150; ++n) refused += b.hub.send_to("routee", {{"n", n}}) == 0;
  });
  std::thread from_c([&] {
    for (int n = 200; n < 250; ++n) refused += c.hub.send_to("routee", {{"n", n}}) == 0;
  });
  for (int n = 300; n < 310; ++n) a.hub.send_to("routee", {{"n", n}});
  from_b.join();
  from_c.join();
  CHECK(refused == 0);
  REQUIRE(eventually([&] { return d.has(113); }));
  CHECK(d.last_seq == 113);
  std::vector<int> mine[3];
  for (const int n : d.got) {
    if (n >= 100) mine[n / 100 - 1].push_back(n);
  }
  for (int k = 0; k < 3; ++k) {
    const int count = k == 2 ? 10 : 50;
    REQUIRE(mine[k].size() == static_cast<std::size_t>(count));
    for (int i = 0; i < count; ++i)
      CHECK(mine[k][static_cast<std::size_t>(i)] == 100 * (k + 1) + i);
  }
  // The device stayed where it was; nothing waits in Redis.
  CHECK_FALSE(d.s->close_status().has_value());
  CHECK(b.store.owner("routee") == std::optional<std::string>("a"));
  CHECK(b.store.takeovers() + c.store.takeovers() == 0);
  CHECK(b.store.routed_out() + c.store.routed_out() == 102);
  CHECK(a.store.routed_in() == 102);
  CHECK(devgate::testing::integer_of(a.commands, {"LLEN", "devgate:{routee}:in"}) == 0);
  // Kept in Redis by A until acknowledged, like its own: all acknowledged, nothing kept.
  a.settle();
  CHECK(a.store.peek("routee").state.replay.empty());
  CHECK(a.store.peek("routee").state.last_seq == 113);
  CHECK(d.errors.empty());
}

TEST_CASE(
    "redis state store: messages routed to a node that cannot hear of them wait in Redis and "
    "reach the device on the node it moves to; past max_routed the sender is refused",
    "[redis][cluster][routing][fault]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a"), b(l, server.url(), "b", 10s, 0, 5), c(l, server.url(), "c");
  device d{"waiting", {}, 0, {}, {}, {}};
  d.connect(a);
  REQUIRE(eventually([&] { return d.welcomes.size() == 1 || (d.poll(), false); }));
  a.hub.send_to("waiting", {{"n", 1}});
  REQUIRE(eventually([&] { return d.has(1); }));
  // A's control connection is down: the notices of routed messages are lost (pub/sub keeps
  // nothing), the messages are not.
  a.control.stop();
  std::this_thread::sleep_for(50ms);
  for (int n = 2; n <= 6; ++n) CHECK(b.hub.send_to("waiting", {{"n", n}}) == node_hub::routed);
  // B allows 5 to wait: the next one is refused, said so, counted.
  CHECK(b.hub.send_to("waiting", {{"n", 7}}) == 0);
  CHECK(b.store.routed_refused() == 1);
  std::this_thread::sleep_for(100ms);
  d.poll();
  CHECK(d.got == std::vector<int>{1});
  CHECK(devgate::testing::integer_of(b.commands, {"LLEN", "devgate:{waiting}:in"}) == 5);
  // The device moves to C: C's claim finds them and numbers them after A's, once each.
  d.s->disconnect();
  d.connect(c);
  REQUIRE(eventually([&] { return d.has(6); }));
  CHECK(d.got == std::vector<int>{1, 2, 3, 4, 5, 6});
  CHECK(d.last_seq == 6);
  CHECK(c.store.routed_in() == 5);
  CHECK(devgate::testing::integer_of(c.commands, {"LLEN", "devgate:{waiting}:in"}) == 0);
  // Now routed to C.
  CHECK(b.hub.send_to("waiting", {{"n", 7}}) == node_hub::routed);
  REQUIRE(eventually([&] { return d.has(7); }));
  CHECK(d.got.back() == 7);
  CHECK(d.errors.empty());
}

TEST_CASE(
    "redis state store: routed messages a node read but kept after losing the device stay "
    "routed for the new owner",
    "[redis][cluster][routing][fault]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a"), b(l, server.url(), "b");
  REQUIRE_FALSE(a.store.load("raced").error);
  a.control.stop();  // A numbers them itself below, not on a notice
  std::this_thread::sleep_for(50ms);
  REQUIRE(b.store.route("raced", R"({"n":1})").routed);
  REQUIRE(b.store.route("raced", R"({"n":2})").routed);
  const auto read = a.store.routed("raced");
  REQUIRE_FALSE(read.error);
  CHECK(read.messages == std::vector<std::string>{R"({"n":1})", R"({"n":2})"});
  // B claims the device between A's read and A's keep: A's keep is refused, nothing of it
  // applies, and B's claim reports both still waiting.
  const auto claimed = b.store.load("raced");
  REQUIRE_FALSE(claimed.error);
  CHECK(claimed.state.routed == 2);
  const auto kept = a.store.keep_routed("raced", {{1, "one"}, {2, "two"}});
  CHECK(kept.refused);
  CHECK_FALSE(kept.error);
  CHECK(a.store.fenced() == 1);
  const auto now = b.store.peek("raced").state;
  CHECK(now.replay.empty());
  CHECK(now.last_seq == 0);
  CHECK(b.store.routed("raced").messages.size() == 2);
  // B's keep applies: kept, and gone from the routed list.
  const auto ok = b.store.keep_routed("raced", {{1, "one"}, {2, "two"}});
  CHECK_FALSE(ok.refused);
  CHECK_FALSE(ok.error);
  CHECK(b.store.peek("raced").state.replay.size() == 2);
  CHECK(b.store.peek("raced").state.last_seq == 2);
  CHECK(b.store.routed("raced").messages.empty());
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
  // A later write from A is not even sent: A no longer owns it (the hub's own write for the
  // closed session, its `touch`, may be counted too, before or after).
  const auto unsent = a.store.not_owned();
  CHECK(a.store.add_messages_sent("fenced", 1) == redis::errc::not_owner);
  CHECK(a.store.not_owned() > unsent);
  // B's writes go in.
  REQUIRE_FALSE(b.store.add_messages_sent("fenced", 2));
  CHECK(b.store.peek("fenced").state.messages_sent == before + 2);
}

TEST_CASE(
    "redis state store: every node's stats show the fleet's figures, summed over the live "
    "nodes; a node that stops or goes silent leaves the sum",
    "[redis][cluster]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a"), b(l, server.url(), "b");
  auto c = std::make_unique<node>(l, server.url(), "c");
  std::vector<device> devices;
  for (int i = 0; i < 6; ++i)
    devices.push_back({devgate::testing::numbered("fig", i), {}, 0, {}, {}, {}});
  // 1 device on A, 2 on B, 3 on C; those on C send 10 messages each.
  node* at[] = {&a, &b, &b, c.get(), c.get(), c.get()};
  for (int i = 0; i < 6; ++i) devices[i].connect(*at[i]);
  for (int i = 3; i < 6; ++i) {
    for (int m = 0; m < 10; ++m) {
      REQUIRE_FALSE(devices[i].s->push(json{{"type", "send"}, {"data", m}}.dump()));
    }
  }
  auto fleet_of = [](node& n) {
    return n.store.fleet_figures().value_or(devgate::store::gateway_figures{});
  };
  REQUIRE(eventually([&] {
    for (node* n : {&a, &b, c.get()}) {
      const auto f = fleet_of(*n);
      if (f.nodes != 3 || f.connected != 6 || f.dispatched != 30) return false;
    }
    return true;
  }));
  CHECK(fleet_of(a).devices == 6);
  CHECK(fleet_of(a).enqueued == 30);
  CHECK(a.hub.stats().connected == 1);  // the node's own figures stay its own
  // The stats frame on A carries the fleet's figures.
  std::optional<json> frame;
  std::mutex m;
  auto token = a.hub.subscribe("stats", [&](std::string_view, const devgate::shared_bytes& p) {
    std::lock_guard lock(m);
    frame = json::parse(p.view());
  });
  REQUIRE(eventually([&] {
    a.hub.publish_stats();
    std::lock_guard lock(m);
    return frame.has_value();
  }));
  a.hub.unsubscribe(token);
  {
    std::lock_guard lock(m);
    const auto& data = frame->at("data");
    CHECK(data.at("nodes") == 3);
    CHECK(data.at("connected") == 6);
    CHECK(data.at("dispatched") == 30);
  }

  // B goes silent (its commands connection stops: no figures, no goodbye): within three
  // heartbeat periods it is no longer counted.
  b.commands.stop();
  REQUIRE(eventually([&] {
    const auto f = fleet_of(a);
    return f.nodes == 2 && f.connected == 4;
  }));
  // C stops (its devices gone first): its entry goes at once.
  for (int i = 3; i < 6; ++i) devices[i].s.reset();
  c.reset();
  REQUIRE(eventually([&] {
    const auto f = fleet_of(a);
    return f.nodes == 1 && f.connected == 1 && f.dispatched == 0;
  }));
  CHECK(devgate::testing::integer_of(a.commands, {"HEXISTS", "devgate:figures", "c"}) == 0);
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

namespace {

// A device that downloads firmware: acknowledges every chunk, then reports the image's SHA-256;
// the bytes received are kept across reconnects (a transfer resumes where it was acknowledged).
struct fw_device {
  std::string id;
  std::optional<in_process_transport::session> s;
  std::vector<std::byte> image;
  std::uint64_t rollout = 0;
  std::uint64_t got = 0;
  bool receiving = false;        // between the `firmware` start and the result (or a lost session)
  bool verified = false;         // the server said so (fw_status)
  bool corrupt = false;          // reports a wrong SHA-256 (a device whose update fails)
  unsigned starts = 0;           // `firmware` start messages received
  std::uint64_t resumed_at = 0;  // the highest offset a start message resumed from

  void connect(node& n) {
    s.emplace(n.transport.connect(id));
    receiving = false;
    REQUIRE_FALSE(s->push(
        json{{"type", "hello"}, {"protocol", 1}, {"last_seq", 0}, {"firmware_version", "1.0"}}
            .dump()));
  }
  // Drops the connection without a close (its node died).
  void drop() {
    s.reset();
    receiving = false;
  }
  void step() {
    if (!s) return;
    for (auto& o : s->take_inbox()) {
      if (o.kind == devgate::payload_kind::text) {
        const auto j = json::parse(o.payload.view());
        const auto type = j.value("type", "");
        if (type == "welcome") {
          // Its result reached a node whose answer was lost with the session: the welcome
          // tells how the transfer ended.
          const auto fw = j.at("state").at("firmware");
          if (fw.value("status", "") == "verified") verified = true;
        } else if (type == "firmware") {
          rollout = j.at("rollout").get<std::uint64_t>();
          image.resize(j.at("size").get<std::size_t>());
          got = j.at("offset").get<std::uint64_t>();
          resumed_at = std::max(resumed_at, got);
          receiving = true;
          ++starts;
          // Every byte was acknowledged before its session dropped: only the result is missing.
          if (got == image.size()) result();
        } else if (type == "fw_status") {
          verified = j.value("status", "") == "verified";
          receiving = false;
        }
        continue;
      }
      const auto h = dev::decode_chunk_header(o.payload.bytes());
      REQUIRE(h);
      if (h->rollout != rollout || h->offset != got) continue;
      std::memcpy(image.data() + h->offset, o.payload.data() + 16, h->length);
      got += h->length;
      // A push fails once the node closed the session: the device reconnects (see the tests).
      if (s->push(json{{"type", "fw_ack"}, {"rollout", rollout}, {"offset", got}}.dump())) return;
      if (got == image.size()) result();
    }
  }
  // Reports the SHA-256 of the whole image.
  void result() {
    const auto sha = corrupt ? std::string(64, '0')
                             : devgate::detail::hex_encode(devgate::detail::sha256(image));
    (void)s->push(
        json{{"type", "fw_result"}, {"rollout", rollout}, {"ok", true}, {"sha256", sha}}.dump());
    receiving = false;
  }
};

// Steps every device until `done` holds (or 20 s pass).
template <class Done>
bool run_until(std::vector<fw_device>& devs, Done&& done) {
  return eventually(
      [&] {
        for (auto& d : devs) d.step();
        return done();
      },
      20s);
}

// The slots leased in Redis, summed over the nodes.
long long leased(redis::connection& c) {
  const auto r = c.call({"HGETALL", "devgate:slots"});
  long long sum = 0;
  for (std::size_t i = 0; i + 1 < r.value.elements.size(); i += 2) {
    if (r.value.elements[i].str[0] != ':') sum += std::stoll(r.value.elements[i + 1].str);
  }
  return sum;
}

}  // namespace

TEST_CASE(
    "redis state store: a rollout published on node A reaches 300 devices over three nodes "
    "and 30 that connect later, under the fleet-wide cap, while node B is killed mid-rollout",
    "[redis][cluster][rollout][fault]") {
  constexpr std::size_t cap = 6;
  redis_server server;
  loop l;
  std::optional<node> a, b, c;
  a.emplace(l, server.url(), "a", 1s, cap);
  b.emplace(l, server.url(), "b", 1s, cap);
  c.emplace(l, server.url(), "c", 1s, cap);
  std::vector<fw_device> devs(330);
  for (std::size_t i = 0; i < devs.size(); ++i) devs[i].id = "fw-" + std::to_string(i);
  auto home = [&](std::size_t i) -> node& {
    return i % 3 == 0 ? *a : (i % 3 == 1 ? (b ? *b : *c) : *c);
  };
  for (std::size_t i = 0; i < 300; ++i) devs[i].connect(home(i));
  REQUIRE(eventually([&] {
    return a->hub.stats().connected + b->hub.stats().connected + c->hub.stats().connected == 300;
  }));

  std::vector<std::byte> img(40'000);  // 5 chunks of 8 KiB, 2 in flight
  for (std::size_t i = 0; i < img.size(); ++i) img[i] = static_cast<std::byte>(i * 7 + 1);
  const auto id = a->hub.publish_firmware("2.0", img);
  // B and C adopt it: every node rolls out the same image under the same id.
  REQUIRE(eventually([&] {
    return b->hub.current_image() && b->hub.current_image()->rollout() == id &&
           c->hub.current_image() && c->hub.current_image()->rollout() == id;
  }));
  CHECK(c->hub.current_image()->sha256() == a->hub.current_image()->sha256());

  std::size_t most_receiving = 0;  // what the devices saw at once, fleet-wide
  long long most_leased = 0;
  bool late_joined = false;
  bool b_killed = false;
  // B's devices that were mid-image when B died, with the offset Redis had for them.
  std::vector<std::pair<std::size_t, std::uint64_t>> cut;
  std::size_t steps = 0;
  auto verified = [&] {
    std::size_t n = 0;
    for (const auto& d : devs) n += d.verified ? 1 : 0;
    return n;
  };
  // B dies (kill -9) while some of its devices are mid-image, with part of it acknowledged in
  // Redis: its Redis connections go first, so it neither writes nor gives back its lease; its
  // devices lose their sessions and reconnect to A or C. Not yet if none is mid-image.
  auto kill_b = [&] {
    bool mid = false;
    for (std::size_t i = 1; i < devs.size(); i += 3)
      mid = mid || (devs[i].receiving && devs[i].got > 0);
    if (!mid) return;
    b->settle();
    for (std::size_t i = 1; i < devs.size(); i += 3) {
      if (!devs[i].receiving) continue;
      const auto kept = a->store.peek(devs[i].id).state.transfer.offset;
      if (kept > 0 && kept < img.size()) cut.emplace_back(i, kept);
    }
    if (cut.empty()) return;
    b_killed = true;
    b->commands.stop();
    b->control.stop();
    // Only the devices B held: the late ones connect later, each once (a second session left
    // open on another node would race the first's claim, which no real device does).
    std::vector<std::size_t> held;
    for (std::size_t i = 1; i < devs.size(); i += 3) {
      if (!devs[i].s) continue;
      devs[i].drop();
      held.push_back(i);
    }
    b.reset();
    for (const auto i : held) devs[i].connect(i % 2 == 0 ? *a : *c);
  };
  const bool done = eventually(
      [&] {
        std::size_t receiving = 0;
        for (auto& d : devs) {
          d.step();
          receiving += d.receiving ? 1 : 0;
        }
        most_receiving = std::max(most_receiving, receiving);
        if (++steps % 16 == 0) most_leased = std::max(most_leased, leased(a->commands));
        const auto v = verified();
        if (!late_joined && v >= 60) {  // devices that connect after the publish, to any node
          late_joined = true;
          for (std::size_t i = 300; i < devs.size(); ++i) devs[i].connect(home(i));
        }
        if (!b_killed && v >= 30) kill_b();
        return v == devs.size();
      },
      90s);
  INFO("verified " << verified() << " of " << devs.size());
  for (const auto& d : devs) {
    if (d.verified) continue;
    const auto st = a->store.peek(d.id).state.transfer;
    const auto ua = a->hub.slots().usage();
    const auto uc = c->hub.slots().usage();
    UNSCOPED_INFO(d.id << ": got " << d.got << " starts " << d.starts << " receiving "
                       << d.receiving << "; in Redis status " << static_cast<int>(st.status)
                       << " offset " << st.offset << " owner " << a->store.owner(d.id).value_or("-")
                       << "; slots a " << ua.active << "/" << ua.waiting << "/" << ua.limit << " c "
                       << uc.active << "/" << uc.waiting << "/" << uc.limit);
  }
  REQUIRE(done);
  CHECK(b_killed);
  // B's transfers cut mid-image resumed on A or C where Redis had them acknowledged.
  REQUIRE_FALSE(cut.empty());
  for (const auto& [i, kept] : cut) {
    INFO(devs[i].id);
    CHECK(devs[i].starts >= 2);
    CHECK(devs[i].resumed_at >= kept);
  }
  CHECK(most_receiving <= cap);  // the cap held for the whole fleet, as the devices saw it
  CHECK(most_receiving >= 2);    // and the nodes shared it
  CHECK(most_leased <= static_cast<long long>(cap));
  // B's lease came back to the fleet when it was reaped; nothing is leased once all is done.
  REQUIRE(eventually([&] { return leased(a->commands) == 0; }, 5s));
  // The fleet's totals are the same from A and C: every device verified, counted once.
  REQUIRE(eventually(
      [&] {
        for (auto& d : devs) d.step();  // a result whose answer was lost with B goes again
        const auto ta = a->hub.rollout();
        const auto tc = c->hub.rollout();
        return ta.verified == devs.size() && tc.verified == devs.size() && ta.pending == 0 &&
               tc.pending == 0 && ta.transferring == 0 && ta.bytes_acked == tc.bytes_acked;
      },
      5s));
  const auto t = a->hub.rollout();
  CHECK(t.rollout == id);
  CHECK(t.failed == 0);
  CHECK(t.bytes_acked == devs.size() * img.size());

  CHECK(t.peak_transferring <= cap);
  // Each device's state says so from any node (B's former devices included).
  CHECK(a->hub.device_state("fw-1").transfer.status == devgate::store::transfer_status::verified);
  CHECK(c->hub.device_state("fw-0").transfer.status == devgate::store::transfer_status::verified);
}

TEST_CASE(
    "redis state store: Redis stopped for 5 s mid-rollout and restarted, with and without its "
    "data: the nodes go on within their leases and the rollout completes with right totals",
    "[redis][cluster][rollout][fault]") {
  constexpr std::size_t cap = 4;
  redis_server server;
  loop l;
  node a(l, server.url(), "a", 10s, cap), b(l, server.url(), "b", 10s, cap);
  std::vector<fw_device> devs(60);
  auto home = [&](std::size_t i) -> node& { return i % 2 == 0 ? a : b; };
  for (std::size_t i = 0; i < devs.size(); ++i) {
    devs[i].id = "out-" + std::to_string(i);
    devs[i].connect(home(i));
  }
  REQUIRE(
      eventually([&] { return a.hub.stats().connected + b.hub.stats().connected == devs.size(); }));
  std::vector<std::byte> img(40'000);
  for (std::size_t i = 0; i < img.size(); ++i) img[i] = static_cast<std::byte>(i * 13 + 5);
  const auto id = a.hub.publish_firmware("2.0", img);
  REQUIRE(
      eventually([&] { return b.hub.current_image() && b.hub.current_image()->rollout() == id; }));

  std::size_t most_receiving = 0;
  auto verified = [&] {
    std::size_t n = 0;
    for (const auto& d : devs) n += d.verified ? 1 : 0;
    return n;
  };
  // Steps every device; one whose session the node closed (let go: Redis lost its state)
  // reconnects to the same node.
  auto step = [&] {
    std::size_t receiving = 0;
    for (std::size_t i = 0; i < devs.size(); ++i) {
      auto& d = devs[i];
      if (d.s && d.s->close_status()) d.connect(home(i));
      d.step();
      receiving += d.receiving ? 1 : 0;
    }
    most_receiving = std::max(most_receiving, receiving);
  };
  REQUIRE(eventually([&] {
    step();
    return verified() >= 15;
  }));

  const bool keep_data = GENERATE(true, false);
  INFO((keep_data ? "restarted with its data" : "restarted empty"));
  if (keep_data) REQUIRE_FALSE(a.commands.call({"SAVE"}).ec);
  server.stop();
  if (!keep_data) server.remove_data();
  // 5 s without Redis: each node goes on with the slots it holds and its own devices.
  const auto before = verified();
  const auto back = std::chrono::steady_clock::now() + 5s;
  while (std::chrono::steady_clock::now() < back) {
    step();
    std::this_thread::sleep_for(1ms);
  }
  CHECK(verified() > before);
  CHECK(a.hub.stats().store_errors + b.hub.stats().store_errors > 0);
  server.start();

  if (!keep_data) {
    // Everything Redis held is gone, the verified devices' states included: they are let go
    // as the nodes write again, reload a state of the new epoch and take the image again.
    for (auto& d : devs) d.verified = false;
  }
  const bool done = eventually(
      [&] {
        step();
        return verified() == devs.size();
      },
      60s);
  INFO("verified " << verified() << " of " << devs.size());
  REQUIRE(done);
  CHECK(most_receiving <= cap);
  // The totals caught up (the nodes wrote again what Redis missed) and agree.
  devgate::firmware::rollout_totals ta, tb;
  const bool caught_up = eventually(
      [&] {
        step();  // devices let go meanwhile reconnect and finish again
        ta = a.hub.rollout();
        tb = b.hub.rollout();
        return ta.verified == devs.size() && tb.verified == devs.size() && ta.pending == 0 &&
               ta.transferring == 0 && ta.bytes_acked == devs.size() * img.size() &&
               tb.bytes_acked == ta.bytes_acked;
      },
      20s);
  if (!caught_up) {
    for (const auto& d : devs) {
      const auto st = a.store.peek(d.id).state;
      if (st.transfer.status == devgate::store::transfer_status::verified) continue;
      UNSCOPED_INFO(d.id << ": in Redis rollout " << st.transfer.rollout << " status "
                         << static_cast<int>(st.transfer.status) << " offset " << st.transfer.offset
                         << " epoch " << st.epoch << " owner "
                         << a.store.owner(d.id).value_or("-"));
    }
  }
  INFO("fenced " << a.store.fenced() << "/" << b.store.fenced() << " not owned "
                 << a.store.not_owned() << "/" << b.store.not_owned() << " released "
                 << a.hub.stats().devices_released << "/" << b.hub.stats().devices_released
                 << " claims " << a.store.claims() << "/" << b.store.claims());
  INFO("a: verified " << ta.verified << " pending " << ta.pending << " transferring "
                      << ta.transferring << " failed " << ta.failed << " bytes " << ta.bytes_acked
                      << "; b: verified " << tb.verified << " bytes " << tb.bytes_acked);
  REQUIRE(caught_up);
  REQUIRE(eventually([&] { return leased(a.commands) == 0; }, 5s));
}

TEST_CASE(
    "redis state store: a device that reconnects to the same node while its state is loading "
    "gets its welcome on the new session",
    "[redis][cluster]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a");
  for (int k = 0; k < 20; ++k) {
    device d{"twice-" + std::to_string(k), {}, 0, {}, {}, {}};
    // The second session opens before the first one's state is in (the claim is a round trip
    // to Redis): both hellos wait for it, and the first session is closed as replaced.
    d.connect(a);
    auto first = std::move(*d.s);
    d.connect(a);
    INFO(k);
    REQUIRE(eventually([&] { return d.welcomes.size() == 1 || (d.poll(), false); }, 5s));
    CHECK(first.close_status() == std::optional(dev::close_replaced));
  }
}

TEST_CASE(
    "redis state store: a campaign started on node A runs over the devices of three nodes: "
    "waves of 10/40/50%, 10% of wave 2 failing pauses it with wave 3 untouched on every node, "
    "fixed and resumed it completes",
    "[redis][cluster][campaign]") {
  redis_server server;
  loop l;
  node a(l, server.url(), "a", 10s, 8), b(l, server.url(), "b", 10s, 8),
      c(l, server.url(), "c", 10s, 8);
  std::vector<fw_device> devs(150);
  auto home = [&](std::size_t i) -> node& { return i % 3 == 0 ? a : (i % 3 == 1 ? b : c); };
  for (std::size_t i = 0; i < devs.size(); ++i) {
    devs[i].id = "cp-" + std::string(i < 10 ? "00" : (i < 100 ? "0" : "")) + std::to_string(i);
    devs[i].connect(home(i));
  }
  REQUIRE(eventually([&] {
    return a.hub.stats().connected + b.hub.stats().connected + c.hub.stats().connected ==
           devs.size();
  }));
  a.settle();
  b.settle();
  c.settle();
  // 10% of wave 2 (positions 15 to 74, in id order) fail verification, on every node.
  for (std::size_t i = 20; i < 75; i += 10) devs[i].corrupt = true;
  std::vector<std::byte> img(20'000);
  for (std::size_t i = 0; i < img.size(); ++i) img[i] = static_cast<std::byte>(i * 7 + 3);
  auto spec = devgate::firmware::parse_campaign_spec(json::parse(R"({
      "name": "fleet", "waves": [{"percent": 10}, {"percent": 40}, {"percent": 50}],
      "success_threshold": 90, "error_threshold": {"percent": 5, "min_executed": 20}})"));
  spec.version = "2.0";
  const auto id = a.hub.start_campaign(spec, img);
  auto describe = [&] { return *a.hub.campaigns().describe(id); };
  CHECK(describe()["devices"] == devs.size());  // every node's devices, not only A's

  REQUIRE(run_until(devs, [&] { return describe()["state"] == "paused"; }));
  REQUIRE(run_until(devs, [&] {
    const auto w = describe()["waves"][1]["counts"];
    return w["pending"] == 0 && w["transferring"] == 0;
  }));
  auto d = describe();
  INFO(d.dump());
  CHECK(d["reason"].get<std::string>().rfind("wave 2:", 0) == 0);
  CHECK(d["waves"][0]["counts"]["verified"] == 15);
  CHECK(d["waves"][2]["started"] == false);
  CHECK(d["counts"]["failed"].get<int>() > 0);
  // The verified devices of waves 1 and 2 are on all three nodes; wave 3 got nothing.
  std::size_t on_b = 0, on_c = 0;
  for (std::size_t i = 0; i < 75; ++i) {
    if (devs[i].verified && i % 3 == 1) ++on_b;
    if (devs[i].verified && i % 3 == 2) ++on_c;
  }
  CHECK(on_b > 15);
  CHECK(on_c > 15);
  for (std::size_t i = 75; i < devs.size(); ++i) CHECK(devs[i].starts == 0);

  for (auto& dv : devs) dv.corrupt = false;
  REQUIRE(a.hub.resume_campaign(id));
  REQUIRE(run_until(devs, [&] { return describe()["state"] == "completed"; }));
  CHECK(describe()["counts"]["verified"] == devs.size());
  REQUIRE(run_until(devs, [&] {
    return std::all_of(devs.begin(), devs.end(), [](const fw_device& x) { return x.verified; });
  }));
  // Node B heard of it as the fleet's rollout (gated: a campaign's), and runs no campaign.
  CHECK(b.hub.rollout().rollout == d["rollout"].get<std::uint32_t>());
  CHECK_FALSE(b.hub.campaigns().active());
}

TEST_CASE(
    "redis state store: the node running a campaign restarts with the same node id and "
    "continues it where it was, over both nodes' devices",
    "[redis][cluster][campaign]") {
  redis_server server;
  loop l;
  std::optional<node> a;
  a.emplace(l, server.url(), "a", 10s, 8);
  node b(l, server.url(), "b", 10s, 8);
  std::vector<fw_device> devs(60);
  auto home = [&](std::size_t i) -> node& { return i % 2 == 0 ? *a : b; };
  for (std::size_t i = 0; i < devs.size(); ++i) {
    devs[i].id = "rs-" + std::string(i < 10 ? "0" : "") + std::to_string(i);
    devs[i].connect(home(i));
  }
  REQUIRE(eventually([&] { return a->hub.stats().connected + b.hub.stats().connected == 60; }));
  a->settle();
  b.settle();
  std::vector<std::byte> img(10'000);
  for (std::size_t i = 0; i < img.size(); ++i) img[i] = static_cast<std::byte>(i * 5 + 1);
  auto spec = devgate::firmware::parse_campaign_spec(
      json::parse(R"({"name": "kept", "waves": [{"percent": 50}, {"percent": 50}],
                      "success_threshold": 100})"));
  spec.version = "2.0";
  const auto id = a->hub.start_campaign(spec, img);
  // Wave 1 (rs-00 to rs-29, on both nodes) completes; wave 2's devices are admitted but do not
  // take their firmware yet.
  std::vector<fw_device> wave1(std::make_move_iterator(devs.begin()),
                               std::make_move_iterator(devs.begin() + 30));
  devs.erase(devs.begin(), devs.begin() + 30);
  REQUIRE(run_until(wave1, [&] {
    return (*a->hub.campaigns().describe(id))["waves"][0]["counts"]["verified"] == 30;
  }));
  REQUIRE(eventually([&] { return (*a->hub.campaigns().describe(id))["current_wave"] == 1; }));
  const auto rollout = (*a->hub.campaigns().describe(id))["rollout"].get<std::uint32_t>();

  // Node a stops (its devices lose their sessions) and comes back under the same id.
  a.reset();
  for (std::size_t i = 0; i < devs.size(); i += 2) devs[i].drop();
  for (std::size_t i = 0; i < wave1.size(); i += 2) wave1[i].drop();
  a.emplace(l, server.url(), "a", 10s, 8);
  const auto back = a->hub.campaigns().describe(id);
  REQUIRE(back);
  INFO(back->dump());
  CHECK((*back)["state"] == "running");
  CHECK((*back)["rollout"] == rollout);
  CHECK((*back)["waves"][0]["counts"]["verified"] == 30);
  for (std::size_t i = 0; i < devs.size(); i += 2) devs[i].connect(*a);
  REQUIRE(
      run_until(devs, [&] { return (*a->hub.campaigns().describe(id))["state"] == "completed"; }));
  CHECK((*a->hub.campaigns().describe(id))["counts"]["verified"] == 60);
  REQUIRE(run_until(devs, [&] {
    return std::all_of(devs.begin(), devs.end(), [](const fw_device& x) { return x.verified; });
  }));
  // A device's history spans the restart.
  const auto page = *a->hub.campaigns().devices(id, std::nullopt, 59, 1);
  CHECK(page["devices"][0]["id"] == "rs-59");
  CHECK(page["devices"][0]["history"].size() >= 3);  // queued, admitted, verified
}
