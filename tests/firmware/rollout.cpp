// Firmware: the image (held once, pre-chunked), the transfer slots, and the rollout engine's
// per-device state machine, driven directly over a transport that records what it is asked to
// send. (Rollouts through a whole hub: tests/device/.)
#include "devgate/firmware/rollout.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "devgate/detail/crypto.hpp"
#include "devgate/device/delivery.hpp"
#include "devgate/device/protocol.hpp"
#include "devgate/device/registry.hpp"
#include "devgate/firmware/image.hpp"
#include "devgate/firmware/slots.hpp"
#include "devgate/store/memory_state_store.hpp"
#include "devgate/transport/transport.hpp"

#include "recording_transport.hpp"
#include "support.hpp"

using json = nlohmann::json;
namespace dev = devgate::device;
namespace fw = devgate::firmware;
using devgate::session_id;
using devgate::shared_bytes;
using devgate::store::transfer_status;

namespace {

std::vector<std::byte> make_image(std::size_t n) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((i * 131 + 7) & 0xFF);
  return v;
}

using devgate::testing::eventually;
using devgate::testing::numbered;
using devgate::testing::recording_transport;

using engine_t = fw::rollout_engine<recording_transport, devgate::store::memory_state_store>;

// What one session received: its texts (parsed) and the offsets of its chunks.
struct received {
  std::vector<json> texts;
  std::vector<std::uint32_t> chunks;
  std::optional<json> first(const std::string& type) const {
    for (const auto& j : texts) {
      if (j.value("type", "") == type) return j;
    }
    return std::nullopt;
  }
};

// The engine over a registry, delivery and a memory store, with helpers playing the hub.
struct rig {
  recording_transport t;
  devgate::store::memory_state_store store;
  dev::registry devices;
  dev::delivery<recording_transport> out{t, 256, 1u << 20};
  engine_t engine;
  std::atomic<session_id> next_session{1};

  explicit rig(fw::rollout_options o) : engine(devices, out, store, o) {}

  // A device that connects and says hello (reporting `version`); returns its session.
  session_id connect(const std::string& id, const std::string& version = "1.0") {
    auto rec = devices.get_or_create(id, [&] { return store.load(id).state; });
    store.set_firmware_version(id, version);
    const session_id s = next_session++;
    const session_id old = devices.attach(rec, s);
    if (old != 0) {
      out.forget(*rec, old);
      engine.on_replaced(*rec, old);
    }
    out.resume(*rec, s, 0, [&](dev::device_record& r, const auto&) {
      r.firmware_version = version;
      return shared_bytes::copy_of(std::string_view(R"({"type":"welcome"})"));
    });
    engine.join(*rec, s);
    return s;
  }
  // The device's live session closes.
  void disconnect(session_id s) {
    if (auto rec = devices.detach(s)) {
      out.forget(*rec, s);
      engine.on_offline(*rec);
    }
  }
  dev::device_record& rec(const std::string& id) { return *devices.find(id); }
  // Takes what was sent to session `s` so far.
  received take(session_id s) {
    received r;
    std::vector<recording_transport::sent> rest;
    for (auto& o : t.out) {
      if (o.session != s) {
        rest.push_back(std::move(o));
      } else if (o.kind == devgate::payload_kind::text) {
        r.texts.push_back(json::parse(o.bytes.view()));
      } else {
        auto h = dev::decode_chunk_header(o.bytes.bytes());
        REQUIRE(h);
        r.chunks.push_back(h->offset);
      }
    }
    t.out = std::move(rest);
    return r;
  }
  transfer_status status(const std::string& id) { return engine.transfer_of(id)->status; }
};

// Plays every device against a rig, from what the engine sent, in order: like a device that
// keeps its image, it takes chunks in order from the offset of the last `firmware` start,
// acknowledges each one and reports the result with the image's hash. A device in `stalled`
// acknowledges one chunk and then nothing more (it stops mid-transfer, its session open).
struct player {
  rig& r;
  std::string sha;
  std::set<std::string> stalled;
  struct model {
    std::uint32_t rollout = 0;
    std::uint64_t expected = 0;
    std::uint64_t size = 0;
  };
  std::unordered_map<session_id, model> sessions;
  std::set<std::string> acked_once;

