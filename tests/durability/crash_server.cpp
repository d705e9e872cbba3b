// devgate_crash_server: a device gateway as a user deploys it for durability, for the crash test
// (crash_test.py): a device::hub over websocket::server with the SQLite state store, ack policy
// on_dispatch, and the store's message log as the sink's durable record.
//
//   devgate_crash_server --port N --state-dir DIR [--sync normal|full] [--deliver-every-ms N]
//                        [--devices N] [--image-size N] [--ack on_dispatch|on_accept]
//                        [--journal FILE]
//
// It rolls firmware 2.0 out (unless the store brings a rollout back), and sends each device
// `deliver`s, one device after the other, every --deliver-every-ms, each with a token unique
// over every run ("<pid>-<n>"). With --journal, it appends to FILE "A <pid> <device> <seq>
// <token>" for each deliver assigned and "S <pid> <device> <seq>" each time the store has
// committed the device's deliveries up to seq (hub_options::on_deliver_stored), so the test
// can check that every committed deliver reached its device once. GET /quiesce stops the
// deliveries (the test's last phase); GET /status answers the hub's figures as JSON.
// Prints "listening on <port>" once ready; stops on SIGINT/SIGTERM (the test kills it -9).

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <atomic>      // flags the routes set
#include <chrono>      // the delivery pace
#include <cstddef>     // std::byte
#include <cstdint>     // counters
#include <cstdio>      // std::printf, the journal
#include <filesystem>  // the state directory
#include <mutex>       // the journal
#include <string>      // ids
#include <thread>      // the delivery thread
#include <vector>      // the image

#include <unistd.h>  // getpid

#include "devgate/core/stop_signals.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/hub.hpp"
#include "devgate/store/sqlite_state_store.hpp"
#include "devgate/websocket/server.hpp"

