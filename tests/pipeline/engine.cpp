// The pipeline as a whole: overflow policies, retries and dead letters, stop semantics, the
// dynamic pool's scaling, metrics.
#include "devgate/pipeline/pipeline.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <sys/wait.h>  // waitpid: attacks run in a child
#include <unistd.h>    // fork, alarm

#include "support.hpp"

namespace {

using namespace std::chrono_literals;
using devgate::testing::eventually;
using devgate::testing::numbered;

devgate::message make(const devgate::shared_bytes& device, std::uint64_t seq) {
  devgate::message m;
  m.device_id = device;
  m.sequence = seq;
  return m;
}

// Records what the sink saw, in order.
struct recorder {
  std::mutex mutex;
  std::vector<std::uint64_t> sequences;
  std::vector<std::size_t> workers;
  void add(const devgate::message& m, const devgate::dispatch_context& ctx) {
    std::lock_guard lock(mutex);
    sequences.push_back(m.sequence);
    workers.push_back(ctx.worker_id);
  }
};

auto recording_sink(recorder& r) {
  return devgate::callback_sink(
      [&r](const devgate::message& m, devgate::dispatch_context& ctx) { r.add(m, ctx); });
}

struct fixed_traits : devgate::pipeline_traits {
  using pool_type = devgate::fixed_pool;
};

const auto device = devgate::shared_bytes::copy_of(std::string_view("fridge"));

}  // namespace

TEST_CASE("reject: a full pipeline refuses with queue_full and counts it", "[pipeline][overflow]") {
  recorder r;
  devgate::pipeline_options o;
  o.capacity = 4;
  devgate::pipeline p(recording_sink(r), o);  // not started: nothing leaves the queue
  for (std::uint64_t seq = 1; seq <= 4; ++seq) REQUIRE_FALSE(p.push(make(device, seq)));
  REQUIRE(p.push(make(device, 5)) == devgate::errc::queue_full);
  REQUIRE(p.metrics().rejected == 1);
  REQUIRE(p.metrics().queue_depth == 4);
  p.stop();  // drains: stop starts workers when start() was never called
  REQUIRE(r.sequences == std::vector<std::uint64_t>{1, 2, 3, 4});
  REQUIRE(p.push(make(device, 6)) == devgate::errc::closed);
  const auto m = p.metrics();
  REQUIRE(m.enqueued == 4);
  REQUIRE(m.dispatched == 4);
  REQUIRE(m.queue_depth == 0);
}

TEST_CASE("drop_oldest: the oldest queued message makes room and is reported",
          "[pipeline][overflow]") {
  recorder r;
  std::vector<std::uint64_t> dropped;
  devgate::pipeline_options o;
  o.capacity = 3;
  o.overflow = devgate::overflow_policy::drop_oldest;
  o.on_dropped = [&](const devgate::message& m) { dropped.push_back(m.sequence); };
  devgate::pipeline p(recording_sink(r), o);
  for (std::uint64_t seq = 1; seq <= 5; ++seq) REQUIRE_FALSE(p.push(make(device, seq)));
  REQUIRE(dropped == std::vector<std::uint64_t>{1, 2});
  REQUIRE(p.metrics().dropped == 2);
  p.stop();
  REQUIRE(r.sequences == std::vector<std::uint64_t>{3, 4, 5});
}

TEST_CASE("block: a push waits for room, then rejects at its timeout", "[pipeline][overflow]") {
  SECTION("no worker frees room: rejected after the timeout") {
    recorder r;
    devgate::pipeline_options o;
    o.capacity = 2;
    o.overflow = devgate::overflow_policy::block;
    o.block_timeout = 20ms;
    devgate::pipeline p(recording_sink(r), o);
    REQUIRE_FALSE(p.push(make(device, 1)));
    REQUIRE_FALSE(p.push(make(device, 2)));
    REQUIRE(p.push(make(device, 3)) == devgate::errc::queue_full);
    REQUIRE(p.metrics().rejected == 1);
  }
  SECTION("a slow sink frees room: every push eventually succeeds") {
    std::atomic<int> seen{0};
    devgate::pipeline_options o;
    o.capacity = 2;
    o.overflow = devgate::overflow_policy::block;
    o.block_timeout = 10s;
    devgate::pipeline p(
        devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
          std::this_thread::sleep_for(50us);
          ++seen;
        }),
        o);
    REQUIRE_FALSE(p.start());
    for (std::uint64_t seq = 1; seq <= 200; ++seq) REQUIRE_FALSE(p.push(make(device, seq)));
    p.stop();
    REQUIRE(seen == 200);
    REQUIRE(p.metrics().rejected == 0);
  }
}

TEST_CASE("failures are retried with backoff, then dead-lettered with the error",
          "[pipeline][sink]") {
  std::atomic<int> attempts{0};
  std::vector<std::pair<std::uint64_t, std::error_code>> dead;
  std::mutex dead_mutex;
  devgate::pipeline_options o;
  o.retry_limit = 2;
  o.retry_backoff = 100us;
  o.dead_letter = [&](const devgate::message& m, std::error_code ec) {
    std::lock_guard lock(dead_mutex);
    dead.emplace_back(m.sequence, ec);
  };
  devgate::pipeline p(
      devgate::callback_sink(
          [&](const devgate::message& m, devgate::dispatch_context& ctx) -> std::error_code {
            ++attempts;
            if (m.sequence == 1 && ctx.attempt < 2) return devgate::errc::backpressure;  // 3rd ok
            if (m.sequence == 2) return devgate::errc::timeout;  // always fails
            return {};
          }),
      o);
  REQUIRE_FALSE(p.start());
  REQUIRE_FALSE(p.push(make(device, 1)));
  REQUIRE_FALSE(p.push(make(device, 2)));
  REQUIRE_FALSE(p.push(make(device, 3)));
  p.stop();
  REQUIRE(attempts == 3 + 3 + 1);
  const auto m = p.metrics();
  REQUIRE(m.dispatched == 2);
  REQUIRE(m.retried == 4);
  REQUIRE(m.dead_lettered == 1);
  REQUIRE(dead.size() == 1);
  REQUIRE(dead[0].first == 2);
  REQUIRE(dead[0].second == devgate::errc::timeout);
}