  // Answers everything sent so far; returns how many messages were read.
  std::size_t step() {
    std::vector<recording_transport::sent> batch;
    {
      std::lock_guard lock(r.t.mutex);
      batch.swap(r.t.out);
    }
    for (auto& o : batch) {
      auto rec = r.devices.find_session(o.session);
      if (!rec) continue;
      auto& m = sessions[o.session];
      if (o.kind == devgate::payload_kind::text) {
        const auto j = json::parse(o.bytes.view());
        if (j.value("type", "") == "firmware") {
          m.rollout = j["rollout"];
          m.expected = j["offset"];
          m.size = j["size"];
        }
        continue;
      }
      const auto h = dev::decode_chunk_header(o.bytes.bytes());
      REQUIRE(h);
      if (h->rollout != m.rollout || h->offset != m.expected) continue;
      m.expected += h->length;
      if (stalled.count(rec->id) != 0 && !acked_once.insert(rec->id).second) continue;
      r.engine.on_ack(*rec, o.session, m.rollout, m.expected);
      if (m.expected == m.size) {
        r.engine.on_result(*rec, o.session, m.rollout, true, sha, std::nullopt);
      }
    }
    return batch.size();
  }
};

fw::rollout_options options(std::size_t limit) {
  fw::rollout_options o;
  o.chunk_size = 1000;
  o.window = 2;
  o.max_concurrent_transfers = limit;
  return o;
}

}  // namespace

