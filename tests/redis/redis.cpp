// Tests of the optional Redis part (include/devgate/redis/) against real redis-server processes,
// each started by its test case on a free loopback port and stopped by it.
#include "devgate/redis/connection.hpp"
#include "devgate/redis/streams_sink.hpp"
#include "devgate/redis/topic_bridge.hpp"
#include "devgate/redis/url.hpp"

#include <fcntl.h>     // O_RDONLY for the server's stdio
#include <signal.h>    // kill
#include <spawn.h>     // posix_spawnp for redis-server and the example consumer
#include <stdlib.h>    // mkdtemp
#include <sys/wait.h>  // waitpid
#include <unistd.h>    // environ

#include <array>
#include <asio/connect.hpp>
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "devgate/pipeline/pipeline.hpp"
#include "redis_support.hpp"
#include "support.hpp"

extern char** environ;

namespace {

using namespace std::chrono_literals;
using devgate::testing::eventually;
using devgate::testing::loop;
using devgate::testing::numbered;
using devgate::testing::options_for;
using devgate::testing::redis_server;
namespace redis = devgate::redis;

devgate::message make(const devgate::shared_bytes& device, std::uint64_t seq,
                      std::string_view payload) {
  devgate::message m;
  m.device_id = device;
  m.sequence = seq;
  m.payload = devgate::shared_bytes::copy_of(payload);
  return m;
}

long long integer(redis::connection& c, std::initializer_list<std::string_view> argv) {
  const auto r = c.call(argv);
  INFO(r.ec.message() << " " << r.value.str);
  REQUIRE_FALSE(r.ec);
  return r.value.integer;
}

// The (device, seq) pairs of every entry in `stream`, in stream order.
std::vector<std::pair<std::string, std::uint64_t>> entries(redis::connection& c,
                                                           std::string_view stream) {
  const auto r = c.call({"XRANGE", stream, "-", "+"}, 10s);
  REQUIRE_FALSE(r.ec);
  std::vector<std::pair<std::string, std::uint64_t>> out;
  for (const auto& e : r.value.elements) {
    std::string device;
    std::uint64_t seq = 0;
    const auto& f = e.elements.at(1).elements;
    for (std::size_t i = 0; i + 1 < f.size(); i += 2) {
      if (f[i].str == "device") device = f[i + 1].str;
      if (f[i].str == "seq") seq = std::stoull(f[i + 1].str);
    }
    out.emplace_back(device, seq);
  }
  return out;
}

}  // namespace

TEST_CASE("redis URLs: the parts are read, bad ones refused with what is wrong", "[redis][url]") {
  auto u = redis::parse_url("redis://127.0.0.1:6380/2");
  REQUIRE(u);
  REQUIRE(u.value.host == "127.0.0.1");
  REQUIRE(u.value.port == 6380);
  REQUIRE(u.value.db == 2);
  u = redis::parse_url("redis://cache.local");
  REQUIRE(u);
  REQUIRE(u.value.host == "cache.local");
  REQUIRE(u.value.port == 6379);
  REQUIRE(u.value.db == 0);
  u = redis::parse_url("redis://:s3cret@h:7000");
  REQUIRE(u);
  REQUIRE(u.value.username.empty());
  REQUIRE(u.value.password == "s3cret");
  u = redis::parse_url("redis://gw:p@ss@[::1]:7001/15");
  REQUIRE(u);
  REQUIRE(u.value.username == "gw");
  REQUIRE(u.value.password == "p@ss");
  REQUIRE(u.value.host == "::1");
  REQUIRE(u.value.port == 7001);
  REQUIRE(u.value.db == 15);

  const std::pair<const char*, const char*> bad[] = {
      {"http://h:6379", "must start with redis://"},
      {"redis://", "no host"},
      {"redis://:6379", "no host"},
      {"redis://h:", "empty port"},
      {"redis://h:http", "port 'http' is not a number from 1 to 65535"},
      {"redis://h:0", "port '0'"},
      {"redis://h:65536", "port '65536'"},
      {"redis://h:6379/x", "database 'x' is not a number"},
      {"redis://h:6379/-1", "database '-1'"},
      {"redis://[::1:6379", "closing ']'"},
      {"redis://user@h", "credentials must be user:password"},
  };
  for (const auto& [url, why] : bad) {
    const auto r = redis::parse_url(url);
    INFO(url << " -> " << r.error);
    REQUIRE_FALSE(r);
    REQUIRE(r.error.find(why) != std::string::npos);
    REQUIRE(r.error.find("expected redis://") != std::string::npos);
  }
}

