// devgate_device_bench_server: the devgate device path as a user builds it, for the device-path
// benchmarks (benchmarks/README.md, benchmarks/run.sh --device).
//
//   devgate_device_bench_server [--port N] [--threads N] [--workers N]
//                               [--store memory|sqlite --state-dir DIR --sync normal|full]
//                               [--store redis --redis redis://HOST:PORT]
//                               [--ack on_accept|on_dispatch] [--commit-delay-us N]
//
// A device::hub over websocket::server (protocol v1 at /ws/<device_id>, docs/PROTOCOL.md) with
// the memory state store (or the SQLite one, for the durability figures, or the Redis one shared
// by cluster nodes, when built with hiredis) and a sink that only
// counts what it receives. The count is read off the measured path with a plain HTTP GET /count
// (answer: {"count":N,"dispatched":N,"enqueued":N}), so the generator can check that the sink
// received every message a device saw acknowledged.
//
// Prints "listening on <port>" once ready; stops on SIGINT/SIGTERM.

#include <CLI/CLI.hpp>

#include <atomic>        // the sink's count
#include <chrono>        // the store's commit delay
#include <cstdint>       // counters
#include <cstdio>        // std::printf
#include <filesystem>    // the state directory
#include <string>        // the /count body
#include <string_view>   // arguments, routes
#include <system_error>  // sink results

#include "devgate/core/stop_signals.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/hub.hpp"
#include "devgate/store/sqlite_state_store.hpp"
#ifdef DEVGATE_BENCH_REDIS
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <thread>

#include "devgate/redis/state_store.hpp"
#include "devgate/redis/url.hpp"
#endif
#include "devgate/websocket/server.hpp"

namespace {

// The sink of the benchmark: the least a sink can do, so the figures are the hub's own cost.
struct counting_sink {
  std::atomic<std::uint64_t>* count;
  std::error_code consume(const devgate::message&, devgate::dispatch_context&) {
    count->fetch_add(1, std::memory_order_relaxed);
    return {};
  }
};

template <class Store>
using bench_hub = devgate::device::hub<devgate::websocket::server, counting_sink, Store>;

devgate::websocket::http_reply text_reply(int status, std::string body) {
  devgate::websocket::http_reply r;
  r.status = status;
  r.content_type = "application/json";
  r.body = devgate::shared_bytes::copy_of(std::string_view(body));
  r.extra_headers = "Cache-Control: no-store\r\n";
  return r;
}

// Serves until SIGINT/SIGTERM with `store` as the hub's state store.
template <class Store>
int serve(devgate::websocket::server_options options, devgate::device::hub_options ho, Store store,
          devgate::stop_signals& stop) {
  std::atomic<std::uint64_t> count{0};
  std::atomic<bench_hub<Store>*> hub_ptr{nullptr};
  options.identify = devgate::device::identify_device;
  options.route = [&](const devgate::websocket::http_request& req) {
    if (req.target != "/count") return text_reply(404, "{\"error\":\"GET /count\"}\n");
    std::string body = "{\"count\":" + std::to_string(count.load(std::memory_order_relaxed));
    if (auto* hub = hub_ptr.load()) {
      const auto s = hub->stats();
      body += ",\"dispatched\":" + std::to_string(s.dispatched) +
              ",\"enqueued\":" + std::to_string(s.enqueued);
    }
    return text_reply(200, body + "}\n");
  };
  devgate::websocket::server transport(options);
  bench_hub<Store> hub(transport, counting_sink{&count}, ho, std::move(store));
  hub_ptr = &hub;
  if (const auto ec = hub.start()) {
    std::fprintf(stderr, "devgate_device_bench_server: %s\n", ec.message().c_str());
    return 1;
  }
  std::printf("listening on %u\n", static_cast<unsigned>(transport.local_port()));
  std::fflush(stdout);
  stop.wait();
  hub_ptr = nullptr;
  hub.stop();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  devgate::websocket::server_options options;
  options.address = "127.0.0.1";
  options.port = 9102;
  options.threads = 1;
  std::size_t workers = 1;
  std::string store = "memory";
  std::string state_dir = "devgate-bench-data";
  std::string sync = "normal";
  std::string ack = "on_accept";
  long commit_delay_us = -1;
  CLI::App app{"devgate device-path benchmark server: hub + counting sink"};
  app.add_option("--port", options.port, "TCP port");
  app.add_option("--threads", options.threads, "network threads");
  app.add_option("--workers", workers, "pipeline workers (fixed)");
  std::string redis_url = "redis://127.0.0.1:6379";
  app.add_option("--store", store, "state store")
      ->check(CLI::IsMember({"memory", "sqlite", "redis"}));
  app.add_option("--redis", redis_url, "the Redis server (--store redis)");
  app.add_option("--state-dir", state_dir, "directory of the SQLite database (--store sqlite)");
  app.add_option("--sync", sync, "SQLite synchronous level")
      ->check(CLI::IsMember({"normal", "full"}));
  app.add_option("--ack", ack, "when a send is answered")
      ->check(CLI::IsMember({"on_accept", "on_dispatch"}));
  app.add_option("--commit-delay-us", commit_delay_us,
                 "store thread's wait for a fuller batch (default: the hub's)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);

  devgate::stop_signals stop;  // caught from here on; serve() waits for them

  devgate::device::hub_options ho;
  ho.pipeline.pool.workers = workers;
  ho.pipeline.pool.min_workers = workers;
  ho.pipeline.pool.max_workers = workers;
  ho.ack = ack == "on_dispatch" ? devgate::device::ack_policy::on_dispatch
                                : devgate::device::ack_policy::on_accept;
  if (commit_delay_us >= 0)
    ho.store_group_commit.delay = std::chrono::microseconds(commit_delay_us);
  // The benchmark's dashboards subscribe to the server log (devices may not by default).
  ho.may_subscribe = devgate::device::allow_topics({"fleet", "server", "stats"});
  if (store == "memory") return serve(options, ho, devgate::store::memory_state_store{}, stop);
  if (store == "redis") {
#ifdef DEVGATE_BENCH_REDIS
    const auto url = devgate::redis::parse_url(redis_url);
    if (!url) {
      std::fprintf(stderr, "devgate_device_bench_server: --redis: %s\n", url.error.c_str());
      return 2;
    }
    asio::io_context io;
    auto guard = asio::make_work_guard(io);
    devgate::redis::connection_options co;
    co.server = url.value;
    devgate::redis::connection commands(io, co), control(io, co);
    devgate::redis::state_store_options so;
    so.node_id = "bench";
    devgate::redis::state_store shared(io, commands, control, so);
    commands.start();
    control.start();
    shared.start();
    std::thread loop([&] { io.run(); });
    if (!commands.wait_connected(std::chrono::seconds(5))) {
      std::fprintf(stderr, "devgate_device_bench_server: no Redis at %s\n", redis_url.c_str());
    }
    const int rc = serve(options, ho, shared, stop);
    shared.stop();
    commands.stop();
    control.stop();
    guard.reset();
    loop.join();
    return rc;
#else
    std::fprintf(stderr, "devgate_device_bench_server: built without hiredis (--store redis)\n");
    return 2;
#endif
  }
  std::filesystem::create_directories(state_dir);
  devgate::store::sqlite_options so;
  so.path = (std::filesystem::path(state_dir) / "devgate.db").string();
  so.durability = sync == "full" ? devgate::store::sqlite_synchronous::full
                                 : devgate::store::sqlite_synchronous::normal;
  return serve(options, ho, devgate::store::sqlite_state_store(so), stop);
}
