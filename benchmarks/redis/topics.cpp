// The cost of a publish that crosses nodes through devgate::redis::topic_bridge: node A
// publishes --messages payloads of --payload bytes on one topic, node B (same process, its own
// connections) has one subscriber to it, and A has none. Both nodes' connections run on one
// loop thread. Printed: messages per second until B received them all, and this process's CPU
// time per message (A's encoding and PUBLISH, B's decoding, copy and delivery; Redis itself
// runs elsewhere), beside the same publishes to a local subscriber without a bridge.
// At most --window messages are on their way at once (Redis drops a subscriber whose output
// buffer passes its pub/sub limit).
//
//   devgate_redis_topics_driver --url redis://127.0.0.1:6379 [--messages N] [--payload B]
//                               [--window W]
#include <sys/resource.h>  // getrusage

#include <CLI/CLI.hpp>

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>
#include <thread>

#include "devgate/device/pubsub.hpp"
#include "devgate/redis/connection.hpp"
#include "devgate/redis/topic_bridge.hpp"
#include "devgate/redis/url.hpp"

namespace {

double cpu_seconds() {
  rusage u{};
  ::getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  std::string url = "redis://127.0.0.1:6379";
  unsigned long messages = 200000;
  unsigned long payload = 64;
  unsigned long window = 5000;
  CLI::App app{"The cost of a topic publish across nodes through devgate::redis::topic_bridge"};
  app.add_option("--url", url, "The Redis server")->capture_default_str();
  app.add_option("--messages", messages, "Messages to publish")->check(CLI::PositiveNumber);
  app.add_option("--payload", payload, "Payload bytes")->capture_default_str();
  app.add_option("--window", window, "Most messages on their way at once")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  const auto parsed = devgate::redis::parse_url(url);
  if (!parsed || messages == 0 || window == 0) {
    std::fprintf(stderr, "%s\n",
                 parsed ? "--messages and --window must be positive" : parsed.error.c_str());
    return 2;
  }
  const auto body = devgate::shared_bytes::copy_of(std::string(payload, 'x'));

  // The baseline: the same publishes to one local host subscriber, no bridge.
  double local_cpu_us = 0;
  {
    devgate::device::pubsub alone;
    std::atomic<unsigned long> got{0};
    alone.subscribe("bench", [&](std::string_view, const devgate::shared_bytes&) { ++got; });
    const double cpu0 = cpu_seconds();
    for (unsigned long i = 0; i < messages; ++i) alone.publish("bench", body);
    local_cpu_us = (cpu_seconds() - cpu0) * 1e6 / static_cast<double>(messages);
  }

  asio::io_context io;
  auto guard = asio::make_work_guard(io);
  std::thread loop([&] { io.run(); });
  devgate::redis::connection_options co;
  co.server = parsed.value;
  devgate::redis::connection a_cmd(io, co), a_sub(io, co), b_cmd(io, co), b_sub(io, co);
  devgate::device::pubsub a, b;
  devgate::redis::topic_bridge_options ao, bo;
  ao.node_id = "a";
  bo.node_id = "b";
  int code = 0;
  {
    devgate::redis::topic_bridge bridge_a(io, a_cmd, a_sub, a, ao);
    devgate::redis::topic_bridge bridge_b(io, b_cmd, b_sub, b, bo);
    std::atomic<unsigned long> received{0};
    b.subscribe("bench", [&](std::string_view, const devgate::shared_bytes& p) {
      if (p.size() == payload) received.fetch_add(1, std::memory_order_relaxed);
    });
    for (auto* c : {&a_cmd, &a_sub, &b_cmd, &b_sub}) c->start();
    bridge_a.start();
    bridge_b.start();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (bridge_a.remote_subscribers("bench") != 1 &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (bridge_a.remote_subscribers("bench") != 1) {
      std::fprintf(stderr, "node b's subscription never showed (is Redis at %s?)\n", url.c_str());
      code = 1;
    } else {
      const double cpu0 = cpu_seconds();
      const auto start = std::chrono::steady_clock::now();
      for (unsigned long i = 0; i < messages; ++i) {
        while (i - received.load(std::memory_order_relaxed) >= window) std::this_thread::yield();
        a.publish("bench", body);
      }
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (received.load() < messages && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double cpu_us = (cpu_seconds() - cpu0) * 1e6 / static_cast<double>(messages);
      std::printf(
          "devgate topic_bridge: %lu messages of %lu bytes, node a -> Redis -> node b: %.0f "
          "msgs/s, "
          "%.2f us CPU per message (both nodes); a local publish %.3f us (received %lu, "
          "forwarded %llu, failed %llu)\n",
          messages, payload, static_cast<double>(received.load()) / seconds, cpu_us, local_cpu_us,
          received.load(), static_cast<unsigned long long>(bridge_a.forwarded()),
          static_cast<unsigned long long>(bridge_a.forward_failed()));
      code = received.load() == messages ? 0 : 1;
    }
    bridge_a.stop();
    bridge_b.stop();
  }
  for (auto* c : {&a_cmd, &a_sub, &b_cmd, &b_sub}) c->stop();
  guard.reset();
  loop.join();
  return code;
}
