// Rollout campaigns as a state machine: the spec's validation, waves, thresholds, the rate,
// timeouts and retries, pause, resume and cancel, driven with a synthetic clock and a scripted
// fleet. (Campaigns through a hub and real clients: tests/device/.)
#include "devgate/firmware/campaign.hpp"
#include "devgate/firmware/campaign_record.hpp"
#include "devgate/firmware/campaign_runner.hpp"  // to_json

#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using json = nlohmann::json;
namespace fw = devgate::firmware;
using devgate::store::transfer_status;
using fw::campaign_device_status;
using fw::campaign_state;

namespace {

std::vector<std::string> fleet_ids(std::size_t n) {
  std::vector<std::string> ids;
  for (std::size_t i = 0; i < n; ++i) ids.push_back("dev-" + std::to_string(i));
  return ids;
}

std::string spec_error(const json& j) {
  try {
    (void)fw::parse_campaign_spec(j);
  } catch (const fw::campaign_spec_error& e) {
    return e.what();
  }
  return "";
}

// A scripted fleet: every admitted device starts transferring at once; the test decides when
// and how each one ends. Carries out the campaign's actions as the hub's runner would.
struct fleet {
  explicit fleet(fw::campaign& campaign) : c(campaign) {}
  fw::campaign& c;
  fw::campaign_ms now = 1'000'000;
  std::vector<std::string> running;       // admitted, transferring, not ended
  std::vector<std::string> admitted_log;  // every admission, in order
  std::vector<std::pair<std::string, std::string>> stopped;

  void apply(const fw::campaign_actions& a) {
    for (const auto& s : a.stop) {
      stopped.push_back(s);
      std::erase(running, s.first);
    }
    for (const auto& id : a.admit) {
      admitted_log.push_back(id);
      running.push_back(id);
      apply(c.on_transfer(id, transfer_status::transferring, "", now));
    }
  }
  void tick(fw::campaign_ms dt = 100) {
    now += dt;
    apply(c.tick(now));
  }
  // Ends the transfers running now (not those it admits meanwhile): verified, unless `fails`
  // says otherwise.
  template <class Fails>
  void finish_all(Fails fails) {
    for (auto n = running.size(); n > 0 && !running.empty(); --n) {
      auto id = running.front();
      running.erase(running.begin());
      const bool bad = fails(id);
      apply(c.on_transfer(id, bad ? transfer_status::failed : transfer_status::verified,
                          bad ? "sha256 mismatch" : "", now));
    }
  }
  void finish_all() {
    finish_all([](const std::string&) { return false; });
  }
};

fw::campaign_spec staged(double success, double error_pct, std::size_t min_executed) {
  fw::campaign_spec s;
  s.name = "staged";
  s.version = "2.0";
  s.waves = {{0, 10}, {0, 40}, {0, 50}};
  s.success_threshold = success;
  s.errors.percent = error_pct;
  s.errors.min_executed = min_executed;
  return s;
}

}  // namespace

