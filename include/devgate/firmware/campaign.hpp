#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>      // std::min, std::max
#include <array>          // counts per status
#include <cmath>          // std::llround, std::isfinite
#include <cstddef>        // std::size_t
#include <cstdint>        // ids, times
#include <cstdio>         // std::snprintf (percentages in reasons)
#include <deque>          // the admission queue, history
#include <map>            // attribute filters
#include <optional>       // lookups
#include <stdexcept>      // a spec's errors
#include <string>         // ids, reasons
#include <string_view>    // names
#include <unordered_map>  // device index
#include <utility>        // std::move
#include <vector>         // waves, actions

#include "devgate/store/state_store.hpp"  // transfer_status (the rollout's events)

namespace devgate::firmware {

/// Wall-clock time in milliseconds since the Unix epoch: a campaign's times are kept and
/// compared in it, so that they mean the same after a restart and on every node.
using campaign_ms = std::int64_t;

/// Where one device stands in a campaign.
enum class campaign_device_status : std::uint8_t {
  queued,        ///< Waiting for its wave to start, or for the rate to admit it.
  pending,       ///< Admitted: waiting for a transfer slot or for the device to connect.
  transferring,  ///< Receiving the image.
  verified,      ///< Confirmed the image's SHA-256 (a success).
  skipped,       ///< Already ran the campaign's version (a success).
  failed,        ///< Failed its last allowed attempt (reported a failure or a bad result).
  timed_out,     ///< Its last allowed attempt ran past the in-progress timeout.
  cancelled,     ///< The campaign was cancelled or aborted before it finished.
  superseded,    ///< A newer campaign took the fleet over before it finished.
};
/// How many `campaign_device_status` values there are.
inline constexpr std::size_t campaign_device_statuses = 9;

/// The name of `s` in the operator API, the store and the metrics.
[[nodiscard]] constexpr const char* to_string(campaign_device_status s) noexcept {
  constexpr std::array<const char*, campaign_device_statuses> names{
      "queued", "pending",   "transferring", "verified",  "skipped",
      "failed", "timed_out", "cancelled",    "superseded"};
  return names[static_cast<std::size_t>(s)];
}
/// The status named `name` (std::nullopt for an unknown name).
[[nodiscard]] inline std::optional<campaign_device_status> device_status_from_string(
    std::string_view name) noexcept {
  for (std::size_t i = 0; i < campaign_device_statuses; ++i) {
    const auto s = static_cast<campaign_device_status>(i);
    if (name == to_string(s)) return s;
  }
  return std::nullopt;
}
/// Whether a device with status `s` is done with the campaign.
[[nodiscard]] constexpr bool is_final(campaign_device_status s) noexcept {
  return s >= campaign_device_status::verified;
}

/// Where a campaign stands.
enum class campaign_state : std::uint8_t {
  scheduled,   ///< Waiting for its start time.
  running,     ///< Admitting devices wave by wave.
  paused,      ///< Admitting no device (by the operator or a threshold); transfers running go on.
  completed,   ///< Every wave ran and every device is done.
  aborted,     ///< Stopped by its error threshold (action abort); unfinished devices cancelled.
  cancelled,   ///< Stopped by the operator; unfinished devices cancelled.
  superseded,  ///< A newer campaign took the fleet over; unfinished devices superseded.
};
/// The name of `s` in the operator API and the store.
[[nodiscard]] constexpr const char* to_string(campaign_state s) noexcept {
  constexpr std::array<const char*, 7> names{"scheduled", "running",   "paused",    "completed",
                                             "aborted",   "cancelled", "superseded"};
  return names[static_cast<std::size_t>(s)];
}
/// The state named `name` (std::nullopt for an unknown name).
[[nodiscard]] inline std::optional<campaign_state> campaign_state_from_string(
    std::string_view name) noexcept {
  for (std::size_t i = 0; i < 7; ++i) {
    const auto s = static_cast<campaign_state>(i);
    if (name == to_string(s)) return s;
  }
  return std::nullopt;
}
/// Whether a campaign in state `s` is over (it changes no more).
[[nodiscard]] constexpr bool is_over(campaign_state s) noexcept {
  return s >= campaign_state::completed;
}

/// Which devices a campaign updates.
struct campaign_target {
  /// These devices (when not empty).
  std::vector<std::string> ids;
  /// Devices whose attributes include every one of these (when not empty; with `ids` too, a
  /// device must be listed and match).
  std::map<std::string, std::string> attributes;
  /// Devices first seen after the start that match join the last wave (AWS IoT Jobs'
  /// `CONTINUOUS`; such a campaign may start with no device, and runs until cancelled or
  /// superseded); otherwise the devices are those known at the start (`SNAPSHOT`).
  bool continuous = false;
  /// Whether `attrs` (a range of name/value pairs) satisfies the attribute filter.
  template <class Attributes>
  [[nodiscard]] bool matches(const Attributes& attrs) const {
    for (const auto& want : attributes) {
      const auto it = std::find_if(attrs.begin(), attrs.end(),
                                   [&](const auto& a) { return a.first == want.first; });
      if (it == attrs.end() || it->second != want.second) return false;
    }
    return true;
  }
};

/// One wave's size: `count` devices, or `percent` of the campaign's devices (one of the two).
/// The last wave always takes every device the earlier waves left.
struct wave_size {
  std::size_t count = 0;  ///< Devices in the wave (when not 0).
  double percent = 0;     ///< Percent of the campaign's devices (when `count` is 0).
};

/// When a wave has gone bad: counted over the wave's devices that failed or timed out for good
/// (retries spent), once at least `min_executed` of the wave's devices are done.
struct error_threshold {
  std::size_t count = 0;         ///< That many errors trip it (0: no absolute limit).
  double percent = 0;            ///< Errors at this percent of the done devices (0: none).
  std::size_t min_executed = 0;  ///< Done devices in the wave before it is checked.
  bool abort = false;            ///< Abort the campaign (else pause it).
};

/// How fast devices are admitted: at most `per_minute` started a minute (0: no limit, the
/// transfer slots pace them), the rate multiplied by `ramp_factor` each time `ramp_every`
/// more devices verified, up to `max_per_minute` (AWS IoT Jobs' exponential rollout).
struct rate_limit {
  double per_minute = 0;       ///< Devices started per minute (0: as fast as slots allow).
  double ramp_factor = 1;      ///< Multiplies the rate at each ramp step (1: constant).
  std::size_t ramp_every = 0;  ///< Verified devices per ramp step (0: no ramp).
  double max_per_minute = 0;   ///< The ramp's ceiling (0: none).
};

/// What a campaign does: its image's version, its devices, its waves and its limits.
struct campaign_spec {
  std::string name;                ///< The operator's name for it.
  std::string version;             ///< The version of the image it rolls out.
  campaign_target target;          ///< Its devices.
  std::vector<wave_size> waves;    ///< Its waves, in order (empty: one wave of every device).
  double success_threshold = 100;  ///< Percent of a wave verified that starts the next wave.
  error_threshold errors;          ///< When a wave goes bad.
  rate_limit rate;                 ///< Admissions per minute.
  std::int64_t timeout_ms = 0;     ///< In-progress timeout per attempt, ms (0: none).
  unsigned retries = 0;            ///< Attempts after the first for a failed or timed-out device.
  campaign_ms start_at = 0;        ///< Admits nobody before this time (0: at once).
};

/// The largest spec values `parse_campaign_spec` accepts.
struct campaign_limits {
  static constexpr std::size_t max_waves = 100;      ///< Waves per campaign.
  static constexpr std::size_t max_ids = 1'000'000;  ///< Listed target ids.
  static constexpr std::size_t max_attributes = 32;  ///< Attribute filters.
  static constexpr std::size_t max_text = 256;       ///< Bytes of a name, version or value.
  static constexpr unsigned max_retries = 100;       ///< Retries per device.
  static constexpr std::size_t history = 16;         ///< History entries kept per device.
};

/// A spec the operator API refused: `what()` names the field and what is wrong with it.
class campaign_spec_error : public std::invalid_argument {
 public:
  /// The constructors of std::invalid_argument (a message naming the field).
  using std::invalid_argument::invalid_argument;
};

namespace detail {
inline const nlohmann::json* campaign_field(const nlohmann::json& j, const char* name) {
  auto it = j.find(name);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}
[[noreturn]] inline void campaign_bad(const std::string& field, const std::string& what) {
  throw campaign_spec_error(field + ": " + what);
}
inline double campaign_number(const nlohmann::json& v, const std::string& field, double lo,
                              double hi) {
  if (!v.is_number()) campaign_bad(field, "must be a number");
  const double d = v.get<double>();
  if (!std::isfinite(d) || d < lo || d > hi) {
    campaign_bad(field, "must be between " + std::to_string(static_cast<std::int64_t>(lo)) +
                            " and " + std::to_string(static_cast<std::int64_t>(hi)));
  }
  return d;
}
inline std::uint64_t campaign_count(const nlohmann::json& v, const std::string& field,
                                    std::uint64_t hi) {
  if (!v.is_number_integer() ||
      (v.is_number_integer() && !v.is_number_unsigned() && v.get<std::int64_t>() < 0)) {
    campaign_bad(field, "must be a non-negative integer");
  }
  const auto n = v.get<std::uint64_t>();
  if (n > hi) campaign_bad(field, "must be at most " + std::to_string(hi));
  return n;
}
inline std::string campaign_text(const nlohmann::json& v, const std::string& field,
                                 bool allow_empty) {
  if (!v.is_string()) campaign_bad(field, "must be a string");
  auto s = v.get<std::string>();
  if (s.empty() && !allow_empty) campaign_bad(field, "must not be empty");
  if (s.size() > campaign_limits::max_text) {
    campaign_bad(field, "must be at most " + std::to_string(campaign_limits::max_text) + " bytes");
  }
  return s;
}
inline void campaign_only(const nlohmann::json& j, const std::string& where,
                          std::initializer_list<const char*> known) {
  for (const auto& [k, v] : j.items()) {
    bool ok = false;
    for (const char* n : known) ok = ok || k == n;
    if (!ok) campaign_bad(where.empty() ? k : where + "." + k, "unknown field");
  }
}
}  // namespace detail

/// Reads a campaign spec from the operator API's JSON body (docs/ROLLOUTS.md has the fields),
/// checking every field. `version` is not read here (the image names it). Throws
/// `campaign_spec_error` naming the first field that is wrong and why.
[[nodiscard]] inline campaign_spec parse_campaign_spec(const nlohmann::json& j) {
  using detail::campaign_bad;
  using detail::campaign_field;
  if (!j.is_object()) campaign_bad("body", "must be a JSON object");
  detail::campaign_only(j, "",
                        {"name", "version", "target", "waves", "success_threshold",
                         "error_threshold", "rate", "timeout_s", "retries", "start_at"});
  campaign_spec s;
  if (auto* v = campaign_field(j, "name")) s.name = detail::campaign_text(*v, "name", false);
  if (auto* v = campaign_field(j, "target")) {
    if (!v->is_object()) campaign_bad("target", "must be an object");
    detail::campaign_only(*v, "target", {"ids", "attributes", "continuous"});
    if (auto* ids = campaign_field(*v, "ids")) {
      if (!ids->is_array()) campaign_bad("target.ids", "must be an array of device ids");
      if (ids->empty()) campaign_bad("target.ids", "must not be empty (omit it for all devices)");
      if (ids->size() > campaign_limits::max_ids) {
        campaign_bad("target.ids", "at most " + std::to_string(campaign_limits::max_ids));
      }
      for (const auto& id : *ids)
        s.target.ids.push_back(detail::campaign_text(id, "target.ids[]", false));
    }
    if (auto* attrs = campaign_field(*v, "attributes")) {
      if (!attrs->is_object()) campaign_bad("target.attributes", "must be an object of strings");
      if (attrs->size() > campaign_limits::max_attributes) {
        campaign_bad("target.attributes",
                     "at most " + std::to_string(campaign_limits::max_attributes));
      }
      for (const auto& [k, a] : attrs->items()) {
        s.target.attributes[detail::campaign_text(k, "target.attributes", false)] =
            detail::campaign_text(a, "target.attributes." + k, true);
      }
    }
    if (auto* c = campaign_field(*v, "continuous")) {
      if (!c->is_boolean()) campaign_bad("target.continuous", "must be true or false");
      s.target.continuous = c->get<bool>();
    }
  }
  if (auto* w = campaign_field(j, "waves")) {
    if (!w->is_array() || w->empty()) campaign_bad("waves", "must be a non-empty array");
    if (w->size() > campaign_limits::max_waves) {
      campaign_bad("waves", "at most " + std::to_string(campaign_limits::max_waves));
    }
    double total = 0;
    for (std::size_t i = 0; i < w->size(); ++i) {
      const auto& e = (*w)[i];
      const auto field = "waves[" + std::to_string(i) + "]";
      if (!e.is_object()) campaign_bad(field, "must be {\"count\": N} or {\"percent\": P}");
      detail::campaign_only(e, field, {"count", "percent"});
      auto* c = campaign_field(e, "count");
      auto* p = campaign_field(e, "percent");
      if ((c == nullptr) == (p == nullptr)) {
        campaign_bad(field, "must have exactly one of count and percent");
      }
      wave_size ws;
      if (c) {
        ws.count = detail::campaign_count(*c, field + ".count", campaign_limits::max_ids);
        if (ws.count == 0) campaign_bad(field + ".count", "must be at least 1");
      } else {
        ws.percent = detail::campaign_number(*p, field + ".percent", 0, 100);
        if (ws.percent <= 0) campaign_bad(field + ".percent", "must be above 0");
        total += ws.percent;
      }
      s.waves.push_back(ws);
    }
    if (total > 100.0001) campaign_bad("waves", "percentages add up to more than 100");
  }
  if (auto* v = campaign_field(j, "success_threshold")) {
    s.success_threshold = detail::campaign_number(*v, "success_threshold", 0, 100);
  }
  if (auto* e = campaign_field(j, "error_threshold")) {
    if (!e->is_object()) campaign_bad("error_threshold", "must be an object");
    detail::campaign_only(*e, "error_threshold", {"count", "percent", "min_executed", "action"});
    if (auto* v = campaign_field(*e, "count")) {
      s.errors.count =
          detail::campaign_count(*v, "error_threshold.count", campaign_limits::max_ids);
    }
    if (auto* v = campaign_field(*e, "percent")) {
      s.errors.percent = detail::campaign_number(*v, "error_threshold.percent", 0, 100);
    }
    if (auto* v = campaign_field(*e, "min_executed")) {
      s.errors.min_executed =
          detail::campaign_count(*v, "error_threshold.min_executed", campaign_limits::max_ids);
    }
    if (auto* v = campaign_field(*e, "action")) {
      const auto a = detail::campaign_text(*v, "error_threshold.action", false);
      if (a != "pause" && a != "abort") {
        campaign_bad("error_threshold.action", "must be \"pause\" or \"abort\"");
      }
      s.errors.abort = a == "abort";
    }
    if (s.errors.count == 0 && s.errors.percent == 0) {
      campaign_bad("error_threshold", "needs count or percent above 0");
    }
  }
  if (auto* r = campaign_field(j, "rate")) {
    if (!r->is_object()) campaign_bad("rate", "must be an object");
    detail::campaign_only(*r, "rate",
                          {"per_minute", "ramp_factor", "ramp_every", "max_per_minute"});
    if (auto* v = campaign_field(*r, "per_minute")) {
      s.rate.per_minute = detail::campaign_number(*v, "rate.per_minute", 0, 1e6);
    }
    if (auto* v = campaign_field(*r, "ramp_factor")) {
      s.rate.ramp_factor = detail::campaign_number(*v, "rate.ramp_factor", 1, 5);
    }
    if (auto* v = campaign_field(*r, "ramp_every")) {
      s.rate.ramp_every = detail::campaign_count(*v, "rate.ramp_every", campaign_limits::max_ids);
    }
    if (auto* v = campaign_field(*r, "max_per_minute")) {
      s.rate.max_per_minute = detail::campaign_number(*v, "rate.max_per_minute", 0, 1e6);
    }
    if (s.rate.per_minute == 0 && (s.rate.ramp_factor != 1 || s.rate.ramp_every != 0)) {
      campaign_bad("rate.per_minute", "a ramp needs a starting rate above 0");
    }
    if (s.rate.ramp_factor > 1 && s.rate.ramp_every == 0) {
      campaign_bad("rate.ramp_every", "a ramp_factor above 1 needs ramp_every >= 1");
    }
  }
  if (auto* v = campaign_field(j, "timeout_s")) {
    s.timeout_ms = static_cast<std::int64_t>(
        std::llround(detail::campaign_number(*v, "timeout_s", 0, 7 * 24 * 3600.0) * 1000));
  }
  if (auto* v = campaign_field(j, "retries")) {
    s.retries =
        static_cast<unsigned>(detail::campaign_count(*v, "retries", campaign_limits::max_retries));
  }
  if (auto* v = campaign_field(j, "start_at")) {
    s.start_at = static_cast<campaign_ms>(
        detail::campaign_count(*v, "start_at", 253'402'300'799'000ULL));  // year 9999
  }
  return s;
}

/// `s` as the operator API shows it (and the store keeps it; `parse_campaign_spec` reads it
/// back, `version` aside).
[[nodiscard]] inline nlohmann::json to_json(const campaign_spec& s) {
  nlohmann::json waves = nlohmann::json::array();
  for (const auto& w : s.waves) {
    waves.push_back(w.count ? nlohmann::json{{"count", w.count}}
                            : nlohmann::json{{"percent", w.percent}});
  }
  nlohmann::json target = nlohmann::json::object();
  if (!s.target.ids.empty()) target["ids"] = s.target.ids;
  if (!s.target.attributes.empty()) target["attributes"] = s.target.attributes;
  target["continuous"] = s.target.continuous;
  nlohmann::json j{{"name", s.name},
                   {"version", s.version},
                   {"target", target},
                   {"waves", waves},
                   {"success_threshold", s.success_threshold},
                   {"rate",
                    {{"per_minute", s.rate.per_minute},
                     {"ramp_factor", s.rate.ramp_factor},
                     {"ramp_every", s.rate.ramp_every},
                     {"max_per_minute", s.rate.max_per_minute}}},
                   {"timeout_s", static_cast<double>(s.timeout_ms) / 1000.0},
                   {"retries", s.retries},
                   {"start_at", s.start_at}};
  if (s.errors.count != 0 || s.errors.percent != 0) {
    j["error_threshold"] = {{"count", s.errors.count},
                            {"percent", s.errors.percent},
                            {"min_executed", s.errors.min_executed},
                            {"action", s.errors.abort ? "abort" : "pause"}};
  }
  return j;
}

/// One change of a device's status in a campaign.
struct campaign_history_entry {
  campaign_ms at = 0;                                              ///< When.
  campaign_device_status status = campaign_device_status::queued;  ///< To what.
  std::string reason;                                              ///< Why (may be empty).
};

/// One device of a campaign: where it stands and its last `campaign_limits::history` changes.
struct campaign_device {
  std::string id;                                                  ///< The device.
  std::uint32_t wave = 0;                                          ///< Its wave (0-based).
  campaign_device_status status = campaign_device_status::queued;  ///< Where it stands.
  std::uint32_t attempts = 0;  ///< Attempts started (admissions).
  campaign_ms started_at = 0;  ///< When its current attempt began transferring (0: not yet).
  std::string reason;          ///< Why it ended (failed, timed out, cancelled...).
  std::deque<campaign_history_entry> history;  ///< Its changes, oldest first (bounded).
};

/// One wave's figures, kept as devices change (no scan).
struct campaign_wave {
  std::size_t size = 0;                                        ///< Devices in the wave.
  bool started = false;                                        ///< Whether it started admitting.
  std::array<std::size_t, campaign_device_statuses> counts{};  ///< Devices per status.
  /// Devices done with the campaign, counted toward its thresholds (superseded, cancelled not).
  [[nodiscard]] std::size_t executed() const noexcept {
    return at(campaign_device_status::verified) + at(campaign_device_status::skipped) +
           at(campaign_device_status::failed) + at(campaign_device_status::timed_out);
  }
  /// Devices that failed or timed out for good.
  [[nodiscard]] std::size_t errors() const noexcept {
    return at(campaign_device_status::failed) + at(campaign_device_status::timed_out);
  }
  /// Devices verified or skipped.
  [[nodiscard]] std::size_t succeeded() const noexcept {
    return at(campaign_device_status::verified) + at(campaign_device_status::skipped);
  }
  /// Devices not done yet.
  [[nodiscard]] std::size_t open() const noexcept {
    return at(campaign_device_status::queued) + at(campaign_device_status::pending) +
           at(campaign_device_status::transferring);
  }
  /// Devices with status `s`.
  [[nodiscard]] std::size_t at(campaign_device_status s) const noexcept {
    return counts[static_cast<std::size_t>(s)];
  }
};

/// What the campaign asks its driver to do to the rollout engine, in this order: stop these
/// devices' transfers (each with the reason the device is told), then admit these devices
/// (start or restart their transfer).
struct campaign_actions {
  std::vector<std::pair<std::string, std::string>> stop;  ///< Devices to stop, and why.
  std::vector<std::string> admit;                         ///< Devices to start now.
  bool changed = false;  ///< Whether anything the store keeps changed.
  /// Whether there is nothing to do.
  [[nodiscard]] bool empty() const noexcept { return stop.empty() && admit.empty(); }
};

/// A rollout campaign as a state machine with no thread, clock or socket of its own: its
/// driver (the hub's campaign runner) feeds it the time (`tick`), the rollout engine's news
/// of each device (`on_transfer`) and the operator's commands, and carries out the actions
/// each returns. Not thread-safe: the driver serialises the calls.
///
/// Waves: the devices are split into waves in the order given; a wave starts when the wave
/// before it has `success_threshold` percent of its devices verified (or skipped). A wave
/// whose devices are all done below that pauses the campaign. After each device that is done,
/// its wave's error threshold is checked (errors are the devices failed or timed out with no
/// retry left, once `min_executed` are done) and pauses or aborts the campaign.
///
/// Admission: devices of started waves are admitted in order, at most as fast as the rate
/// allows (a token bucket holding one second's worth). An attempt that
/// fails or runs past `timeout_ms` from the start of its transfer goes back to the queue while
/// the device has retries left, and is done as `failed` or `timed_out` otherwise.
class campaign {
 public:
  /// A campaign numbered `id` for `spec` over `devices` (in wave order; duplicates dropped),
  /// created at `now`. Throws campaign_spec_error for no device (unless its target is
  /// continuous: devices may come later).
  campaign(std::uint64_t id, campaign_spec spec, const std::vector<std::string>& devices,
           campaign_ms now)
      : id_(id), spec_(std::move(spec)), created_at_(now) {
    devices_.reserve(devices.size());
    for (const auto& d : devices) {
      if (index_.emplace(d, static_cast<std::uint32_t>(devices_.size())).second) {
        devices_.push_back(make_device(d, 0));
      }
    }
    if (devices_.empty() && !spec_.target.continuous) {
      throw campaign_spec_error("target: matches no device");
    }
    initial_ = devices_.size();
    marked_.assign(devices_.size(), 1);  // a new campaign: every device is news to a store
    changed_.resize(devices_.size());
    for (std::uint32_t i = 0; i < changed_.size(); ++i) changed_[i] = i;
    split_waves();
    state_ = campaign_state::scheduled;
    rate_ = spec_.rate.per_minute;
    last_refill_ = now;
    tokens_ = 1;
  }

