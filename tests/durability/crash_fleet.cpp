// devgate_crash_fleet: the devices of the crash test (crash_test.py), each a devgate
// device_client (C++, Asio) on one thread: each sends numbered messages with increasing ids,
// receives `deliver`s (acknowledged), downloads the firmware rollout, and reconnects whenever
// its connection drops (the server is killed -9 and restarted under it).
//
//   devgate_crash_fleet --port N --devices N --report FILE [--send-every-ms N]
//
// On a line "finish" on stdin it stops sending new messages and waits until every device has
// its every send answered `sent`, has verified the firmware, and has had no new `deliver` for a
// while; then it writes the report (JSON: per device, the ids sent, the sequence numbers of the
// delivers in the order received, the firmware figures) and exits 0 (1 if it could not finish
// within --finish-timeout-s).

#include <CLI/CLI.hpp>
#include <asio.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>   // std::max
#include <chrono>      // pacing
#include <cstdint>     // ids
#include <cstdio>      // std::snprintf
#include <cstdlib>     // std::_Exit
#include <fstream>     // the report
#include <functional>  // the timers' loops
#include <iostream>    // the finish line
#include <memory>      // clients
#include <string>      // names
#include <thread>      // the stdin reader
#include <vector>      // devices

#include "devgate/client/device_client.hpp"

namespace {

struct device {
  std::string name;
  std::unique_ptr<devgate::client::device_client> client;
  std::unique_ptr<asio::steady_timer> retry;
  std::uint64_t next_id = 1;                // the id of the next new send
  std::vector<std::uint64_t> delivers;      // sequence numbers, in the order received
  std::vector<std::string> tokens;          // their data's tokens, in the same order
  std::uint64_t last_messages_sent = 0;     // from the last `sent`
  std::uint64_t welcome_messages_sent = 0;  // from the last welcome
  std::uint64_t verified = 0;               // firmware updates verified
  std::uint64_t failed = 0;                 // firmware updates failed
  std::uint64_t errors = 0;                 // error messages received
  std::chrono::steady_clock::time_point last_deliver{};
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"devgate crash-test fleet: device clients that send, receive and update"};
  unsigned port = 0;
  std::size_t count = 1000;
  std::string report;
  unsigned send_every_ms = 200;
  unsigned finish_timeout_s = 120;
  app.add_option("--port", port, "server port")->required();
  app.add_option("--devices", count, "devices (dev-0000...)");
  app.add_option("--report", report, "where the JSON report goes")->required();
  app.add_option("--send-every-ms", send_every_ms, "each device sends one message this often");
  app.add_option("--finish-timeout-s", finish_timeout_s, "how long finishing may take");
  CLI11_PARSE(app, argc, argv);

  asio::io_context ioc;
  auto guard = asio::make_work_guard(ioc);
  std::vector<device> fleet(count);
  bool finishing = false;
  for (std::size_t i = 0; i < count; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "dev-%04zu", i);
    devgate::client::device_client_options o;
    o.port = static_cast<std::uint16_t>(port);
    o.device_id = name;
    o.firmware_version = "1.0";
    auto& d = fleet[i];
    d.name = name;
    d.client = std::make_unique<devgate::client::device_client>(ioc, o);
    d.retry = std::make_unique<asio::steady_timer>(ioc);
    d.client->on_deliver = [&d](std::uint64_t seq, const nlohmann::json& j) {
      d.delivers.push_back(seq);
      d.tokens.push_back(j["data"].value("token", ""));
      d.last_deliver = std::chrono::steady_clock::now();
    };
    d.client->on_welcome = [&d](const nlohmann::json& w) {
      d.welcome_messages_sent = w["state"]["messages_sent"].get<std::uint64_t>();
    };
    d.client->on_text = [&d](const nlohmann::json& j) {
      const auto type = j.value("type", "");
      if (type == "sent") d.last_messages_sent = j["messages_sent"].get<std::uint64_t>();
      if (type == "error") ++d.errors;
    };
    d.client->on_firmware = [&d](const std::string&, bool ok, const std::string&) {
      ++(ok ? d.verified : d.failed);
    };
    // Reconnect 100-300 ms after any drop (the server is down while it restarts).
    d.client->on_closed = [&d, i](std::uint16_t) {
      d.retry->expires_after(std::chrono::milliseconds(100 + (i * 37) % 200));
      d.retry->async_wait([&d](const std::error_code& e) {
        if (!e) d.client->connect();
      });
    };
    d.client->connect();
  }

  // Each device sends one new message per period, while it is connected and not finishing.
  asio::steady_timer pace(ioc);
  std::size_t turn = 0;
  std::function<void()> tick = [&] {
    if (!finishing) {
      // Spread over the period: a slice of the fleet per millisecond-ish tick.
      const std::size_t per_tick = std::max<std::size_t>(1, count / std::max(1u, send_every_ms));
      for (std::size_t k = 0; k < per_tick; ++k) {
        auto& d = fleet[turn++ % count];
        if (d.client->connected() && d.client->unacknowledged() < 200) {
          const auto id = d.next_id++;
          d.client->send({{"n", id}}, id);
        }
      }
    }
    pace.expires_after(std::chrono::milliseconds(1));
    pace.async_wait([&](const std::error_code& e) {
      if (!e) tick();
    });
  };
  tick();

  // The finish line: stop sending, wait until everything settled, report.
  int exit_code = 1;
  asio::steady_timer settle(ioc);
  std::chrono::steady_clock::time_point finish_started{};
  std::function<void()> check = [&] {
    const auto now = std::chrono::steady_clock::now();
    bool settled = true;
    for (auto& d : fleet) {
      if (!d.client->connected() || d.client->unacknowledged() != 0 || d.verified == 0 ||
          now - d.last_deliver < std::chrono::seconds(2)) {
        settled = false;
        break;
      }
    }
    if (settled || now - finish_started > std::chrono::seconds(finish_timeout_s)) {
      nlohmann::json out = nlohmann::json::object();
      for (auto& d : fleet) {
        out[d.name] = {{"sent", d.next_id - 1},
                       {"unacknowledged", d.client->unacknowledged()},
                       {"unacknowledged_dropped", d.client->unacknowledged_dropped()},
                       {"delivers", d.delivers},
                       {"tokens", d.tokens},
                       {"duplicates", d.client->duplicates()},
                       {"last_messages_sent", d.last_messages_sent},
                       {"welcome_messages_sent", d.welcome_messages_sent},
                       {"verified", d.verified},
                       {"failed", d.failed},
                       {"firmware_restarts", d.client->firmware_restarts()},
                       {"chunks", d.client->chunks_received()},
                       {"sha256", d.client->last_image_sha256()},
                       {"errors", d.errors},
                       {"welcomes", d.client->welcomes()}};
      }
      std::ofstream(report) << out.dump() << "\n";
      exit_code = settled ? 0 : 1;
      if (!settled) std::fprintf(stderr, "crash_fleet: did not settle in time\n");
      for (auto& d : fleet) d.retry->cancel();
      pace.cancel();
      guard.reset();
      ioc.stop();
      return;
    }
    settle.expires_after(std::chrono::milliseconds(200));
    settle.async_wait([&](const std::error_code& e) {
      if (!e) check();
    });
  };
  std::thread input([&] {
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line == "finish") {
        asio::post(ioc, [&] {
          finishing = true;
          finish_started = std::chrono::steady_clock::now();
          check();
        });
        return;
      }
    }
  });
  ioc.run();
  input.detach();  // blocked on stdin, which the test closes; the process ends here
  std::fflush(stdout);
  std::_Exit(exit_code);  // the clients' sockets close with the process
}
