// XADDs per second through devgate::redis::streams_sink: a pipeline with --workers workers
// pushes --messages messages of --payload bytes from --devices devices into one stream, and the
// rate is messages over the time from the first push until the pipeline drained (every message
// answered by Redis). run_redis.sh runs it beside redis-benchmark's pipelined XADD.
//
//   devgate_redis_sink_driver --url redis://127.0.0.1:6379 [--messages N] [--workers W]
//                            [--devices D] [--payload B] [--stream NAME]
#include <CLI/CLI.hpp>

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "devgate/pipeline/pipeline.hpp"
#include "devgate/redis/connection.hpp"
#include "devgate/redis/streams_sink.hpp"
#include "devgate/redis/url.hpp"

int main(int argc, char** argv) {
  std::string url = "redis://127.0.0.1:6379";
  std::string stream = "bench:sink";
  unsigned long messages = 200000;
  unsigned long workers = 16;
  unsigned long devices = 1000;
  unsigned long payload = 64;
  CLI::App app{"XADDs per second through devgate::redis::streams_sink"};
  app.add_option("--url", url, "The Redis server")->capture_default_str();
  app.add_option("--stream", stream, "The stream (deleted first)")->capture_default_str();
  app.add_option("--messages", messages, "Messages to push")->check(CLI::PositiveNumber);
  app.add_option("--workers", workers, "Pipeline workers")->check(CLI::PositiveNumber);
  app.add_option("--devices", devices, "Devices the messages come from")
      ->check(CLI::PositiveNumber);
  app.add_option("--payload", payload, "Payload bytes")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  const auto parsed = devgate::redis::parse_url(url);
  if (!parsed) {
    std::fprintf(stderr, "%s\n", parsed.error.c_str());
    return 2;
  }
  asio::io_context io;
  auto guard = asio::make_work_guard(io);
  std::thread loop([&] { io.run(); });
  devgate::redis::connection_options co;
  co.server = parsed.value;
  devgate::redis::connection c(io, co);
  c.start();
  // Every way out stops the connection and joins the loop thread.
  auto finish = [&](int code) {
    c.stop();
    guard.reset();
    loop.join();
    return code;
  };
  if (!c.wait_connected(std::chrono::seconds(5))) {
    std::fprintf(stderr, "cannot connect to %s: %s\n", url.c_str(), c.last_error().c_str());
    return finish(1);
  }
  (void)c.call({"DEL", stream});

  devgate::redis::streams_sink_options so;
  so.stream = stream;
  so.max_workers = workers;
  devgate::pipeline_options po;
  po.pool.workers = workers;
  po.capacity = 1u << 20;
  devgate::pipeline<devgate::redis::streams_sink> p(devgate::redis::streams_sink(c, so), po);
  if (p.start()) return finish(1);
  std::vector<devgate::shared_bytes> ids;
  for (unsigned long d = 0; d < devices; ++d) {
    ids.push_back(devgate::shared_bytes::copy_of("device-" + std::to_string(d)));
  }
  const auto body = devgate::shared_bytes::copy_of(std::string(payload, 'x'));
  const auto start = std::chrono::steady_clock::now();
  for (unsigned long i = 0; i < messages; ++i) {
    auto make = [&] {
      devgate::message m;
      m.device_id = ids[i % devices];
      m.sequence = i / devices + 1;
      m.payload = body;
      return m;
    };
    while (p.push(make())) std::this_thread::yield();  // a refused message was not taken
  }
  p.stop();  // drains: returns once every message was answered
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto m = p.metrics();
  const auto len = c.call({"XLEN", stream});
  std::printf(
      "devgate streams_sink: %lu messages, %lu workers, %lu-byte payload: %.0f XADD/s "
      "(sent %llu, failed %llu, XLEN %lld)\n",
      messages, workers, payload, static_cast<double>(m.dispatched) / seconds,
      static_cast<unsigned long long>(p.sink().sent()),
      static_cast<unsigned long long>(p.sink().failed()), len.value.integer);
  return finish(m.dispatched == messages ? 0 : 1);
}