  /// The campaign's id.
  [[nodiscard]] std::uint64_t id() const noexcept { return id_; }
  /// Its spec.
  [[nodiscard]] const campaign_spec& spec() const noexcept { return spec_; }
  /// Where it stands.
  [[nodiscard]] campaign_state state() const noexcept { return state_; }
  /// Why it paused, aborted, completed short or was cancelled (empty when running).
  [[nodiscard]] const std::string& reason() const noexcept { return reason_; }
  /// When it was created.
  [[nodiscard]] campaign_ms created_at() const noexcept { return created_at_; }
  /// Its waves.
  [[nodiscard]] const std::vector<campaign_wave>& waves() const noexcept { return waves_; }
  /// Its devices, in wave order.
  [[nodiscard]] const std::vector<campaign_device>& devices() const noexcept { return devices_; }
  /// The device `id` (nullptr: not in the campaign).
  [[nodiscard]] const campaign_device* find(std::string_view id) const {
    auto it = index_.find(std::string(id));
    return it == index_.end() ? nullptr : &devices_[it->second];
  }
  /// Devices per status over every wave.
  [[nodiscard]] std::size_t count(campaign_device_status s) const noexcept {
    return totals_[static_cast<std::size_t>(s)];
  }
  /// Attempts that were retried (after a failure or a timeout).
  [[nodiscard]] std::uint64_t retries() const noexcept { return retried_; }
  /// Attempts that ran past the in-progress timeout (retried or not).
  [[nodiscard]] std::uint64_t timeouts() const noexcept { return timeouts_; }
  /// Devices admitted so far (attempts started).
  [[nodiscard]] std::uint64_t admitted() const noexcept { return admitted_; }
  /// The admission rate now, devices per minute (0: no limit).
  [[nodiscard]] double rate() const noexcept { return rate_; }
  /// The index of the last wave started (-1: none yet).
  [[nodiscard]] int current_wave() const noexcept {
    int w = -1;
    for (std::size_t i = 0; i < waves_.size(); ++i) {
      if (waves_[i].started) w = static_cast<int>(i);
    }
    return w;
  }

