#pragma once

#include <array>    // bucket counts
#include <atomic>   // detail::pipeline_atomic_histogram
#include <bit>      // std::bit_width
#include <cstddef>  // std::size_t
#include <cstdint>  // counters
#include <cstdio>   // std::snprintf for numbers
#include <string>   // exposition text

namespace devgate {

/// A histogram with fixed power-of-two bucket bounds: bucket i counts values <= 2^(Shift + i);
/// the last slot counts the rest (+Inf). Recording is one bit_width and two relaxed stores.
template <std::size_t Buckets, unsigned Shift>
struct log2_histogram {
  std::array<std::uint64_t, Buckets + 1> counts{};  ///< Per bucket, not cumulative; [Buckets]=+Inf.
  std::uint64_t sum = 0;                            ///< Sum of the recorded values.
  std::uint64_t count = 0;                          ///< Number of recorded values.

  /// The index of the bucket `value` falls in.
  static constexpr std::size_t bucket_of(std::uint64_t value) noexcept {
    // ceil(log2(value)) is the bit width of value - 1; values up to 2^Shift share bucket 0.
    const auto width = static_cast<std::size_t>(std::bit_width(value == 0 ? 0 : value - 1));
    const std::size_t i = width > Shift ? width - Shift : 0;
    return i < Buckets ? i : Buckets;
  }
  /// The upper bound of bucket `i` (i < Buckets).
  static constexpr std::uint64_t bound(std::size_t i) noexcept {
    return std::uint64_t{1} << (Shift + i);
  }
  /// Adds another histogram's counts (summing per-worker histograms on read).
  void merge(const log2_histogram& other) noexcept {
    for (std::size_t i = 0; i <= Buckets; ++i) counts[i] += other.counts[i];
    sum += other.sum;
    count += other.count;
  }
  /// The smallest bucket bound below which at least `q` (0..1) of the values fall (an estimate).
  [[nodiscard]] std::uint64_t quantile_bound(double q) const noexcept {
    const auto want = static_cast<std::uint64_t>(q * static_cast<double>(count));
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < Buckets; ++i) {
      seen += counts[i];
      if (seen >= want && seen > 0) return bound(i);
    }
    return bound(Buckets - 1) * 2;
  }
};

/// Batch sizes: 1, 2, 4, ... 4096.
using batch_histogram = log2_histogram<13, 0>;
/// Enqueue-to-dispatch latency in nanoseconds: 1.024 us, 2.048 us, ... ~1.07 s.
using latency_histogram = log2_histogram<21, 10>;

/// A consistent-enough reading of every pipeline metric (counters are read one by one, relaxed).
struct pipeline_metrics {
  std::uint64_t enqueued = 0;    ///< Messages accepted by `push` and `push_bulk`.
  std::uint64_t dispatched = 0;  ///< Messages a sink accepted (after any retries).
  /// Messages refused with `errc::queue_full`: the pipeline was full under `reject`, a `block`
  /// wait timed out, or `drop_oldest` found nothing it could evict in time; a refused batch
  /// counts each of its messages.
  std::uint64_t rejected = 0;
  std::uint64_t dropped = 0;        ///< Queued messages evicted by `drop_oldest`.
  std::uint64_t retried = 0;        ///< Sink attempts that failed (or threw) and were retried.
  std::uint64_t dead_lettered = 0;  ///< Messages handed to the dead-letter handler.
  std::uint64_t handed_back = 0;    ///< Messages returned undispatched by `stop(deadline)`.
  /// Exceptions thrown by host handlers (sink, dead-letter handler, `on_dropped`), caught.
  std::uint64_t handler_exceptions = 0;
  /// Dead-lettered messages whose dead-letter handler threw: nobody may have kept them.
  std::uint64_t lost = 0;
  /// Messages accepted and not yet dispatched, dead-lettered, dropped or handed back; never
  /// above the capacity.
  std::uint64_t queue_depth = 0;
  std::uint64_t workers_alive = 0;  ///< Worker threads running now.
  batch_histogram batch_size;       ///< Messages per fetched batch.
  /// Enqueue-to-dispatch latency in nanoseconds (to the start of the message's batch).
  latency_histogram latency_ns;
};

namespace detail {

/// A histogram one thread writes (relaxed load+store, no locked instruction) and any reads.
template <class Histogram>
struct pipeline_atomic_histogram;

template <std::size_t Buckets, unsigned Shift>
struct pipeline_atomic_histogram<log2_histogram<Buckets, Shift>> {
  std::array<std::atomic<std::uint64_t>, Buckets + 1> counts{};
  std::atomic<std::uint64_t> sum{0};
  std::atomic<std::uint64_t> count{0};

