// Unit tests of each policy on its own: queues, demands, fetcher ordering, sinks, metrics.
#include "devgate/pipeline/fetcher.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "devgate/pipeline/demand.hpp"
#include "devgate/pipeline/metrics.hpp"
#include "devgate/pipeline/queue.hpp"
#include "devgate/pipeline/sink.hpp"
#include "devgate/pipeline/worker_pool.hpp"
#include "support.hpp"

namespace {

using devgate::testing::numbered;

devgate::message make(const devgate::shared_bytes& device, std::uint64_t seq) {
  devgate::message m;
  m.device_id = device;
  m.sequence = seq;
  return m;
}

std::vector<devgate::message> batch_of_one(const devgate::shared_bytes& device, std::uint64_t seq) {
  std::vector<devgate::message> v;
  v.push_back(make(device, seq));
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("queue policies hand back what was pushed, in order per producer",
                   "[pipeline][queue]", devgate::lockfree_queue, devgate::locked_queue) {
  typename TestType::template queue<int> q;
  typename TestType::template queue<int>::producer_token token(q);
  for (int i = 0; i < 100; ++i) REQUIRE(q.push(token, int{i}));
  REQUIRE(q.push(100));
  std::vector<int> out(200, -1);
  std::size_t got = 0;
  while (std::size_t n = q.pop_bulk(out.data() + got, 7)) got += n;
  REQUIRE(got == 101);
  std::vector<int> from_token;
  for (std::size_t i = 0; i < got; ++i) {
    if (out[i] != 100) from_token.push_back(out[i]);
  }
  for (int i = 0; i < 100; ++i) REQUIRE(from_token[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("fixed_demand always asks for N", "[pipeline][demand]") {
  devgate::fixed_demand<32> d;
  REQUIRE(d.demand() == 32);
  d.record({32, 0, std::chrono::seconds(1)});
  REQUIRE(d.demand() == 32);
  REQUIRE(d.max_demand() == 32);
}

TEST_CASE("adaptive_demand grows under backlog, shrinks when idle or slow", "[pipeline][demand]") {
  devgate::demand_options o;
  o.min_batch = 2;
  o.max_batch = 64;
  o.latency_target = std::chrono::microseconds(100);
  devgate::adaptive_demand d(o);
  REQUIRE(d.demand() == 2);
  for (int i = 0; i < 10; ++i) d.record({d.demand(), d.demand(), std::chrono::microseconds(1)});
  REQUIRE(d.demand() == 64);  // full batches: grew, bounded by max_batch
  d.record({64, 64, std::chrono::milliseconds(1)});
  REQUIRE(d.demand() == 32);  // over the latency target: halved even though the batch was full
  d.record({32, 1, std::chrono::microseconds(1)});
  REQUIRE(d.demand() == 16);  // mostly empty: shrinks
  for (int i = 0; i < 10; ++i) d.record({d.demand(), 0, std::chrono::microseconds(1)});
  REQUIRE(d.demand() == 2);  // bounded by min_batch
}

TEST_CASE("fixed_pool runs its workers from the start and never scales", "[pipeline][pool]") {
  devgate::pool_options o;
  o.workers = 3;
  devgate::fixed_pool p(o);
  REQUIRE(p.max_workers() == 3);
  REQUIRE(p.initial_workers() == 3);
  devgate::pool_sample hot;
  hot.backlog = 1'000'000;
  hot.alive = 1;
  hot.now = devgate::clock::now();
  REQUIRE_FALSE(p.add_worker(hot));
  REQUIRE(p.idle_wait() == devgate::clock::duration::max());
  REQUIRE_FALSE(p.may_retire(3));
  o.workers = 0;
  REQUIRE_THROWS_WITH(devgate::fixed_pool(o), Catch::Contains("workers"));
}

TEST_CASE("dynamic_pool adds a worker after staying hot, retires down to min_workers",
          "[pipeline][pool]") {
  using namespace std::chrono_literals;
  devgate::pool_options o;
  o.min_workers = 1;
  o.max_workers = 3;
  o.scale_up_backlog = 10;
  o.scale_up_latency = 1ms;
  o.scale_up_after = 10ms;
  o.idle_before_retire = 500ms;
  devgate::dynamic_pool p(o);
  REQUIRE(p.max_workers() == 3);
  REQUIRE(p.initial_workers() == 1);
  REQUIRE(p.idle_wait() == 500ms);
  const devgate::clock::time_point t0(1h);
  auto sample = [&](std::size_t backlog, std::chrono::nanoseconds waited, std::size_t alive,
                    devgate::clock::duration at) {
    devgate::pool_sample s;
    s.backlog = backlog;
    s.oldest_wait = waited;
    s.alive = alive;
    s.now = t0 + at;
    return s;
  };
  // Backlog over the threshold: hot from t0, a worker after scale_up_after, then the clock
  // restarts.
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 1, 0ms)));
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 1, 5ms)));
  REQUIRE(p.add_worker(sample(11, 0ns, 1, 10ms)));
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 2, 11ms)));
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 2, 20ms)));
  REQUIRE(p.add_worker(sample(11, 0ns, 2, 21ms)));
  // A cold batch ends the hot period: the clock starts again at the next hot one.
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 2, 22ms)));  // hot from 22 ms
  REQUIRE_FALSE(p.add_worker(sample(10, 1ms, 2, 25ms)));  // at the thresholds, not over: cold
  REQUIRE_FALSE(p.add_worker(sample(0, 2ms, 2, 30ms)));   // waited too long: hot from 30 ms
  REQUIRE_FALSE(p.add_worker(sample(0, 2ms, 2, 39ms)));   // 17 ms after 22, 9 after 30
  REQUIRE(p.add_worker(sample(0, 2ms, 2, 40ms)));
  // Never past max_workers, however long it stays hot.
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 3, 50ms)));
  REQUIRE_FALSE(p.add_worker(sample(11, 0ns, 3, 70ms)));
  REQUIRE_FALSE(p.may_retire(1));
  REQUIRE(p.may_retire(2));
  o.min_workers = 0;
  REQUIRE_THROWS_WITH(devgate::dynamic_pool(o), Catch::Contains("min_workers"));
  o.min_workers = 4;
  REQUIRE_THROWS_WITH(devgate::dynamic_pool(o), Catch::Contains("max_workers"));
}