TEST_CASE("redis connection: pipelined commands from several threads, answered in order",
          "[redis][connection]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));

  // Each thread issues its INCRs without waiting for any reply: all are in flight together,
  // and each thread's replies must come back in the order it issued them.
  constexpr int threads = 4;
  constexpr long long per_thread = 5000;
  struct seen {
    std::mutex m;
    std::vector<long long> values;
    std::atomic<long long> answered{0};
    std::atomic<long long> max_outstanding{0};
  };
  std::vector<seen> results(threads);
  std::atomic<long long> issued{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      const std::string key = numbered("counter", static_cast<std::uint64_t>(t));
      for (long long i = 0; i < per_thread; ++i) {
        issued.fetch_add(1);
        c.command({"INCR", key}, [&r = results[static_cast<std::size_t>(t)], &issued](
                                     std::error_code ec, const redisReply* reply) {
          // On the loop's thread: recorded here, checked by the test's thread (Catch2's
          // assertions are not thread-safe).
          std::lock_guard lock(r.m);
          r.values.push_back(ec ? -1 : reply->integer);
          const long long outstanding = issued.load() - r.answered.fetch_add(1);
          if (outstanding > r.max_outstanding.load()) r.max_outstanding.store(outstanding);
        });
      }
    });
  }
  for (auto& t : ts) t.join();
  REQUIRE(eventually([&] {
    long long sum = 0;
    for (auto& r : results) sum += r.answered.load();
    return sum == threads * per_thread;
  }));
  long long most = 0;
  for (auto& r : results) {
    std::lock_guard lock(r.m);
    REQUIRE(r.values.size() == static_cast<std::size_t>(per_thread));
    for (long long i = 0; i < per_thread; ++i)
      REQUIRE(r.values[static_cast<std::size_t>(i)] == i + 1);
    most = std::max(most, r.max_outstanding.load());
  }
  // Pipelined: many commands were in flight at once, not one round trip each.
  REQUIRE(most > 100);

  // Binary-safe arguments: bytes a printf-formatted command would mangle go through intact.
  const std::string odd("a\0b %s\r\n*3\r\n", 13);
  REQUIRE_FALSE(c.call({"SET", "odd", odd}).ec);
  const auto back = c.call({"GET", "odd"});
  REQUIRE(back.value.str == odd);
  // An error reply is an error, with Redis's text.
  const auto wrong = c.call({"INCR", "odd"});
  REQUIRE(wrong.ec == redis::errc::error_reply);
  REQUIRE(wrong.value.str.find("not an integer") != std::string::npos);
}

TEST_CASE("redis connection: a drop fails every command in flight; none is dropped silently",
          "[redis][connection][fault]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));
  constexpr int total = 20000;
  std::atomic<int> ok{0};
  std::atomic<int> disconnected{0};
  std::atomic<int> not_connected{0};
  std::atomic<int> other{0};
  std::thread issuer([&] {
    for (int i = 0; i < total; ++i) {
      c.command({"INCR", "n"}, [&](std::error_code ec, const redisReply*) {
        if (!ec) {
          ok.fetch_add(1);
        } else if (ec == redis::errc::disconnected) {
          disconnected.fetch_add(1);
        } else if (ec == redis::errc::not_connected) {
          not_connected.fetch_add(1);
        } else {
          other.fetch_add(1);
        }
      });
    }
  });
  server.stop();
  issuer.join();
  // Every command got its one callback: answered, failed in flight, or refused up front.
  REQUIRE(eventually(
      [&] {
        return ok.load() + disconnected.load() + not_connected.load() + other.load() == total;
      },
      10s));
  REQUIRE(other.load() == 0);
  REQUIRE(ok.load() + disconnected.load() + not_connected.load() == total);
  REQUIRE(eventually([&] { return c.drops() == 1; }, 10s));  // (all may have been answered first)
}