  /// How many devices it had when it was created (the waves were split over them; devices
  /// added later by a continuous target join the last wave).
  [[nodiscard]] std::size_t initial_devices() const noexcept { return initial_; }
  /// How many devices were verified since the rate last ramped.
  [[nodiscard]] std::size_t verified_since_ramp() const noexcept { return verified_since_ramp_; }
  /// Moves the positions (in `devices()`) of the devices changed since the last call into
  /// `out` (cleared first), each once: what a store must write again.
  void take_changed(std::vector<std::uint32_t>& out) {
    out.clear();
    out.swap(changed_);
    for (const auto i : out) marked_[i] = 0;
  }

  /// Time passes: the campaign starts at its start time, timed-out attempts end, and the rate
  /// admits the next devices.
  campaign_actions tick(campaign_ms now) {
    campaign_actions a;
    if (is_over(state_)) return a;
    if (state_ == campaign_state::scheduled) {
      if (now < spec_.start_at) return a;
      state_ = campaign_state::running;
      last_refill_ = now;
      tokens_ = 1;
      a.changed = true;
      start_wave(0);
    }
    if (spec_.timeout_ms > 0) expire(now, a);
    admit(now, a);
    return a;
  }

  /// The rollout engine's news of device `id`: its transfer is now `status` (`reason` for a
  /// failure). News of a device not admitted now is stale and ignored.
  campaign_actions on_transfer(std::string_view id, store::transfer_status status,
                               std::string_view reason, campaign_ms now) {
    campaign_actions a;
    auto it = index_.find(std::string(id));
    if (it == index_.end() || is_over(state_)) return a;
    auto& d = devices_[it->second];
    if (d.status != campaign_device_status::pending &&
        d.status != campaign_device_status::transferring) {
      return a;
    }
    switch (status) {
      case store::transfer_status::pending:
        if (d.status == campaign_device_status::transferring) {
          set(d, campaign_device_status::pending, std::string(reason), now);
          a.changed = true;
        }
        break;
      case store::transfer_status::transferring:
        if (d.started_at == 0) d.started_at = now;
        if (d.status != campaign_device_status::transferring) {
          set(d, campaign_device_status::transferring, {}, now);
          a.changed = true;
        }
        break;
      case store::transfer_status::verified:
      case store::transfer_status::skipped: {
        set(d,
            status == store::transfer_status::verified ? campaign_device_status::verified
                                                       : campaign_device_status::skipped,
            {}, now);
        a.changed = true;
        if (status == store::transfer_status::verified) ramp();
        check_wave(d.wave, now, a);
        break;
      }
      case store::transfer_status::failed: {
        const bool stall = reason == "timed_out";
        if (stall) ++timeouts_;
        attempt_ended(d, stall ? campaign_device_status::timed_out : campaign_device_status::failed,
                      std::string(reason), now, a);
        a.changed = true;
        break;
      }
      case store::transfer_status::none:
        break;
    }
    admit(now, a);
    return a;
  }