TEST_CASE("campaign spec: every field is read and checked with a clear message", "[campaign]") {
  const auto s = fw::parse_campaign_spec(json::parse(R"({
    "name": "eu-rollout",
    "target": {"attributes": {"region": "eu"}, "continuous": true},
    "waves": [{"percent": 10}, {"count": 50}, {"percent": 90}],
    "success_threshold": 90,
    "error_threshold": {"percent": 5, "min_executed": 20, "action": "abort"},
    "rate": {"per_minute": 120, "ramp_factor": 2, "ramp_every": 10, "max_per_minute": 600},
    "timeout_s": 1.5, "retries": 2, "start_at": 1700000000000})"));
  CHECK(s.name == "eu-rollout");
  CHECK(s.target.attributes.at("region") == "eu");
  CHECK(s.target.continuous);
  REQUIRE(s.waves.size() == 3);
  CHECK(s.waves[1].count == 50);
  CHECK(s.errors.abort);
  CHECK(s.errors.min_executed == 20);
  CHECK(s.rate.max_per_minute == 600);
  CHECK(s.timeout_ms == 1500);
  CHECK(s.retries == 2);
  CHECK(s.start_at == 1700000000000);
  // Its JSON form reads back the same.
  const auto again = fw::parse_campaign_spec([&] {
    auto j = fw::to_json(s);
    j.erase("version");
    return j;
  }());
  CHECK(fw::to_json(again) == fw::to_json(s));

  CHECK(spec_error(json::array()) == "body: must be a JSON object");
  CHECK(spec_error({{"colour", "red"}}) == "colour: unknown field");
  CHECK(spec_error({{"name", ""}}) == "name: must not be empty");
  CHECK(spec_error({{"waves", json::array()}}) == "waves: must be a non-empty array");
  CHECK(spec_error({{"waves", {{{"count", 1}, {"percent", 5}}}}}) ==
        "waves[0]: must have exactly one of count and percent");
  CHECK(spec_error({{"waves", {{{"percent", 60}}, {{"percent", 60}}}}}) ==
        "waves: percentages add up to more than 100");
  CHECK(spec_error({{"waves", {{{"count", 0}}}}}) == "waves[0].count: must be at least 1");
  CHECK(spec_error({{"success_threshold", 120}}) == "success_threshold: must be between 0 and 100");
  CHECK(spec_error({{"success_threshold", "90"}}) == "success_threshold: must be a number");
  CHECK(spec_error({{"retries", -1}}) == "retries: must be a non-negative integer");
  CHECK(spec_error({{"retries", 1000}}) == "retries: must be at most 100");
  CHECK(spec_error({{"error_threshold", {{"min_executed", 3}}}}) ==
        "error_threshold: needs count or percent above 0");
  CHECK(spec_error({{"error_threshold", {{"percent", 5}, {"action", "stop"}}}}) ==
        "error_threshold.action: must be \"pause\" or \"abort\"");
  CHECK(spec_error({{"rate", {{"ramp_factor", 2}, {"ramp_every", 5}}}}) ==
        "rate.per_minute: a ramp needs a starting rate above 0");
  CHECK(spec_error({{"rate", {{"per_minute", 10}, {"ramp_factor", 2}}}}) ==
        "rate.ramp_every: a ramp_factor above 1 needs ramp_every >= 1");
  CHECK(spec_error({{"target", {{"ids", json::array()}}}}) ==
        "target.ids: must not be empty (omit it for all devices)");
  CHECK(spec_error({{"target", {{"ids", {1, 2}}}}}) == "target.ids[]: must be a string");
  CHECK(spec_error({{"target", {{"attributes", {{"region", 1}}}}}}) ==
        "target.attributes.region: must be a string");
  CHECK(spec_error({{"timeout_s", -1}}) == "timeout_s: must be between 0 and 604800");
  // A campaign over no device is refused too.
  CHECK_THROWS_AS(fw::campaign(1, fw::campaign_spec{}, {}, 0), fw::campaign_spec_error);
}

TEST_CASE("campaign: waves of 10/40/50% over 1,000 devices run one after the other", "[campaign]") {
  fw::campaign c(1, staged(90, 5, 20), fleet_ids(1000), 0);
  REQUIRE(c.waves().size() == 3);
  CHECK(c.waves()[0].size == 100);
  CHECK(c.waves()[1].size == 400);
  CHECK(c.waves()[2].size == 500);
  CHECK(c.state() == campaign_state::scheduled);
  fleet f{c};
  f.tick();
  CHECK(c.state() == campaign_state::running);
  // No rate: the whole first wave is admitted at once, and only it.
  CHECK(f.admitted_log.size() == 100);
  CHECK(c.current_wave() == 0);
  // 89 verified: below 90%, wave 2 waits; the 90th starts it.
  for (int i = 0; i < 89; ++i) {
    auto id = f.running.front();
    f.running.erase(f.running.begin());
    f.apply(c.on_transfer(id, transfer_status::verified, "", f.now));
  }
  CHECK(c.current_wave() == 0);
  CHECK(f.admitted_log.size() == 100);
  auto id = f.running.front();
  f.running.erase(f.running.begin());
  f.apply(c.on_transfer(id, transfer_status::verified, "", f.now));
  CHECK(c.current_wave() == 1);
  CHECK(f.admitted_log.size() == 500);
  // The waves' devices in order: wave 2 is devices 100..499.
  CHECK(f.admitted_log[100] == "dev-100");
  CHECK(c.find("dev-499")->wave == 1);
  f.finish_all();
  CHECK(c.current_wave() == 2);
  f.finish_all();
  CHECK(c.state() == campaign_state::completed);
  CHECK(c.count(campaign_device_status::verified) == 1000);
  CHECK(c.admitted() == 1000);
}