TEST_CASE("stop with a deadline hands back what it did not dispatch, in order",
          "[pipeline][lifecycle]") {
  recorder r;
  devgate::pipeline_options o;
  o.pool.workers = 1;
  o.demand.max_batch = 8;
  devgate::pipeline<devgate::callback_sink<
                        std::function<void(const devgate::message&, devgate::dispatch_context&)>>,
                    fixed_traits>
      p(devgate::callback_sink<
            std::function<void(const devgate::message&, devgate::dispatch_context&)>>(
            [&](const devgate::message& m, devgate::dispatch_context& ctx) {
              std::this_thread::sleep_for(1ms);
              r.add(m, ctx);
            }),
        o);
  REQUIRE_FALSE(p.start());
  constexpr std::uint64_t total = 2000;  // ~2 s of work: far more than the deadline allows
  for (std::uint64_t seq = 1; seq <= total; ++seq) REQUIRE_FALSE(p.push(make(device, seq)));
  auto left = p.stop(devgate::clock::now() + 20ms);
  REQUIRE_FALSE(left.empty());
  REQUIRE(r.sequences.size() + left.size() == total);
  // Dispatched messages are a prefix; the handed-back ones continue the sequence.
  for (std::size_t i = 0; i < r.sequences.size(); ++i) REQUIRE(r.sequences[i] == i + 1);
  for (std::size_t i = 0; i < left.size(); ++i) {
    REQUIRE(left[i].sequence == r.sequences.size() + i + 1);
  }
  const auto m = p.metrics();
  REQUIRE(m.handed_back == left.size());
  REQUIRE(m.queue_depth == 0);
  REQUIRE(p.push(make(device, total + 1)) == devgate::errc::closed);
}

TEST_CASE("the dynamic pool scales up under a burst and back down afterwards", "[pipeline][pool]") {
  std::atomic<std::uint64_t> seen{0};
  devgate::pipeline_options o;
  o.pool.min_workers = 1;
  o.pool.max_workers = 4;
  o.pool.scale_up_backlog = 50;
  o.pool.scale_up_after = 2ms;
  o.pool.idle_before_retire = 100ms;
  o.capacity = 100000;
  devgate::pipeline p(
      devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
        std::this_thread::sleep_for(100us);
        ++seen;
      }),
      o);
  REQUIRE_FALSE(p.start());
  REQUIRE(p.metrics().workers_alive == 1);
  std::vector<devgate::shared_bytes> devices;
  for (int d = 0; d < 64; ++d) devices.push_back(devgate::shared_bytes::copy_of(numbered("d", d)));
  constexpr std::uint64_t burst = 20000;
  for (std::uint64_t i = 0; i < burst; ++i)
    REQUIRE_FALSE(p.push(make(devices[i % 64], i / 64 + 1)));
  std::uint64_t peak = 0;
  REQUIRE(eventually([&] {
    peak = std::max<std::uint64_t>(peak, p.metrics().workers_alive);
    return peak > 1;
  }));
  REQUIRE(eventually([&] { return seen.load() == burst; }, 120s));
  REQUIRE(eventually([&] { return p.metrics().workers_alive == 1; }));
  p.stop();
  REQUIRE(p.metrics().workers_alive == 0);
  std::string text;
  p.render_prometheus(text);
  REQUIRE(text.find("devgate_dispatched_total 20000\n") != std::string::npos);
}

namespace {

// A pool policy of the user's own: one worker per `scale_up_backlog` waiting messages (in steps),
// up to `max_workers`, starting with one; a worker idle for 20 ms always asks to retire, and the
// pool keeps the last one.
class backlog_steps_pool {
 public:
  explicit backlog_steps_pool(const devgate::pool_options& o)
      : step_(o.scale_up_backlog), most_(o.max_workers) {
    if (step_ == 0) throw std::invalid_argument("backlog_steps_pool: scale_up_backlog >= 1");
  }
  std::size_t max_workers() const noexcept { return most_; }
  static std::size_t initial_workers() noexcept { return 1; }
  bool add_worker(const devgate::pool_sample& s) const noexcept {
    return s.alive < std::min(most_, 1 + s.backlog / step_);
  }
  static devgate::clock::duration idle_wait() noexcept { return 20ms; }
  static bool may_retire(std::size_t /*alive*/) noexcept { return true; }

 private:
  std::size_t step_;
  std::size_t most_;
};
static_assert(devgate::pool_policy<backlog_steps_pool>);

struct backlog_steps_traits : devgate::pipeline_traits {
  using pool_type = backlog_steps_pool;
};

}  // namespace

