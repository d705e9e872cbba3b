// A reconnect storm: N devices connect and say hello (each subscribes to `fleet`), then all
// leave, as after a gateway restart or a network blip.
//  - pubsub_storm: the subscriptions alone (`subscribe(fleet, s)` then `unsubscribe_all(s)`
//    for every session), the cost that grows with the number of subscribers;
//  - hub_storm: whole sessions through the hub over the in-process transport (open, hello,
//    welcome, close), N distinct devices.
// Run: devgate_bench_device --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>
#include <vector>

#include "devgate/device/hub.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/device/pubsub.hpp"
#include "devgate/transport/in_process.hpp"

namespace {

void pubsub_storm(benchmark::State& state) {
  const auto n = static_cast<devgate::session_id>(state.range(0));
  for (auto _ : state) {
    devgate::device::pubsub bus;
    for (devgate::session_id s = 1; s <= n; ++s) bus.subscribe(devgate::device::topics::fleet, s);
    for (devgate::session_id s = 1; s <= n; ++s) bus.unsubscribe_all(s);
    benchmark::DoNotOptimize(bus.has_subscribers(devgate::device::topics::fleet));
  }
  state.counters["sessions_per_s"] =
      benchmark::Counter(static_cast<double>(n) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}
BENCHMARK(pubsub_storm)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);

void hub_storm(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<std::string> ids;
  for (std::size_t i = 0; i < n; ++i) {
    std::string id = "storm-";
    id += std::to_string(i);
    ids.push_back(std::move(id));
  }
  const std::string hello = R"({"type":"hello","protocol":1,"last_seq":0})";
  devgate::in_process_transport t;
  devgate::device::hub<devgate::in_process_transport> hub(t);
  if (hub.start()) {
    state.SkipWithError("hub did not start");
    return;
  }
  std::vector<devgate::in_process_transport::session> sessions;
  sessions.reserve(n);
  for (auto _ : state) {
    for (const auto& id : ids) {
      sessions.push_back(t.connect(id));
      (void)sessions.back().push(hello);
    }
    for (auto& s : sessions) s.disconnect();
    sessions.clear();
  }
  hub.stop();
  state.counters["sessions_per_s"] =
      benchmark::Counter(static_cast<double>(n) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}
BENCHMARK(hub_storm)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