TEST_CASE("fetcher restores arrival order across producer threads", "[pipeline][fetcher]") {
  using fetcher = devgate::fetcher<devgate::lockfree_queue, devgate::fixed_demand<8>>;
  fetcher f(1, 1, {});
  const auto device = devgate::shared_bytes::copy_of(std::string_view("dev"));
  fetcher::producer token(f);
  // Alternate between an explicit token and another thread's implicit producer: the queue keeps
  // FIFO only per producer, the tickets restore the order in which pushes happened.
  for (std::uint64_t seq = 1; seq <= 40; ++seq) {
    if (seq % 2 == 0) {
      f.enqueue(0, make(device, seq), token);
    } else {
      std::thread([&] { f.enqueue(0, make(device, seq)); }).join();
    }
  }
  fetcher::batch b(8);
  std::uint64_t expected = 1;
  while (f.fetch(0, b, 0) != 0) {
    for (auto& item : b) REQUIRE(item.msg.sequence == expected++);
    f.release(0, b, {});
  }
  REQUIRE(expected == 41);
}

TEST_CASE("fetcher gives a partition to one worker at a time", "[pipeline][fetcher]") {
  using fetcher = devgate::fetcher<devgate::locked_queue, devgate::fixed_demand<4>>;
  fetcher f(2, 2, {});
  const auto device = devgate::shared_bytes::copy_of(std::string_view("dev"));
  const auto p = f.partition_of(device);
  for (std::uint64_t seq = 1; seq <= 10; ++seq) f.enqueue(p, make(device, seq));
  fetcher::batch first(4);
  fetcher::batch second(4);
  REQUIRE(f.fetch(0, first, 0) == 4);
  REQUIRE(f.fetch(1, second, 0) == 0);  // claimed by worker 0 until it releases
  f.release(0, first, {});
  REQUIRE(f.fetch(1, second, 0) == 4);
  REQUIRE(second.begin()->msg.sequence == 5);
  f.release(1, second, {});
  devgate::queued_message victim;
  REQUIRE(f.evict_one(p, victim));
  REQUIRE(victim.msg.sequence == 9);  // the oldest not yet fetched
  std::vector<devgate::message> rest;
  f.drain_into(rest);
  REQUIRE(rest.size() == 1);
  REQUIRE(rest[0].sequence == 10);
}