TEST_CASE("redis connection: AUTH and SELECT on connect; a wrong password is reported",
          "[redis][connection]") {
  redis_server server({"--requirepass", "s3cret"});
  loop l;
  {
    redis::connection c(
        l.io, options_for("redis://:s3cret@127.0.0.1:" + std::to_string(server.port()) + "/3"));
    c.start();
    REQUIRE(c.wait_connected(5s));
    REQUIRE_FALSE(c.call({"SET", "where", "db3"}).ec);
    REQUIRE(integer(c, {"DBSIZE"}) == 1);
    REQUIRE_FALSE(c.call({"SELECT", "0"}).ec);
    REQUIRE(integer(c, {"DBSIZE"}) == 0);
  }
  redis::connection wrong(l.io,
                          options_for("redis://:nope@127.0.0.1:" + std::to_string(server.port())));
  wrong.start();
  REQUIRE_FALSE(wrong.wait_connected(500ms));
  REQUIRE(wrong.failed_connects() >= 1);
  INFO(wrong.last_error());
  REQUIRE(wrong.last_error().find("WRONGPASS") != std::string::npos);
}

TEST_CASE("redis streams sink: a pipeline puts every message into the stream, in order per device",
          "[redis][sink]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));

  redis::streams_sink_options so;
  so.stream = "fleet";
  devgate::pipeline_options po;
  po.pool.workers = 4;
  devgate::pipeline<redis::streams_sink> p(redis::streams_sink(c, so), po);
  REQUIRE_FALSE(p.start());
  constexpr std::uint64_t devices = 16;
  constexpr std::uint64_t per_device = 250;
  std::vector<devgate::shared_bytes> ids;
  for (std::uint64_t d = 0; d < devices; ++d) {
    ids.push_back(devgate::shared_bytes::copy_of(numbered("dev", d)));
  }
  for (std::uint64_t seq = 1; seq <= per_device; ++seq) {
    for (std::uint64_t d = 0; d < devices; ++d) {
      REQUIRE_FALSE(p.push(make(ids[d], seq, numbered("reading ", seq))));
    }
  }
  p.stop();
  const auto m = p.metrics();
  REQUIRE(m.dispatched == devices * per_device);
  REQUIRE(m.dead_lettered == 0);
  REQUIRE(p.sink().sent() == devices * per_device);
  REQUIRE(p.sink().failed() == 0);
  REQUIRE(integer(c, {"XLEN", "fleet"}) == static_cast<long long>(devices * per_device));
  std::map<std::string, std::uint64_t> last;
  for (const auto& [device, seq] : entries(c, "fleet")) {
    REQUIRE(seq == last[device] + 1);  // each device's messages in order, none missing
    last[device] = seq;
  }
  REQUIRE(last.size() == devices);

  // The fields of one entry, and the payload bytes as sent.
  const auto first = c.call({"XRANGE", "fleet", "-", "+", "COUNT", "1"});
  REQUIRE(first.value.elements.size() == 1);
  const auto& f = first.value.elements[0].elements[1].elements;
  REQUIRE(f.size() == 8);
  REQUIRE(f[0].str == "device");
  REQUIRE(f[2].str == "seq");
  REQUIRE(f[4].str == "kind");
  REQUIRE(f[5].str == "text");
  REQUIRE(f[6].str == "payload");
  REQUIRE(f[7].str == "reading 1");
}

TEST_CASE("redis streams sink: per-device streams and approximate MAXLEN trimming",
          "[redis][sink]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));
  redis::streams_sink_options so;
  so.stream = "dev:";
  so.stream_per_device = true;
  so.max_length = 100;
  redis::streams_sink sink(c, so);
  devgate::dispatch_context ctx;
  const auto a = devgate::shared_bytes::copy_of(std::string_view("a"));
  const auto b = devgate::shared_bytes::copy_of(std::string_view("b"));
  for (std::uint64_t seq = 1; seq <= 1000; ++seq) {
    REQUIRE_FALSE(sink.consume(make(a, seq, "x"), ctx));
  }
  REQUIRE_FALSE(sink.consume(make(b, 1, "y"), ctx));
  const auto len_a = integer(c, {"XLEN", "dev:a"});
  REQUIRE(len_a >= 100);
  REQUIRE(len_a < 1000);  // trimmed (by whole nodes: approximately)
  REQUIRE(integer(c, {"XLEN", "dev:b"}) == 1);
  REQUIRE(sink.sent() == 1001);
}