TEST_CASE("campaign: 10% of wave 2 failing pauses it at the error threshold; resume completes",
          "[campaign]") {
  fw::campaign c(1, staged(90, 5, 20), fleet_ids(1000), 0);
  fleet f{c};
  f.tick();
  f.finish_all();
  REQUIRE(c.current_wave() == 1);
  // Every tenth device of wave 2 fails verification.
  std::set<std::string> broken;
  for (int i = 100; i < 500; i += 10) broken.insert("dev-" + std::to_string(i));
  auto fails = [&](const std::string& d) { return broken.count(d) != 0; };
  f.finish_all(fails);
  CHECK(c.state() == campaign_state::paused);
  CHECK(c.reason().find("wave 2:") == 0);
  CHECK(c.reason().find("error threshold") != std::string::npos);
  CHECK(c.current_wave() == 1);  // wave 3 never started
  CHECK(c.waves()[2].at(campaign_device_status::queued) == 500);
  // Paused as soon as 20 were done: 2 of 20 failed (10%); the 400 were admitted at once, so
  // their transfers finished; no more is admitted while paused.
  CHECK(c.waves()[1].errors() == 40);
  f.tick(10'000);
  CHECK(f.admitted_log.size() == 500);
  // The operator fixes the devices and resumes: they are retried and the campaign completes.
  broken.clear();
  // Wave 2 had 90% verified, which meets the success threshold: wave 3 starts with them.
  f.apply(c.resume(f.now));
  CHECK(c.state() == campaign_state::running);
  CHECK(c.reason().empty());
  CHECK(c.current_wave() == 2);
  CHECK(f.running.size() == 540);
  f.finish_all();
  CHECK(c.state() == campaign_state::completed);
  CHECK(c.count(campaign_device_status::verified) == 1000);
  CHECK(c.count(campaign_device_status::failed) == 0);
  // The history tells the story of one of them.
  const auto* d = c.find("dev-100");
  REQUIRE(d != nullptr);
  std::vector<std::string> story;
  for (const auto& h : d->history) story.push_back(fw::to_string(h.status));
  CHECK(story == std::vector<std::string>{"queued", "pending", "transferring", "failed", "queued",
                                          "pending", "transferring", "verified"});
  CHECK(d->history[3].reason == "sha256 mismatch");
}

TEST_CASE("campaign: the error threshold's abort action cancels the devices not done",
          "[campaign]") {
  auto spec = staged(90, 5, 20);
  spec.errors.abort = true;
  spec.waves = {{0, 100}};
  spec.rate.per_minute = 6000;  // 100 a second: some admitted, most still queued
  fw::campaign c(1, spec, fleet_ids(100), 0);
  fleet f{c};
  for (int i = 0; i < 5; ++i) f.tick(100);  // 10 a tick, 50 admitted... (first one at once)
  REQUIRE(f.admitted_log.size() >= 40);
  // 19 verified, then 1 failure: 1 of 20 done is 5%: abort.
  for (int i = 0; i < 19; ++i) {
    auto id = f.running.front();
    f.running.erase(f.running.begin());
    f.apply(c.on_transfer(id, transfer_status::verified, "", f.now));
  }
  CHECK(c.state() == campaign_state::running);
  auto id = f.running.front();
  f.running.erase(f.running.begin());
  const auto in_flight = f.running.size();
  f.apply(c.on_transfer(id, transfer_status::failed, "flash write error", f.now));
  CHECK(c.state() == campaign_state::aborted);
  CHECK(c.reason() == "wave 1: 1 of 20 done failed or timed out (5.0%), at the error threshold");
  // The transfers running were stopped and told why; queued devices just left.
  CHECK(f.stopped.size() == in_flight);
  CHECK(f.stopped.front().second == "cancelled");
  CHECK(c.count(campaign_device_status::cancelled) == 100 - 20);
  f.tick(10'000);
  CHECK(f.admitted_log.size() <= 51);
}

TEST_CASE("campaign: cancel mid-wave stops the transfers running and cancels the rest",
          "[campaign]") {
  fw::campaign c(7, staged(90, 5, 20), fleet_ids(1000), 0);
  fleet f{c};
  f.tick();
  f.finish_all();
  REQUIRE(f.running.size() == 400);
  // Half of wave 2 ends, then the operator cancels.
  for (int i = 0; i < 200; ++i) {
    auto id = f.running.front();
    f.running.erase(f.running.begin());
    f.apply(c.on_transfer(id, transfer_status::verified, "", f.now));
  }
  f.apply(c.cancel("operator: bad batch", f.now));
  CHECK(c.state() == campaign_state::cancelled);
  CHECK(c.reason() == "operator: bad batch");
  CHECK(f.stopped.size() == 200);
  CHECK(f.running.empty());
  CHECK(c.count(campaign_device_status::verified) == 300);
  CHECK(c.count(campaign_device_status::cancelled) == 700);
  // News arriving after the cancel changes nothing; no command applies any more.
  const auto late = c.on_transfer("dev-499", transfer_status::verified, "", f.now);
  CHECK(!late.changed);
  CHECK(c.count(campaign_device_status::verified) == 300);
  CHECK(!c.pause("again"));
  CHECK(!c.resume(f.now).changed);
  CHECK(c.cancel("twice", f.now).empty());
}

TEST_CASE("campaign: the rate admits 120 devices a minute, and ramps by its factor", "[campaign]") {
  auto spec = staged(0, 0, 0);
  spec.waves.clear();
  spec.rate.per_minute = 120;
  fw::campaign c(1, spec, fleet_ids(1000), 0);
  fleet f{c};
  // A minute of ticks every 100 ms: the first (which starts it) admits at once, the next 599
  // ticks' 59.9 s admit one each half second.
  for (int i = 0; i < 600; ++i) f.tick(100);
  CHECK(f.admitted_log.size() == 120);
  // Paused for a minute: no admission, and no burst after the resume.
  REQUIRE(c.pause("lunch"));
  for (int i = 0; i < 600; ++i) f.tick(100);
  CHECK(f.admitted_log.size() == 120);
  f.apply(c.resume(f.now));
  f.tick(100);
  CHECK(f.admitted_log.size() == 121);
  f.tick(100);
  CHECK(f.admitted_log.size() == 121);

  // A ramp: 60 a minute, doubled for every 5 verified, up to 240.
  auto ramped = spec;
  ramped.rate = {60, 2, 5, 240};
  fw::campaign r(2, ramped, fleet_ids(1000), 0);
  fleet g{r};
  g.tick(0);
  CHECK(r.rate() == 60);
  g.finish_all();
  for (int i = 0; i < 4; ++i) {
    g.tick(1000);
    g.finish_all();
  }
  CHECK(r.rate() == 120);  // 5 verified
  for (int i = 0; i < 20; ++i) {
    g.tick(500);
    g.finish_all();
  }
  CHECK(r.rate() == 240);  // the ceiling
}

TEST_CASE("campaign: attempts past the timeout are stopped and retried, then time out",
          "[campaign]") {
  auto spec = staged(0, 0, 0);
  spec.waves.clear();
  spec.timeout_ms = 1000;
  spec.retries = 2;
  fw::campaign c(1, spec, fleet_ids(3), 0);
  fleet f{c};
  f.tick();
  REQUIRE(f.running.size() == 3);
  // dev-0 verifies; dev-1 stalls for ever; dev-2 fails (retried) and then verifies.
  f.apply(c.on_transfer("dev-0", transfer_status::verified, "", f.now));
  std::erase(f.running, "dev-0");
  f.apply(c.on_transfer("dev-2", transfer_status::failed, "device reported a failure", f.now));
  std::erase(f.running, "dev-2");
  // Admitted again at once (the scripted fleet starts it transferring).
  CHECK(c.find("dev-2")->status == campaign_device_status::transferring);
  CHECK(c.find("dev-2")->attempts == 2);
  f.apply(c.on_transfer("dev-2", transfer_status::verified, "", f.now));
  std::erase(f.running, "dev-2");
  for (int i = 0; i < 40; ++i) f.tick(100);
  const auto* d = c.find("dev-1");
  CHECK(d->status == campaign_device_status::timed_out);
  CHECK(d->attempts == 3);
  CHECK(c.timeouts() == 3);
  CHECK(c.retries() == 3);  // dev-2 once, dev-1 twice
  CHECK(f.stopped.size() == 3);
  CHECK(f.stopped.front() == std::pair<std::string, std::string>{"dev-1", "timed_out"});
  CHECK(c.state() == campaign_state::completed);
  CHECK(c.reason().find("below the success threshold") == std::string::npos);
  // The rollout engine's own stall verdict counts as a timeout too.
  fw::campaign s(2, spec, fleet_ids(1), 0);
  fleet g{s};
  g.tick();
  g.apply(s.on_transfer("dev-0", transfer_status::failed, "timed_out", g.now));
  CHECK(s.timeouts() == 1);
  CHECK(s.find("dev-0")->attempts == 2);
}

TEST_CASE("campaign: a wave done below the success threshold pauses; the last one ends short",
          "[campaign]") {
  auto spec = staged(90, 0, 0);
  spec.waves = {{2, 0}, {2, 0}};
  fw::campaign c(1, spec, fleet_ids(4), 0);
  fleet f{c};
  f.tick();
  f.finish_all([](const std::string& d) { return d == "dev-0"; });
  CHECK(c.state() == campaign_state::paused);
  CHECK(c.reason() == "wave 1 ended with 50.0% verified, below the success threshold");
  f.apply(c.resume(f.now, false));  // resumed as is: wave 1 still short, so paused again
  CHECK(c.state() == campaign_state::paused);
  f.apply(c.resume(f.now));  // with a retry of dev-0
  f.finish_all();
  CHECK(c.current_wave() == 1);
  f.finish_all([](const std::string& d) { return d == "dev-3"; });
  CHECK(c.state() == campaign_state::completed);
  CHECK(c.reason() == "wave 2 ended with 50.0% verified, below the success threshold");
}

TEST_CASE(
    "campaign: a start time, continuous targets, a superseding campaign, the history "
    "bound",
    "[campaign]") {
  auto spec = staged(0, 0, 0);
  spec.waves.clear();
  spec.start_at = 5'000'000;
  spec.target.continuous = true;
  fw::campaign c(1, spec, fleet_ids(2), 0);
  fleet f{c};
  f.tick();
  CHECK(c.state() == campaign_state::scheduled);
  CHECK(f.admitted_log.empty());
  CHECK(c.add_device("late-0", f.now));  // joins before the start
  f.now = 5'000'000;
  f.tick(0);
  CHECK(c.state() == campaign_state::running);
  CHECK(f.admitted_log.size() == 3);
  CHECK(c.add_device("late-1", f.now));
  CHECK(!c.add_device("late-1", f.now));
  f.tick();
  CHECK(f.admitted_log.size() == 4);
  // dev-0 flaps offline and back many times: its history keeps the last 16 changes.
  for (int i = 0; i < 20; ++i) {
    f.apply(c.on_transfer("dev-0", transfer_status::pending, "offline", f.now));
    f.apply(c.on_transfer("dev-0", transfer_status::transferring, "", f.now));
  }
  CHECK(c.find("dev-0")->history.size() == fw::campaign_limits::history);
  // A newer campaign takes over: the unfinished devices are superseded and stopped.
  f.apply(c.on_transfer("dev-1", transfer_status::verified, "", f.now));
  f.apply(c.cancel("superseded by campaign 2", f.now, true));
  CHECK(c.state() == campaign_state::superseded);
  CHECK(c.count(campaign_device_status::superseded) == 3);
  CHECK(c.count(campaign_device_status::verified) == 1);
  CHECK(f.stopped.size() == 3);
  CHECK(f.stopped.front().second == "superseded");
  // A snapshot campaign takes no late device.
  fw::campaign snap(3, staged(0, 0, 0), fleet_ids(2), 0);
  CHECK(!snap.add_device("late", 0));
  CHECK_THROWS_AS(fw::campaign(4, staged(0, 0, 0), {}, 0), fw::campaign_spec_error);
  // A continuous campaign may start empty, and waits for devices: done, it still runs.
  auto all = staged(0, 0, 0);
  all.target.continuous = true;
  fw::campaign open_ended(5, all, {}, 0);
  fleet g{open_ended};
  g.tick();
  CHECK(open_ended.state() == campaign_state::running);
  CHECK(open_ended.add_device("first", g.now));
  g.tick();
  CHECK(g.admitted_log == std::vector<std::string>{"first"});
  g.finish_all();
  CHECK(open_ended.count(campaign_device_status::verified) == 1);
  CHECK(open_ended.state() == campaign_state::running);
  g.apply(open_ended.cancel("superseded by campaign 6", g.now, true));
  CHECK(open_ended.state() == campaign_state::superseded);
}

TEST_CASE("campaign: restored from what the store kept, it goes on where it was", "[campaign]") {
  fw::campaign c(1, staged(90, 5, 20), fleet_ids(1000), 0);
  fleet f{c};
  f.tick();
  f.finish_all();
  // Mid wave 2: 100 of its devices verified, 300 transferring.
  for (int i = 0; i < 100; ++i) {
    auto id = f.running.front();
    f.running.erase(f.running.begin());
    f.apply(c.on_transfer(id, transfer_status::verified, "", f.now));
  }
  // The restart: a new campaign from the spec and device list, then the kept places.
  fw::campaign r(1, c.spec(), fleet_ids(1000), 0);
  for (const auto& d : c.devices()) r.restore_device(d);
  const auto again = r.restored(c.state(), c.reason(), c.waves_started(), c.admitted(), c.retries(),
                                c.timeouts(), c.rate(), f.now);
  CHECK(again.admit.size() == 300);
  CHECK(r.count(campaign_device_status::verified) == 200);
  CHECK(r.waves()[1].at(campaign_device_status::transferring) == 300);
  CHECK(r.current_wave() == 1);
  fleet g{r};
  g.now = f.now;
  for (const auto& id : again.admit) g.running.push_back(id);
  g.finish_all();
  CHECK(r.current_wave() == 2);
  g.finish_all();
  CHECK(r.state() == campaign_state::completed);
  CHECK(r.count(campaign_device_status::verified) == 1000);
}

TEST_CASE("campaign: its kept form (records) reads back whole; only changed devices are written",
          "[campaign]") {
  auto spec = staged(90, 5, 20);
  spec.name = "";  // an unnamed campaign reads back too
  spec.retries = 1;
  spec.rate.per_minute = 600;
  spec.rate.ramp_factor = 2;
  spec.rate.ramp_every = 50;
  spec.rate.max_per_minute = 6000;
  spec.timeout_ms = 30'000;
  fw::campaign c(7, spec, fleet_ids(1000), 5);
  std::vector<std::uint32_t> changed;
  c.take_changed(changed);
  CHECK(changed.size() == 1000);  // new: every device is written
  c.take_changed(changed);
  CHECK(changed.empty());
  fleet f{c};
  for (int i = 0; i < 15; ++i) f.tick(1000);  // 10 a second: wave 1 admitted
  f.finish_all([](const std::string& id) { return id == "dev-3"; });
  for (int i = 0; i < 5; ++i) f.tick(1000);  // wave 2 at a ramped rate, dev-3's retry
  c.take_changed(changed);
  CHECK_FALSE(changed.empty());
  CHECK(changed.size() < 1000);
  std::set<std::uint32_t> unique(changed.begin(), changed.end());
  CHECK(unique.size() == changed.size());  // each once
  REQUIRE(c.count(campaign_device_status::verified) > 0);
  REQUIRE_FALSE(f.running.empty());

  devgate::store::kept_campaign k;
  k.campaign = fw::to_record(c, 42);
  CHECK(k.campaign.id == 7);
  CHECK(k.campaign.rollout == 42);
  CHECK(k.campaign.version == "2.0");
  CHECK_FALSE(k.campaign.ended);
  for (std::uint32_t i = 0; i < c.devices().size(); ++i) {
    k.devices.push_back(fw::to_device_record(c, i));
  }
  auto back = fw::revive(k, f.now);
  const auto& r = *back.c;
  CHECK(to_json(r, 42) == to_json(c, 42));  // state, counts per wave, counters, rate, spec
  for (std::size_t i = 0; i < c.devices().size(); ++i) {
    const auto& a = c.devices()[i];
    const auto& b = r.devices()[i];
    CHECK(to_json(a) == to_json(b));  // status, attempts, reason, history
  }
  std::vector<std::string> running = f.running;
  std::sort(running.begin(), running.end());
  auto readmit = back.readmit.admit;
  std::sort(readmit.begin(), readmit.end());
  CHECK(readmit == running);
  // A default campaign (no name, no waves, continuous, no device yet) reads back too.
  fw::campaign_spec all;
  all.version = "3.0";
  all.target.continuous = true;
  fw::campaign open_ended(8, all, {}, 9);
  devgate::store::kept_campaign e;
  e.campaign = fw::to_record(open_ended, 43);
  const auto again = fw::revive(e, 10);
  CHECK(to_json(*again.c, 43) == to_json(open_ended, 43));
  // A damaged record is refused with the campaign's id and the reason.
  k.campaign.state = "{\"spec\": {}}";
  try {
    (void)fw::revive(k, f.now);
    FAIL("revive accepted a damaged record");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).rfind("campaign 7 as the store kept it: ", 0) == 0);
  }
}

TEST_CASE("campaign: a reason that is not UTF-8 is kept with U+FFFD, never thrown on",
          "[campaign]") {
  fw::campaign c(9, staged(90, 5, 20), fleet_ids(10), 5);
  fleet f{c};
  for (int i = 0; i < 3; ++i) f.tick(1000);
  REQUIRE_FALSE(f.running.empty());
  const auto id = *f.running.begin();
  // What a host or the fleet channel may hand over: a byte that starts no UTF-8 sequence.
  f.apply(c.on_transfer(id, transfer_status::failed, "flash \xff error", f.now));
  std::vector<std::uint32_t> changed;
  c.take_changed(changed);
  REQUIRE_FALSE(changed.empty());
  devgate::store::campaign_device_record row;
  const auto pos = static_cast<std::uint32_t>(c.find(id) - c.devices().data());
  REQUIRE_NOTHROW(row = fw::to_device_record(c, pos));
  CHECK(row.state.find("flash \xef\xbf\xbd error") != std::string::npos);
  REQUIRE_NOTHROW((void)fw::to_record(c, 1));
}