TEST_CASE("fetcher holds one partition at a time, leaving the others to other workers",
          "[pipeline][fetcher]") {
  using fetcher = devgate::fetcher<devgate::locked_queue, devgate::fixed_demand<8>>;
  fetcher f(2, 2, {});
  // Two devices in the two partitions, 3 messages each: one demand of 8 could take both.
  std::vector<devgate::shared_bytes> ids;
  for (int k = 0; ids.size() < 2; ++k) {
    auto id = devgate::shared_bytes::copy_of(numbered("dev", k));
    if (ids.empty() || f.partition_of(id) != f.partition_of(ids[0])) ids.push_back(id);
  }
  for (std::uint64_t seq = 1; seq <= 3; ++seq) {
    for (const auto& id : ids) f.enqueue(f.partition_of(id), make(id, seq));
  }
  const auto first_p = f.partition_of(ids[0]);
  fetcher::batch first(8);
  fetcher::batch second(8);
  REQUIRE(f.fetch(0, first, first_p) == 3);  // only its first partition's share
  REQUIRE(first.taken() == 3);
  REQUIRE(first.begin()->partition == first_p);
  REQUIRE(f.fetch(1, second, first_p + 1) == 3);  // the other partition is still free
  REQUIRE(second.begin()->partition != first_p);
  REQUIRE(f.fetch_next(first) == 0);  // worker 1 holds the rest: worker 0's batch ends
  REQUIRE(first.taken() == 3);
  f.release(0, first, {});
  REQUIRE(f.fetch(0, first, first_p) == 0);  // partition 1 is still worker 1's
  f.release(0, first, {});
  // One batch visits both partitions in turn when nobody else holds them.
  for (const auto& id : ids) f.enqueue(f.partition_of(id), make(id, 4));
  REQUIRE(f.fetch_next(second) == 1);  // released its partition, took the other one's share
  REQUIRE(second.begin()->partition == first_p);
  REQUIRE(second.begin()->msg.sequence == 4);
  REQUIRE(second.taken() == 4);
  REQUIRE(f.fetch_next(second) == 0);  // every partition looked at once
  f.release(1, second, {});
  REQUIRE(f.fetch(0, first, first_p + 1) == 1);  // its own partition's message 4 was left
  REQUIRE(first.begin()->msg.sequence == 4);
  REQUIRE(first.begin()->partition != first_p);
  f.release(0, first, {});
  REQUIRE_FALSE(f.has_work(0));
  REQUIRE_FALSE(f.has_work(1));
  // A lone worker (spread = false) takes every share in one pass and holds both claims.
  for (const auto& id : ids) f.enqueue(f.partition_of(id), make(id, 5));
  REQUIRE(f.fetch(0, first, 0, false) == 2);
  REQUIRE(f.fetch(1, second, 0) == 0);
  REQUIRE(f.fetch_next(first) == 0);  // the pass is over: releases both
  f.release(0, first, {});
  REQUIRE_FALSE(f.has_work(0));
  REQUIRE_FALSE(f.has_work(1));
}

TEST_CASE("callback and fan-out sinks", "[pipeline][sink]") {
  int a = 0;
  int b = 0;
  auto first =
      devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) { ++a; });
  auto second = devgate::callback_sink(
      [&](const devgate::message&, devgate::dispatch_context&) -> std::error_code {
        ++b;
        return devgate::errc::backpressure;
      });
  devgate::fanout_sink both(first, second);
  devgate::dispatch_context ctx;
  devgate::message m;
  REQUIRE(both.consume(m, ctx) == devgate::errc::backpressure);
  REQUIRE(a == 1);
  REQUIRE(b == 1);  // every sink is called even when one fails
  REQUIRE(ctx.reply(m, {}) == devgate::errc::unknown_session);  // no transport attached
}