TEST_CASE(
    "redis streams sink: a share goes out whole; one device's error reply fails that device only",
    "[redis][sink][batch]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));
  // "dev:bad" holds a string: every XADD to it is a WRONGTYPE error reply.
  REQUIRE(c.call({"SET", "dev:bad", "not a stream"}).value.str == "OK");
  std::mutex dead_m;
  std::vector<std::pair<std::string, std::uint64_t>> dead;
  std::vector<std::error_code> dead_errors;
  devgate::pipeline_options po;
  po.pool.workers = 1;
  po.demand.min_batch = po.demand.max_batch = 64;  // the lone worker's first share takes all
  po.retry_limit = 1;
  po.retry_backoff = 1ms;
  po.dead_letter = [&](const devgate::message& m, std::error_code ec) {
    std::lock_guard lock(dead_m);
    dead.emplace_back(std::string(m.device_id.view()), m.sequence);
    dead_errors.push_back(ec);
  };
  redis::streams_sink_options so;
  so.stream = "dev:";
  so.stream_per_device = true;
  devgate::pipeline<redis::streams_sink> p(redis::streams_sink(c, so), po);
  const std::array<devgate::shared_bytes, 3> ids{
      devgate::shared_bytes::copy_of(std::string_view("a")),
      devgate::shared_bytes::copy_of(std::string_view("bad")),
      devgate::shared_bytes::copy_of(std::string_view("b"))};
  for (std::uint64_t seq = 1; seq <= 20; ++seq) {
    for (const auto& id : ids) REQUIRE_FALSE(p.push(make(id, seq, "x")));
  }
  REQUIRE_FALSE(p.start());
  p.stop();
  const auto m = p.metrics();
  REQUIRE(m.dispatched == 40);
  REQUIRE(m.dead_lettered == 20);
  REQUIRE(m.retried == 20);  // only the bad device's messages were retried
  REQUIRE(p.sink().sent() == 40);
  REQUIRE(p.sink().failed() == 40);  // 20 in the share, 20 retries
  {
    std::lock_guard lock(dead_m);
    for (std::size_t i = 0; i < dead.size(); ++i) {
      REQUIRE(dead[i] == std::pair<std::string, std::uint64_t>{"bad", i + 1});  // in order
      REQUIRE(dead_errors[i] == redis::errc::error_reply);
    }
  }
  for (const char* stream : {"dev:a", "dev:b"}) {
    std::uint64_t last = 0;
    for (const auto& [device, seq] : entries(c, stream)) REQUIRE(seq == ++last);
    REQUIRE(last == 20);
  }
}

TEST_CASE(
    "redis streams sink: Redis down -> errors, retries, dead letters; restarted -> "
    "reconnects and delivers again",
    "[redis][sink][fault]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));

  std::atomic<std::uint64_t> dead{0};
  std::mutex dead_m;
  std::vector<std::error_code> dead_errors;
  devgate::pipeline_options po;
  po.pool.workers = 2;
  po.retry_limit = 2;
  po.retry_backoff = 1ms;
  po.retry_backoff_max = 5ms;
  po.dead_letter = [&](const devgate::message&, std::error_code ec) {
    std::lock_guard lock(dead_m);
    dead_errors.push_back(ec);
    dead.fetch_add(1);
  };
  redis::streams_sink_options so;
  so.stream = "fleet";
  so.reply_timeout = 300ms;
  devgate::pipeline<redis::streams_sink> p(redis::streams_sink(c, so), po);
  REQUIRE_FALSE(p.start());
  const auto id = devgate::shared_bytes::copy_of(std::string_view("fridge"));

  // Up: everything lands.
  std::uint64_t seq = 0;
  for (int i = 0; i < 500; ++i) REQUIRE_FALSE(p.push(make(id, ++seq, "up")));
  REQUIRE(eventually([&] { return p.metrics().dispatched == 500; }));
  REQUIRE(integer(c, {"XLEN", "fleet"}) == 500);

  // Redis stops while messages keep coming: each is either delivered (Redis took it before it
  // went) or dead-lettered with a Redis error after its retries; none vanishes.
  std::atomic<int> refused{0};
  std::thread producer([&] {
    for (int i = 0; i < 400; ++i) {
      if (p.push(make(id, 500 + i + 1, "during"))) refused.fetch_add(1);
      std::this_thread::sleep_for(1ms);
    }
  });
  std::this_thread::sleep_for(50ms);
  server.stop();
  producer.join();
  REQUIRE(refused.load() == 0);
  seq = 900;
  REQUIRE(eventually([&] {
    const auto m = p.metrics();
    return m.dispatched + m.dead_lettered == 900;
  }));
  const auto during = p.metrics();
  REQUIRE(during.dead_lettered > 0);
  REQUIRE(during.dead_lettered == dead.load());
  REQUIRE(p.sink().sent() == during.dispatched);
  // Each dead letter had retry_limit + 1 failed attempts.
  REQUIRE(p.sink().failed() >= during.dead_lettered * (po.retry_limit + 1));
  {
    std::lock_guard lock(dead_m);
    for (const auto& ec : dead_errors) {
      INFO(ec.message());
      REQUIRE(ec.category() == redis::error_category());
      REQUIRE((ec == redis::errc::not_connected || ec == redis::errc::disconnected ||
               ec == redis::errc::timeout));
    }
  }
  REQUIRE(c.drops() == 1);
  REQUIRE_FALSE(c.connected());

  // Restarted (empty: no persistence): the connection comes back by itself, with backoff.
  std::this_thread::sleep_for(300ms);  // a few failed attempts first
  server.start();
  REQUIRE(c.wait_connected(5s));
  REQUIRE(c.connects() == 2);
  REQUIRE(c.failed_connects() >= 1);
  const auto before = p.metrics();
  for (int i = 0; i < 300; ++i) REQUIRE_FALSE(p.push(make(id, ++seq, "again")));
  REQUIRE(eventually([&] { return p.metrics().dispatched == before.dispatched + 300; }));
  REQUIRE(p.metrics().dead_lettered == before.dead_lettered);
  REQUIRE(integer(c, {"XLEN", "fleet"}) == 300);
  p.stop();
}