  /// A device first seen after the start (`continuous` targets): it joins the last wave.
  /// False if it is in the campaign already or the campaign is over or not continuous.
  bool add_device(const std::string& id, campaign_ms now) {
    if (!spec_.target.continuous || is_over(state_) || index_.count(id) != 0) return false;
    const auto w = static_cast<std::uint32_t>(waves_.size() - 1);
    index_.emplace(id, static_cast<std::uint32_t>(devices_.size()));
    devices_.push_back(make_device(id, w));
    marked_.push_back(0);
    auto& d = devices_.back();
    ++waves_[w].size;
    count_in(d);
    note(d, now, "joined");
    if (waves_[w].started) queue_.push_back(static_cast<std::uint32_t>(devices_.size() - 1));
    return true;
  }

  /// The operator pauses the campaign: nobody more is admitted; running transfers go on.
  /// False if it is not running or scheduled.
  bool pause(std::string reason) {
    if (state_ != campaign_state::running && state_ != campaign_state::scheduled) return false;
    state_ = campaign_state::paused;
    reason_ = std::move(reason);
    return true;
  }
  /// The operator resumes a paused campaign at `now`. With `retry_failed`, the devices of the
  /// started waves that failed or timed out for good are queued again with their retries
  /// renewed (the operator fixed them). The waves' thresholds are checked again at once.
  /// Returns what to do (nothing, `changed` false, if it was not paused).
  campaign_actions resume(campaign_ms now, bool retry_failed = true) {
    campaign_actions a;
    if (state_ != campaign_state::paused) return a;
    state_ = started_any() ? campaign_state::running : campaign_state::scheduled;
    reason_.clear();
    a.changed = true;
    if (retry_failed) {
      for (std::uint32_t i = 0; i < devices_.size(); ++i) {
        auto& d = devices_[i];
        if (!waves_[d.wave].started) continue;
        if (d.status != campaign_device_status::failed &&
            d.status != campaign_device_status::timed_out) {
          continue;
        }
        d.attempts = 0;
        set(d, campaign_device_status::queued, "resumed", now);
        queue_.push_back(i);
      }
    }
    last_refill_ = now;
    tokens_ = 1;
    for (std::size_t w = 0; w < waves_.size() && state_ == campaign_state::running; ++w) {
      if (waves_[w].started) check_wave(w, now, a);
    }
    admit(now, a);
    return a;
  }
  /// The operator cancels the campaign (or a newer campaign supersedes it, `superseded`):
  /// devices not done are cancelled (superseded) and those admitted are stopped. Nothing if
  /// it is over already.
  campaign_actions cancel(std::string reason, campaign_ms now, bool superseded = false) {
    campaign_actions a;
    if (is_over(state_)) return a;
    end(superseded ? campaign_state::superseded : campaign_state::cancelled, std::move(reason), now,
        a);
    return a;
  }