TEST_CASE("a pool policy of the user's own drives a real pipeline", "[pipeline][pool]") {
  std::mutex mutex;
  std::vector<std::vector<std::uint64_t>> seen(64);
  std::atomic<std::size_t> highest_worker{0};
  devgate::pipeline_options o;
  o.pool.max_workers = 3;
  o.pool.scale_up_backlog = 100;
  o.capacity = 100000;
  using sink_t = devgate::callback_sink<
      std::function<void(const devgate::message&, devgate::dispatch_context&)>>;
  devgate::pipeline<sink_t, backlog_steps_traits> p(
      sink_t([&](const devgate::message& m, devgate::dispatch_context& ctx) {
        std::this_thread::sleep_for(100us);
        auto top = highest_worker.load();
        while (ctx.worker_id > top && !highest_worker.compare_exchange_weak(top, ctx.worker_id)) {
        }
        std::lock_guard lock(mutex);
        seen[m.session].push_back(m.sequence);
      }),
      o);
  REQUIRE_FALSE(p.start());
  REQUIRE(p.metrics().workers_alive == 1);
  std::vector<devgate::shared_bytes> devices;
  for (int d = 0; d < 64; ++d) devices.push_back(devgate::shared_bytes::copy_of(numbered("d", d)));
  constexpr std::uint64_t burst = 6400;
  for (std::uint64_t i = 0; i < burst; ++i) {
    auto m = make(devices[i % 64], i / 64 + 1);
    m.session = i % 64;
    REQUIRE_FALSE(p.push(std::move(m)));
  }
  std::uint64_t peak = 0;
  REQUIRE(eventually([&] {
    peak = std::max<std::uint64_t>(peak, p.metrics().workers_alive);
    return peak == 3;  // 6400 waiting: the policy wants min(3, 1 + 6400 / 100) workers
  }));
  REQUIRE(eventually([&] { return p.metrics().dispatched == burst; }, 120s));
  // Idle, every worker asks to retire; the pool keeps the last one, which still takes new work.
  REQUIRE(eventually([&] { return p.metrics().workers_alive == 1; }));
  std::this_thread::sleep_for(60ms);
  REQUIRE(p.metrics().workers_alive == 1);
  auto late = make(devices[0], burst / 64 + 1);
  REQUIRE_FALSE(p.push(std::move(late)));
  REQUIRE(eventually([&] { return p.metrics().dispatched == burst + 1; }));
  p.stop();
  REQUIRE(highest_worker.load() < 3);  // worker ids stay within the policy's slots
  for (std::size_t d = 0; d < seen.size(); ++d) {
    const std::uint64_t expected = d == 0 ? burst / 64 + 1 : burst / 64;
    REQUIRE(seen[d].size() == expected);
    for (std::size_t i = 0; i < seen[d].size(); ++i) REQUIRE(seen[d][i] == i + 1);
  }
  o.pool.scale_up_backlog = 0;
  REQUIRE_THROWS_WITH((devgate::pipeline<sink_t, backlog_steps_traits>(sink_t({}), o)),
                      Catch::Contains("scale_up_backlog"));
}

TEST_CASE("misuse is caught at construction with a clear message", "[pipeline][options]") {
  devgate::pipeline_options o;
  o.capacity = 0;
  REQUIRE_THROWS_WITH(devgate::pipeline(devgate::null_sink{}, o), Catch::Contains("capacity"));
  o = {};
  o.pool.min_workers = 0;
  REQUIRE_THROWS_WITH(devgate::pipeline(devgate::null_sink{}, o), Catch::Contains("min_workers"));
  devgate::pipeline p(devgate::null_sink{});
  REQUIRE_FALSE(p.start());
  REQUIRE(p.start() == devgate::errc::already_running);
}

namespace {

std::vector<devgate::message> batch_of(const devgate::shared_bytes& id, std::uint64_t first,
                                       std::uint64_t count) {
  std::vector<devgate::message> v;
  for (std::uint64_t seq = first; seq < first + count; ++seq) v.push_back(make(id, seq));
  return v;
}

}  // namespace

TEST_CASE("push_bulk accepts a batch in order and stamps it once", "[pipeline][bulk]") {
  recorder r;
  std::mutex stamps_mutex;
  std::vector<devgate::clock::time_point> enqueued;
  std::vector<devgate::clock::time_point> received;
  devgate::pipeline_options o;
  o.pool.workers = 2;
  devgate::pipeline<devgate::callback_sink<
                        std::function<void(const devgate::message&, devgate::dispatch_context&)>>,
                    fixed_traits>
      p(devgate::callback_sink<
            std::function<void(const devgate::message&, devgate::dispatch_context&)>>(
            [&](const devgate::message& m, devgate::dispatch_context& ctx) {
              {
                std::lock_guard lock(stamps_mutex);
                enqueued.push_back(m.enqueued);
                received.push_back(m.received);
              }
              r.add(m, ctx);
            }),
        o);
  auto producer = p.make_producer();
  auto batch = batch_of(device, 1, 10);
  const auto early = devgate::clock::now() - 1h;
  batch[0].received = early;  // a transport's own reading is kept
  const auto result = p.push_bulk(batch, producer);
  REQUIRE(result.accepted == 10);
  REQUIRE_FALSE(result.error);
  REQUIRE(batch[3].device_id.use_count() == 0);  // accepted messages were moved from
  REQUIRE(p.push_bulk(std::span<devgate::message>(), producer).accepted == 0);
  REQUIRE_FALSE(p.start());
  p.stop();
  REQUIRE(r.sequences == std::vector<std::uint64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10});
  REQUIRE(received[0] == early);
  for (std::size_t i = 1; i < enqueued.size(); ++i) {
    REQUIRE(enqueued[i] == enqueued[0]);
    REQUIRE(received[i] == enqueued[0]);  // unset: stamped with the same single reading
  }
  const auto m = p.metrics();
  REQUIRE(m.enqueued == 10);
  REQUIRE(m.dispatched == 10);
}