TEST_CASE(
    "redis streams sink: a stalled Redis times out; what the pipeline counts delivered is "
    "in the stream",
    "[redis][sink][fault]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));
  devgate::pipeline_options po;
  po.pool.workers = 2;
  po.retry_limit = 1;
  po.retry_backoff = 1ms;
  std::mutex dead_m;
  std::vector<std::uint64_t> dead_seqs;
  std::vector<std::error_code> dead_errors;
  po.dead_letter = [&](const devgate::message& m, std::error_code ec) {
    std::lock_guard lock(dead_m);  // checked on the test's thread below
    dead_seqs.push_back(m.sequence);
    dead_errors.push_back(ec);
  };
  redis::streams_sink_options so;
  so.stream = "fleet";
  so.reply_timeout = 100ms;
  devgate::pipeline<redis::streams_sink> p(redis::streams_sink(c, so), po);
  REQUIRE_FALSE(p.start());
  const auto id = devgate::shared_bytes::copy_of(std::string_view("fridge"));
  server.stall();  // SIGSTOP: connected, but no reply comes
  for (std::uint64_t seq = 1; seq <= 10; ++seq) REQUIRE_FALSE(p.push(make(id, seq, "slow")));
  REQUIRE(eventually([&] { return p.metrics().dead_lettered == 10; }));
  REQUIRE(p.metrics().dispatched == 0);
  REQUIRE(p.sink().failed() == 20);
  {
    std::lock_guard lock(dead_m);
    for (const auto& ec : dead_errors) REQUIRE(ec == redis::errc::timeout);
  }
  server.resume();
  // The late XADDs apply once Redis runs again (at-least-once: the dead letters may also be in
  // the stream); new messages go through again.
  for (std::uint64_t seq = 11; seq <= 20; ++seq) REQUIRE_FALSE(p.push(make(id, seq, "ok")));
  REQUIRE(eventually([&] { return p.metrics().dispatched == 10; }));
  p.stop();
  std::map<std::uint64_t, int> in_stream;
  for (const auto& [device, seq] : entries(c, "fleet")) ++in_stream[seq];
  for (std::uint64_t seq = 11; seq <= 20; ++seq) REQUIRE(in_stream[seq] == 1);
}

