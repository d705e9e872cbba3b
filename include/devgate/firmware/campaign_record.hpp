#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>  // std::min
#include <cstddef>    // std::size_t
#include <cstdint>    // ids, positions
#include <memory>     // the revived campaign
#include <stdexcept>  // a kept form that does not read
#include <string>     // JSON text
#include <utility>    // std::move
#include <vector>     // device ids

#include "devgate/firmware/campaign.hpp"
#include "devgate/store/state_store.hpp"

namespace devgate::firmware {

/// Campaign `c` (rolled out by `rollout`) as a store keeps it, without its image: the spec and
/// the campaign's own state, as JSON text (read back by `revive`). Text that is not UTF-8 (a
/// reason a host or the fleet channel gave) is written with U+FFFD: the runner's thread, which
/// calls it, never throws.
[[nodiscard]] inline store::campaign_record to_record(const campaign& c, std::uint32_t rollout) {
  store::campaign_record r;
  r.id = c.id();
  r.rollout = rollout;
  r.version = c.spec().version;
  r.ended = is_over(c.state());
  r.state = nlohmann::json{{"spec", to_json(c.spec())},
                           {"state", to_string(c.state())},
                           {"reason", c.reason()},
                           {"created_at", c.created_at()},
                           {"initial", c.initial_devices()},
                           {"waves_started", c.waves_started()},
                           {"admitted", c.admitted()},
                           {"retries", c.retries()},
                           {"timeouts", c.timeouts()},
                           {"rate", c.rate()},
                           {"verified_since_ramp", c.verified_since_ramp()}}
                .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return r;
}

/// Device `position` of campaign `c` as a store keeps it: its wave, status, attempts, reason and
/// history, as JSON text.
[[nodiscard]] inline store::campaign_device_record to_device_record(const campaign& c,
                                                                    std::uint32_t position) {
  const auto& d = c.devices()[position];
  nlohmann::json history = nlohmann::json::array();
  for (const auto& h : d.history) {
    history.push_back({h.at, static_cast<int>(h.status), h.reason});
  }
  return {d.id, position,
          nlohmann::json{{"wave", d.wave},
                         {"status", static_cast<int>(d.status)},
                         {"attempts", d.attempts},
                         {"started_at", d.started_at},
                         {"reason", d.reason},
                         {"history", history}}
              .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)};
}

/// A campaign read back from a store: the campaign, and the devices it had admitted (their
/// transfers resume through the rollout engine).
struct revived_campaign {
  std::unique_ptr<campaign> c;  ///< The campaign as it was kept.
  campaign_actions readmit;     ///< Devices to admit again (pending or transferring).
};

/// Reads back campaign `k` (kept by `to_record`) at `now`. Throws std::runtime_error naming the
/// campaign when its kept form does not read (a store written by hand, or damaged).
[[nodiscard]] inline revived_campaign revive(const store::kept_campaign& k, campaign_ms now) {
  const auto bad = [&](const std::string& why) {
    return std::runtime_error("campaign " + std::to_string(k.campaign.id) +
                              " as the store kept it: " + why);
  };
  try {
    const auto j = nlohmann::json::parse(k.campaign.state);
    auto spec_json = j.at("spec");
    // What to_json writes for defaults that the operator's form leaves out.
    if (spec_json.value("name", "").empty()) spec_json.erase("name");
    if (auto w = spec_json.find("waves"); w != spec_json.end() && w->empty()) spec_json.erase(w);
    auto spec = parse_campaign_spec(spec_json);
    spec.version = k.campaign.version;
    const auto state = campaign_state_from_string(j.at("state").get<std::string>());
    if (!state) throw bad("unknown state");
    // The devices it had when created (the waves were split over them), then those added.
    const auto initial = std::min(j.at("initial").get<std::size_t>(), k.devices.size());
    std::vector<std::string> ids;
    ids.reserve(initial);
    for (std::size_t i = 0; i < initial; ++i) ids.push_back(k.devices[i].device);
    auto c = std::make_unique<campaign>(k.campaign.id, std::move(spec), ids,
                                        j.at("created_at").get<campaign_ms>());
    for (const auto& row : k.devices) {
      const auto d = nlohmann::json::parse(row.state);
      campaign_device kept;
      kept.id = row.device;
      kept.wave = d.at("wave").get<std::uint32_t>();
      const auto status = d.at("status").get<int>();
      if (status < 0 || status >= static_cast<int>(campaign_device_statuses)) {
        throw bad("device " + row.device + ": unknown status");
      }
      kept.status = static_cast<campaign_device_status>(status);
      kept.attempts = d.at("attempts").get<std::uint32_t>();
      kept.started_at = d.at("started_at").get<campaign_ms>();
      kept.reason = d.at("reason").get<std::string>();
      for (const auto& h : d.at("history")) {
        const auto s = h.at(1).get<int>();
        if (s < 0 || s >= static_cast<int>(campaign_device_statuses)) {
          throw bad("device " + row.device + ": unknown status in its history");
        }
        kept.history.push_back({h.at(0).get<campaign_ms>(), static_cast<campaign_device_status>(s),
                                h.at(2).get<std::string>()});
      }
      c->restore_device(kept);
    }
    auto readmit = c->restored(
        *state, j.at("reason").get<std::string>(), j.at("waves_started").get<std::size_t>(),
        j.at("admitted").get<std::uint64_t>(), j.at("retries").get<std::uint64_t>(),
        j.at("timeouts").get<std::uint64_t>(), j.at("rate").get<double>(), now,
        j.value("verified_since_ramp", std::size_t{0}));
    return {std::move(c), std::move(readmit)};
  } catch (const std::runtime_error&) {
    throw;
  } catch (const std::exception& e) {  // nlohmann::json's errors, campaign_spec_error
    throw bad(e.what());
  }
}

}  // namespace devgate::firmware