  /// Puts back a device's place as the store kept it (a restart): its wave, status, attempts
  /// and history. Admitted devices (pending, transferring) are admitted again by `restored`.
  void restore_device(const campaign_device& kept) {
    auto it = index_.find(kept.id);
    if (it == index_.end()) {
      index_.emplace(kept.id, static_cast<std::uint32_t>(devices_.size()));
      devices_.push_back(make_device(
          kept.id,
          std::min<std::uint32_t>(kept.wave, static_cast<std::uint32_t>(waves_.size() - 1))));
      marked_.push_back(0);
      ++waves_[devices_.back().wave].size;
      count_in(devices_.back());
      it = index_.find(kept.id);
    }
    auto& d = devices_[it->second];
    count_out(d);
    d.status = kept.status;
    d.attempts = kept.attempts;
    d.started_at = kept.started_at;
    d.reason = kept.reason;
    d.history = kept.history;
    count_in(d);
  }
  /// Puts back the campaign's own state as the store kept it (after `restore_device` for each
  /// device): its state, reason, started waves, counters and rate. Returns the devices to admit
  /// again (those that were admitted when it stopped), and rebuilds the admission queue.
  campaign_actions restored(campaign_state state, std::string reason, std::size_t waves_started,
                            std::uint64_t admitted, std::uint64_t retried, std::uint64_t timeouts,
                            double rate, campaign_ms now, std::size_t verified_since_ramp = 0) {
    campaign_actions a;
    verified_since_ramp_ = verified_since_ramp;
    std::vector<std::uint32_t> kept;
    take_changed(kept);  // the store has every device as it is now
    state_ = state;
    reason_ = std::move(reason);
    admitted_ = admitted;
    retried_ = retried;
    timeouts_ = timeouts;
    rate_ = rate;
    last_refill_ = now;
    tokens_ = 1;
    queue_.clear();
    for (std::size_t w = 0; w < waves_.size(); ++w) waves_[w].started = w < waves_started;
    if (is_over(state_)) return a;
    for (std::uint32_t i = 0; i < devices_.size(); ++i) {
      auto& d = devices_[i];
      if (!waves_[d.wave].started) continue;
      if (d.status == campaign_device_status::queued) queue_.push_back(i);
      if (d.status == campaign_device_status::pending ||
          d.status == campaign_device_status::transferring) {
        // Its transfer resumes through the rollout engine, which restored its offset.
        a.admit.push_back(d.id);
      }
    }
    return a;
  }
  /// How many waves started (they start in order).
  [[nodiscard]] std::size_t waves_started() const noexcept {
    std::size_t n = 0;
    for (const auto& w : waves_) n += w.started ? 1 : 0;
    return n;
  }