TEST_CASE("push_bulk keeps each device's order across partitions", "[pipeline][bulk]") {
  std::mutex mutex;
  std::vector<std::vector<std::uint64_t>> seen(8);
  devgate::pipeline_options o;
  o.partitions = 5;  // not a power of two: the modulo path
  o.pool.workers = 2;
  devgate::pipeline<devgate::callback_sink<
                        std::function<void(const devgate::message&, devgate::dispatch_context&)>>,
                    fixed_traits>
      p(devgate::callback_sink<
            std::function<void(const devgate::message&, devgate::dispatch_context&)>>(
            [&](const devgate::message& m, devgate::dispatch_context&) {
              std::lock_guard lock(mutex);
              seen[m.session].push_back(m.sequence);
            }),
        o);
  REQUIRE_FALSE(p.start());
  std::vector<devgate::shared_bytes> ids;
  for (int d = 0; d < 8; ++d) ids.push_back(devgate::shared_bytes::copy_of(numbered("d", d)));
  auto producer = p.make_producer();
  constexpr std::uint64_t per_device = 300;
  std::uint64_t seq = 1;
  while (seq <= per_device) {
    // Runs of one device, then interleaved devices, in batches of varying sizes.
    std::vector<devgate::message> batch;
    for (std::uint64_t k = 0; k < 3 && seq <= per_device; ++k, ++seq) {
      for (std::size_t d = 0; d < ids.size(); ++d) {
        auto m = make(ids[d], seq);
        m.session = d;
        batch.push_back(std::move(m));
      }
    }
    const auto result = p.push_bulk(batch, producer);
    REQUIRE(result.accepted == batch.size());
  }
  p.stop();
  for (const auto& s : seen) {
    REQUIRE(s.size() == per_device);
    for (std::size_t i = 0; i < s.size(); ++i) REQUIRE(s[i] == i + 1);
  }
}

TEST_CASE("push_bulk at capacity: reject leaves the rest untouched and counts it",
          "[pipeline][bulk][overflow]") {
  recorder r;
  devgate::pipeline_options o;
  o.capacity = 4;
  devgate::pipeline p(recording_sink(r), o);  // not started: nothing leaves the queue
  auto producer = p.make_producer();
  auto first = batch_of(device, 1, 1);
  REQUIRE(p.push_bulk(first, producer).accepted == 1);
  auto batch = batch_of(device, 2, 6);
  const auto result = p.push_bulk(batch, producer);
  REQUIRE(result.accepted == 3);
  REQUIRE(result.error == devgate::errc::queue_full);
  REQUIRE(batch[3].sequence == 5);
  REQUIRE(batch[2].device_id.use_count() == 0);  // accepted: moved from
  REQUIRE(batch[3].device_id.use_count() > 0);   // not accepted: still the caller's
  REQUIRE(batch[5].device_id.view() == device.view());
  REQUIRE(p.metrics().rejected == 3);
  REQUIRE(p.metrics().queue_depth == 4);
  p.stop();
  REQUIRE(r.sequences == std::vector<std::uint64_t>{1, 2, 3, 4});
  auto late = batch_of(device, 9, 2);
  const auto closed = p.push_bulk(late, producer);
  REQUIRE(closed.accepted == 0);
  REQUIRE(closed.error == devgate::errc::closed);
  REQUIRE(late[0].device_id.use_count() > 0);
  REQUIRE(p.metrics().rejected == 3);  // closed is not a rejection
}

TEST_CASE("push_bulk at capacity: drop_oldest and block accept the whole batch",
          "[pipeline][bulk][overflow]") {
  SECTION("drop_oldest evicts the oldest queued messages") {
    recorder r;
    std::vector<std::uint64_t> dropped;
    devgate::pipeline_options o;
    o.capacity = 3;
    o.overflow = devgate::overflow_policy::drop_oldest;
    o.on_dropped = [&](const devgate::message& m) { dropped.push_back(m.sequence); };
    devgate::pipeline p(recording_sink(r), o);
    auto producer = p.make_producer();
    auto batch = batch_of(device, 1, 5);
    const auto result = p.push_bulk(batch, producer);
    REQUIRE(result.accepted == 5);
    REQUIRE_FALSE(result.error);
    REQUIRE(dropped == std::vector<std::uint64_t>{1, 2});
    p.stop();
    REQUIRE(r.sequences == std::vector<std::uint64_t>{3, 4, 5});
  }
  SECTION("block waits for a slow sink to free room") {
    std::atomic<int> seen{0};
    devgate::pipeline_options o;
    o.capacity = 8;
    o.overflow = devgate::overflow_policy::block;
    o.block_timeout = 10s;
    devgate::pipeline p(
        devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
          std::this_thread::sleep_for(20us);
          ++seen;
        }),
        o);
    REQUIRE_FALSE(p.start());
    auto producer = p.make_producer();
    auto batch = batch_of(device, 1, 300);
    const auto result = p.push_bulk(batch, producer);
    REQUIRE(result.accepted == 300);
    REQUIRE_FALSE(result.error);
    p.stop();
    REQUIRE(seen == 300);
    REQUIRE(p.metrics().rejected == 0);
  }
}

