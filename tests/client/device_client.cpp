// End to end: the C++ device client against websocket::server + device::hub.
#include "devgate/client/device_client.hpp"

#include <catch2/catch.hpp>

#include <asio.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "devgate/device/device_id.hpp"
#include "devgate/device/hub.hpp"
#include "devgate/websocket/server.hpp"
#include "support.hpp"
#if DEVGATE_TEST_SQLITE
#include "devgate/store/sqlite_state_store.hpp"
#endif

namespace dev = devgate::device;
using devgate::client::device_client;
using devgate::client::device_client_options;
using json = nlohmann::json;

namespace {

// Real sockets, hundreds of devices, sanitizer builds: generous bounds (they only detect failure).
template <class Pred>
bool eventually(Pred p, std::chrono::milliseconds limit = std::chrono::seconds(120)) {
  return devgate::testing::eventually(std::move(p), limit);
}

// A server + hub on loopback, and an io_context thread for clients.
struct rig {
  devgate::websocket::server ws;
  dev::hub<devgate::websocket::server> hub;
  asio::io_context ioc;
  asio::executor_work_guard<asio::io_context::executor_type> guard{asio::make_work_guard(ioc)};
  std::thread io;

  static devgate::websocket::server_options ws_options() {
    devgate::websocket::server_options o;
    o.address = "127.0.0.1";
    o.threads = 2;
    o.identify = dev::identify_device;
    return o;
  }
  explicit rig(dev::hub_options o = {}) : ws(ws_options()), hub(ws, {}, std::move(o)) {
    REQUIRE_FALSE(hub.start());
    io = std::thread([this] { ioc.run(); });
  }
  ~rig() { finish(); }
  // Stops the hub and the client thread (before any client is destroyed).
  void finish() {
    if (!io.joinable()) return;
    hub.stop();
    guard.reset();
    ioc.stop();
    io.join();
  }
  device_client_options opts(std::string id, std::string version = "") const {
    device_client_options o;
    o.port = ws.local_port();
    o.device_id = std::move(id);
    o.firmware_version = std::move(version);
    return o;
  }
};

// Declared after the clients: stops the client thread before they are destroyed.
struct stop_first {
  rig& r;
  ~stop_first() { r.finish(); }
};

std::vector<std::byte> make_image(std::size_t n) {
  std::vector<std::byte> v(n);
  std::uint32_t x = 2463534242u;
  for (auto& b : v) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<std::byte>(x);
  }
  return v;
}

std::string http_get(std::uint16_t port, const std::string& target) {
  asio::io_context ctx;
  asio::ip::tcp::socket s(ctx);
  s.connect({asio::ip::make_address("127.0.0.1"), port});
  const std::string req = "GET " + target +
                          " HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n";
  asio::write(s, asio::buffer(req));
  asio::streambuf buf;
  std::error_code ec;
  asio::read_until(s, buf, "\r\n", ec);
  std::string line;
  std::istream is(&buf);
  std::getline(is, line);
  return line;
}

}  // namespace

TEST_CASE("e2e: ids are checked before the upgrade (400), valid ids upgrade (101)") {
  rig r;
  CHECK(http_get(r.ws.local_port(), "/ws/bad%20id").starts_with("HTTP/1.1 400"));
  CHECK(http_get(r.ws.local_port(), "/ws/" + std::string(129, 'a')).starts_with("HTTP/1.1 400"));
  CHECK(http_get(r.ws.local_port(), "/other/x").starts_with("HTTP/1.1 400"));
  CHECK(http_get(r.ws.local_port(), "/ws/ok-id_1.2").starts_with("HTTP/1.1 101"));
}