 private:
  static campaign_device make_device(std::string id, std::uint32_t wave) {
    campaign_device d;
    d.id = std::move(id);
    d.wave = wave;
    return d;
  }
  void split_waves() {
    const std::size_t total = devices_.size();
    std::vector<wave_size> sizes = spec_.waves;
    if (sizes.empty()) sizes.push_back({0, 100});
    waves_.resize(sizes.size());
    std::size_t begin = 0;
    double cum_percent = 0;
    for (std::size_t w = 0; w < sizes.size(); ++w) {
      std::size_t end;
      if (w + 1 == sizes.size()) {
        end = total;
      } else if (sizes[w].count != 0) {
        end = std::min(total, begin + sizes[w].count);
      } else {
        cum_percent += sizes[w].percent;
        end = std::clamp<std::size_t>(
            static_cast<std::size_t>(std::llround(static_cast<double>(total) * cum_percent / 100)),
            begin, total);
      }
      if (sizes[w].count != 0 && total != 0) {
        cum_percent = 100.0 * static_cast<double>(end) / static_cast<double>(total);
      }
      for (std::size_t i = begin; i < end; ++i) devices_[i].wave = static_cast<std::uint32_t>(w);
      waves_[w].size = end - begin;
      begin = end;
    }
    for (auto& d : devices_) {
      count_in(d);
      note(d, created_at_, "created");
    }
  }

