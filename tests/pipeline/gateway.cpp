// The gateway as a composition root: the default intake, an intake and session hooks of its
// owner's (what the device hub is built on), and batches pushed through per-thread producers.
#include "devgate/pipeline/gateway.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
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

namespace {

// A transport that delivers every session's messages on its one network thread, as a reactor
// does: a message handed to `post` reaches the intake on that thread, after the ones before it.
class reactor_transport {
 public:
  void set_handlers(devgate::transport_handlers h) { handlers_ = std::move(h); }
  std::error_code start() {
    thread_ = std::thread([this] { run(); });
    return {};
  }
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  std::error_code send(devgate::session_id, devgate::payload_kind, devgate::shared_bytes) {
    return {};
  }
  std::size_t broadcast(std::span<const devgate::session_id> s, devgate::payload_kind,
                        devgate::shared_bytes) {
    return s.size();
  }
  void close(devgate::session_id, devgate::close_code, std::string_view) {}
  std::size_t buffered_bytes(devgate::session_id) const { return 0; }

  // A device's message arrives on session `s`.
  void post(devgate::session_id s, std::string payload) {
    {
      std::lock_guard lock(mutex_);
      inbox_.push_back({s, std::move(payload)});
    }
    cv_.notify_all();
  }
  // When the network thread got to session `s`'s latest message (or nothing yet).
  std::optional<devgate::clock::time_point> served(devgate::session_id s) {
    std::lock_guard lock(mutex_);
    return s < served_.size() ? served_[s] : std::nullopt;
  }

 private:
  void run() {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [&] { return stopping_ || !inbox_.empty(); });
      if (inbox_.empty()) return;
      auto [s, text] = std::move(inbox_.front());
      inbox_.pop_front();
      if (served_.size() <= s) served_.resize(s + 1);
      served_[s] = devgate::clock::now();
      lock.unlock();
      devgate::inbound_message in;
      in.session = s;
      in.device_id =
          devgate::shared_bytes::copy_of(std::string_view(devgate::testing::numbered("d", s)));
      in.payload = devgate::shared_bytes::copy_of(std::string_view(text));
      (void)handlers_.on_messages(std::span<devgate::inbound_message>(&in, 1));
      lock.lock();
    }
  }

  devgate::transport_handlers handlers_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<devgate::session_id, std::string>> inbox_;
  std::vector<std::optional<devgate::clock::time_point>> served_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

TEST_CASE("attack: a full pipeline with the block policy stalls a network thread",
          "[pipeline][gateway][overflow]") {
  using namespace std::chrono_literals;
  reactor_transport t;
  std::atomic<bool> release{false};
  std::atomic<int> in_sink{0};
  devgate::pipeline_options o;
  o.capacity = 1;
  o.overflow = devgate::overflow_policy::block;
  o.block_timeout = 1s;
  devgate::gateway gw(
      t, devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
        ++in_sink;
        while (!release.load()) std::this_thread::sleep_for(100us);
      }),
      o);
  const auto started = gw.start();
  if (!started) {
    // The attack: device 1 fills the pipeline, its next message makes the network thread wait
    // for room, and device 2, served by the same thread, waits with it.
    t.post(1, "fills the pipeline");
    REQUIRE(devgate::testing::eventually([&] { return in_sink.load() == 1; }));
    t.post(1, "waits for room");
    std::this_thread::sleep_for(10ms);
    const auto sent = devgate::clock::now();
    t.post(2, "an unrelated device");
    REQUIRE(devgate::testing::eventually([&] { return t.served(2).has_value(); }));
    const auto stalled = std::chrono::duration_cast<std::chrono::milliseconds>(*t.served(2) - sent);
    release = true;
    gw.stop();
    FAIL("the network thread was blocked: device 2 waited " << stalled.count() << " ms");
  }
  REQUIRE(started == devgate::errc::would_block);
  REQUIRE_FALSE(gw.metrics().workers_alive);
}

TEST_CASE("attack: drop_oldest with nothing to evict does not stall a network thread",
          "[pipeline][gateway][overflow]") {
  using namespace std::chrono_literals;
  reactor_transport t;
  std::atomic<bool> release{false};
  std::atomic<int> in_sink{0};
  devgate::pipeline_options o;
  o.capacity = 1;
  o.overflow = devgate::overflow_policy::drop_oldest;
  o.block_timeout = 1s;
  devgate::gateway gw(
      t, devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
        ++in_sink;
        while (!release.load()) std::this_thread::sleep_for(100us);
      }),
      o);
  REQUIRE_FALSE(gw.start());
  // Device 1's first message is in the sink: its partition is claimed, nothing can be evicted,
  // so its next message is refused. Device 2, served by the same thread, must not wait for that.
  t.post(1, "fills the pipeline");
  REQUIRE(devgate::testing::eventually([&] { return in_sink.load() == 1; }));
  t.post(1, "finds nothing to evict");
  std::this_thread::sleep_for(10ms);
  const auto sent = devgate::clock::now();
  t.post(2, "an unrelated device");
  REQUIRE(devgate::testing::eventually([&] { return t.served(2).has_value(); }));
  const auto stalled = std::chrono::duration_cast<std::chrono::milliseconds>(*t.served(2) - sent);
  release = true;
  gw.stop();
  INFO("device 2 waited " << stalled.count() << " ms behind device 1's refused push");
  REQUIRE(stalled < 200ms);
  REQUIRE(gw.metrics().rejected >= 1);
}