TEST_CASE("e2e: reconnect keeps state; offline messages arrive once and in order; takeover") {
  rig r;
  device_client c(r.ioc, r.opts("tab1"));
  std::mutex mu;
  std::vector<std::uint64_t> seqs;
  std::vector<json> welcomes, texts;
  std::atomic<int> closed{0};
  std::atomic<std::uint16_t> close_code{0};
  c.on_deliver = [&](std::uint64_t seq, const json& j) {
    std::lock_guard lock(mu);
    // Catch assertions only on the test thread: record and compare there.
    seqs.push_back(j["data"]["n"] == seq ? seq : 0);
  };
  c.on_welcome = [&](const json& j) {
    std::lock_guard lock(mu);
    welcomes.push_back(j);
  };
  c.on_text = [&](const json& j) {
    std::lock_guard lock(mu);
    texts.push_back(j);
  };
  c.on_closed = [&](std::uint16_t code) {
    close_code = code;
    ++closed;
  };
  c.connect();
  REQUIRE(eventually([&] { return c.connected(); }));
  for (int i = 1; i <= 4; ++i) c.send({{"i", i}}, i);
  REQUIRE(eventually([&] { return r.hub.device_state("tab1").messages_sent == 4; }));
  r.hub.send_to("tab1", {{"n", 1}});
  REQUIRE(eventually([&] { return c.last_seq() == 1; }));
  c.close();
  REQUIRE(eventually([&] { return closed.load() == 1; }));
  CHECK(close_code.load() == 1000);
  for (int n = 2; n <= 6; ++n) r.hub.send_to("tab1", {{"n", n}});
  c.connect();
  REQUIRE(eventually([&] { return c.last_seq() == 6; }));
  {
    std::lock_guard lock(mu);
    CHECK(seqs == std::vector<std::uint64_t>{1, 2, 3, 4, 5, 6});
    REQUIRE(welcomes.size() == 2);
    CHECK(welcomes[1]["state"]["messages_sent"] == 4);
    CHECK(welcomes[1]["replay"] == 5);
  }
  CHECK(c.duplicates() == 0);

  // A second tab with the same id takes over; the first is closed with 4000.
  device_client c2(r.ioc, r.opts("tab1"));
  stop_first stop_io{r};
  c2.connect();
  REQUIRE(eventually([&] { return closed.load() == 2; }));
  CHECK(close_code.load() == 4000);
  REQUIRE(eventually([&] { return c2.connected(); }));
  // Bad input over the wire gets its documented error (sent once the handler counts them, so
  // that the three errors awaited are these three).
  std::atomic<int> errors{0};
  std::vector<std::string> codes;
  c2.on_text = [&](const json& j) {
    if (j["type"] == "error") {
      std::lock_guard lock(mu);
      codes.push_back(j["code"]);
      ++errors;
    }
  };
  c2.send_text("{oops");
  c2.send_json({{"type", "ack"}, {"seq", 99}});
  c2.send_json({{"type", "whatever"}});
  REQUIRE(eventually([&] { return errors.load() >= 3; }));
  {
    std::lock_guard lock(mu);
    CHECK(std::find(codes.begin(), codes.end(), "bad_json") != codes.end());
    CHECK(std::find(codes.begin(), codes.end(), "bad_ack") != codes.end());
    CHECK(std::find(codes.begin(), codes.end(), "unknown_type") != codes.end());
  }
  c2.close();
  REQUIRE(eventually([&] { return r.hub.connected() == 0; }));
}

