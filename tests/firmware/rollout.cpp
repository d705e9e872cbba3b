// Firmware: the image (held once, pre-chunked), the transfer slots, and the rollout engine's
// per-device state machine, driven directly over a transport that records what it is asked to
// send. (Rollouts through a whole hub: tests/device/.)
#include "devgate/firmware/rollout.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
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
  session_id next_session = 1;

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
  fw::transfer_slots slots(2);
  CHECK(slots.acquire("a"));
  CHECK(slots.acquire("b"));
  CHECK_FALSE(slots.acquire("c"));
  CHECK_FALSE(slots.acquire("d"));
  CHECK(slots.acquire("a"));  // already active
  CHECK(slots.active() == 2);
  CHECK(slots.release("d") == std::nullopt);  // leaves the queue
  CHECK(slots.release("a") == std::optional<std::string>("c"));
  CHECK(slots.release("b") == std::nullopt);
  CHECK(slots.peak() == 2);
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
