// The few-line embedding: a gateway with default policies, the in-process transport and a
// callback sink. Pushes a few device messages, stops (draining), prints who dispatched what.
#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

#include "devgate/devgate.hpp"

int main() {
  devgate::in_process_transport transport;
  std::mutex mutex;  // the sink runs on worker threads
  std::vector<std::string> lines;

  devgate::gateway gateway(
      transport,
      devgate::callback_sink([&](const devgate::message& m, devgate::dispatch_context& ctx) {
        std::lock_guard lock(mutex);
        lines.push_back("worker " + std::to_string(ctx.worker_id) + " <- " +
                        std::string(m.device_id.view()) + " #" + std::to_string(m.sequence) + ": " +
                        std::string(m.payload.view()));
      }));
  if (auto ec = gateway.start()) {
    std::fprintf(stderr, "start failed: %s\n", ec.message().c_str());
    return 1;
  }

  auto fridge = transport.connect("fridge");
  auto lamp = transport.connect("lamp");
  for (int i = 1; i <= 3; ++i) {
    (void)fridge.push("temp=" + std::to_string(3 + i));
    (void)lamp.push(i % 2 ? "on" : "off");
  }

  gateway.stop();  // stops intake, dispatches everything queued, joins the workers
  for (const auto& line : lines) std::printf("%s\n", line.c_str());
  std::string metrics;
  gateway.render_prometheus(metrics);
  std::printf("\n%.*s", static_cast<int>(metrics.find("# HELP devgate_rejected")), metrics.c_str());
  return lines.size() == 6 ? 0 : 1;
}