namespace {

// A slow sink (a downstream call of ~2 ms) that records the most calls it saw running at once,
// and checks exactly-once and per-device order (the session field carries the device index).
struct overlap_sink {
  static constexpr std::size_t devices = 4;
  std::atomic<int> running{0};
  std::atomic<int> peak{0};
  std::atomic<std::uint64_t> out_of_order{0};
  std::atomic<std::uint64_t> count{0};
  std::array<std::atomic<std::uint64_t>, devices> last{};
  std::array<std::atomic<std::uint32_t>, devices> partition{};
  std::error_code consume(const devgate::message& m, devgate::dispatch_context& ctx) {
    const int now = running.fetch_add(1) + 1;
    for (int seen = peak.load(); now > seen && !peak.compare_exchange_weak(seen, now);) {
    }
    auto& l = last[m.session];
    if (m.sequence != l.load(std::memory_order_relaxed) + 1) out_of_order.fetch_add(1);
    l.store(m.sequence, std::memory_order_relaxed);
    partition[m.session].store(static_cast<std::uint32_t>(ctx.partition));
    std::this_thread::sleep_for(2ms);
    count.fetch_add(1);
    running.fetch_sub(1);
    return {};
  }
};

// Four device ids that land in four different partitions of `partitions` (the fetcher hashes
// the id with std::hash<std::string_view>), so the devices can only share a worker by choice.
std::vector<devgate::shared_bytes> spread_devices(std::size_t partitions) {
  std::vector<devgate::shared_bytes> ids;
  std::vector<std::size_t> used;
  for (int k = 0; ids.size() < overlap_sink::devices; ++k) {
    const auto name = numbered("device-", k);
    const auto p = std::hash<std::string_view>{}(name) % partitions;
    if (std::find(used.begin(), used.end(), p) != used.end()) continue;
    used.push_back(p);
    ids.push_back(devgate::shared_bytes::copy_of(name));
  }
  return ids;
}

// Pushes `per_device` messages for each of four devices (a burst, the devices interleaved, as a
// demo page's "send 200" button in several tabs makes), before or after `start`.
template <class Traits>
void run_overlap(const devgate::pipeline_options& o, std::uint64_t per_device, bool before_start) {
  overlap_sink sink;
  devgate::pipeline<overlap_sink&, Traits> p(sink, o);
  if (!before_start) REQUIRE_FALSE(p.start());
  const auto ids = spread_devices(o.partitions);
  for (std::uint64_t seq = 1; seq <= per_device; ++seq) {
    for (std::size_t d = 0; d < ids.size(); ++d) {
      auto m = make(ids[d], seq);
      m.session = d;
      REQUIRE_FALSE(p.push(std::move(m)));
    }
  }
  if (before_start) REQUIRE_FALSE(p.start());
  const auto total = per_device * overlap_sink::devices;
  // Not stop() at once: a stopping pool adds no workers.
  REQUIRE(eventually([&] { return sink.count.load() == total; }));
  p.stop();
  REQUIRE(sink.count == total);
  REQUIRE(sink.out_of_order == 0);
  for (std::size_t d = 0; d < overlap_sink::devices; ++d) {
    REQUIRE(sink.last[d].load() == per_device);
    for (std::size_t e = 0; e < d; ++e) REQUIRE(sink.partition[d] != sink.partition[e]);
  }
  const auto m = p.metrics();
  REQUIRE(m.dispatched == total);
  REQUIRE(m.queue_depth == 0);
  // Each call sleeps 2 ms, so workers that can take different devices at the same time must
  // overlap; one worker holding every device's partition keeps this at 1.
  INFO("most sink calls seen running at once: " << sink.peak.load());
  REQUIRE(sink.peak.load() >= 2);
}

template <std::size_t N>
struct fixed_pool_demand : devgate::pipeline_traits {
  using demand_type = devgate::fixed_demand<N>;
  using pool_type = devgate::fixed_pool;
};

}  // namespace

TEST_CASE("different devices are dispatched in parallel by different workers",
          "[pipeline][pool][parallel]") {
  devgate::pipeline_options o;
  SECTION("fixed pool of 4 workers, one batch's demand covers every device's messages") {
    // 4 x 16 queued before start, demand 64: one fetch could take all four partitions.
    o.pool.workers = 4;
    run_overlap<fixed_pool_demand<64>>(o, 16, true);
  }
  SECTION("fixed pool of 4 workers, adaptive demand, a burst while running") {
    o.pool.workers = 4;
    run_overlap<fixed_traits>(o, 100, false);
  }
  SECTION("dynamic pool, 1 to 4 workers, adaptive demand, a burst while running") {
    o.pool.min_workers = 1;
    o.pool.max_workers = 4;
    run_overlap<devgate::pipeline_traits>(o, 100, false);
  }
}

TEST_CASE("partitions never cap dispatch below the worker count", "[pipeline][pool][parallel]") {
  // A sink that waits on I/O (here 20 ms) with 64 workers: with the default 32 partitions, each
  // held by one worker at a time, at most 32 messages were dispatched at once.
  struct waiting_sink {
    std::atomic<int> now{0};
    std::atomic<int> peak{0};
    std::atomic<std::uint64_t> done{0};
    std::error_code consume(const devgate::message&, devgate::dispatch_context&) {
      const int n = now.fetch_add(1) + 1;
      for (int p = peak.load(); n > p && !peak.compare_exchange_weak(p, n);) {
      }
      std::this_thread::sleep_for(20ms);
      now.fetch_sub(1);
      done.fetch_add(1);
      return {};
    }
  } sink;
  devgate::pipeline_options o;
  o.pool.workers = 64;
  devgate::pipeline<waiting_sink&, fixed_pool_demand<1>> p(sink, o);
  CHECK(p.options().partitions == 64);
  REQUIRE_FALSE(p.start());
  constexpr std::uint64_t devices = 2048;
  for (std::uint64_t d = 0; d < devices; ++d) {
    REQUIRE_FALSE(
        p.push(make(devgate::shared_bytes::copy_of(std::string_view(numbered("d", d))), 1)));
  }
  REQUIRE(eventually([&] { return sink.done.load() == devices; }, 30s));
  p.stop();
  INFO("peak concurrent dispatches: " << sink.peak.load());
  CHECK(sink.peak.load() > 40);  // 64 workers; hash collisions leave some partitions idle
}

// ---- faults contained: attacks by faulty host code ---------------------------------------------

