// demo_server: the device-gateway demo. Every browser tab at http://localhost:4000/<device_id>
// is a device (it speaks docs/PROTOCOL.md over a WebSocket) and a window on the gateway (the
// live server log, figures, and the fleet's firmware rollout).
//
//   demo_server [--port 4000] [--threads N] [--workers-min N] [--workers-max N]
//               [--queue-capacity N] [--max-devices N] [--firmware-size BYTES]
//               [--state-file PATH] [--tls-cert FILE --tls-key FILE] ...
//
// Routes: GET /<device_id> (the page), /static/* (its CSS and JS), /ws/<device_id> (the
// device WebSocket), /metrics (Prometheus), /healthz, /api/info, /api/log (recent server log),
// /api/firmware/release (publishes a new image to the fleet; see release_route below).
// Ctrl-C (SIGINT) or SIGTERM: intake closes, the pipeline drains, sessions close with 1001,
// the device states are written to the state file.

#include <CLI/CLI.hpp>

#include <atomic>              // the hub pointer the routes read
#include <chrono>              // control loop period, simulated work
#include <condition_variable>  // control thread wake-ups
#include <csignal>             // SIGHUP (certificate reload)
#include <cstddef>             // std::byte
#include <cstdint>             // sizes, counters
#include <cstdio>              // std::printf
#include <deque>               // log ring, release jobs
#include <filesystem>          // web root, state file
#include <functional>          // the SIGHUP loop
#include <mutex>               // log ring, jobs
#include <optional>            // the SIGHUP set, with TLS only
#include <string>              // texts
#include <string_view>         // routes
#include <system_error>        // store errors
#include <thread>              // the control thread
#include <vector>              // firmware images

#include "devgate/devgate.hpp"
#include "file_state_store.hpp"

#ifndef DEVGATE_DEMO_WEB_ROOT
#define DEVGATE_DEMO_WEB_ROOT "web"
#endif

namespace {

/// Command-line settings.
struct demo_config {
  std::string address = "0.0.0.0";
  std::uint16_t port = 4000;
  unsigned threads = 2;
  std::size_t workers_min = 1;
  std::size_t workers_max = 8;
  std::size_t queue_capacity = 1u << 16;
  std::size_t max_devices = 100'000;
  std::size_t firmware_size = 4u << 20;
  unsigned dispatch_us = 2000;
  std::string state_file = "/tmp/devgate-demo-state.json";
  std::string web_root = DEVGATE_DEMO_WEB_ROOT;
  std::string tls_cert;  // with tls_key: https and wss on the same port
  std::string tls_key;
};

/// The last dispatched messages (the `server` topic's events, as sent), so that a page that
/// opens or reconnects can show the log it missed. Bounded; lost on restart.
class server_log {
 public:
  static constexpr std::size_t capacity = 500;
  /// Keeps one event payload.
  void add(devgate::shared_bytes event) {
    std::lock_guard lock(m_);
    entries_.push_back(std::move(event));
    if (entries_.size() > capacity) entries_.pop_front();
  }
  /// The kept events as one JSON array (oldest first).
  [[nodiscard]] std::string render() const {
    std::lock_guard lock(m_);
    std::string out = "[";
    for (const auto& e : entries_) {
      if (out.size() > 1) out += ',';
      out.append(reinterpret_cast<const char*>(e.data()), e.size());
    }
    out += "]\n";
    return out;
  }