TEST_CASE("firmware image: held once, chunks are slices of one buffer", "[firmware]") {
  const auto bytes = make_image(100'000);
  fw::image img(3, "2.0", bytes, 16384);
  CHECK(img.chunk_count() == 7);
  CHECK(img.memory_bytes() == 100'000 + 7 * dev::chunk_header_size);
  CHECK(img.sha256() == devgate::detail::hex_encode(devgate::detail::sha256(bytes)));
  const auto c0 = img.chunk_at(0);
  const auto c6 = img.chunk_at(6 * 16384);
  CHECK(img.buffer_use_count() == 3);
  auto h = dev::decode_chunk_header(c6.bytes());
  REQUIRE(h);
  CHECK(h->offset == 6 * 16384);
  CHECK(h->length == 100'000 - 6 * 16384);
  CHECK(h->last);
  CHECK(std::memcmp(c6.data() + 16, bytes.data() + 6 * 16384, h->length) == 0);
  CHECK(c0.data() + (16384 + 16) * 6 == c6.data());
  CHECK_THROWS_AS(fw::image(1, "x", std::span<const std::byte>{}, 10), std::invalid_argument);
}

TEST_CASE("transfer slots: never more than the limit; freed slots go in arrival order",
          "[firmware]") {
  using grant = fw::transfer_slots::grant;
  fw::transfer_slots slots(2);
  CHECK(slots.acquire("a", 0) == grant::acquired);
  CHECK(slots.acquire("b", 0) == grant::acquired);
  CHECK(slots.acquire("c", 0) == grant::queued);
  CHECK(slots.acquire("d", 0) == grant::queued);
  CHECK(slots.acquire("a", 0) == grant::held);    // already active
  CHECK(slots.acquire("c", 0) == grant::queued);  // keeps its place
  CHECK(slots.active() == 2);
  CHECK(slots.release("d", 0) == std::nullopt);  // leaves the queue
  CHECK(slots.release("a", 0) == std::optional<std::string>("c"));
  CHECK(slots.release("b", 0) == std::nullopt);
  CHECK(slots.peak() == 2);
}

TEST_CASE("transfer slots: a new rollout takes them empty; requests for another are refused",
          "[firmware]") {
  using grant = fw::transfer_slots::grant;
  fw::transfer_slots slots(1);
  CHECK(slots.acquire("a", 0) == grant::acquired);
  CHECK(slots.acquire("b", 0) == grant::queued);
  CHECK(slots.reset(7) == std::vector<std::string>{"a"});
  CHECK(slots.rollout() == 7);
  CHECK(slots.active() == 0);
  CHECK(slots.waiting() == 0);
  CHECK(slots.acquire("c", 0) == grant::stale);  // read the old rollout: nothing taken
  CHECK(slots.acquire("c", 7) == grant::acquired);
  CHECK(slots.acquire("a", 7) == grant::queued);
  CHECK(slots.release("c", 0) == std::nullopt);  // a late release of the old rollout
  CHECK(slots.holders() == std::vector<std::string>{"c"});
  CHECK(slots.release("c", 7) == std::optional<std::string>("a"));
  CHECK(slots.peak() == 1);
}

TEST_CASE("rollout engine: publish joins every device, starts online ones while slots last",
          "[firmware][rollout]") {
  rig r(options(1));
  const auto a = r.connect("a");
  const auto b = r.connect("b");
  const auto c = r.connect("c", "2.0");
  r.devices.get_or_create("offline", [] { return devgate::store::device_state{}; });
  r.take(a);
  r.take(b);
  r.take(c);
  CHECK(r.engine.current() == nullptr);
  CHECK(r.engine.totals().rollout == 0);

  bool announced = false;
  const auto id = r.engine.publish("2.0", make_image(4500), [&](const fw::image& img) {
    announced = true;
    CHECK(img.version() == "2.0");
    CHECK(r.t.out.empty());  // every device joined, none started yet
    CHECK(r.status("a") == transfer_status::pending);
    CHECK(r.status("c") == transfer_status::skipped);
  });
  CHECK(id == 1);
  CHECK(announced);
  // Slots are handed out in snapshot order: exactly one of a and b starts.
  const auto ga = r.take(a);
  const auto gb = r.take(b);
  const bool a_first = !ga.texts.empty();
  const auto& started = a_first ? ga : gb;
  CHECK((a_first ? gb : ga).texts.empty());
  const auto start = started.first("firmware");
  REQUIRE(start);
  CHECK((*start)["rollout"] == 1);
  CHECK((*start)["size"] == 4500);
  CHECK((*start)["chunks"] == 5);
  CHECK((*start)["offset"] == 0);
  CHECK((*start)["window"] == 2);
  CHECK(started.chunks == std::vector<std::uint32_t>{0, 1000});  // one window
  CHECK(r.take(c).texts.empty());
  const auto tot = r.engine.totals();
  CHECK(tot.transferring == 1);
  CHECK(tot.pending == 2);  // the other online device, and the offline one
  CHECK(tot.skipped == 1);
  CHECK(r.engine.slots().active() == 1);
  CHECK(r.engine.slots().waiting() == 1);
  CHECK(r.store.load(a_first ? "a" : "b").state.transfer.status == transfer_status::transferring);
  CHECK(r.store.load("offline").state.transfer.status == transfer_status::pending);
  CHECK(r.store.load("c").state.transfer.status == transfer_status::skipped);
  CHECK_THROWS_AS(r.engine.publish("", make_image(10), [](const fw::image&) {}),
                  std::invalid_argument);
}

TEST_CASE("rollout engine: acks move the window; a verified result frees the slot",
          "[firmware][rollout]") {
  rig r(options(1));
  const auto image = make_image(4500);
  const auto a = r.connect("a");
  r.take(a);
  r.engine.publish("2.0", image, [](const fw::image&) {});
  const auto b = r.connect("b");  // joins at hello and waits for the slot
  CHECK(r.status("b") == transfer_status::pending);
  CHECK(r.take(a).chunks == std::vector<std::uint32_t>{0, 1000});
  auto& ra = r.rec("a");

  // Wrong rollout, misaligned, beyond what was sent, and a non-live session.
  CHECK(r.engine.on_ack(ra, a, 7, 1000) == dev::error::unknown_rollout);
  CHECK(r.engine.on_ack(ra, a, 1, 500) == dev::error::bad_fw_ack);
  CHECK(r.engine.on_ack(ra, a, 1, 3000) == dev::error::bad_fw_ack);
  CHECK(r.engine.on_ack(ra, b, 1, 1000) == std::nullopt);  // ignored
  CHECK(r.engine.transfer_of("a")->offset == 0);

  CHECK(r.engine.on_ack(ra, a, 1, 1000) == std::nullopt);
  CHECK(r.take(a).chunks == std::vector<std::uint32_t>{2000});
  CHECK(r.engine.on_ack(ra, a, 1, 500) == dev::error::bad_fw_ack);  // backwards
  for (std::uint64_t off : {2000u, 3000u, 4000u, 4500u}) {
    CHECK(r.engine.on_ack(ra, a, 1, off) == std::nullopt);
  }
  CHECK(r.take(a).chunks == std::vector<std::uint32_t>{3000, 4000});
  CHECK(r.engine.transfer_of("a")->offset == 4500);
  CHECK(r.store.load("a").state.transfer.offset == 4500);

  const auto sha = devgate::detail::hex_encode(devgate::detail::sha256(image));
  CHECK(r.engine.on_result(ra, a, 1, true, sha, std::nullopt) == std::nullopt);
  const auto st = r.take(a).first("fw_status");
  REQUIRE(st);
  CHECK((*st)["status"] == "verified");
  CHECK(r.status("a") == transfer_status::verified);
  CHECK(r.store.load("a").state.firmware_version == "2.0");
  CHECK(r.engine.on_result(ra, a, 1, true, sha, std::nullopt) == dev::error::unknown_rollout);
  // The freed slot went to b.
  const auto gb = r.take(b);
  CHECK(gb.first("firmware"));
  CHECK(gb.chunks == std::vector<std::uint32_t>{0, 1000});
  CHECK(r.engine.totals().verified == 1);
  CHECK(r.engine.totals().transferring == 1);
  CHECK(r.engine.totals().peak_transferring == 1);
}

TEST_CASE("rollout engine: failed results carry a reason", "[firmware][rollout]") {
  rig r(options(4));
  const auto a = r.connect("a");
  const auto b = r.connect("b");
  const auto c = r.connect("c");
  r.engine.publish("2.0", make_image(1500), [](const fw::image&) {});
  for (auto [id, s] : {std::pair{"a", a}, std::pair{"b", b}, std::pair{"c", c}}) {
    auto& rec = r.rec(id);
    REQUIRE(r.engine.on_ack(rec, s, 1, 1000) == std::nullopt);
    if (s != b) REQUIRE(r.engine.on_ack(rec, s, 1, 1500) == std::nullopt);
  }
  CHECK(r.engine.on_result(r.rec("a"), a, 1, false, std::nullopt, "flash full") == std::nullopt);
  CHECK(r.engine.on_result(r.rec("b"), b, 1, true, std::string(64, '0'), std::nullopt) ==
        std::nullopt);
  CHECK(r.engine.on_result(r.rec("c"), c, 1, true, std::string(64, '0'), std::nullopt) ==
        std::nullopt);
  CHECK(r.engine.transfer_of("a")->reason == "flash full");
  CHECK(r.engine.transfer_of("b")->reason == "result before every byte was acknowledged");
  CHECK(r.engine.transfer_of("c")->reason == "sha256 mismatch");
  const auto st = r.take(c).first("fw_status");
  REQUIRE(st);
  CHECK((*st)["status"] == "failed");
  CHECK((*st)["reason"] == "sha256 mismatch");
  CHECK(r.engine.totals().failed == 3);
  CHECK(r.store.load("c").state.transfer.status == transfer_status::failed);
  CHECK(r.store.load("c").state.firmware_version == "1.0");
}

TEST_CASE("rollout engine: a device's long failure reason is kept cut to 256 bytes (attack)",
          "[firmware][rollout]") {
  rig r(options(4));
  const auto a = r.connect("a");
  r.engine.publish("2.0", make_image(1500), [](const fw::image&) {});
  // A hostile device's reason of 60,000 bytes: one ASCII byte, then two-byte characters, so
  // byte 256 falls inside a character.
  std::string reason = "x";
  while (reason.size() < 60000) reason += "\xc3\xa9";  // U+00E9
  REQUIRE(r.engine.on_result(r.rec("a"), a, 1, false, std::nullopt, reason) == std::nullopt);
  const auto kept = r.engine.transfer_of("a")->reason;
  CHECK(kept.size() == 255);  // 1 + 127 characters of 2 bytes: the 128th would end at byte 257
  CHECK(kept == reason.substr(0, 255));
  CHECK(r.store.load("a").state.transfer.reason == kept);
  const auto st = r.take(a).first("fw_status");
  REQUIRE(st);
  CHECK((*st)["reason"] == kept);  // nlohmann would throw on a cut character when dumping
}

TEST_CASE("rollout engine: a dropped transfer gives up its slot and resumes where it was acked",
          "[firmware][rollout]") {
  rig r(options(1));
  const auto a = r.connect("a");
  const auto b = r.connect("b");
  r.take(a);
  r.take(b);
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  const bool a_first = !r.take(a).texts.empty();
  const std::string first = a_first ? "a" : "b";
  const std::string second = a_first ? "b" : "a";
  const session_id s1 = a_first ? a : b;
  const session_id s2 = a_first ? b : a;
  r.take(s2);
  REQUIRE(r.engine.on_ack(r.rec(first), s1, 1, 1000) == std::nullopt);
  r.disconnect(s1);
  CHECK(r.status(first) == transfer_status::pending);
  CHECK(r.engine.transfer_of(first)->offset == 1000);
  // Its slot went to the other device.
  CHECK(r.take(s2).first("firmware"));
  CHECK(r.engine.slots().active() == 1);
  // Back online: it waits for the slot, then resumes from 1000.
  const auto again = r.connect(first);
  CHECK(r.take(again).texts.size() == 1);  // the welcome only
  CHECK(r.engine.slots().waiting() == 1);
  r.disconnect(s2);
  const auto resumed = r.take(again);
  const auto start = resumed.first("firmware");
  REQUIRE(start);
  CHECK((*start)["offset"] == 1000);
  CHECK(resumed.chunks == std::vector<std::uint32_t>{1000, 2000});
  CHECK(r.engine.totals().peak_transferring == 1);
}

TEST_CASE("rollout engine: a takeover pauses the transfer streaming to the replaced session",
          "[firmware][rollout]") {
  rig r(options(1));
  const auto old = r.connect("tab");
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  REQUIRE(r.engine.on_ack(r.rec("tab"), old, 1, 2000) == std::nullopt);
  r.take(old);
  const auto fresh = r.connect("tab");  // on_replaced, then hello joins again
  CHECK(r.take(old).texts.empty());
  const auto got = r.take(fresh);
  const auto start = got.first("firmware");
  REQUIRE(start);
  CHECK((*start)["offset"] == 2000);
  CHECK(got.chunks == std::vector<std::uint32_t>{2000, 3000});
  CHECK(r.engine.on_ack(r.rec("tab"), old, 1, 3000) == std::nullopt);  // ignored
  CHECK(r.engine.transfer_of("tab")->offset == 2000);
  CHECK(r.engine.slots().active() == 1);
}

TEST_CASE("rollout engine: a hello restarts a transfer still marked as streaming to a gone session",
          "[firmware][rollout]") {
  // A takeover whose on_replaced has not run yet when the new session's hello joins.
  rig r(options(1));
  const auto old = r.connect("tab");
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  REQUIRE(r.engine.on_ack(r.rec("tab"), old, 1, 1000) == std::nullopt);
  auto rec = r.devices.find("tab");
  const session_id fresh = 99;
  REQUIRE(r.devices.attach(rec, fresh) == old);
  r.out.resume(*rec, fresh, 0, [](dev::device_record&, const auto&) {
    return shared_bytes::copy_of(std::string_view(R"({"type":"welcome"})"));
  });
  r.engine.join(*rec, fresh);
  const auto start = r.take(fresh).first("firmware");
  REQUIRE(start);
  CHECK((*start)["offset"] == 1000);
  r.engine.on_replaced(*rec, old);  // late: the transfer now streams to `fresh`, untouched
  CHECK(r.status("tab") == transfer_status::transferring);
  CHECK(r.engine.slots().active() == 1);
}

TEST_CASE("rollout engine: a new rollout supersedes the current one", "[firmware][rollout]") {
  rig r(options(2));
  const auto a = r.connect("a");
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  REQUIRE(r.engine.on_ack(r.rec("a"), a, 1, 1000) == std::nullopt);
  r.take(a);
  const auto id = r.engine.publish("3.0", make_image(2500), [](const fw::image&) {});
  CHECK(id == 2);
  const auto got = r.take(a);
  const auto start = got.first("firmware");
  REQUIRE(start);
  CHECK((*start)["rollout"] == 2);
  CHECK((*start)["offset"] == 0);
  // A late ack of the superseded rollout.
  CHECK(r.engine.on_ack(r.rec("a"), a, 1, 2000) == dev::error::unknown_rollout);
  CHECK(r.engine.current()->version() == "3.0");
  CHECK(r.engine.totals().rollout == 2);
  CHECK(r.engine.totals().transferring == 1);
}

TEST_CASE("rollout engine: options are checked", "[firmware][rollout]") {
  devgate::store::memory_state_store store;
  dev::registry devices;
  recording_transport t;
  dev::delivery<recording_transport> out(t, 1, 1);
  auto o = options(1);
  o.window = 0;
  CHECK_THROWS_AS(engine_t(devices, out, store, o), std::invalid_argument);
  o = options(1);
  o.chunk_size = 0;
  CHECK_THROWS_AS(engine_t(devices, out, store, o), std::invalid_argument);
}

TEST_CASE("rollout engine: 16 stalled transfers do not stop the rollout of 300 others (attack)",
          "[firmware][rollout][stall]") {
  // The 16 stalled devices take every slot (the default count) before the 300 others connect.
  auto o = options(16);
  o.stall_timeout = std::chrono::milliseconds(300);  // well above a good device's window time
  o.retry_backoff = std::chrono::milliseconds(20);
  o.max_retries = 2;
  rig r(o);
  const auto image = make_image(4500);
  const auto sha = devgate::detail::hex_encode(devgate::detail::sha256(image));
  r.engine.publish("2.0", image, [](const fw::image&) {});
  player p{r, sha, {}, {}, {}};
  for (int i = 0; i < 16; ++i) {
    p.stalled.insert(numbered("stall", i));
    r.connect(numbered("stall", i));
  }
  for (int i = 0; i < 300; ++i) r.connect(numbered("good", i));
  CHECK(r.engine.slots().active() == 16);
  CHECK(r.engine.slots().waiting() == 300);
  const bool done = eventually(
      [&] {
        p.step();
        const auto t = r.engine.totals();
        return t.verified == 300 && t.failed == 16;
      },
      std::chrono::seconds(30));
  const auto t = r.engine.totals();
  INFO("verified " << t.verified << " failed " << t.failed << " transferring " << t.transferring
                   << " pending " << t.pending);
  REQUIRE(done);
  CHECK(t.transferring == 0);
  CHECK(t.pending == 0);
  CHECK(t.peak_transferring <= 16);
  CHECK(t.timed_out == 16);
  CHECK(t.retries >= 16 * 2);  // each stalled device was retried twice, then failed
  CHECK(r.engine.slots().active() == 0);
  CHECK(r.engine.slots().waiting() == 0);
  for (int i = 0; i < 16; ++i) {
    const auto st = r.engine.transfer_of(numbered("stall", i));
    CHECK(st->status == transfer_status::failed);
    CHECK(st->reason == "timed_out");
    CHECK(st->offset == 1000);  // its one acknowledged chunk
    CHECK(r.store.load(numbered("stall", i)).state.transfer.reason == "timed_out");
  }
}

TEST_CASE("rollout engine: superseding a rollout is atomic with respect to concurrent hellos",
          "[firmware][rollout][race]") {
  constexpr std::size_t limit = 4;
  constexpr int devices = 48;
  rig r(options(limit));
  const auto image = make_image(4500);
  const auto sha = devgate::detail::hex_encode(devgate::detail::sha256(image));
  for (int i = 0; i < devices; ++i) r.connect(numbered("d", static_cast<std::uint64_t>(i)));
  // Each round: hellos and takeovers on two threads while a third publishes, then the state
  // once every thread is done: every device is in the last rollout, and exactly the
  // transferring devices hold the slots, no more than the limit.
  for (int round = 0; round < 30; ++round) {
    std::atomic<bool> stop{false};
    std::vector<std::thread> hellos;
    for (int k = 0; k < 2; ++k) {
      hellos.emplace_back([&, k] {
        std::minstd_rand rng(static_cast<unsigned>(round * 2 + k + 1));
        while (!stop.load()) r.connect(numbered("d", rng() % devices));
      });
    }
    std::thread publisher([&] {
      for (int k = 0; k < 3; ++k) {
        r.engine.publish(numbered("v", static_cast<std::uint64_t>(round * 3 + k)), image,
                         [](const fw::image&) {});
      }
    });
    publisher.join();
    stop = true;
    for (auto& h : hellos) h.join();
    const auto current = r.engine.current()->rollout();
    std::size_t transferring = 0;
    std::size_t behind = 0;
    for (int i = 0; i < devices; ++i) {
      const auto t = r.engine.transfer_of(numbered("d", static_cast<std::uint64_t>(i)));
      REQUIRE(t);
      if (t->rollout != current) ++behind;
      if (t->status == transfer_status::transferring) ++transferring;
    }
    INFO("round " << round);
    CHECK(behind == 0);
    CHECK(transferring <= limit);
    CHECK(transferring == r.engine.slots().active());
    CHECK(r.engine.slots().active() + r.engine.slots().waiting() == devices);
  }
  // And the rollout completes for every device.
  player p{r, sha, {}, {}, {}};
  const bool done = eventually(
      [&] {
        p.step();
        return r.engine.totals().verified == static_cast<std::size_t>(devices);
      },
      std::chrono::seconds(20));
  INFO("verified " << r.engine.totals().verified << " transferring "
                   << r.engine.totals().transferring << " pending " << r.engine.totals().pending);
  CHECK(done);
  CHECK(r.engine.totals().peak_transferring <= limit);
}

TEST_CASE("rollout engine: a stalled transfer is taken back, retried after a backoff, then fails",
          "[firmware][rollout][stall]") {
  auto o = options(1);
  o.stall_timeout = std::chrono::hours(1);  // the timer thread finds nothing: ticks are ours
  o.retry_backoff = std::chrono::minutes(1);
  o.max_retries = 1;
  rig r(o);
  const auto a = r.connect("a");
  const auto b = r.connect("b");
  r.take(a);
  r.take(b);
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  const bool a_first = !r.take(a).texts.empty();
  const std::string first = a_first ? "a" : "b";
  const std::string second = a_first ? "b" : "a";
  const session_id s1 = a_first ? a : b;
  const session_id s2 = a_first ? b : a;
  r.take(s2);
  REQUIRE(r.engine.on_ack(r.rec(first), s1, 1, 1000) == std::nullopt);
  const auto t0 = devgate::clock::now();
  r.engine.tick(t0 + std::chrono::minutes(30));  // progress seen: the clock starts again
  CHECK(r.status(first) == transfer_status::transferring);
  r.engine.tick(t0 + std::chrono::minutes(89));
  CHECK(r.status(first) == transfer_status::transferring);
  // No progress for an hour: back to pending at its acked offset; the slot goes to the other.
  r.engine.tick(t0 + std::chrono::minutes(91));
  CHECK(r.status(first) == transfer_status::pending);
  CHECK(r.engine.transfer_of(first)->offset == 1000);
  CHECK(r.engine.totals().retries == 1);
  CHECK(r.take(s2).first("firmware"));
  CHECK(r.engine.on_ack(r.rec(first), s1, 1, 2000) == dev::error::unknown_rollout);  // late
  REQUIRE(r.engine.on_ack(r.rec(second), s2, 1, 1000) == std::nullopt);
  // Its backoff ends: it waits for the slot, and resumes from 1000 once the other is done.
  r.engine.tick(t0 + std::chrono::minutes(93));
  CHECK(r.status(second) == transfer_status::transferring);
  CHECK(r.engine.slots().waiting() == 1);
  r.take(s1);
  REQUIRE(r.engine.on_result(r.rec(second), s2, 1, false, std::nullopt, "flash full") ==
          std::nullopt);
  const auto resumed = r.take(s1);
  const auto start = resumed.first("firmware");
  REQUIRE(start);
  CHECK((*start)["offset"] == 1000);
  CHECK(resumed.chunks == std::vector<std::uint32_t>{1000, 2000});
  // It stalls again, past its one retry: failed, timed_out, and told so.
  r.engine.tick(t0 + std::chrono::minutes(200));
  CHECK(r.status(first) == transfer_status::failed);
  CHECK(r.engine.transfer_of(first)->reason == "timed_out");
  const auto st = r.take(s1).first("fw_status");
  REQUIRE(st);
  CHECK((*st)["status"] == "failed");
  CHECK((*st)["reason"] == "timed_out");
  CHECK(r.engine.totals().timed_out == 1);
  CHECK(r.engine.totals().failed == 2);
  CHECK(r.engine.slots().active() == 0);
}

TEST_CASE("rollout engine: a backoff holds over a reconnect; an offline device asks at hello",
          "[firmware][rollout][stall]") {
  auto o = options(1);
  o.stall_timeout = std::chrono::hours(1);
  o.retry_backoff = std::chrono::hours(1);
  rig r(o);
  const auto a = r.connect("a");
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  r.take(a);
  r.engine.tick(devgate::clock::now() + std::chrono::minutes(61));
  CHECK(r.status("a") == transfer_status::pending);
  const auto again = r.connect("a");  // within its backoff: no slot yet
  CHECK_FALSE(r.take(again).first("firmware"));
  CHECK(r.engine.slots().active() == 0);
  r.disconnect(again);
  r.engine.tick(devgate::clock::now() + std::chrono::minutes(200));  // backoff over, offline
  CHECK(r.engine.slots().active() == 0);
  const auto back = r.connect("a");
  const auto start = r.take(back).first("firmware");
  REQUIRE(start);
  CHECK((*start)["offset"] == 0);
}

TEST_CASE("rollout engine: fw_restart sends the image again from byte 0, a bounded number of times",
          "[firmware][rollout][restart]") {
  auto o = options(1);
  o.max_retries = 1;
  rig r(o);
  const auto a = r.connect("a");
  const auto b = r.connect("b");
  r.take(a);
  r.take(b);
  r.engine.publish("2.0", make_image(4500), [](const fw::image&) {});
  const bool a_first = !r.take(a).texts.empty();
  const session_id s1 = a_first ? a : b;
  const session_id s2 = a_first ? b : a;
  const std::string first = a_first ? "a" : "b";
  r.take(s2);
  auto& rec = r.rec(first);
  REQUIRE(r.engine.on_ack(rec, s1, 1, 1000) == std::nullopt);
  REQUIRE(r.engine.on_ack(rec, s1, 1, 2000) == std::nullopt);
  r.take(s1);
  CHECK(r.engine.totals().bytes_acked == 2000);
  CHECK(r.engine.on_restart(rec, s1, 9) == dev::error::unknown_rollout);
  CHECK(r.engine.on_restart(rec, s2, 1) == std::nullopt);  // not its live session: ignored
  CHECK(r.engine.transfer_of(first)->offset == 2000);
  // The device lost its partial image: a new start at 0, then the first window again.
  CHECK(r.engine.on_restart(rec, s1, 1) == std::nullopt);
  const auto got = r.take(s1);
  const auto start = got.first("firmware");
  REQUIRE(start);
  CHECK((*start)["offset"] == 0);
  CHECK(got.chunks == std::vector<std::uint32_t>{0, 1000});
  CHECK(r.engine.transfer_of(first)->offset == 0);
  CHECK(r.store.load(first).state.transfer.offset == 0);
  CHECK(r.engine.totals().bytes_acked == 0);
  CHECK(r.status(first) == transfer_status::transferring);
  REQUIRE(r.engine.on_ack(rec, s1, 1, 1000) == std::nullopt);
  CHECK(r.take(s1).chunks == std::vector<std::uint32_t>{2000});
  // Past max_retries a restart ends the transfer (a device restarting forever would keep a
  // slot forever), and the slot goes to the other device.
  CHECK(r.engine.on_restart(rec, s1, 1) == std::nullopt);
  CHECK(r.status(first) == transfer_status::failed);
  CHECK(r.engine.transfer_of(first)->reason == "too_many_restarts");
  const auto st = r.take(s1).first("fw_status");
  REQUIRE(st);
  CHECK((*st)["reason"] == "too_many_restarts");
  CHECK(r.take(s2).first("firmware"));
}

TEST_CASE("rollout engine: the totals' counters match a scan of the devices after a mixed run",
          "[firmware][rollout][totals]") {
  auto o = options(3);
  o.stall_timeout = std::chrono::hours(1);
  o.retry_backoff = std::chrono::hours(1);
  o.max_retries = 1;
  rig r(o);
  const auto image = make_image(4500);
  const auto sha = devgate::detail::hex_encode(devgate::detail::sha256(image));
  std::vector<std::string> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(numbered("m", static_cast<std::uint64_t>(i)));
  // Compares totals() with the devices' own states.
  const auto check_scan = [&] {
    const auto tot = r.engine.totals();
    fw::rollout_totals scan;
    for (const auto& id : ids) {
      const auto t = r.engine.transfer_of(id);
      if (!t || t->rollout != tot.rollout) continue;
      scan.pending += t->status == transfer_status::pending;
      scan.transferring += t->status == transfer_status::transferring;
      scan.verified += t->status == transfer_status::verified;
      scan.failed += t->status == transfer_status::failed;
      scan.skipped += t->status == transfer_status::skipped;
      scan.bytes_acked += t->offset;
    }
    CHECK(tot.pending == scan.pending);
    CHECK(tot.transferring == scan.transferring);
    CHECK(tot.verified == scan.verified);
    CHECK(tot.failed == scan.failed);
    CHECK(tot.skipped == scan.skipped);
    CHECK(tot.bytes_acked == scan.bytes_acked);
  };
  std::vector<session_id> sessions(ids.size());
  for (std::size_t i = 0; i < 30; ++i) sessions[i] = r.connect(ids[i], i % 10 == 0 ? "2.0" : "1.0");
  r.devices.get_or_create(ids[35], [] { return devgate::store::device_state{}; });  // offline
  r.engine.publish("2.0", image, [](const fw::image&) {});
  check_scan();
  player p{r, sha, {ids[1], ids[2]}, {}, {}};  // two stall
  std::minstd_rand rng(7);
  for (int round = 0; round < 200; ++round) {
    p.step();
    const auto i = rng() % 40;
    switch (rng() % 8) {
      case 0:  // a device comes or comes back
        sessions[i] = r.connect(ids[i]);
        break;
      case 1:  // a device drops
        if (sessions[i] != 0) r.disconnect(sessions[i]);
        sessions[i] = 0;
        break;
      case 2:  // a device restarts from 0
        if (sessions[i] != 0) r.engine.on_restart(r.rec(ids[i]), sessions[i], 1);
        break;
      case 3:  // a device fails
        if (sessions[i] != 0) {
          r.engine.on_result(r.rec(ids[i]), sessions[i], 1, false, std::nullopt, "no");
        }
        break;
      case 4:  // time passes: stalls are found
        r.engine.tick(devgate::clock::now() + std::chrono::hours(3 * (round + 1)));
        break;
      default:
        break;
    }
    if (round % 20 == 0) check_scan();
  }
  check_scan();
  const auto before = r.engine.totals();
  CHECK(before.verified > 0);
  CHECK(before.failed > 0);
  CHECK(before.skipped > 0);
  // A record evicted from memory leaves the counters; made again at hello, it counts once.
  r.disconnect(sessions[5]);
  sessions[5] = 0;
  r.engine.forget(r.rec(ids[5]));
  const auto forgotten = r.engine.totals();
  CHECK(forgotten.verified + forgotten.failed + forgotten.pending + forgotten.transferring +
            forgotten.skipped ==
        r.devices.devices() - 1);
  // A new rollout starts from fresh counters, and they still match.
  r.engine.publish("3.0", image, [](const fw::image&) {});
  check_scan();
  for (int round = 0; round < 50; ++round) p.step();
  check_scan();
  const auto tot = r.engine.totals();
  CHECK(tot.verified + tot.failed + tot.pending + tot.transferring + tot.skipped ==
        r.devices.devices());
}