namespace {

// Runs `attack` in a forked child, so an attack that kills the process (an exception reaching
// std::terminate) or hangs it (a watchdog alarm ends it) fails the test instead of the suite.
// Answers how the child ended: "ok" when `attack` returned true.
template <class Attack>
std::string run_in_child(Attack attack) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(20);  // a hang ends with SIGALRM
    int rc = 1;
    try {
      rc = attack() ? 0 : 1;
    } catch (...) {
      rc = 2;  // an exception reached the host's call
    }
    std::_Exit(rc);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFSIGNALED(status)) return numbered("killed by signal ", WTERMSIG(status));
  if (WEXITSTATUS(status) == 2) return "an exception escaped to the caller";
  if (WEXITSTATUS(status) != 0) return "the counts did not balance";
  return "ok";
}

struct throwing_every_third {
  std::atomic<std::uint64_t> delivered{0};
  std::error_code consume(const devgate::message& m, devgate::dispatch_context&) {
    if (m.sequence % 3 == 0) throw std::runtime_error("sink failed");
    delivered.fetch_add(1, std::memory_order_relaxed);
    return {};
  }
};

}  // namespace

TEST_CASE("attack: a sink that throws on every third message loses nothing",
          "[pipeline][sink][faults]") {
  const auto how = run_in_child([] {
    throwing_every_third sink;
    std::atomic<std::uint64_t> dead{0};
    std::atomic<std::uint64_t> dead_threw{0};
    devgate::pipeline_options o;
    o.retry_limit = 2;
    o.retry_backoff = 10us;
    o.retry_backoff_max = 10us;
    o.dead_letter = [&](const devgate::message&, std::error_code ec) {
      dead.fetch_add(1);
      if (ec == devgate::errc::handler_threw) dead_threw.fetch_add(1);
    };
    constexpr std::uint64_t pushed = 300;
    devgate::pipeline<throwing_every_third&> p(sink, o);
    if (p.start()) return false;
    const std::array ids{devgate::shared_bytes::copy_of(std::string_view("a")),
                         devgate::shared_bytes::copy_of(std::string_view("b")),
                         devgate::shared_bytes::copy_of(std::string_view("c"))};
    for (std::uint64_t seq = 1; seq <= pushed; ++seq) {
      if (p.push(make(ids[seq % ids.size()], seq))) return false;
    }
    p.stop();
    const auto m = p.metrics();
    // Every third message threw on its first try and its two retries: dead-lettered as such.
    return sink.delivered + dead == pushed && dead == pushed / 3 && dead_threw == dead &&
           m.dispatched == sink.delivered && m.dead_lettered == dead &&
           m.handler_exceptions == 3 * dead && m.retried == 2 * dead && m.lost == 0 &&
           m.enqueued == m.dispatched + m.dead_lettered && m.queue_depth == 0;
  });
  REQUIRE(how == "ok");
}

TEST_CASE("attack: a throwing dead-letter handler is counted, not fatal",
          "[pipeline][sink][faults]") {
  const auto how = run_in_child([] {
    devgate::pipeline_options o;
    o.retry_limit = 0;
    o.dead_letter = [](const devgate::message&, std::error_code) {
      throw std::runtime_error("dead-letter store down");
    };
    devgate::pipeline p(devgate::callback_sink([](const devgate::message&,
                                                  devgate::dispatch_context&) -> std::error_code {
                          return devgate::errc::timeout;
                        }),
                        o);
    if (p.start()) return false;
    for (std::uint64_t seq = 1; seq <= 10; ++seq) {
      if (p.push(make(device, seq))) return false;
    }
    p.stop();
    const auto m = p.metrics();
    std::string text;
    p.render_prometheus(text);
    return m.dead_lettered == 10 && m.lost == 10 && m.handler_exceptions == 10 &&
           text.find("devgate_lost_total 10\n") != std::string::npos &&
           text.find("devgate_handler_exceptions_total 10\n") != std::string::npos;
  });
  REQUIRE(how == "ok");
}

TEST_CASE("attack: a throwing on_dropped handler neither escapes nor leaks capacity",
          "[pipeline][overflow][faults]") {
  const auto how = run_in_child([] {
    recorder r;
    devgate::pipeline_options o;
    o.capacity = 2;
    o.overflow = devgate::overflow_policy::drop_oldest;
    o.on_dropped = [](const devgate::message&) { throw std::runtime_error("log full"); };
    devgate::pipeline p(recording_sink(r), o);
    bool pushed = true;
    try {
      for (std::uint64_t seq = 1; seq <= 5; ++seq) pushed = pushed && !p.push(make(device, seq));
    } catch (...) {
      pushed = false;  // the exception reached the pushing (network) thread
    }
    p.stop();  // must not wait for a unit of capacity nobody holds
    const auto m = p.metrics();
    return pushed && r.sequences == std::vector<std::uint64_t>{4, 5} && m.dropped == 3 &&
           m.handler_exceptions == 3 && m.lost == 0;
  });
  REQUIRE(how == "ok");
}

// ---- lifecycle and metrics say exactly what happened ----------------------------------------

TEST_CASE("start after stop answers closed", "[pipeline][lifecycle]") {
  recorder r;
  devgate::pipeline p(recording_sink(r));
  REQUIRE_FALSE(p.start());
  REQUIRE(p.start() == devgate::errc::already_running);
  p.stop();
  REQUIRE(p.start() == devgate::errc::closed);
  devgate::pipeline never_started(recording_sink(r));
  never_started.stop();
  REQUIRE(never_started.start() == devgate::errc::closed);
}