TEST_CASE("e2e: firmware reaches hundreds of devices, verified, with connections killed") {
  const int devices =
      std::getenv("DEVGATE_E2E_DEVICES") ? std::atoi(std::getenv("DEVGATE_E2E_DEVICES")) : 300;
  constexpr std::size_t limit = 16;
  dev::hub_options o;
  o.chunk_size = 8192;
  o.window = 4;
  o.max_concurrent_transfers = limit;
  rig r(o);
  const auto image = make_image(200'000);
  const auto sha = devgate::detail::hex_encode(devgate::detail::sha256(image));

  std::vector<std::unique_ptr<device_client>> clients;
  stop_first stop_io{r};
  std::atomic<int> verified_cb{0};
  std::atomic<int> reconnects{0};
  for (int i = 0; i < devices; ++i) {
    auto c = std::make_unique<device_client>(r.ioc, r.opts("dev" + std::to_string(i), "1.0"));
    c->on_firmware = [&](const std::string& v, bool ok, const std::string&) {
      if (ok && v == "2.0") ++verified_cb;
    };
    // Every client reconnects after it drops (killed below).
    c->on_closed = [&, p = c.get()](std::uint16_t code) {
      if (code == 1006) {
        ++reconnects;
        p->connect();
      }
    };
    clients.push_back(std::move(c));
  }
  // Two thirds online at publish, the rest connect afterwards.
  for (int i = 0; i < devices * 2 / 3; ++i) clients[i]->connect();
  REQUIRE(
      eventually([&] { return r.hub.connected() == static_cast<std::size_t>(devices * 2 / 3); }));
  const auto start = std::chrono::steady_clock::now();
  r.hub.publish_firmware("2.0", image);
  for (int i = devices * 2 / 3; i < devices; ++i) clients[i]->connect();
  // Kill connections mid-transfer: every 10th device, once it has received some chunks.
  std::vector<bool> killed(devices, false);
  int kills = 0;
  const bool all_verified = eventually(
      [&] {
        for (int i = 0; i < devices; i += 10) {
          if (!killed[i] && clients[i]->chunks_received() >= 3 &&
              clients[i]->firmware_verified() == 0) {
            killed[i] = true;
            ++kills;
            clients[i]->abort();
          }
        }
        CHECK(r.hub.slots().active() <= limit);
        return r.hub.rollout().verified == static_cast<std::size_t>(devices);
      },
      std::chrono::seconds(300));
  {
    const auto t = r.hub.rollout();
    INFO("verified " << t.verified << " pending " << t.pending << " transferring " << t.transferring
                     << " failed " << t.failed << " active " << r.hub.slots().active()
                     << " waiting " << r.hub.slots().waiting() << " connected "
                     << r.hub.connected());
    REQUIRE(all_verified);
  }
  const auto secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto tot = r.hub.rollout();
  CHECK(tot.failed == 0);
  CHECK(tot.peak_transferring <= limit);
  CHECK(tot.peak_transferring >= 2);
  CHECK(kills > 0);
  REQUIRE(eventually([&] { return verified_cb.load() == devices; }));
  for (auto& c : clients) CHECK(c->last_image_sha256() == sha);
  // Held once: the hub's image is the only owner of the buffer once transfers are done.
  auto img = r.hub.current_image();
  REQUIRE(img);
  CHECK(img->memory_bytes() < image.size() + 64 * 25 + 1);
  WARN("rollout of " << image.size() << " bytes to " << devices << " devices (limit " << limit
                     << ", " << kills << " killed mid-transfer, " << reconnects.load()
                     << " reconnects): " << secs << " s");
  for (auto& c : clients) c->close();
  REQUIRE(eventually([&] { return r.hub.connected() == 0; }));
}

TEST_CASE("e2e: a device that lost its partial image restarts the transfer from byte 0") {
  dev::hub_options o;
  o.chunk_size = 4096;
  o.window = 2;
  rig r(o);
  const auto image = make_image(1024 * 1024);  // 256 chunks: the abort comes mid-transfer
  const auto sha = devgate::detail::hex_encode(devgate::detail::sha256(image));
  auto first = std::make_unique<device_client>(r.ioc, r.opts("board", "1.0"));
  // A new client (the board after its reset, below) has none of the image.
  device_client again(r.ioc, r.opts("board", "1.0"));
  std::mutex mu;
  std::vector<std::string> errors;
  again.on_text = [&](const json& j) {
    std::lock_guard lock(mu);
    if (j["type"] == "error") errors.push_back(j.dump());
  };
  stop_first stop_io{r};
  first->connect();
  REQUIRE(eventually([&] { return r.hub.connected() == 1; }));
  r.hub.publish_firmware("2.0", image);
  REQUIRE(eventually([&] { return first->chunks_received() >= 3; }));
  first->abort();  // the board resets: its partial image is gone
  REQUIRE(eventually([&] { return r.hub.connected() == 0; }));
  const auto acked = r.hub.device_transfer("board");
  REQUIRE(acked);
  CHECK(acked->offset > 0);  // the server resumes past bytes the new client does not hold
  REQUIRE(r.hub.rollout().verified == 0);
  again.connect();
  const bool verified = eventually([&] { return again.firmware_verified() == 1; });
  {
    std::lock_guard lock(mu);
    INFO("errors: " << errors.size() << (errors.empty() ? "" : " first " + errors.front())
                    << " restarts " << again.firmware_restarts() << " chunks "
                    << again.chunks_received() << " rollout " << r.hub.rollout().transferring << "/"
                    << r.hub.rollout().pending << "/" << r.hub.rollout().failed);
    REQUIRE(verified);
  }
  CHECK(again.firmware_restarts() == 1);
  CHECK(again.last_image_sha256() == sha);
  CHECK(r.hub.rollout().verified == 1);
  CHECK(r.hub.rollout().failed == 0);
  again.close();
  REQUIRE(eventually([&] { return r.hub.connected() == 0; }));
}

namespace {
struct collect {
  std::vector<std::string> texts;
  void on_message(devgate::payload_kind, devgate::shared_bytes b) { texts.emplace_back(b.view()); }
  void on_ping(std::span<const std::byte>) {}
  void on_pong(std::span<const std::byte>) {}
  void on_close(std::uint16_t, std::string_view) {}
};
}  // namespace

TEST_CASE("frame_reader client role: unmasked frames accepted, masked ones fail with 1002") {
  using namespace devgate::websocket;
  reader_limits limits;
  limits.role = reader_role::client;
  const std::string_view text = "hello";
  const auto payload = std::as_bytes(std::span(text.data(), text.size()));
  {
    frame_reader r(limits);
    collect c;
    auto f = encode_frame(opcode::text, payload);
    std::vector<std::byte> wire(f.bytes().begin(), f.bytes().end());
    CHECK(r.consume(wire, c) == read_status::ok);
    REQUIRE(c.texts.size() == 1);
    CHECK(c.texts[0] == "hello");
  }
  {
    frame_reader r(limits);
    collect c;
    auto wire = encode_client_frame(opcode::text, true, payload,
                                    {std::byte{1}, std::byte{2}, std::byte{3}, std::byte{4}});
    CHECK(r.consume(wire, c) == read_status::error);
    CHECK(r.error() == devgate::close_code::protocol_error);
  }
  STATIC_REQUIRE(sizeof(frame_reader) <= 64);
}

// Rollout campaigns through the hub, on a fleet of real clients scripted with their faults.
namespace {
struct campaign_fleet {
  rig& r;
  std::vector<std::unique_ptr<device_client>> clients;
  std::atomic<int> cancelled_told{0};
  // `n` devices c0000.. on version 1.0, region eu for even ones, connected.
  campaign_fleet(rig& rr, int n) : r(rr) {
    for (int i = 0; i < n; ++i) {
      char name[16];
      std::snprintf(name, sizeof name, "c%04d", i);
      auto o = r.opts(name, "1.0");
      o.attributes = {{"region", i % 2 == 0 ? "eu" : "us"}, {"model", "m1"}};
      auto c = std::make_unique<device_client>(r.ioc, o);
      c->on_firmware = [this](const std::string&, bool ok, const std::string& reason) {
        if (!ok && reason == "cancelled") ++cancelled_told;
      };
      clients.push_back(std::move(c));
    }
    for (auto& c : clients) c->connect();
    REQUIRE(eventually([&] { return r.hub.connected() == static_cast<std::size_t>(n); }));
  }
  json describe(std::uint64_t id) const { return *r.hub.campaigns().describe(id); }
  std::size_t count(std::uint64_t id, const char* status) const {
    return describe(id)["counts"][status].get<std::size_t>();
  }
};
}  // namespace

TEST_CASE(
    "e2e campaign: 1,000 devices in waves; a bad wave pauses it, a resume completes it; "
    "the rate, cancel, timeouts and retries") {
  constexpr int devices = 1000;
  dev::hub_options o;
  o.chunk_size = 1024;
  o.window = 2;
  o.max_concurrent_transfers = 64;
  o.stall_timeout = std::chrono::milliseconds(0);  // the campaign's timeout is under test
  rig r(o);
  campaign_fleet f(r, devices);
  stop_first stop_io{r};  // after the clients: the client thread stops before they go
  const auto image = make_image(3000);

  // Waves of 10/40/50%, success 90%, errors 5% once 20 are done; 10% of wave 2 fail.
  for (int i = 100; i < 500; i += 10) f.clients[i]->set_faults({true, 0});
  auto spec = devgate::firmware::parse_campaign_spec(json::parse(R"({
      "name": "staged", "waves": [{"percent": 10}, {"percent": 40}, {"percent": 50}],
      "success_threshold": 90, "error_threshold": {"percent": 5, "min_executed": 20}})"));
  spec.version = "2.0";
  const auto id = r.hub.start_campaign(spec, image);
  REQUIRE(eventually([&] { return f.describe(id)["state"] == "paused"; }));
  auto d = f.describe(id);
  INFO(d.dump());
  CHECK(d["reason"].get<std::string>().rfind("wave 2:", 0) == 0);
  CHECK(d["waves"][0]["counts"]["verified"] == 100);
  CHECK(d["waves"][2]["started"] == false);
  // In-flight transfers finish; then nothing moves and wave 3 stays untouched.
  REQUIRE(eventually([&] {
    const auto w = f.describe(id)["waves"][1]["counts"];
    return w["pending"] == 0 && w["transferring"] == 0;
  }));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  d = f.describe(id);
  CHECK(d["state"] == "paused");
  CHECK(d["waves"][2]["counts"]["queued"] == 500);
  for (int i = 500; i < devices; ++i) CHECK(f.clients[i]->chunks_received() == 0);
  const auto failed = d["counts"]["failed"].get<std::size_t>();
  CHECK(failed > 0);
  CHECK(failed <= 40);
  // The failures are listed with their reason, filtered and paged.
  auto page =
      *r.hub.campaigns().devices(id, devgate::firmware::campaign_device_status::failed, 0, 5);
  CHECK(page["total"] == failed);
  CHECK(page["devices"].size() == std::min<std::size_t>(5, failed));
  CHECK(page["devices"][0]["reason"] == "sha256 mismatch on the device");
  // Fixed, resumed: every device ends verified.
  for (int i = 100; i < 500; i += 10) f.clients[i]->set_faults({});
  REQUIRE(r.hub.resume_campaign(id));
  REQUIRE(eventually([&] { return f.describe(id)["state"] == "completed"; }));
  CHECK(f.count(id, "verified") == devices);
  REQUIRE(eventually([&] {
    for (auto& c : f.clients) {
      if (c->firmware_verified() != 1) return false;
    }
    return true;
  }));
  CHECK(!r.hub.campaigns().active());

  // A rate of 120 a minute on the devices of region eu, which stall mid-transfer: measured
  // over 10 s, then the campaign is cancelled with transfers running.
  for (auto& c : f.clients) c->set_faults({false, 1024});
  auto rated = devgate::firmware::parse_campaign_spec(
      json::parse(R"({"target": {"attributes": {"region": "eu"}}, "rate": {"per_minute": 120}})"));
  rated.version = "3.0";
  const auto id2 = r.hub.start_campaign(rated, image);
  CHECK(f.describe(id2)["devices"] == devices / 2);
  REQUIRE(eventually([&] { return f.describe(id2)["admitted"] == 1; }));
  const auto t0 = std::chrono::steady_clock::now();
  const auto a0 = f.describe(id2)["admitted"].get<double>();
  std::this_thread::sleep_for(std::chrono::seconds(10));
  const auto a1 = f.describe(id2)["admitted"].get<double>();
  const auto minutes =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 60;
  const double per_minute = (a1 - a0) / minutes;
  INFO("admitted " << a1 - a0 << " in " << minutes * 60 << " s: " << per_minute << " a minute");
  CHECK(per_minute >= 108);
  CHECK(per_minute <= 132);
  const auto running = f.count(id2, "transferring");
  CHECK(running > 10);
  REQUIRE(r.hub.cancel_campaign(id2, "operator: wrong image"));
  d = f.describe(id2);
  CHECK(d["state"] == "cancelled");
  CHECK(d["counts"]["cancelled"] == devices / 2);
  // The devices transferring were told, and stop.
  REQUIRE(eventually([&] { return f.cancelled_told.load() >= static_cast<int>(running); }));
  CHECK(r.hub.slots().active() == 0);

  // Timeouts and retries: five stalled devices, 1 s to finish, one retry each.
  auto timed = devgate::firmware::parse_campaign_spec(json::parse(
      R"({"target": {"ids": ["c0001", "c0003", "c0005", "c0007", "c0009"]}, "timeout_s": 1,
          "retries": 1, "success_threshold": 0})"));
  timed.version = "4.0";
  const auto id3 = r.hub.start_campaign(timed, image);
  REQUIRE(eventually([&] { return f.describe(id3)["state"] == "completed"; }));
  d = f.describe(id3);
  CHECK(d["counts"]["timed_out"] == 5);
  CHECK(d["timeouts"] == 10);
  CHECK(d["retries"] == 5);
  auto one = *r.hub.campaigns().devices(id3, std::nullopt, 0, 1);
  CHECK(one["devices"][0]["attempts"] == 2);
  CHECK(one["devices"][0]["reason"] == "timed_out");

  // A newer campaign supersedes the one running; a release to the whole fleet supersedes it.
  for (auto& c : f.clients) c->set_faults({});
  auto slow = devgate::firmware::parse_campaign_spec(json::parse(R"({"rate": {"per_minute": 1}})"));
  slow.version = "5.0";
  const auto id4 = r.hub.start_campaign(slow, image);
  slow.version = "6.0";
  const auto id5 = r.hub.start_campaign(slow, image);
  d = f.describe(id4);
  CHECK(d["state"] == "superseded");
  CHECK(d["reason"] == "superseded by campaign " + std::to_string(id5));
  CHECK(d["counts"]["superseded"].get<std::size_t>() + d["counts"]["verified"].get<std::size_t>() ==
        devices);
  CHECK(r.hub.campaigns().active() == id5);
  const auto release = r.hub.publish_firmware("7.0", image);
  d = f.describe(id5);
  CHECK(d["state"] == "superseded");
  CHECK(d["reason"] == "superseded by release " + std::to_string(release) + " to the whole fleet");
  CHECK(!r.hub.campaigns().active());
  REQUIRE(
      eventually([&] { return r.hub.rollout().verified == static_cast<std::size_t>(devices); }));
  for (auto& c : f.clients) c->close();
  REQUIRE(eventually([&] { return r.hub.connected() == 0; }));
}

#if DEVGATE_TEST_SQLITE
namespace {
// A server + hub keeping its state in SQLite at `db`, listening on `port` (0: any).
struct sqlite_node {
  devgate::websocket::server ws;
  dev::hub<devgate::websocket::server, devgate::null_sink, devgate::store::sqlite_state_store> hub;

  static devgate::websocket::server_options ws_options(std::uint16_t port) {
    auto o = rig::ws_options();
    o.port = port;
    return o;
  }
  static devgate::store::sqlite_state_store open(const std::string& db) {
    devgate::store::sqlite_options o;
    o.path = db;
    return devgate::store::sqlite_state_store(std::move(o));
  }
  sqlite_node(const std::string& db, std::uint16_t port, dev::hub_options o)
      : ws(ws_options(port)), hub(ws, {}, std::move(o), open(db)) {
    REQUIRE_FALSE(hub.start());
  }
};
}  // namespace

TEST_CASE(
    "e2e campaign: a server restart mid-campaign with the SQLite store continues where "
    "it was") {
  constexpr int devices = 200;
  constexpr std::size_t image_size = 32 * 1024;  // 32 chunks of 1 KiB
  char dir_pattern[] = "/tmp/devgate-campaign-XXXXXX";
  REQUIRE(mkdtemp(dir_pattern) != nullptr);
  const std::string dir = dir_pattern;
  const std::string db = dir + "/state.db";
  dev::hub_options o;
  o.chunk_size = 1024;
  o.window = 2;
  o.max_concurrent_transfers = 16;
  o.stall_timeout = std::chrono::milliseconds(0);
  const auto image = make_image(image_size);

  asio::io_context ioc;
  auto guard = asio::make_work_guard(ioc);
  std::vector<std::unique_ptr<device_client>> clients;
  auto node = std::make_unique<sqlite_node>(db, 0, o);
  const auto port = node->ws.local_port();
  for (int i = 0; i < devices; ++i) {
    char name[16];
    std::snprintf(name, sizeof name, "r%04d", i);
    device_client_options co;
    co.port = port;
    co.device_id = name;
    co.firmware_version = "1.0";
    clients.push_back(std::make_unique<device_client>(ioc, co));
  }
  // Two devices of wave 2 fail every attempt (they end failed after their retry).
  clients[100]->set_faults({true, 0});
  clients[150]->set_faults({true, 0});
  // Ten devices of wave 2 stall after 8 KiB: they are mid-transfer when the server restarts.
  for (int i = 40; i < 50; ++i) clients[static_cast<std::size_t>(i)]->set_faults({false, 8192});
  std::thread io([&] { ioc.run(); });
  struct joiner {
    std::thread& t;
    asio::io_context& c;
    ~joiner() {
      c.stop();
      if (t.joinable()) t.join();
    }
  } join_io{io, ioc};
  for (auto& c : clients) c->connect();
  REQUIRE(eventually([&] { return node->hub.connected() == static_cast<std::size_t>(devices); }));

  auto spec = devgate::firmware::parse_campaign_spec(json::parse(
      R"({"name": "restart", "waves": [{"percent": 10}, {"percent": 90}],
          "success_threshold": 90, "retries": 1, "rate": {"per_minute": 1200}})"));
  spec.version = "2.0";
  const auto id = node->hub.start_campaign(spec, image);
  auto describe = [&] { return *node->hub.campaigns().describe(id); };
  // Mid-campaign: wave 2 running, transfers in flight.
  json last;
  const bool mid = eventually([&] {
    last = describe();
    return last["counts"]["verified"].get<int>() >= 60 &&
           last["counts"]["transferring"].get<int>() >= 10;
  });
  INFO(last.dump());
  REQUIRE(mid);
  const auto before = describe();
  INFO("before the restart: " << before.dump());
  const auto restart_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count();
  node.reset();  // the server stops (sessions closed, the store written) ...
  std::vector<std::uint64_t> chunks_before;
  std::vector<bool> verified_before;
  REQUIRE(eventually([&] {
    for (auto& c : clients) {
      if (c->connected()) return false;
    }
    return true;
  }));
  for (auto& c : clients) {
    chunks_before.push_back(c->chunks_received());
    verified_before.push_back(c->firmware_verified() == 1);
  }
  for (int i = 40; i < 50; ++i) clients[static_cast<std::size_t>(i)]->set_faults({});
  // ... and a new one starts on the same database and port, before any device is back.
  node = std::make_unique<sqlite_node>(db, port, o);
  REQUIRE(node->hub.campaigns().active() == id);
  auto d = describe();
  INFO("after the restart: " << d.dump());
  CHECK(d["state"] == "running");
  CHECK(d["name"] == "restart");
  CHECK(d["created_at"] == before["created_at"]);
  CHECK(d["waves"][1]["started"] == true);
  CHECK(d["counts"]["verified"].get<int>() >= before["counts"]["verified"].get<int>());
  CHECK(d["admitted"].get<int>() >= before["admitted"].get<int>());
  // It kept no device verified that was not.
  for (int i = 0; i < devices; ++i) {
    const auto one =
        *node->hub.campaigns().devices(id, std::nullopt, static_cast<std::size_t>(i), 1);
    const auto& dev = one["devices"][0];
    if (dev["status"] == "verified") {
      INFO(dev.dump());
      CHECK(verified_before[static_cast<std::size_t>(
          std::stoi(dev["id"].get<std::string>().substr(1)))]);
    }
  }

  // The devices come back; the campaign continues and completes.
  for (auto& c : clients) c->connect();
  REQUIRE(eventually([&] { return describe()["state"] == "completed"; }));
  d = describe();
  CHECK(d["counts"]["verified"] == devices - 2);
  CHECK(d["counts"]["failed"] == 2);
  CHECK(d["waves"][0]["counts"]["verified"] == devices / 10);
  int resumed = 0;
  for (int i = 0; i < devices; ++i) {
    const auto& c = *clients[static_cast<std::size_t>(i)];
    INFO("device " << i << ": " << chunks_before[static_cast<std::size_t>(i)] << " chunks before, "
                   << c.chunks_received() << " in all");
    if (i == 100 || i == 150) {
      CHECK(c.firmware_verified() == 0);
      continue;
    }
    CHECK(c.firmware_verified() == 1);
    CHECK(c.firmware_restarts() == 0);
    // Verified before: nothing more sent. Mid-transfer: resumed (at most a window resent).
    if (verified_before[static_cast<std::size_t>(i)]) {
      CHECK(c.chunks_received() == chunks_before[static_cast<std::size_t>(i)]);
    } else {
      CHECK(c.chunks_received() <= 32 + 2);
    }
    const auto b = chunks_before[static_cast<std::size_t>(i)];
    if (b > 0 && b < 32 && !verified_before[static_cast<std::size_t>(i)]) ++resumed;
  }
  CHECK(resumed >= 10);
  // A failed device's attempts and its history span both runs of the server.
  auto failed =
      *node->hub.campaigns().devices(id, devgate::firmware::campaign_device_status::failed, 0, 10);
  REQUIRE(failed["devices"].size() == 2);
  CHECK(failed["devices"][0]["attempts"] == 2);
  const auto first = *node->hub.campaigns().devices(id, std::nullopt, 0, 1);
  CHECK(first["devices"][0]["history"][0]["at"].get<std::int64_t>() < restart_ms);

  for (auto& c : clients) c->close();
  REQUIRE(eventually([&] { return node->hub.connected() == 0; }));
  node.reset();
  guard.reset();
  std::filesystem::remove_all(dir);
}
#endif