namespace {

// One gateway node's side of the topic bridge: its own connections, pubsub and bridge, with a
// host subscriber that records what it receives per topic.
struct bridge_node {
  bridge_node(loop& l, const std::string& url, const std::string& id,
              std::vector<std::string> topics = {})
      : commands(l.io, options_for(url)),
        subscriptions(l.io, options_for(url)),
        bridge(l.io, commands, subscriptions, bus, options(id, std::move(topics))) {
    commands.start();
    subscriptions.start();
  }
  // The bridge delivers on the loop thread until it stops: stop it before `got` and `m` go
  // (members die in reverse order, the bridge after them).
  ~bridge_node() { bridge.stop(); }
  bridge_node(const bridge_node&) = delete;
  bridge_node& operator=(const bridge_node&) = delete;
  static redis::topic_bridge_options options(const std::string& id,
                                             std::vector<std::string> topics) {
    redis::topic_bridge_options o;
    o.node_id = id;
    o.topics = std::move(topics);
    o.interest_refresh = 20ms;
    return o;
  }
  devgate::device::pubsub::token listen(const std::string& topic) {
    return bus.subscribe(topic, [this](std::string_view t, const devgate::shared_bytes& p) {
      std::lock_guard lock(m);
      got[std::string(t)].emplace_back(p.view());
    });
  }
  std::vector<std::string> received(const std::string& topic) {
    std::lock_guard lock(m);
    return got[topic];
  }
  void publish(const std::string& topic, std::string_view text) {
    bus.publish(topic, devgate::shared_bytes::copy_of(text));
  }
  redis::connection commands;
  redis::connection subscriptions;
  devgate::device::pubsub bus;
  redis::topic_bridge bridge;
  std::mutex m;
  std::map<std::string, std::vector<std::string>> got;
};

}  // namespace

TEST_CASE("redis topic bridge: a publish on one node reaches every node's subscribers once",
          "[redis][topics]") {
  redis_server server;
  loop l;
  bridge_node a(l, server.url(), "a"), b(l, server.url(), "b"), c(l, server.url(), "c");
  a.listen("alerts");
  b.listen("alerts");
  const auto c_token = c.listen("alerts");
  for (auto* n : {&a, &b, &c}) n->bridge.start();
  // Each node learns that the others subscribe (PUBSUB NUMSUB, every 20 ms).
  REQUIRE(eventually([&] {
    return a.bridge.remote_subscribers("alerts") == 2 &&
           b.bridge.remote_subscribers("alerts") == 2 && c.bridge.remote_subscribers("alerts") == 2;
  }));
  std::vector<std::string> sent;
  for (int i = 0; i < 100; ++i) {
    sent.push_back(numbered("alert ", i));
    a.publish("alerts", sent.back());
  }
  sent.emplace_back(std::string("\0binary\n\xff", 9));  // any bytes travel
  a.bus.publish("alerts", devgate::shared_bytes::copy_of(std::string_view(sent.back())),
                devgate::payload_kind::binary);
  REQUIRE(eventually([&] { return b.received("alerts").size() == 101; }));
  REQUIRE(eventually([&] { return c.received("alerts").size() == 101; }));
  CHECK(b.received("alerts") == sent);  // in order, byte for byte
  CHECK(c.received("alerts") == sent);
  CHECK(a.received("alerts") == sent);  // the publisher's own node: once, not again from Redis
  // Redis answers A's PUBLISHes after it handed the messages on: counted soon after.
  REQUIRE(eventually([&] { return a.bridge.forwarded() == 101; }));
  // Its own, handed back by Redis (A subscribes too) and skipped.
  REQUIRE(eventually([&] { return a.bridge.ignored() == 101; }));

  // Another node publishes: the others get it.
  b.publish("alerts", "from b");
  REQUIRE(eventually([&] { return a.received("alerts").size() == 102; }));
  REQUIRE(eventually([&] { return c.received("alerts").size() == 102; }));
  CHECK(a.received("alerts").back() == "from b");

  // A topic nobody subscribes to: after the first publish (not known yet: sent), nothing goes
  // to Redis.
  a.publish("nobody", "x");
  REQUIRE(eventually([&] { return a.bridge.remote_subscribers("nobody") == 0; }));
  CHECK_FALSE(a.bridge.remote_interest("nobody"));
  REQUIRE(eventually([&] { return a.bridge.forwarded() == 102; }));  // that first one
  const auto forwarded = a.bridge.forwarded();
  for (int i = 0; i < 50; ++i) a.publish("nobody", "x");
  std::this_thread::sleep_for(50ms);
  CHECK(a.bridge.forwarded() == forwarded);
  CHECK_FALSE(a.bus.has_subscribers("nobody"));

  // C's last subscriber leaves: C unsubscribes the channel and gets nothing more.
  c.bus.unsubscribe(c_token);
  const auto c_messages = c.subscriptions.messages();
  std::this_thread::sleep_for(100ms);  // the UNSUBSCRIBE reaches Redis
  b.publish("alerts", "after c left");
  REQUIRE(eventually([&] { return a.received("alerts").size() == 103; }));
  std::this_thread::sleep_for(50ms);
  CHECK(c.subscriptions.messages() == c_messages);
  CHECK(c.received("alerts").size() == 102);

  // A node that relays only "alerts" keeps its "stats" to itself.
  bridge_node d(l, server.url(), "d", {"alerts"});
  d.listen("stats");
  a.listen("stats");
  d.bridge.start();
  REQUIRE(eventually([&] { return a.bridge.remote_subscribers("stats") == 0; }));
  d.publish("stats", "d's own");
  a.publish("stats", "a's own");
  std::this_thread::sleep_for(100ms);
  CHECK(a.received("stats") == std::vector<std::string>{"a's own"});
  CHECK(d.received("stats") == std::vector<std::string>{"d's own"});
  CHECK_FALSE(d.bridge.remote_interest("stats"));
}