 private:
  mutable std::mutex m_;
  std::deque<devgate::shared_bytes> entries_;
};

/// Shared between the sink (worker threads) and main: what a dispatch does besides logging.
struct dispatch_effects {
  /// Simulated downstream call per message (what makes the dynamic pool grow under load).
  std::chrono::microseconds work{0};
  /// Sends the device a sequenced receipt; set once the hub exists, before start().
  std::function<void(std::string_view device, std::uint64_t number, std::size_t worker)> receipt;
};

/// The demo's sink: "dispatches" a device message (a simulated downstream call), then sends
/// the device a sequenced receipt, which it gets even if it was offline at that moment.
struct demo_sink {
  std::shared_ptr<dispatch_effects> fx;
  /// Dispatches one message.
  std::error_code consume(const devgate::message& m, devgate::dispatch_context& ctx) {
    if (fx->work.count() > 0) std::this_thread::sleep_for(fx->work);
    if (fx->receipt) fx->receipt(m.device_id.view(), m.sequence, ctx.worker_id);
    return {};
  }
};

using demo_hub =
    devgate::device::hub<devgate::websocket::server, demo_sink, devgate_demo::file_state_store>;

/// devgate's version, "major.minor.patch".
std::string devgate_version() {
  return std::to_string(DEVGATE_VERSION_MAJOR) + "." + std::to_string(DEVGATE_VERSION_MINOR) + "." +
         std::to_string(DEVGATE_VERSION_PATCH);
}

/// The version string of release `n` (the factory version is 1.0.0).
std::string release_version(std::uint64_t n) { return "1." + std::to_string(n) + ".0"; }

/// A synthetic firmware image: `size` pseudo-random bytes, the same for the same release.
std::vector<std::byte> release_image(std::uint64_t n, std::size_t size) {
  std::vector<std::byte> out(size);
  std::uint64_t x = 0x9E3779B97F4A7C15ull ^ (n * 0xBF58476D1CE4E5B9ull);  // xorshift64 seed
  for (std::size_t i = 0; i < size; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    for (std::size_t b = 0; b < 8 && i + b < size; ++b) {
      out[i + b] = static_cast<std::byte>(x >> (8 * b));
    }
  }
  return out;
}

/// The control thread: publishes gateway figures, flushes the state file, and publishes
/// firmware releases (cutting and hashing a 4 MiB image does not belong on a network thread).
class control_loop {
 public:
  control_loop(demo_hub& hub, std::size_t firmware_size) : hub_(hub), size_(firmware_size) {}
  ~control_loop() { stop(); }
  /// Starts the thread.
  void start() {
    thread_ = std::thread([this] { run(); });
  }
  /// Asks for release `n` to be published.
  void request_release(std::uint64_t n) {
    {
      std::lock_guard lock(m_);
      jobs_.push_back(n);
    }
    cv_.notify_one();
  }
  /// Stops the thread (pending releases are dropped; they are in the release counter).
  void stop() {
    {
      std::lock_guard lock(m_);
      stopping_ = true;
    }
    cv_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    std::unique_lock lock(m_);
    while (!stopping_) {
      cv_.wait_for(lock, std::chrono::milliseconds(250),
                   [this] { return stopping_ || !jobs_.empty(); });
      while (!jobs_.empty() && !stopping_) {
        const auto n = jobs_.front();
        jobs_.pop_front();
        lock.unlock();
        publish(n);
        lock.lock();
      }
      lock.unlock();
      hub_.publish_stats();
      if (const auto ec = hub_.state_store().flush()) {
        std::fprintf(stderr, "demo_server: cannot write %s: %s\n",
                     hub_.state_store().file().c_str(), ec.message().c_str());
      }
      lock.lock();
    }
  }
  void publish(std::uint64_t n) {
    const auto image = release_image(n, size_);
    const auto version = release_version(n);
    const auto rollout = hub_.publish_firmware(version, image);
    std::printf("firmware %s published (rollout %u, %zu bytes, sha256 %s)\n", version.c_str(),
                rollout, image.size(), hub_.current_image()->sha256().c_str());
    std::fflush(stdout);
  }

