// The in-memory state store: one field per operation, devices independent, safe from any thread.
#include "devgate/store/memory_state_store.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace store = devgate::store;

TEST_CASE("an unknown device loads as a default state, and loading stores nothing", "[store]") {
  store::memory_state_store s;
  const auto [st, ec] = s.load("fridge");
  REQUIRE_FALSE(ec);
  REQUIRE(st.messages_sent == 0);
  REQUIRE(st.last_seen_ms == 0);
  REQUIRE(st.firmware_version.empty());
  REQUIRE(st.transfer.status == store::transfer_status::none);
  REQUIRE(s.size() == 0);
}

TEST_CASE("each operation replaces or adds to its own field only", "[store]") {
  store::memory_state_store s;
  REQUIRE_FALSE(s.add_messages_sent("fridge", 3));
  REQUIRE(s.load("fridge").state.messages_sent == 3);
  REQUIRE_FALSE(s.add_messages_sent("fridge", 4));
  REQUIRE(s.load("fridge").state.messages_sent == 7);  // the new total
  REQUIRE_FALSE(s.touch("fridge", 1'700'000'000'000));
  REQUIRE_FALSE(s.set_firmware_version("fridge", "1.2.0"));
  store::transfer_state t;
  t.rollout = 2;
  t.version = "2.0.0";
  t.status = store::transfer_status::transferring;
  t.offset = 4096;
  REQUIRE_FALSE(s.set_transfer("fridge", t));
  auto st = s.load("fridge").state;
  REQUIRE(st.messages_sent == 7);
  REQUIRE(st.last_seen_ms == 1'700'000'000'000);
  REQUIRE(st.firmware_version == "1.2.0");
  REQUIRE(st.transfer.rollout == 2);
  REQUIRE(st.transfer.version == "2.0.0");
  REQUIRE(st.transfer.status == store::transfer_status::transferring);
  REQUIRE(st.transfer.offset == 4096);
  REQUIRE_FALSE(s.touch("fridge", 1'700'000'000'500));
  st = s.load("fridge").state;
  REQUIRE(st.last_seen_ms == 1'700'000'000'500);
  REQUIRE(st.messages_sent == 7);  // untouched by touch
  REQUIRE(st.firmware_version == "1.2.0");
  // Another device is independent.
  REQUIRE_FALSE(s.add_messages_sent("lamp", 1));
  REQUIRE(s.load("lamp").state.messages_sent == 1);
  REQUIRE(s.load("lamp").state.firmware_version.empty());
  REQUIRE(s.load("fridge").state.messages_sent == 7);
  REQUIRE(s.size() == 2);
  // Forgetting one device leaves the other.
  REQUIRE_FALSE(s.forget("lamp"));
  REQUIRE(s.size() == 1);
  REQUIRE(s.load("lamp").state.messages_sent == 0);
  REQUIRE(s.load("fridge").state.messages_sent == 7);
}

TEST_CASE("a moved store keeps its devices", "[store]") {
  store::memory_state_store s;
  s.set_firmware_version("fridge", "1.0.0");
  store::memory_state_store moved(std::move(s));
  REQUIRE(moved.load("fridge").state.firmware_version == "1.0.0");
  REQUIRE(moved.size() == 1);
}

TEST_CASE("counters stay exact when many threads update many devices", "[store]") {
  store::memory_state_store s;
  constexpr int threads = 4;
  constexpr int devices = 64;
  constexpr int rounds = 500;
  std::vector<std::string> ids;
  for (int d = 0; d < devices; ++d) {
    std::string id = "device-";
    id += std::to_string(d);
    ids.push_back(std::move(id));
  }
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      for (int r = 0; r < rounds; ++r) {
        for (const auto& id : ids) {
          s.add_messages_sent(id, 1);
          s.touch(id, t);
        }
      }
    });
  }
  for (auto& w : workers) w.join();
  REQUIRE(s.size() == devices);
  for (const auto& id : ids) {
    const auto st = s.load(id).state;
    REQUIRE(st.messages_sent == std::uint64_t{threads} * rounds);
    REQUIRE(st.last_seen_ms >= 0);
    REQUIRE(st.last_seen_ms < threads);
  }
}

TEST_CASE("transfer statuses have their wire names", "[store]") {
  using store::transfer_status;
  REQUIRE(std::string_view(store::to_string(transfer_status::none)) == "none");
  REQUIRE(std::string_view(store::to_string(transfer_status::pending)) == "pending");
  REQUIRE(std::string_view(store::to_string(transfer_status::transferring)) == "transferring");
  REQUIRE(std::string_view(store::to_string(transfer_status::verified)) == "verified");
  REQUIRE(std::string_view(store::to_string(transfer_status::failed)) == "failed");
  REQUIRE(std::string_view(store::to_string(transfer_status::skipped)) == "skipped");
}