TEST_CASE("queue_depth never reads above the capacity", "[pipeline][metrics]") {
  // The capacity is held by one message the sink sits on; pushers are refused over and over
  // while a sampler reads the depth.
  std::atomic<bool> release{false};
  devgate::pipeline_options o;
  o.capacity = 1;
  devgate::pipeline p(
      devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
        while (!release.load()) std::this_thread::sleep_for(100us);
      }),
      o);
  REQUIRE_FALSE(p.start());
  REQUIRE_FALSE(p.push(make(device, 1)));
  std::atomic<bool> done{false};
  std::thread pusher([&] {
    for (std::uint64_t seq = 2; !done.load(std::memory_order_relaxed); ++seq) {
      (void)p.push(make(device, seq));
    }
  });
  std::uint64_t highest = 0;
  const auto until = devgate::clock::now() + 300ms;
  while (devgate::clock::now() < until && highest <= o.capacity) {
    highest = std::max(highest, p.metrics().queue_depth);
  }
  done = true;
  pusher.join();
  release = true;
  p.stop();
  INFO("deepest reading: " << highest);
  REQUIRE(highest <= o.capacity);
  REQUIRE(p.metrics().rejected > 0);
}

TEST_CASE("rejected counts drop_oldest pushes that found nothing to evict, and says so",
          "[pipeline][metrics][overflow]") {
  // Every queued message is being dispatched (its partition claimed): nothing can be evicted.
  std::atomic<bool> release{false};
  std::atomic<int> in_sink{0};
  devgate::pipeline_options o;
  o.capacity = 1;
  o.overflow = devgate::overflow_policy::drop_oldest;
  o.block_timeout = 5ms;
  devgate::pipeline p(
      devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
        ++in_sink;
        while (!release.load()) std::this_thread::sleep_for(100us);
      }),
      o);
  REQUIRE_FALSE(p.start());
  REQUIRE_FALSE(p.push(make(device, 1)));
  REQUIRE(eventually([&] { return in_sink.load() == 1; }));
  REQUIRE(p.push(make(device, 2)) == devgate::errc::queue_full);
  REQUIRE(p.metrics().rejected == 1);
  release = true;
  p.stop();
  std::string text;
  p.render_prometheus(text);
  const auto help = text.find("# HELP devgate_rejected_total");
  REQUIRE(help != std::string::npos);
  const auto line = text.substr(help, text.find('\n', help) - help);
  INFO(line);
  REQUIRE(line.find("drop_oldest") != std::string::npos);
  REQUIRE(line.find("block") != std::string::npos);
}

TEST_CASE("a message handed back while in retry backoff says it was attempted",
          "[pipeline][lifecycle]") {
  std::atomic<int> tries{0};
  devgate::pipeline_options o;
  o.retry_backoff = 10s;  // the first retry waits far past the stop's deadline
  o.retry_backoff_max = 10s;
  devgate::pipeline p(devgate::callback_sink([&](const devgate::message&,
                                                 devgate::dispatch_context&) -> std::error_code {
                        ++tries;
                        return devgate::errc::timeout;
                      }),
                      o);
  REQUIRE_FALSE(p.start());
  REQUIRE_FALSE(p.push(make(device, 1)));
  REQUIRE_FALSE(p.push(make(device, 2)));  // held back behind 1, never tried
  REQUIRE(eventually([&] { return tries.load() == 1; }));
  const auto left = p.stop(devgate::clock::now() + 20ms);
  REQUIRE(left.size() == 2);
  REQUIRE(left[0].sequence == 1);
  REQUIRE(left[0].attempts == 1);
  REQUIRE(left[1].sequence == 2);
  REQUIRE(left[1].attempts == 0);
  REQUIRE(p.metrics().handed_back == 2);
}

namespace {

// A batch sink: records each share it is given and each message it took (in call order), fails
// in the share the messages `fail_in_batch` picks and, on retry (`consume`), those `fail_always`
// picks.
struct share_recorder {
  std::mutex mutex;
  std::vector<std::size_t> share_sizes;
  std::vector<std::pair<std::string, std::uint64_t>> taken;
  std::vector<unsigned> retry_attempts;
  std::function<bool(const devgate::message&)> fail_in_batch = [](const auto&) { return false; };
  std::function<bool(const devgate::message&)> fail_always = [](const auto&) { return false; };
  bool throw_in_batch = false;
  bool contract_broken = false;  // checked on the test's thread (Catch is not thread-safe)
};

struct batch_recording_sink {
  share_recorder* r;
  std::error_code consume(const devgate::message& m, devgate::dispatch_context& ctx) {
    std::lock_guard lock(r->mutex);
    r->retry_attempts.push_back(ctx.attempt);
    if (r->fail_always(m)) return devgate::errc::timeout;
    r->taken.emplace_back(std::string(m.device_id.view()), m.sequence);
    return {};
  }
  void consume_batch(devgate::message_batch batch, devgate::dispatch_context& ctx,
                     std::span<std::error_code> results) {
    std::lock_guard lock(r->mutex);
    if (r->throw_in_batch) throw std::runtime_error("batch sink failed");
    if (ctx.attempt != 0 || results.size() != batch.size() || batch.empty() ||
        batch.partition(0) != ctx.partition) {
      r->contract_broken = true;
    }
    r->share_sizes.push_back(batch.size());
    std::size_t i = 0;
    for (const devgate::message& m : batch) {
      if (r->fail_in_batch(m) || r->fail_always(m)) {
        results[i] = devgate::errc::backpressure;
      } else {
        r->taken.emplace_back(std::string(m.device_id.view()), m.sequence);
      }
      ++i;
    }
  }
};
static_assert(devgate::batch_sink<batch_recording_sink>);
static_assert(!devgate::batch_sink<devgate::null_sink>);

}  // namespace