  demo_hub& hub_;
  std::size_t size_;
  std::thread thread_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::uint64_t> jobs_;
  bool stopping_ = false;
};

/// Everything the HTTP routes need; the hub pointer is set before the server starts.
struct route_context {
  demo_config cfg;
  std::function<devgate::websocket::http_reply(const devgate::websocket::http_request&)> files;
  server_log log;
  std::atomic<demo_hub*> hub{nullptr};
  std::atomic<control_loop*> control{nullptr};
  std::atomic<bool> stopping{false};
};

devgate::websocket::http_reply text_reply(int status, std::string_view content_type,
                                          std::string body) {
  devgate::websocket::http_reply r;
  r.status = status;
  r.content_type = std::string(content_type);
  r.body = devgate::shared_bytes::copy_of(std::string_view(body));
  r.extra_headers = "Cache-Control: no-store\r\n";
  return r;
}

/// Serves `path` from the web root (the request's other fields are kept).
devgate::websocket::http_reply serve_file(route_context& rc,
                                          const devgate::websocket::http_request& req,
                                          std::string_view path) {
  auto copy = req;
  copy.target = path;
  auto reply = rc.files(copy);
  // Always revalidate: the page and its script must match the running server.
  reply.extra_headers += "Cache-Control: no-cache\r\n";
  return reply;
}

/// Prometheus text: the pipeline's metrics plus the hub's figures.
std::string render_metrics(demo_hub& hub) {
  std::string out;
  hub.engine().render_prometheus(out);
  const auto s = hub.stats();
  auto gauge = [&out](const char* name, const char* help, const char* type, auto value) {
    devgate::append_prometheus_metric(out, name, type, help, static_cast<std::uint64_t>(value));
  };
  gauge("connected_devices", "Device sessions open now.", "gauge", s.connected);
  gauge("devices_held", "Device records held in memory (bounded by --max-devices).", "gauge",
        s.devices);
  gauge("devices_evicted_total", "Offline device records evicted to stay within --max-devices.",
        "counter", s.devices_evicted);
  gauge("replay_bytes", "Bytes of sequenced messages kept for devices, fleet-wide.", "gauge",
        s.replay_bytes);
  gauge("store_errors_total", "State store calls that failed (or writes dropped).", "counter",
        s.store_errors);
  gauge("replay_dropped_total", "Sequenced messages dropped by replay overflow.", "counter",
        s.replay_dropped);
  gauge("protocol_errors_total", "Error replies sent to devices.", "counter", s.protocol_errors);
  gauge("takeovers_total", "Sessions replaced by a newer one.", "counter", s.takeovers);
  gauge("firmware_rollout", "Current rollout id (0: none).", "gauge", s.rollout.rollout);
  gauge("firmware_rollout_pending", "Devices waiting for the current image.", "gauge",
        s.rollout.pending);
  gauge("firmware_rollout_transferring", "Devices receiving the current image.", "gauge",
        s.rollout.transferring);
  gauge("firmware_rollout_verified", "Devices that verified the current image.", "gauge",
        s.rollout.verified);
  gauge("firmware_rollout_failed", "Devices that failed the current image.", "gauge",
        s.rollout.failed);
  gauge("firmware_rollout_skipped", "Devices that already ran the current version.", "gauge",
        s.rollout.skipped);
  return out;
}

/// GET /api/firmware/release: counts a new release and has the control thread publish it.
/// A GET with an effect, because devgate's HTTP side serves only GET and HEAD; HEAD does
/// nothing, and the page calls it with fetch(), never as a link.
devgate::websocket::http_reply release_route(route_context& rc,
                                             const devgate::websocket::http_request& req) {
  auto* hub = rc.hub.load();
  auto* control = rc.control.load();
  if (req.method != "GET") return text_reply(405, "text/plain; charset=utf-8", "use GET\n");
  if (hub == nullptr || control == nullptr || rc.stopping) {
    return text_reply(503, "text/plain; charset=utf-8", "stopping\n");
  }
  const auto n = hub->state_store().next_release();
  control->request_release(n);
  nlohmann::json j{{"release", n}, {"version", release_version(n)}, {"size", rc.cfg.firmware_size}};
  return text_reply(200, "application/json", j.dump() + "\n");
}

devgate::websocket::http_reply route(route_context& rc,
                                     const devgate::websocket::http_request& req) {
  std::string_view path = req.target;
  if (const auto q = path.find('?'); q != std::string_view::npos) path = path.substr(0, q);
  auto* hub = rc.hub.load();
  if (path == "/healthz") {
    if (hub == nullptr || rc.stopping) return text_reply(503, "text/plain", "stopping\n");
    return text_reply(200, "text/plain; charset=utf-8", "ok\n");
  }
  if (path == "/metrics") {
    if (hub == nullptr) return text_reply(503, "text/plain", "starting\n");
    return text_reply(200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(*hub));
  }
  if (path == "/api/log") return text_reply(200, "application/json", rc.log.render());
  if (path == "/api/info") {
    nlohmann::json j{
        {"workers_min", rc.cfg.workers_min},       {"workers_max", rc.cfg.workers_max},
        {"queue_capacity", rc.cfg.queue_capacity}, {"firmware_size", rc.cfg.firmware_size},
        {"dispatch_us", rc.cfg.dispatch_us},       {"devgate", devgate_version()}};
    return text_reply(200, "application/json", j.dump() + "\n");
  }
  if (path == "/api/firmware/release") return release_route(rc, req);
  if (path.starts_with("/static/")) {
    return serve_file(rc, req, req.target.substr(std::string_view("/static").size()));
  }
  if (path == "/") {
    auto r = text_reply(302, "text/plain; charset=utf-8", "see /marco\n");
    r.extra_headers += "Location: /marco\r\n";
    return r;
  }
  // Any other single segment that is a valid device id: the device page.
  if (devgate::device::is_valid_device_id(path.substr(1))) {
    return serve_file(rc, req, "/index.html");
  }
  return text_reply(404, "text/plain; charset=utf-8",
                    "not found: open /<device id>, e.g. /marco (ids are [A-Za-z0-9._-])\n");
}

}  // namespace