  /// Records one value; only the owning thread calls this.
  void record(std::uint64_t value) noexcept {
    auto& c = counts[log2_histogram<Buckets, Shift>::bucket_of(value)];
    c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    sum.store(sum.load(std::memory_order_relaxed) + value, std::memory_order_relaxed);
    count.store(count.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
  /// Adds the current counts to `out`.
  void add_to(log2_histogram<Buckets, Shift>& out) const noexcept {
    for (std::size_t i = 0; i <= Buckets; ++i)
      out.counts[i] += counts[i].load(std::memory_order_relaxed);
    out.sum += sum.load(std::memory_order_relaxed);
    out.count += count.load(std::memory_order_relaxed);
  }
};

/// Appends the "# HELP" and "# TYPE" lines of metric `devgate_<name>`.
inline void pipeline_append_header(std::string& out, const char* name, const char* type,
                                   const char* help) {
  out += "# HELP devgate_";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE devgate_";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

template <std::size_t Buckets, unsigned Shift>
void pipeline_append_histogram(std::string& out, const char* name, const char* help,
                               const log2_histogram<Buckets, Shift>& h, double scale) {
  pipeline_append_header(out, name, "histogram", help);
  char number[64];
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < Buckets; ++i) {
    cumulative += h.counts[i];
    std::snprintf(number, sizeof number, "%.9g", static_cast<double>(h.bound(i)) * scale);
    out += "devgate_";
    out += name;
    out += "_bucket{le=\"";
    out += number;
    out += "\"} ";
    out += std::to_string(cumulative);
    out += '\n';
  }
  out += "devgate_";
  out += name;
  out += "_bucket{le=\"+Inf\"} ";
  out += std::to_string(h.count);
  std::snprintf(number, sizeof number, "%.9g", static_cast<double>(h.sum) * scale);
  out += "\ndevgate_";
  out += name;
  out += "_sum ";
  out += number;
  out += "\ndevgate_";
  out += name;
  out += "_count ";
  out += std::to_string(h.count);
  out += '\n';
}

}  // namespace detail

/// Appends one counter or gauge named `devgate_<name>` in Prometheus text format (HELP, TYPE and
/// the value), for embedders that add their own figures beside the pipeline's.
inline void append_prometheus_metric(std::string& out, const char* name, const char* type,
                                     const char* help, std::uint64_t value) {
  detail::pipeline_append_header(out, name, type, help);
  out += "devgate_";
  out += name;
  out += ' ';
  out += std::to_string(value);
  out += '\n';
}

/// Appends `m` to `out` in the Prometheus text exposition format (version 0.0.4); every name
/// starts with `devgate_`, latencies are in seconds as Prometheus expects.
inline void render_prometheus(const pipeline_metrics& m, std::string& out) {
  append_prometheus_metric(out, "enqueued_total", "counter", "Messages accepted into the pipeline.",
                           m.enqueued);
  append_prometheus_metric(out, "dispatched_total", "counter",
                           "Messages a sink accepted, after any retries.", m.dispatched);
  append_prometheus_metric(out, "rejected_total", "counter",
                           "Messages refused with queue_full: the pipeline was full under reject, "
                           "a block wait timed out, or drop_oldest found nothing to evict in time.",
                           m.rejected);
  append_prometheus_metric(out, "dropped_total", "counter",
                           "Queued messages evicted by the drop-oldest overflow policy.",
                           m.dropped);
  append_prometheus_metric(out, "retried_total", "counter",
                           "Sink attempts that failed or threw and were retried.", m.retried);
  append_prometheus_metric(out, "dead_lettered_total", "counter",
                           "Messages handed to the dead-letter handler after the retry limit.",
                           m.dead_lettered);
  append_prometheus_metric(out, "handed_back_total", "counter",
                           "Messages returned undispatched by a stop with a deadline.",
                           m.handed_back);
  append_prometheus_metric(out, "handler_exceptions_total", "counter",
                           "Exceptions thrown by a sink, the dead-letter handler or on_dropped, "
                           "caught by the pipeline.",
                           m.handler_exceptions);
  append_prometheus_metric(out, "lost_total", "counter",
                           "Dead-lettered messages whose dead-letter handler threw.", m.lost);
  append_prometheus_metric(
      out, "queue_depth", "gauge",
      "Messages accepted and not yet dispatched, dead-lettered, dropped or handed back.",
      m.queue_depth);
  append_prometheus_metric(out, "workers_alive", "gauge", "Worker threads running.",
                           m.workers_alive);
  detail::pipeline_append_histogram(out, "batch_size", "Messages per fetched batch.", m.batch_size,
                                    1.0);
  detail::pipeline_append_histogram(out, "dispatch_latency_seconds", "Enqueue-to-dispatch latency.",
                                    m.latency_ns, 1e-9);
}

}  // namespace devgate
