// devgate_ws_bench_server: devgate's side of the side-by-side benchmarks (benchmarks/README.md).
//
//   devgate_ws_bench_server [--port N] [--threads N] [--mode transport|pipeline] [--workers N]
//                           [--tls-cert FILE --tls-key FILE]
//
// With --tls-cert/--tls-key (PEM chain and key) the port speaks TLS (server_options::tls).
// transport (default): websocket::server alone, speaking the bench protocol: every text and
//   binary message is echoed; the text message "broadcast <bytes>" makes the server send one
//   binary payload of that size to every other open session (the sender excluded), encoded once.
// pipeline: the full engine, gateway + websocket::server + a sink. The sink reads the device's
//   send time (CLOCK_MONOTONIC ns, first 8 bytes of a binary message), records device-to-sink
//   latency, and replies with the same payload through dispatch_context (so a device can keep W
//   messages in flight). The text message "stats" makes the sink reply with a JSON histogram
//   summary of the latencies since the previous "stats" and start a new one.
//
// Prints "listening on <port>" once ready; stops on SIGINT/SIGTERM.

#include <ctime>  // clock_gettime

#include <algorithm>    // std::find
#include <array>        // histogram buckets
#include <atomic>       // histogram counters
#include <bit>          // std::bit_width
#include <cstdint>      // fixed-width integers
#include <cstdio>       // std::printf
#include <cstdlib>      // std::strtoul
#include <cstring>      // std::memcpy
#include <mutex>        // session registry
#include <span>         // read batches
#include <string>       // arguments, stats JSON
#include <string_view>  // commands
#include <vector>       // session registry

#include "devgate/core/stop_signals.hpp"
#include "devgate/pipeline/gateway.hpp"
#include "devgate/websocket/server.hpp"

#include "../loadgen/stamp.hpp"  // now_ns: the clock of the latency stamps

namespace {

using devgate_bench::now_ns;

// Log-linear histogram of nanoseconds (32 sub-buckets per power of two: about 3% resolution),
// written concurrently by the pipeline's workers with relaxed atomic increments.
class latency_histogram {
 public:
  void record(std::uint64_t ns) noexcept {
    buckets_[index(ns)].fetch_add(1, std::memory_order_relaxed);
  }

  // {"count":n,"p50_us":..,"p99_us":..,"p999_us":..,"max_us":..}, then starts afresh.
  std::string take_summary() {
    std::array<std::uint64_t, size> counts{};
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < size; ++i) {
      counts[i] = buckets_[i].exchange(0, std::memory_order_relaxed);
      total += counts[i];
    }
    auto at = [&](double p) {
      if (total == 0) return 0.0;
      const auto rank = static_cast<std::uint64_t>(p * static_cast<double>(total - 1)) + 1;
      std::uint64_t seen = 0;
      for (std::size_t i = 0; i < size; ++i) {
        seen += counts[i];
        if (seen >= rank) return static_cast<double>(lower(i)) / 1000.0;
      }
      return 0.0;
    };
    double max_us = 0;
    for (std::size_t i = size; i-- > 0;) {
      if (counts[i] != 0) {
        max_us = static_cast<double>(lower(i)) / 1000.0;
        break;
      }
    }
    char out[256];
    std::snprintf(out, sizeof out,
                  R"({"count":%llu,"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"max_us":%.1f})",
                  static_cast<unsigned long long>(total), at(0.5), at(0.99), at(0.999), max_us);
    return out;
  }

 private:
  static constexpr std::size_t size = 64 + 40 * 32;
  static std::size_t index(std::uint64_t v) noexcept {
    if (v < 64) return static_cast<std::size_t>(v);
    const auto e = static_cast<std::size_t>(std::bit_width(v) - 1);  // >= 6
    const std::size_t i = 64 + (e - 6) * 32 + static_cast<std::size_t>((v >> (e - 5)) & 31);
    return i < size ? i : size - 1;
  }
  static std::uint64_t lower(std::size_t i) noexcept {
    if (i < 64) return i;
    const std::size_t k = i - 64;
    return (32 + k % 32) << (k / 32 + 1);
  }
  std::array<std::atomic<std::uint64_t>, size> buckets_{};
};