  void count_in(const campaign_device& d) {
    ++waves_[d.wave].counts[static_cast<std::size_t>(d.status)];
    ++totals_[static_cast<std::size_t>(d.status)];
  }
  void count_out(const campaign_device& d) {
    --waves_[d.wave].counts[static_cast<std::size_t>(d.status)];
    --totals_[static_cast<std::size_t>(d.status)];
  }
  // Every change of a device goes through here (its history grows): the store hears of it.
  void note(campaign_device& d, campaign_ms now, std::string reason) {
    d.history.push_back({now, d.status, std::move(reason)});
    while (d.history.size() > campaign_limits::history) d.history.pop_front();
    const auto i = static_cast<std::uint32_t>(&d - devices_.data());
    if (marked_[i] == 0) {
      marked_[i] = 1;
      changed_.push_back(i);
    }
  }
  void set(campaign_device& d, campaign_device_status to, std::string reason, campaign_ms now) {
    count_out(d);
    d.status = to;
    count_in(d);
    if (is_final(to)) d.reason = reason;
    note(d, now, std::move(reason));
  }
  [[nodiscard]] bool started_any() const noexcept {
    for (const auto& w : waves_) {
      if (w.started) return true;
    }
    return false;
  }

  void start_wave(std::size_t w) {
    // Empty waves pass at once: the next one starts with them.
    for (; w < waves_.size(); ++w) {
      if (waves_[w].started) continue;
      waves_[w].started = true;
      for (std::uint32_t i = 0; i < devices_.size(); ++i) {
        if (devices_[i].wave == w && devices_[i].status == campaign_device_status::queued) {
          queue_.push_back(i);
        }
      }
      if (waves_[w].size != 0) break;
    }
  }

  // An attempt of `d` ended badly (`as` failed or timed_out): back to the queue while it has
  // retries left, else done.
  void attempt_ended(campaign_device& d, campaign_device_status as, std::string reason,
                     campaign_ms now, campaign_actions& a) {
    d.started_at = 0;
    if (d.attempts <= spec_.retries) {
      // Queued again (while paused, it waits there for the resume).
      ++retried_;
      set(d, campaign_device_status::queued, "retry after " + reason, now);
      queue_.push_back(index_.at(d.id));
      return;
    }
    set(d, as, std::move(reason), now);
    check_wave(d.wave, now, a);
  }