TEST_CASE(
    "a batch sink takes shares whole; its failures are retried one by one, then dead-lettered",
    "[pipeline][sink][batch]") {
  share_recorder r;
  r.fail_in_batch = [](const devgate::message& m) { return m.sequence % 5 == 0; };
  r.fail_always = [](const devgate::message& m) { return m.sequence == 7; };
  std::vector<std::uint64_t> dead;
  devgate::pipeline_options o;
  o.pool.workers = 1;
  o.demand.min_batch = o.demand.max_batch = 64;
  o.retry_limit = 2;
  o.retry_backoff = 100us;
  o.dead_letter = [&](const devgate::message& m, std::error_code) { dead.push_back(m.sequence); };
  devgate::pipeline<batch_recording_sink, fixed_traits> p(batch_recording_sink{&r}, o);
  constexpr std::uint64_t total = 200;
  for (std::uint64_t seq = 1; seq <= total; ++seq) REQUIRE_FALSE(p.push(make(device, seq)));
  REQUIRE_FALSE(p.start());
  p.stop();
  REQUIRE_FALSE(r.contract_broken);
  // Taken whole: the queue was full before the worker started, so shares hold many messages.
  REQUIRE_FALSE(r.share_sizes.empty());
  REQUIRE(*std::max_element(r.share_sizes.begin(), r.share_sizes.end()) > 1);
  // Every message but 7 taken exactly once; 7 dead-lettered after its retries.
  std::vector<std::uint64_t> seqs;
  for (const auto& t : r.taken) seqs.push_back(t.second);
  std::sort(seqs.begin(), seqs.end());
  std::vector<std::uint64_t> expected;
  for (std::uint64_t seq = 1; seq <= total; ++seq)
    if (seq != 7) expected.push_back(seq);
  REQUIRE(seqs == expected);
  REQUIRE(dead == std::vector<std::uint64_t>{7});
  // The 40 multiples of 5 needed one retry each, 7 needed two (attempts 1 and 2).
  REQUIRE(r.retry_attempts.size() == total / 5 + 2);
  for (auto a : r.retry_attempts) REQUIRE(a >= 1);
  const auto m = p.metrics();
  REQUIRE(m.dispatched == total - 1);
  REQUIRE(m.retried == total / 5 + 2);
  REQUIRE(m.dead_lettered == 1);
}

TEST_CASE("attack: a batch sink that throws loses nothing (each message is retried)",
          "[pipeline][sink][batch]") {
  share_recorder r;
  r.throw_in_batch = true;
  devgate::pipeline_options o;
  o.retry_backoff = 10us;
  devgate::pipeline p(batch_recording_sink{&r}, o);
  REQUIRE_FALSE(p.start());
  constexpr std::uint64_t total = 500;
  for (std::uint64_t seq = 1; seq <= total; ++seq) REQUIRE_FALSE(p.push(make(device, seq)));
  p.stop();
  REQUIRE(r.taken.size() == total);
  REQUIRE_FALSE(r.contract_broken);
  const auto m = p.metrics();
  REQUIRE(m.dispatched == total);
  REQUIRE(m.dead_lettered == 0);
  REQUIRE(m.handler_exceptions >= 1);
  REQUIRE(m.retried == total);
}

TEST_CASE("stop with a deadline during a batch's retries hands back only what was not taken",
          "[pipeline][sink][batch][lifecycle]") {
  share_recorder r;
  // Device "d1"'s 3 fails in the share, then waits out a long backoff; "d2"'s 4 and "d3"'s 2
  // fail too. A lone worker's share holds every partition's run.
  r.fail_in_batch = [](const devgate::message& m) {
    const auto d = m.device_id.view();
    return (d == "d1" && m.sequence == 3) || (d == "d2" && m.sequence == 4) ||
           (d == "d3" && m.sequence == 2);
  };
  devgate::pipeline_options o;
  o.pool.workers = 1;
  o.demand.min_batch = o.demand.max_batch = 64;  // one share takes all 15
  o.retry_backoff = 10s;
  o.retry_backoff_max = 10s;
  devgate::pipeline<batch_recording_sink, fixed_traits> p(batch_recording_sink{&r}, o);
  const std::array<devgate::shared_bytes, 3> devices{
      devgate::shared_bytes::copy_of(std::string_view("d1")),
      devgate::shared_bytes::copy_of(std::string_view("d2")),
      devgate::shared_bytes::copy_of(std::string_view("d3"))};
  for (std::uint64_t seq = 1; seq <= 5; ++seq) {
    for (const auto& d : devices) REQUIRE_FALSE(p.push(make(d, seq)));
  }
  REQUIRE_FALSE(p.start());
  REQUIRE(eventually([&] {
    std::lock_guard lock(r.mutex);
    return r.taken.size() == 12;
  }));
  const auto left = p.stop(devgate::clock::now() + 50ms);
  REQUIRE_FALSE(r.contract_broken);
  REQUIRE(r.share_sizes == std::vector<std::size_t>{15});
  // Not taken: the three failures. The first to be retried says it was attempted once.
  std::vector<std::pair<std::string, std::uint64_t>> back;
  for (const auto& m : left) back.emplace_back(std::string(m.device_id.view()), m.sequence);
  std::sort(back.begin(), back.end());
  REQUIRE(back ==
          std::vector<std::pair<std::string, std::uint64_t>>{{"d1", 3}, {"d2", 4}, {"d3", 2}});
  std::uint32_t attempted = 0;
  for (const auto& m : left) attempted += m.attempts;
  REQUIRE(attempted == 1);
  // Nothing taken twice.
  auto taken = r.taken;
  std::sort(taken.begin(), taken.end());
  REQUIRE(std::adjacent_find(taken.begin(), taken.end()) == taken.end());
  const auto m = p.metrics();
  REQUIRE(m.handed_back == 3);
  REQUIRE(m.dispatched == 12);
  REQUIRE(m.queue_depth == 0);
}