// The open sessions, for "broadcast": what every peer server keeps too (Node ws's
// wss.clients, a set in the Beast and websocketpp servers).
class session_registry {
 public:
  void add(devgate::session_id id) {
    std::lock_guard lock(mutex_);
    ids_.push_back(id);
  }
  void remove(devgate::session_id id) {
    std::lock_guard lock(mutex_);
    const auto it = std::find(ids_.rbegin(), ids_.rend(), id);
    if (it == ids_.rend()) return;
    *it = ids_.back();
    ids_.pop_back();
  }
  std::vector<devgate::session_id> all_but(devgate::session_id id) {
    std::lock_guard lock(mutex_);
    std::vector<devgate::session_id> out;
    out.reserve(ids_.size());
    for (const auto s : ids_) {
      if (s != id) out.push_back(s);
    }
    return out;
  }

 private:
  std::mutex mutex_;
  std::vector<devgate::session_id> ids_;
};

bool parse_broadcast(std::string_view text, std::size_t& bytes) {
  constexpr std::string_view prefix = "broadcast ";
  if (text.substr(0, prefix.size()) != prefix) return false;
  bytes = std::strtoull(std::string(text.substr(prefix.size())).c_str(), nullptr, 10);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  devgate::websocket::server_options options;
  options.address = "127.0.0.1";
  options.port = 9101;
  options.threads = 1;
  options.reader.max_message_size = 64u << 20;
  options.backpressure.max_buffered_bytes = 64u << 20;
  bool pipeline_mode = false;
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
    } else if (arg == "--tls-cert" && has_value) {
      if (!options.tls) options.tls.emplace();
      options.tls->certificate_chain_file = argv[++i];
    } else if (arg == "--tls-key" && has_value) {
      if (!options.tls) options.tls.emplace();
      options.tls->private_key_file = argv[++i];
    } else if (arg == "--mode" && has_value) {
      pipeline_mode = std::string_view(argv[++i]) == "pipeline";
    } else {
      std::fprintf(stderr,
                   "usage: %s [--port N] [--threads N] [--mode transport|pipeline] "
                   "[--workers N] [--tls-cert FILE --tls-key FILE]\n",
                   argv[0]);
      return 2;
    }
  }

  devgate::stop_signals stop;  // caught from here on; main() waits for them below

  devgate::websocket::server server(options);
  session_registry sessions;
  latency_histogram histogram;

  auto listening = [&] {
    std::printf("listening on %u\n", static_cast<unsigned>(server.local_port()));
    std::fflush(stdout);
  };

  if (!pipeline_mode) {
    devgate::transport_handlers handlers;
    handlers.on_open = [&](const devgate::session_info& s) { sessions.add(s.id); };
    handlers.on_close = [&](devgate::session_id id, devgate::close_code) { sessions.remove(id); };
    handlers.on_messages = [&](std::span<devgate::inbound_message> batch) {
      for (auto& m : batch) {
        std::size_t bytes = 0;
        if (m.kind == devgate::payload_kind::text && parse_broadcast(m.payload.view(), bytes)) {
          const auto ids = sessions.all_but(m.session);
          server.broadcast(ids, devgate::payload_kind::binary,
                           devgate::shared_bytes::build(bytes, [](std::span<std::byte> b) {
                             std::memset(b.data(), 0, b.size());
                           }));
          continue;
        }
        (void)server.send(m.session, m.kind, std::move(m.payload));
      }
      return devgate::batch_result{batch.size(), {}};
    };
    server.set_handlers(std::move(handlers));
    if (const auto ec = server.start()) {
      std::fprintf(stderr, "devgate_ws_bench_server: %s\n", ec.message().c_str());
      return 1;
    }
    listening();
    stop.wait();
    server.stop();
    return 0;
  }

  devgate::pipeline_options popts;
  popts.pool.workers = workers;
  popts.pool.min_workers = workers;
  popts.pool.max_workers = workers;
  auto sink = devgate::callback_sink(
      [&](const devgate::message& m, devgate::dispatch_context& ctx) -> std::error_code {
        if (m.kind == devgate::payload_kind::text) {
          if (m.payload.view() == "stats") {
            return ctx.reply(m, devgate::shared_bytes::copy_of(histogram.take_summary()));
          }
          return {};
        }
        if (m.payload.size() >= 8) {
          std::uint64_t sent = 0;
          std::memcpy(&sent, m.payload.data(), 8);
          histogram.record(now_ns() - sent);
        }
        // The acknowledgement shares the message's buffer: no copy.
        ctx.reply(m, m.payload, devgate::payload_kind::binary);
        return {};  // a vanished device is not a sink failure worth retrying
      });
  devgate::gateway gateway(server, std::move(sink), popts);
  if (const auto ec = gateway.start()) {
    std::fprintf(stderr, "devgate_ws_bench_server: %s\n", ec.message().c_str());
    return 1;
  }
  listening();
  stop.wait();
  gateway.stop();
  return 0;
}