TEST_CASE(
    "redis topic bridge: Redis down -> local subscribers still served, the misses counted; "
    "back -> resubscribed",
    "[redis][topics][fault]") {
  redis_server server;
  loop l;
  bridge_node a(l, server.url(), "a"), b(l, server.url(), "b");
  a.listen("log");
  b.listen("log");
  a.bridge.start();
  b.bridge.start();
  REQUIRE(eventually([&] { return a.bridge.remote_subscribers("log") == 1; }));
  a.publish("log", "before");
  REQUIRE(eventually([&] { return b.received("log").size() == 1; }));

  server.stop();
  REQUIRE(eventually([&] { return !a.commands.connected() && !b.subscriptions.connected(); }));
  for (int i = 0; i < 10; ++i) a.publish("log", "during");
  CHECK(a.received("log").size() == 11);                                 // served locally
  REQUIRE(eventually([&] { return a.bridge.forward_failed() == 10; }));  // none lost silently
  CHECK(b.received("log").size() == 1);

  server.start();
  REQUIRE(a.commands.wait_connected(5s));
  REQUIRE(b.subscriptions.wait_connected(5s));
  // B subscribes again on its reconnect; A's publishes reach it once Redis counts it.
  REQUIRE(eventually([&] {
    a.publish("log", "after");
    return b.received("log").size() > 1;
  }));
  CHECK(b.received("log").back() == "after");
  CHECK(b.subscriptions.connects() == 2);
}

#ifdef DEVGATE_REDIS_CONSUMER
TEST_CASE("redis example consumer: claims a dead consumer's pending entries (XAUTOCLAIM)",
          "[redis][example]") {
  redis_server server;
  loop l;
  redis::connection c(l.io, options_for(server.url()));
  c.start();
  REQUIRE(c.wait_connected(5s));
  for (int i = 1; i <= 10; ++i) {
    REQUIRE_FALSE(
        c.call({"XADD", "fleet", "*", "device", "fridge", "payload", numbered("m", i)}).ec);
  }
  REQUIRE_FALSE(c.call({"XGROUP", "CREATE", "fleet", "workers", "0"}).ec);
  // A consumer reads four entries and dies before acknowledging them.
  const auto taken =
      c.call({"XREADGROUP", "GROUP", "workers", "dead", "COUNT", "4", "STREAMS", "fleet", ">"});
  REQUIRE_FALSE(taken.ec);
  REQUIRE(taken.value.elements.at(0).elements.at(1).elements.size() == 4);
  std::this_thread::sleep_for(150ms);  // idle past --min-idle-ms

  int out[2];
  REQUIRE(::pipe(out) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  std::vector<std::string> args = {
      DEVGATE_REDIS_CONSUMER, server.url(), "fleet", "workers", "alive", "--min-idle-ms", "100",
      "--exit-when-idle-ms",  "300"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  REQUIRE(::posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ) == 0);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  std::string printed;
  char buf[4096];
  for (ssize_t n = 0; (n = ::read(out[0], buf, sizeof buf)) > 0;) {
    printed.append(buf, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  INFO(printed);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  REQUIRE(printed.find("claimed 4, read 6, acked 10") != std::string::npos);
  REQUIRE(printed.find("payload=m1\n") != std::string::npos);
  // Nothing is left pending: the dead consumer's entries were taken over and acknowledged.
  const auto pending = c.call({"XPENDING", "fleet", "workers"});
  REQUIRE(pending.value.elements.at(0).integer == 0);
}
#endif