  // `d` is done: its wave's thresholds, the next wave, the campaign's end.
  void check_wave(std::size_t w, campaign_ms now, campaign_actions& a) {
    const auto& wave = waves_[w];
    if (is_over(state_)) return;
    const auto executed = wave.executed();
    const auto errors = wave.errors();
    const auto& e = spec_.errors;
    if ((e.count != 0 || e.percent != 0) && errors != 0 && executed >= e.min_executed) {
      const double pct = 100.0 * static_cast<double>(errors) / static_cast<double>(executed);
      if ((e.count != 0 && errors >= e.count) || (e.percent != 0 && pct >= e.percent)) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.1f", pct);
        auto why = "wave " + std::to_string(w + 1) + ": " + std::to_string(errors) + " of " +
                   std::to_string(executed) + " done failed or timed out (" + buf +
                   "%), at the error threshold";
        if (e.abort) {
          end(campaign_state::aborted, std::move(why), now, a);
        } else if (state_ != campaign_state::paused) {
          state_ = campaign_state::paused;
          reason_ = std::move(why);
          a.changed = true;
        }
        return;
      }
    }
    const auto counted = wave.size - wave.at(campaign_device_status::cancelled) -
                         wave.at(campaign_device_status::superseded);
    const bool success = counted == 0 || 100.0 * static_cast<double>(wave.succeeded()) >=
                                             spec_.success_threshold * static_cast<double>(counted);
    if (success && w + 1 < waves_.size() && !waves_[w + 1].started &&
        state_ == campaign_state::running) {
      start_wave(w + 1);
      a.changed = true;
    }
    if (!success && wave.open() == 0 && state_ == campaign_state::running) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.1f",
                    100.0 * static_cast<double>(wave.succeeded()) / static_cast<double>(counted));
      auto why = "wave " + std::to_string(w + 1) + " ended with " + buf +
                 "% verified, below the success threshold";
      if (w + 1 < waves_.size()) {
        state_ = campaign_state::paused;
        reason_ = std::move(why);
        a.changed = true;
        return;
      }
      reason_ = std::move(why);  // the last wave: the campaign ends, short
    }
    finish_if_done(a);
  }
  // A continuous campaign waits for the devices still to come: only a cancel (or a newer
  // campaign) ends it.
  void finish_if_done(campaign_actions& a) {
    if (is_over(state_) || state_ == campaign_state::paused || spec_.target.continuous) return;
    for (const auto& w : waves_) {
      if (!w.started || w.open() != 0) return;
    }
    state_ = campaign_state::completed;
    a.changed = true;
  }

  void end(campaign_state to, std::string reason, campaign_ms now, campaign_actions& a) {
    const auto as = to == campaign_state::superseded ? campaign_device_status::superseded
                                                     : campaign_device_status::cancelled;
    for (auto& d : devices_) {
      if (is_final(d.status)) continue;
      if (d.status != campaign_device_status::queued) a.stop.emplace_back(d.id, to_string(as));
      set(d, as, reason, now);
    }
    queue_.clear();
    state_ = to;
    reason_ = std::move(reason);
    a.changed = true;
  }

  // Ends the attempts that have been transferring for longer than the timeout.
  void expire(campaign_ms now, campaign_actions& a) {
    for (auto& d : devices_) {
      if (d.started_at == 0 || now - d.started_at < spec_.timeout_ms) continue;
      if (d.status != campaign_device_status::pending &&
          d.status != campaign_device_status::transferring) {
        continue;
      }
      ++timeouts_;
      a.stop.emplace_back(d.id, "timed_out");
      attempt_ended(d, campaign_device_status::timed_out, "timed_out", now, a);
      a.changed = true;
    }
  }

  void ramp() {
    ++verified_since_ramp_;
    const auto& r = spec_.rate;
    if (r.ramp_every == 0 || r.ramp_factor <= 1 || rate_ == 0) return;
    while (verified_since_ramp_ >= r.ramp_every) {
      verified_since_ramp_ -= r.ramp_every;
      rate_ *= r.ramp_factor;
      if (r.max_per_minute > 0) rate_ = std::min(rate_, r.max_per_minute);
    }
  }

  void admit(campaign_ms now, campaign_actions& a) {
    if (state_ != campaign_state::running) return;
    if (rate_ > 0) {
      // The bucket holds one second's worth (at least one device): a tick of any period
      // admits what the rate allows, and an idle spell brings no larger burst.
      const double cap = std::max(1.0, rate_ / 60.0);
      tokens_ = std::min(cap, tokens_ + static_cast<double>(now - last_refill_) * rate_ / 60'000.0);
    }
    last_refill_ = now;
    while (!queue_.empty() && (rate_ == 0 || tokens_ >= 1)) {
      auto& d = devices_[queue_.front()];
      queue_.pop_front();
      if (d.status != campaign_device_status::queued) continue;
      ++d.attempts;
      ++admitted_;
      d.started_at = 0;
      set(d, campaign_device_status::pending, d.attempts > 1 ? "retry" : "admitted", now);
      a.admit.push_back(d.id);
      a.changed = true;
      if (rate_ > 0) tokens_ -= 1;
    }
  }

  std::uint64_t id_;
  campaign_spec spec_;
  campaign_ms created_at_;
  campaign_state state_ = campaign_state::scheduled;
  std::string reason_;
  std::vector<campaign_device> devices_;
  std::unordered_map<std::string, std::uint32_t> index_;
  std::vector<campaign_wave> waves_;
  std::array<std::size_t, campaign_device_statuses> totals_{};
  std::deque<std::uint32_t> queue_;  // devices of started waves waiting for admission
  double rate_ = 0;
  double tokens_ = 1;
  campaign_ms last_refill_ = 0;
  std::size_t verified_since_ramp_ = 0;
  std::uint64_t admitted_ = 0;
  std::uint64_t retried_ = 0;
  std::uint64_t timeouts_ = 0;
  std::size_t initial_ = 0;
  std::vector<std::uint8_t> marked_;    // per device: listed in changed_
  std::vector<std::uint32_t> changed_;  // devices changed since take_changed
};

}  // namespace devgate::firmware
