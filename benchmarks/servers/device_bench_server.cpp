// devgate_device_bench_server: the devgate device path as a user builds it, for the device-path
// benchmarks (benchmarks/README.md, benchmarks/run.sh --device).
//
//   devgate_device_bench_server [--port N] [--threads N] [--workers N]
//
// A device::hub over websocket::server (protocol v1 at /ws/<device_id>, docs/PROTOCOL.md) with
// the memory state store and a sink that only counts what it receives. The count is read off the
// measured path with a plain HTTP GET /count (answer: {"count":N,"dispatched":N,"enqueued":N}),
// so the generator can check that the sink received every message a device saw acknowledged.
//
// Prints "listening on <port>" once ready; stops on SIGINT/SIGTERM.

#include <atomic>        // the sink's count
#include <cstdint>       // counters
#include <cstdio>        // std::printf
#include <cstdlib>       // std::strtoul
#include <string>        // the /count body
#include <string_view>   // arguments, routes
#include <system_error>  // sink results

#include "devgate/core/stop_signals.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/hub.hpp"
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

using bench_hub = devgate::device::hub<devgate::websocket::server, counting_sink>;

devgate::websocket::http_reply text_reply(int status, std::string body) {
  devgate::websocket::http_reply r;
  r.status = status;
  r.content_type = "application/json";
  r.body = devgate::shared_bytes::copy_of(std::string_view(body));
  r.extra_headers = "Cache-Control: no-store\r\n";
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  devgate::websocket::server_options options;
  options.address = "127.0.0.1";
  options.port = 9102;
  options.threads = 1;
  std::size_t workers = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--port" && has_value) {
      options.port = static_cast<std::uint16_t>(std::strtoul(argv[++i], nullptr, 10));
    } else if (arg == "--threads" && has_value) {
      options.threads = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 10));
    } else if (arg == "--workers" && has_value) {
      workers = std::strtoul(argv[++i], nullptr, 10);
    } else {
      std::fprintf(stderr, "usage: %s [--port N] [--threads N] [--workers N]\n", argv[0]);
      return 2;
    }
  }

  devgate::stop_signals stop;  // caught from here on; main() waits for them below

  std::atomic<std::uint64_t> count{0};
  std::atomic<bench_hub*> hub_ptr{nullptr};
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

  devgate::device::hub_options ho;
  ho.pipeline.pool.workers = workers;
  ho.pipeline.pool.min_workers = workers;
  ho.pipeline.pool.max_workers = workers;
  // The benchmark's dashboards subscribe to the server log (devices may not by default).
  ho.may_subscribe = devgate::device::allow_topics({"fleet", "server", "stats"});
  bench_hub hub(transport, counting_sink{&count}, ho);
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
