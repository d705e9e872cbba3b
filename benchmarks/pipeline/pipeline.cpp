// Pipeline throughput and enqueue-to-dispatch latency, devgate beside:
//  (a) the ceiling: raw moodycamel bulk enqueue/dequeue of the same messages between the same
//      threads (no partitions, no ordering, no accounting);
//  (b) a prototype-style baseline: mutex+deque queue, a fetcher polling at a fixed interval when
//      empty, one short-lived thread spawned per message of each hard-coded batch of 10.
// devgate is measured with per-message `push` and with `push_bulk` (the like-for-like rival of
// the ceiling's bulk enqueue: same batch size on both sides).
// Run: devgate_bench_pipeline --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <iterator>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <concurrentqueue/concurrentqueue.h>

#include "devgate/pipeline/pipeline.hpp"

namespace {

using namespace std::chrono_literals;
constexpr int devices = 64;
constexpr std::int64_t messages_per_iteration = 1'000'000;

const std::vector<devgate::shared_bytes>& device_ids() {
  static const auto ids = [] {
    std::vector<devgate::shared_bytes> v;
    for (int d = 0; d < devices; ++d)
      v.push_back(devgate::shared_bytes::copy_of("dev-" + std::to_string(d)));
    return v;
  }();
  return ids;
}

devgate::message make(std::int64_t i) {
  devgate::message m;
  m.device_id = device_ids()[static_cast<std::size_t>(i % devices)];
  m.sequence = static_cast<std::uint64_t>(i / devices + 1);
  m.received = devgate::clock::now();
  return m;
}

double percentile(std::vector<std::int64_t>& v, double q) {
  if (v.empty()) return 0;
  const auto k = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return static_cast<double>(v[k]);
}

void set_latency(benchmark::State& state, std::vector<std::int64_t>& ns) {
  state.counters["p50_us"] = percentile(ns, 0.50) / 1000.0;
  state.counters["p99_us"] = percentile(ns, 0.99) / 1000.0;
}

// Every 64th message's latency (enough samples, little overhead in the consumer loop).
constexpr std::int64_t sample_every = 64;

// ---- (a) the ceiling: raw moodycamel bulk, same message type, same thread counts ------------

void ceiling_moodycamel(benchmark::State& state) {
  const auto consumers = static_cast<int>(state.range(0));
  const auto batch = static_cast<std::size_t>(state.range(1));
  std::vector<std::int64_t> latency;
  for (auto _ : state) {
    moodycamel::ConcurrentQueue<devgate::message> q(1 << 16);
    std::atomic<std::int64_t> consumed{0};
    std::vector<std::vector<std::int64_t>> samples(static_cast<std::size_t>(consumers));
    std::vector<std::thread> threads;
    for (int c = 0; c < consumers; ++c) {
      threads.emplace_back([&, c] {
        std::vector<devgate::message> buf(batch);
        moodycamel::ConsumerToken token(q);
        std::int64_t seen = 0;
        while (consumed.load(std::memory_order_relaxed) < messages_per_iteration) {
          const auto n = q.try_dequeue_bulk(token, buf.begin(), batch);
          if (n == 0) {
            std::this_thread::yield();
            continue;
          }
          const auto now = devgate::clock::now();
          for (std::size_t i = 0; i < n; ++i) {
            if (++seen % sample_every == 0) {
              samples[static_cast<std::size_t>(c)].push_back((now - buf[i].received).count());
            }
            buf[i] = devgate::message{};
          }
          consumed.fetch_add(static_cast<std::int64_t>(n), std::memory_order_relaxed);
        }
      });
    }
    moodycamel::ProducerToken token(q);
    std::vector<devgate::message> out(batch);
    for (std::int64_t i = 0; i < messages_per_iteration;) {
      const auto n =
          std::min<std::int64_t>(static_cast<std::int64_t>(batch), messages_per_iteration - i);
      for (std::int64_t k = 0; k < n; ++k) out[static_cast<std::size_t>(k)] = make(i + k);
      // Out of memory (a token whose producer could not be allocated fails too, as in
      // lockfree_queue::push_bulk): stop the consumers and report it.
      if (!token.valid() || !q.enqueue_bulk(token, std::make_move_iterator(out.begin()),
                                            static_cast<std::size_t>(n))) {
        consumed.store(messages_per_iteration, std::memory_order_relaxed);
        state.SkipWithError("moodycamel enqueue_bulk ran out of memory");
        break;
      }
      i += n;
    }
    for (auto& t : threads) t.join();
    for (auto& s : samples) latency.insert(latency.end(), s.begin(), s.end());
  }
  state.SetItemsProcessed(state.iterations() * messages_per_iteration);
  set_latency(state, latency);
}
BENCHMARK(ceiling_moodycamel)
    ->ArgNames({"workers", "batch"})
    ->ArgsProduct({{1, 2}, {16, 64, 256}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- devgate: one producer pushing per message, workers pulling through the fetcher ---------

template <std::size_t Batch>
struct fixed_traits : devgate::pipeline_traits {
  using demand_type = devgate::fixed_demand<Batch>;
  using pool_type = devgate::fixed_pool;
};
struct adaptive_traits : devgate::pipeline_traits {
  using pool_type = devgate::fixed_pool;
};

// Samples latency like the ceiling does, per worker (no sharing between workers).
struct sampling_sink {
  std::vector<std::vector<std::int64_t>>* samples;
  std::vector<std::int64_t>* seen;
  std::error_code consume(const devgate::message& m, devgate::dispatch_context& ctx) {
    if (++(*seen)[ctx.worker_id * 8] % sample_every == 0) {
      (*samples)[ctx.worker_id].push_back((m.dispatched - m.received).count());
    }
    return {};
  }
};

template <class Traits>
void run_devgate(benchmark::State& state, std::size_t batch, bool bulk = false) {
  const auto workers = static_cast<std::size_t>(state.range(0));
  std::vector<std::int64_t> latency;
  for (auto _ : state) {
    std::vector<std::vector<std::int64_t>> samples(workers);
    std::vector<std::int64_t> seen(workers * 8);  // one cache line per worker
    devgate::pipeline_options o;
    o.capacity = 1 << 16;
    o.overflow = devgate::overflow_policy::block;
    o.block_timeout = 10s;
    o.pool.workers = workers;
    o.demand.max_batch = batch;
    devgate::pipeline<sampling_sink, Traits> p(sampling_sink{&samples, &seen}, o);
    (void)p.start();
    auto producer = p.make_producer();
    if (bulk) {
      // Batches built exactly as the ceiling builds them.
      std::vector<devgate::message> out(batch);
      for (std::int64_t i = 0; i < messages_per_iteration;) {
        const auto n =
            std::min<std::int64_t>(static_cast<std::int64_t>(batch), messages_per_iteration - i);
        for (std::int64_t k = 0; k < n; ++k) out[static_cast<std::size_t>(k)] = make(i + k);
        const auto r = p.push_bulk(std::span(out.data(), static_cast<std::size_t>(n)), producer);
        if (r.error) state.SkipWithError("push_bulk failed");
        i += n;
      }
    } else {
      for (std::int64_t i = 0; i < messages_per_iteration; ++i) {
        if (p.push(make(i), producer)) state.SkipWithError("push failed");
      }
    }
    p.stop();
    for (auto& s : samples) latency.insert(latency.end(), s.begin(), s.end());
  }
  state.SetItemsProcessed(state.iterations() * messages_per_iteration);
  set_latency(state, latency);
}

void devgate_fixed_demand(benchmark::State& state) {
  switch (state.range(1)) {
    case 16:
      return run_devgate<fixed_traits<16>>(state, 16);
    case 64:
      return run_devgate<fixed_traits<64>>(state, 64);
    default:
      return run_devgate<fixed_traits<256>>(state, 256);
  }
}
BENCHMARK(devgate_fixed_demand)
    ->ArgNames({"workers", "batch"})
    ->ArgsProduct({{1, 2}, {16, 64, 256}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// push_bulk with the ceiling's batch size on both the enqueue and the dequeue side.
void devgate_bulk_fixed_demand(benchmark::State& state) {
  switch (state.range(1)) {
    case 16:
      return run_devgate<fixed_traits<16>>(state, 16, true);
    case 64:
      return run_devgate<fixed_traits<64>>(state, 64, true);
    default:
      return run_devgate<fixed_traits<256>>(state, 256, true);
  }
}
BENCHMARK(devgate_bulk_fixed_demand)
    ->ArgNames({"workers", "batch"})
    ->ArgsProduct({{1, 2}, {16, 64, 256}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

void devgate_bulk_adaptive_demand(benchmark::State& state) {
  run_devgate<adaptive_traits>(state, static_cast<std::size_t>(state.range(1)), true);
}
BENCHMARK(devgate_bulk_adaptive_demand)
    ->ArgNames({"workers", "batch"})
    ->ArgsProduct({{1, 2}, {64}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

void devgate_adaptive_demand(benchmark::State& state) {
  run_devgate<adaptive_traits>(state, static_cast<std::size_t>(state.range(1)));
}
BENCHMARK(devgate_adaptive_demand)
    ->ArgNames({"workers", "max_batch"})
    ->ArgsProduct({{1, 2}, {256}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// ---- devgate latency at a paced rate (msgs/s), e.g. half of its measured maximum -------------

void devgate_paced_latency(benchmark::State& state) {
  const auto rate = static_cast<double>(state.range(0));
  const bool bulk = state.range(1) != 0;  // push each tick's messages with one push_bulk
  constexpr std::int64_t count = 200'000;
  std::vector<std::int64_t> latency;
  for (auto _ : state) {
    std::vector<std::vector<std::int64_t>> samples(2);
    std::vector<std::int64_t> seen(16);
    devgate::pipeline_options o;
    o.capacity = 1 << 16;
    o.overflow = devgate::overflow_policy::block;
    o.pool.workers = 1;
    devgate::pipeline<sampling_sink, adaptive_traits> p(sampling_sink{&samples, &seen}, o);
    (void)p.start();
    auto producer = p.make_producer();
    std::vector<devgate::message> out;
    const auto start = devgate::clock::now();
    // Push in ticks of 50 us: every message that is due by the tick is pushed, then sleep.
    for (std::int64_t i = 0; i < count;) {
      const auto now = devgate::clock::now();
      const auto due = std::min<std::int64_t>(
          count,
          static_cast<std::int64_t>(std::chrono::duration<double>(now - start).count() * rate) + 1);
      if (bulk) {
        out.clear();
        for (; i < due; ++i) out.push_back(make(i));
        (void)p.push_bulk(out, producer);
      } else {
        for (; i < due; ++i) (void)p.push(make(i), producer);
      }
      std::this_thread::sleep_until(now + 50us);
    }
    p.stop();
    for (auto& s : samples) latency.insert(latency.end(), s.begin(), s.end());
  }
  state.SetItemsProcessed(state.iterations() * count);
  set_latency(state, latency);
}
BENCHMARK(devgate_paced_latency)
    ->ArgNames({"msgs_per_s", "bulk"})
    ->ArgsProduct({{100'000, 1'000'000, 2'000'000, 4'000'000}, {0, 1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(1);

// ---- (b) prototype-style baseline --------------------------------------------------------------

void prototype_baseline(benchmark::State& state) {
  constexpr std::int64_t count = 20'000;  // spawning a thread per message is slow: fewer messages
  constexpr std::size_t hard_coded_batch = 10;
  const auto poll_interval = std::chrono::milliseconds(state.range(0));
  std::vector<std::int64_t> latency;
  for (auto _ : state) {
    std::mutex mutex;
    std::deque<devgate::message> queue;
    std::atomic<std::int64_t> done{0};
    std::mutex samples_mutex;
    std::vector<std::int64_t> samples;
    std::thread fetcher([&] {
      std::vector<devgate::message> batch;
      while (done.load() < count) {
        {
          std::lock_guard lock(mutex);
          while (batch.size() < hard_coded_batch && !queue.empty()) {
            batch.push_back(std::move(queue.front()));
            queue.pop_front();
          }
        }
        if (batch.empty()) {
          std::this_thread::sleep_for(poll_interval);  // the GenStage fetcher's polling
          continue;
        }
        std::vector<std::thread> tasks;  // one short-lived task per message
        for (auto& m : batch) {
          tasks.emplace_back([&, m = std::move(m)] {
            const auto waited = (devgate::clock::now() - m.received).count();
            std::lock_guard lock(samples_mutex);
            samples.push_back(waited);
          });
        }
        for (auto& t : tasks) t.join();
        done.fetch_add(static_cast<std::int64_t>(batch.size()));
        batch.clear();
      }
    });
    for (std::int64_t i = 0; i < count; ++i) {
      std::lock_guard lock(mutex);
      queue.push_back(make(i));
    }
    fetcher.join();
    latency.insert(latency.end(), samples.begin(), samples.end());
  }
  state.SetItemsProcessed(state.iterations() * count);
  set_latency(state, latency);
}
BENCHMARK(prototype_baseline)
    ->ArgName("poll_ms")
    ->Arg(1)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
