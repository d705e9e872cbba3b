// The gateway as a composition root: the default intake, an intake and session hooks of its
// owner's (what the device hub is built on), and batches pushed through per-thread producers.
#include "devgate/pipeline/gateway.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "devgate/transport/in_process.hpp"

#include "support.hpp"

namespace {

devgate::message make(const std::string& device, std::uint64_t seq) {
  devgate::message m;
  m.device_id = devgate::shared_bytes::copy_of(std::string_view(device));
  m.sequence = seq;
  m.payload = devgate::shared_bytes::copy_of(std::string_view(std::to_string(seq)));
  return m;
}

// Records what the sink saw, per device, in dispatch order.
struct recorder {
  std::mutex mutex;
  std::vector<std::string> seen;
  void add(const devgate::message& m) {
    std::lock_guard lock(mutex);
    seen.push_back(std::string(m.device_id.view()) + ":" + std::string(m.payload.view()));
  }
};

}  // namespace

TEST_CASE("gateway: an owner's intake and session hooks replace the default intake",
          "[pipeline][gateway]") {
  devgate::in_process_transport t;
  recorder rec;
  devgate::gateway gw(t, devgate::callback_sink([&](const devgate::message& m,
                                                    devgate::dispatch_context&) { rec.add(m); }));
  std::vector<std::string> opened;
  std::vector<devgate::close_code> closed;
  std::vector<std::size_t> batch_sizes;
  devgate::session_hooks hooks;
  hooks.on_open = [&](const devgate::session_info& info) { opened.push_back(info.device_id); };
  hooks.on_close = [&](devgate::session_id, devgate::close_code c) { closed.push_back(c); };
  // The intake takes messages starting with "+" (pushing them with the gateway's push), and
  // refuses the rest of the batch from the first one that does not.
  auto intake = [&](std::span<devgate::inbound_message> batch) -> devgate::batch_result {
    batch_sizes.push_back(batch.size());
    std::size_t n = 0;
    while (n < batch.size() && batch[n].payload.view().starts_with("+")) ++n;
    std::vector<devgate::message> accepted;
    for (std::size_t i = 0; i < n; ++i) {
      accepted.push_back(devgate::message::from(std::move(batch[i])));
    }
    const auto r = gw.push(std::span<devgate::message>(accepted));
    if (r.error || n == batch.size()) return r;
    return {n, devgate::errc::unknown_session};
  };
  REQUIRE_FALSE(gw.start(intake, std::move(hooks)));
  auto lamp = t.connect("lamp");
  REQUIRE(opened == std::vector<std::string>{"lamp"});
  REQUIRE_FALSE(lamp.push("+on"));
  REQUIRE(lamp.push("off") == devgate::errc::unknown_session);  // the refusal reaches the device
  REQUIRE_FALSE(lamp.push("+dim"));
  lamp.disconnect();
  REQUIRE(closed == std::vector<devgate::close_code>{devgate::close_code::normal});
  gw.stop();
  // The in-process transport hands over one message per call.
  REQUIRE(batch_sizes == std::vector<std::size_t>{1, 1, 1});
  REQUIRE(rec.seen == std::vector<std::string>{"lamp:+on", "lamp:+dim"});
  REQUIRE(gw.metrics().enqueued == 2);
}

TEST_CASE("gateway: batches pushed from several threads keep each thread's order",
          "[pipeline][gateway][bulk]") {
  devgate::in_process_transport t;
  recorder rec;
  devgate::pipeline_options o;
  o.capacity = 1u << 16;
  devgate::gateway gw(t,
                      devgate::callback_sink([&](const devgate::message& m,
                                                 devgate::dispatch_context&) { rec.add(m); }),
                      o);
  REQUIRE_FALSE(gw.start());
  constexpr int threads = 4;
  constexpr int batches = 50;
  constexpr int per_batch = 8;
  std::vector<std::thread> producers;
  std::atomic<int> refused{0};
  for (int p = 0; p < threads; ++p) {
    producers.emplace_back([&, p] {
      const std::string device = devgate::testing::numbered("d", static_cast<std::uint64_t>(p));
      std::uint64_t seq = 0;
      for (int b = 0; b < batches; ++b) {
        std::vector<devgate::message> batch;
        for (int i = 0; i < per_batch; ++i) batch.push_back(make(device, ++seq));
        const auto r = gw.push(std::span<devgate::message>(batch));
        if (r.error || r.accepted != batch.size()) ++refused;
      }
    });
  }
  for (auto& th : producers) th.join();
  gw.stop();
  REQUIRE(refused == 0);
  REQUIRE(rec.seen.size() == static_cast<std::size_t>(threads * batches * per_batch));
  std::vector<std::uint64_t> last(threads, 0);
  for (const auto& s : rec.seen) {
    const auto colon = s.find(':');
    const auto p = std::stoul(s.substr(1, colon - 1));
    const auto seq = std::stoull(s.substr(colon + 1));
    REQUIRE(seq == last[p] + 1);  // in order per device, whatever the worker
    last[p] = seq;
  }
  // After stop, a batch is refused whole and left as it was.
  std::vector<devgate::message> late{make("late", 1)};
  const auto r = gw.push(std::span<devgate::message>(late));
  REQUIRE(r.accepted == 0);
  REQUIRE(r.error == devgate::errc::closed);
  REQUIRE(late[0].payload.view() == "1");
}