TEST_CASE("log2 histogram buckets and Prometheus rendering", "[pipeline][metrics]") {
  using h = devgate::latency_histogram;
  REQUIRE(h::bucket_of(0) == 0);
  REQUIRE(h::bucket_of(1024) == 0);
  REQUIRE(h::bucket_of(1025) == 1);
  REQUIRE(h::bucket_of(2048) == 1);
  REQUIRE(h::bucket_of(std::uint64_t{1} << 40) == 21);  // +Inf
  devgate::pipeline_metrics m;
  m.enqueued = 7;
  m.batch_size.counts[2] = 3;
  m.batch_size.count = 3;
  m.batch_size.sum = 12;
  std::string text;
  devgate::render_prometheus(m, text);
  REQUIRE(text.find("# TYPE devgate_enqueued_total counter\ndevgate_enqueued_total 7\n") !=
          std::string::npos);
  REQUIRE(text.find("devgate_batch_size_bucket{le=\"2\"} 0\n") != std::string::npos);
  REQUIRE(text.find("devgate_batch_size_bucket{le=\"4\"} 3\n") != std::string::npos);
  REQUIRE(text.find("devgate_batch_size_bucket{le=\"+Inf\"} 3\n") != std::string::npos);
  REQUIRE(text.find("devgate_dispatch_latency_seconds_bucket{le=\"1.024e-06\"} 0\n") !=
          std::string::npos);
  REQUIRE(text.find("# TYPE devgate_workers_alive gauge") != std::string::npos);
}

TEMPLATE_TEST_CASE("fetcher enqueue_bulk groups a batch by partition, in order",
                   "[pipeline][fetcher][bulk]", devgate::lockfree_queue, devgate::locked_queue) {
  using fetcher = devgate::fetcher<TestType, devgate::fixed_demand<64>>;
  fetcher f(4, 1, {});
  std::vector<devgate::shared_bytes> ids;
  for (int d = 0; d < 6; ++d) ids.push_back(devgate::shared_bytes::copy_of(numbered("dev", d)));
  typename fetcher::producer token(f);
  // Single pushes and bulks interleave: the tickets keep one order per partition.
  std::vector<devgate::message> batch;
  for (std::uint64_t seq = 1; seq <= 4; ++seq) {
    for (std::size_t d = 0; d < ids.size(); ++d) {
      auto m = make(ids[d], seq);
      m.session = d;
      batch.push_back(std::move(m));
    }
  }
  for (std::size_t d = 0; d < ids.size(); ++d) {
    auto m = make(ids[d], 0);  // pushed alone before the batch
    m.session = d;
    f.enqueue(f.partition_of(ids[d]), std::move(m), token);
  }
  std::size_t distinct = 0;
  for (std::size_t p = 0; p < f.partitions(); ++p) {
    for (const auto& id : ids) {
      if (f.partition_of(id) == p) {
        ++distinct;
        break;
      }
    }
  }
  REQUIRE(f.enqueue_bulk(batch.data(), batch.size(), token) == distinct);
  auto single = batch_of_one(ids[0], 5);
  REQUIRE(f.enqueue_bulk(single.data(), 1, token) == 1);
  REQUIRE(f.tickets() == 6 + 24 + 1);
  std::vector<std::vector<std::uint64_t>> seen(ids.size());
  typename fetcher::batch b(64);
  while (f.fetch(0, b, 0) != 0) {
    for (auto& item : b) {
      REQUIRE(item.partition == f.partition_of(item.msg.device_id));
      seen[item.msg.session].push_back(item.msg.sequence);
    }
    f.release(0, b, {});
  }
  for (std::size_t d = 0; d < ids.size(); ++d) {
    std::vector<std::uint64_t> expected{0, 1, 2, 3, 4};
    if (d == 0) expected.push_back(5);
    REQUIRE(seen[d] == expected);
  }
}