namespace {

using crash_hub = devgate::device::hub<devgate::websocket::server, devgate::null_sink,
                                       devgate::store::sqlite_state_store>;

devgate::websocket::http_reply json_reply(int status, const nlohmann::json& body) {
  devgate::websocket::http_reply r;
  r.status = status;
  r.content_type = "application/json";
  r.body = devgate::shared_bytes::copy_of(std::string_view(body.dump() + "\n"));
  r.extra_headers = "Cache-Control: no-store\r\n";
  return r;
}

std::string device_name(std::size_t i) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "dev-%04zu", i);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"devgate crash-test server: hub + SQLite store + ack on_dispatch"};
  unsigned port = 0;
  std::string state_dir;
  std::string sync = "normal";
  unsigned deliver_every_ms = 5;
  std::size_t devices = 1000;
  std::size_t image_size = 256 * 1024;
  std::string ack = "on_dispatch";
  std::string journal_path;
  app.add_option("--port", port, "TCP port")->required();
  app.add_option("--state-dir", state_dir, "directory of the SQLite database")->required();
  app.add_option("--sync", sync, "SQLite synchronous level")
      ->check(CLI::IsMember({"normal", "full"}));
  app.add_option("--deliver-every-ms", deliver_every_ms, "pace of deliveries (0: none)");
  app.add_option("--devices", devices, "devices the deliveries go to (dev-0000...)");
  app.add_option("--image-size", image_size, "bytes of the firmware image");
  app.add_option("--ack", ack, "ack policy (on_accept shows what the test catches)")
      ->check(CLI::IsMember({"on_accept", "on_dispatch"}));
  app.add_option("--journal", journal_path, "file to append assigned and stored deliveries to");
  CLI11_PARSE(app, argc, argv);

  // Each line is flushed (a write(2)): a kill -9 keeps what was written.
  std::FILE* journal = journal_path.empty() ? nullptr : std::fopen(journal_path.c_str(), "a");
  if (!journal_path.empty() && journal == nullptr) {
    std::fprintf(stderr, "devgate_crash_server: cannot open %s\n", journal_path.c_str());
    return 1;
  }
  std::mutex journal_mutex;
  const long pid = static_cast<long>(::getpid());

  devgate::stop_signals stop;
  std::filesystem::create_directories(state_dir);
  devgate::store::sqlite_options so;
  so.path = (std::filesystem::path(state_dir) / "devgate.db").string();
  so.durability = sync == "full" ? devgate::store::sqlite_synchronous::full
                                 : devgate::store::sqlite_synchronous::normal;
  so.message_log = true;
  devgate::store::sqlite_state_store store(so);

  std::atomic<bool> quiesced{false};
  std::atomic<crash_hub*> hub_ptr{nullptr};
  devgate::websocket::server_options options;
  options.address = "127.0.0.1";
  options.port = static_cast<std::uint16_t>(port);
  options.threads = 2;
  options.identify = devgate::device::identify_device;
  options.route = [&](const devgate::websocket::http_request& req) {
    if (req.target == "/quiesce") {
      quiesced = true;
      return json_reply(200, {{"quiesced", true}});
    }
    if (req.target == "/status") {
      nlohmann::json body{{"quiesced", quiesced.load()}};
      if (auto* hub = hub_ptr.load()) {
        const auto s = hub->stats();
        body["connected"] = s.connected;
        body["dispatched"] = s.dispatched;
        body["store_errors"] = s.store_errors;
        body["verified"] = s.rollout.verified;
        body["transferring"] = s.rollout.transferring;
        body["rollout"] = s.rollout.rollout;
      }
      return json_reply(200, body);
    }
    return json_reply(404, {{"error", "GET /status or /quiesce"}});
  };
  devgate::websocket::server transport(options);

  devgate::device::hub_options ho;
  ho.ack = ack == "on_accept" ? devgate::device::ack_policy::on_accept
                              : devgate::device::ack_policy::on_dispatch;
  ho.max_concurrent_transfers = 4;
  ho.window = 2;
  ho.chunk_size = 4 * 1024;
  ho.max_replay_messages = 100'000;  // nothing dropped: the test checks every deliver
  ho.max_replay_bytes = 64u << 20;
  ho.on_deliver_stored = [&](const std::string& id, std::uint64_t seq, bool stored) {
    std::lock_guard lock(journal_mutex);
    if (journal == nullptr || !stored) return;
    std::fprintf(journal, "S %ld %s %llu\n", pid, id.c_str(), static_cast<unsigned long long>(seq));
    std::fflush(journal);
  };
  ho.on_store_error = [](std::string_view op, const std::string& id, std::error_code ec) {
    std::fprintf(stderr, "store error: %.*s %s: %s\n", static_cast<int>(op.size()), op.data(),
                 id.c_str(), ec.message().c_str());
  };
  crash_hub hub(transport, {}, ho, std::move(store));
  hub_ptr = &hub;
  if (const auto ec = hub.start()) {
    std::fprintf(stderr, "devgate_crash_server: %s\n", ec.message().c_str());
    return 1;
  }
  if (!hub.current_image()) {  // the first start; later ones resume the kept rollout
    std::vector<std::byte> image(image_size);
    for (std::size_t i = 0; i < image.size(); ++i) {
      image[i] = static_cast<std::byte>((i * 131 + 7) & 0xFF);
    }
    hub.publish_firmware("2.0", image);
  }
  std::printf("listening on %u\n", static_cast<unsigned>(transport.local_port()));
  std::fflush(stdout);

  std::atomic<bool> done{false};
  std::thread deliverer([&] {
    std::size_t next = 0;
    while (!done.load() && deliver_every_ms != 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(deliver_every_ms));
      if (quiesced.load()) continue;
      const auto id = device_name(next % devices);
      const auto token = std::to_string(pid) + "-" + std::to_string(next++);
      const auto seq =
          hub.send_to(id, {{"from", "crash_server"}, {"device", id}, {"token", token}});
      {
        std::lock_guard lock(journal_mutex);
        if (journal != nullptr) {
          std::fprintf(journal, "A %ld %s %llu %s\n", pid, id.c_str(),
                       static_cast<unsigned long long>(seq), token.c_str());
          std::fflush(journal);
        }
      }
    }
  });
  stop.wait();
  done = true;
  deliverer.join();
  hub_ptr = nullptr;
  hub.stop();
  {
    std::lock_guard lock(journal_mutex);  // the store thread may still report (~hub drains it)
    if (journal != nullptr) std::fclose(journal);
    journal = nullptr;
  }
  return 0;
}