int main(int argc, char** argv) {
  demo_config cfg;
  CLI::App app{
      "devgate demo: each browser tab at http://localhost:<port>/<device_id> is a device and a "
      "window on the gateway."};
  app.add_option("--port", cfg.port, "TCP port (0 picks a free one)")->capture_default_str();
  app.add_option("--address", cfg.address, "Address to listen on")->capture_default_str();
  app.add_option("--threads", cfg.threads, "WebSocket threads (0 = one per core)")
      ->capture_default_str();
  app.add_option("--workers-min", cfg.workers_min, "Fewest pipeline workers")
      ->check(CLI::Range(std::size_t{1}, std::size_t{256}))
      ->capture_default_str();
  app.add_option("--workers-max", cfg.workers_max,
                 "Most pipeline workers (the pool grows under load)")
      ->check(CLI::Range(std::size_t{1}, std::size_t{256}))
      ->capture_default_str();
  app.add_option("--queue-capacity", cfg.queue_capacity,
                 "Messages the pipeline holds at once; past it devices get queue_full")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-devices", cfg.max_devices,
                 "Device records held in memory; offline ones are evicted past it (0: no bound)")
      ->capture_default_str();
  app.add_option("--firmware-size", cfg.firmware_size, "Bytes of each synthetic firmware image")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 30))
      ->capture_default_str();
  app.add_option("--dispatch-us", cfg.dispatch_us,
                 "Simulated downstream call per dispatched message, in microseconds")
      ->capture_default_str();
  app.add_option("--state-file", cfg.state_file,
                 "Where device states persist across restarts (JSON)")
      ->capture_default_str();
  app.add_option("--web-root", cfg.web_root, "Directory of index.html, app.js, style.css")
      ->check(CLI::ExistingDirectory)
      ->capture_default_str();
  app.add_option("--tls-cert", cfg.tls_cert,
                 "PEM certificate chain: serve https and wss (with --tls-key); SIGHUP reloads it")
      ->check(CLI::ExistingFile);
  app.add_option("--tls-key", cfg.tls_key, "PEM private key of --tls-cert")
      ->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);
  if (cfg.tls_cert.empty() != cfg.tls_key.empty()) {
    std::fprintf(stderr, "demo_server: --tls-cert and --tls-key go together\n");
    return 2;
  }
  if (cfg.workers_min > cfg.workers_max) {
    std::fprintf(stderr, "demo_server: --workers-min (%zu) is above --workers-max (%zu)\n",
                 cfg.workers_min, cfg.workers_max);
    return 2;
  }
  if (!std::filesystem::exists(std::filesystem::path(cfg.web_root) / "index.html")) {
    std::fprintf(stderr,
                 "demo_server: no index.html in %s; pass --web-root <examples/demo_server/web>\n",
                 cfg.web_root.c_str());
    return 2;
  }

  devgate::stop_signals stop;  // caught from here on; main() waits for them below

  std::unique_ptr<devgate_demo::file_state_store> loaded;
  try {
    loaded = std::make_unique<devgate_demo::file_state_store>(cfg.state_file);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "demo_server: %s\n", e.what());
    return 1;
  }

  route_context rc;
  rc.cfg = cfg;
  rc.files = devgate::websocket::static_files(cfg.web_root);

  devgate::websocket::server_options ws;
  ws.address = cfg.address;
  ws.port = cfg.port;
  ws.threads = cfg.threads;
  ws.identify = devgate::device::identify_device;
  ws.route = [&rc](const devgate::websocket::http_request& req) { return route(rc, req); };
  // A page that stops reading (a backgrounded tab) is closed with 1013 and resumes later.
  ws.backpressure.max_buffered_bytes = 8u << 20;
  if (!cfg.tls_cert.empty())
    ws.tls = devgate::websocket::tls_options{cfg.tls_cert, cfg.tls_key, {}};
  devgate::websocket::server transport(ws);

  auto fx = std::make_shared<dispatch_effects>();
  fx->work = std::chrono::microseconds(cfg.dispatch_us);

  devgate::device::hub_options ho;
  ho.pipeline.capacity = cfg.queue_capacity;
  ho.pipeline.pool.min_workers = cfg.workers_min;
  ho.pipeline.pool.max_workers = cfg.workers_max;
  ho.max_devices = cfg.max_devices;
  ho.on_store_error = [](std::string_view op, const std::string& id, std::error_code ec) {
    std::fprintf(stderr, "demo_server: state store %.*s for %s failed: %s\n",
                 static_cast<int>(op.size()), op.data(), id.c_str(), ec.message().c_str());
  };
  demo_hub hub(transport, demo_sink{fx}, ho, std::move(*loaded));
  loaded.reset();

  fx->receipt = [&hub](std::string_view device, std::uint64_t number, std::size_t worker) {
    hub.send_to(device,
                nlohmann::json{{"kind", "dispatched"}, {"message", number}, {"worker", worker}});
  };
  auto log_token = hub.subscribe(
      devgate::device::topics::server,
      [&rc](std::string_view, const devgate::shared_bytes& payload) { rc.log.add(payload); });

  control_loop control(hub, cfg.firmware_size);
  rc.hub = &hub;
  rc.control = &control;
  if (const auto ec = hub.start()) {
    std::fprintf(stderr, "demo_server: cannot listen on %s:%u: %s\n", cfg.address.c_str(),
                 static_cast<unsigned>(cfg.port), ec.message().c_str());
    return 1;
  }
  // The current release survives a restart: republish it so late devices still get it
  // (devices that already run it report its version and are skipped).
  if (const auto n = hub.state_store().releases(); n > 0) control.request_release(n);
  control.start();

  const auto port = transport.local_port();
  const char* scheme = ws.tls ? "https" : "http";
  std::printf("devgate demo server (devgate %s)\n", devgate_version().c_str());
  std::printf("  open   %s://localhost:%u/marco   (any /<device id> is a device: /fridge, ...)\n",
              scheme, static_cast<unsigned>(port));
  std::printf("  also   %s://localhost:%u/metrics   %s://localhost:%u/healthz\n", scheme,
              static_cast<unsigned>(port), scheme, static_cast<unsigned>(port));
  std::printf("  state  %s   web root %s\n", cfg.state_file.c_str(), cfg.web_root.c_str());
  std::printf("listening on %u; Ctrl-C stops\n", static_cast<unsigned>(port));
  std::fflush(stdout);

  // With TLS, SIGHUP reloads the certificate and key files (new connections get them).
  asio::io_context hup_context{1};
  std::optional<asio::signal_set> hup;
  std::function<void()> wait_hup = [&] {
    hup->async_wait([&](const std::error_code& e, int) {
      if (e) return;
      const auto reloaded = transport.reload_tls();
      std::fprintf(stderr, "demo_server: SIGHUP: %s\n",
                   reloaded ? reloaded.message().c_str() : "TLS certificate reloaded");
      wait_hup();
    });
  };
  std::thread hup_thread;
  if (ws.tls) {
    hup.emplace(hup_context, SIGHUP);
    wait_hup();
    hup_thread = std::thread([&] { hup_context.run(); });
  }

  stop.wait();
  hup_context.stop();
  if (hup_thread.joinable()) hup_thread.join();
  std::printf("stopping: draining the pipeline, closing sessions (1001)...\n");
  std::fflush(stdout);
  rc.stopping = true;
  control.stop();
  hub.stop();  // intake closes, queued messages dispatch, then sessions close with 1001
  hub.unsubscribe(log_token);
  hub.store_writer().drain();  // every write behind reaches the store before the file is saved
  const auto ec = hub.state_store().flush();
  const auto s = hub.stats();
  std::printf("stopped: %llu messages dispatched, state %s %s\n",
              static_cast<unsigned long long>(s.dispatched), cfg.state_file.c_str(),
              ec ? ec.message().c_str() : "saved");
  return ec ? 1 : 0;
}
