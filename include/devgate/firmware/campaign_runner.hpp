#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>   // std::max
#include <array>       // counts per status
#include <atomic>      // the active rollout, read by on_status
#include <chrono>      // the tick period, wall-clock time
#include <cstddef>     // std::size_t
#include <cstdint>     // campaign and rollout ids
#include <deque>       // ended campaigns
#include <functional>  // the change hook, the target filter
#include <memory>      // campaigns
#include <mutex>       // the run lock, the news queue
#include <optional>    // lookups
#include <span>        // changed devices
#include <string>      // ids, reasons
#include <utility>     // std::move
#include <vector>      // news, ids

#include "devgate/firmware/campaign.hpp"
#include "devgate/firmware/detail/ticker.hpp"
#include "devgate/store/state_store.hpp"

namespace devgate::firmware {

/// `c` as the operator API shows it: state, reason, spec, counts per status over the campaign
/// and per wave, and its counters (read from counters kept as devices change: no scan).
[[nodiscard]] inline nlohmann::json to_json(const campaign& c, std::uint32_t rollout) {
  auto counts = [](const auto& by_status) {
    nlohmann::json j = nlohmann::json::object();
    for (std::size_t i = 0; i < campaign_device_statuses; ++i) {
      j[to_string(static_cast<campaign_device_status>(i))] = by_status[i];
    }
    return j;
  };
  std::array<std::size_t, campaign_device_statuses> totals{};
  for (std::size_t i = 0; i < campaign_device_statuses; ++i) {
    totals[i] = c.count(static_cast<campaign_device_status>(i));
  }
  nlohmann::json waves = nlohmann::json::array();
  for (const auto& w : c.waves()) {
    waves.push_back({{"size", w.size}, {"started", w.started}, {"counts", counts(w.counts)}});
  }
  return {{"id", c.id()},
          {"name", c.spec().name},
          {"version", c.spec().version},
          {"rollout", rollout},
          {"state", to_string(c.state())},
          {"reason", c.reason()},
          {"created_at", c.created_at()},
          {"devices", c.devices().size()},
          {"counts", counts(totals)},
          {"waves", waves},
          {"current_wave", c.current_wave()},
          {"admitted", c.admitted()},
          {"retries", c.retries()},
          {"timeouts", c.timeouts()},
          {"rate_per_minute", c.rate()},
          {"spec", to_json(c.spec())}};
}
/// One device of a campaign as the operator API shows it, with its history.
[[nodiscard]] inline nlohmann::json to_json(const campaign_device& d) {
  nlohmann::json history = nlohmann::json::array();
  for (const auto& h : d.history) {
    history.push_back({{"at", h.at}, {"status", to_string(h.status)}, {"reason", h.reason}});
  }
  return {{"id", d.id},
          {"wave", d.wave + 1},
          {"status", to_string(d.status)},
          {"attempts", d.attempts},
          {"reason", d.reason},
          {"history", history}};
}

/// Runs rollout campaigns over a rollout engine: one campaign is active at a time (it owns the
/// engine's current rollout, published gated), a newer one supersedes it (its unfinished
/// devices end `superseded`). A timer thread feeds the active campaign the time and the
/// engine's news of its devices (queued by `on_status`, which the engine calls), and carries
/// out what the campaign decides: `admit` and `stop` on the engine.
///
/// Locking: one run lock serialises the campaign and the engine calls made for it; the news
/// queue has a lock of its own, so the engine's calls into `on_status` (from any thread, some
/// made by the runner's own `admit`) never wait for the run lock.
template <class Engine>
class campaign_runner {
 public:
  /// Called under the run lock whenever the active campaign changed in a way a store keeps,
  /// with the positions of the devices that changed since the last call (the store layer
  /// persists them; keep it short).
  using change_hook = std::function<void(const campaign&, std::uint32_t rollout,
                                         std::span<const std::uint32_t> changed)>;

  /// A runner over `engine` (referenced) that steps every `tick` and keeps the last `keep`
  /// ended campaigns for the operator API.
  explicit campaign_runner(Engine& engine,
                           std::chrono::milliseconds tick = std::chrono::milliseconds(50),
                           std::size_t keep = 16)
      : engine_(engine), tick_(tick), keep_(keep == 0 ? 1 : keep) {}
  campaign_runner(const campaign_runner&) = delete;
  campaign_runner& operator=(const campaign_runner&) = delete;
  /// Stops the timer thread.
  ~campaign_runner() { ticker_.stop(); }

  /// Stops the timer thread (the owner calls it before the engine goes away), then takes in
  /// the news queued so far, so that the store hears of it; after it the change hook is not
  /// called again (news and hellos that come later change nothing) until a campaign starts.
  void stop() {
    ticker_.stop();
    std::lock_guard lock(run_mutex_);
    if (active_ && !stopped_) {
      drain(wall_ms());
      after_step();
    }
    stopped_ = true;
  }
  /// Sets the hook told of each change the store keeps (before the first campaign).
  void on_change(change_hook hook) {
    std::lock_guard lock(run_mutex_);
    on_change_ = std::move(hook);
  }

  /// The engine's news of a device (its `rollout_options::on_status`): queued for the next
  /// step when it concerns the active campaign's rollout.
  void on_status(const std::string& id, const store::transfer_state& t) {
    if (t.rollout == 0 || t.rollout != rollout_.load(std::memory_order_acquire)) return;
    std::lock_guard lock(news_mutex_);
    news_.push_back({id, t.status, t.reason});
  }

  /// Starts campaign `spec` over `devices` (in wave order): `publish()` makes its image the
  /// engine's current rollout (gated) and returns the rollout id. The active campaign, if any,
  /// is superseded first. Returns the new campaign's id. Throws campaign_spec_error (no
  /// device) or what `publish` throws; nothing changes then. `id`: one `reserve` handed out
  /// (0: the next).
  template <class Publish>
  std::uint64_t start(campaign_spec spec, const std::vector<std::string>& devices,
                      Publish&& publish, std::uint64_t id = 0) {
    std::lock_guard lock(run_mutex_);
    stopped_ = false;
    const auto now = wall_ms();
    if (id == 0) id = next_id_++;
    auto c = std::make_unique<campaign>(id, std::move(spec), devices, now);
    // The new rollout first (the old campaign's devices leave it): a publish that throws
    // changes nothing.
    const std::uint32_t rollout = publish();
    if (active_) {
      drain(now);
      execute(active_->cancel("superseded by campaign " + std::to_string(id), now, true));
      flush();
      retire();
    }
    active_ = std::move(c);
    active_rollout_ = rollout;
    rollout_.store(rollout, std::memory_order_release);
    dirty_ = true;
    execute(active_->tick(now));
    flush();
    ticker_.start(tick_, [this] { step(wall_ms()); });
    return active_->id();
  }
  /// Hands out the id of a campaign to `start` later (an operator API answers with it before
  /// the image is ready).
  std::uint64_t reserve() {
    std::lock_guard lock(run_mutex_);
    return next_id_++;
  }
  /// Takes back campaign `c` (kept by a store) and its rollout after a restart: the devices it
  /// had admitted are admitted again (their transfers resume where the store left them).
  void restore(std::unique_ptr<campaign> c, std::uint32_t rollout, campaign_actions readmit) {
    std::lock_guard lock(run_mutex_);
    next_id_ = std::max(next_id_, c->id() + 1);
    if (active_ && !is_over(c->state())) {
      // An older campaign the store still had running: the newer one superseded it.
      const auto now = wall_ms();
      execute(active_->cancel("superseded by campaign " + std::to_string(c->id()), now, true));
      flush();
      retire();
    }
    if (is_over(c->state())) {
      ended_.push_back({std::move(c), rollout});
      while (ended_.size() > keep_) ended_.pop_front();
      return;
    }
    active_ = std::move(c);
    active_rollout_ = rollout;
    rollout_.store(rollout, std::memory_order_release);
    execute(readmit);
    ticker_.start(tick_, [this] { step(wall_ms()); });
  }

  /// The engine's rollout was replaced by one that is not the active campaign's (a release to
  /// the whole fleet): the active campaign ends `superseded` with `reason`. Nothing if none.
  void supersede(std::string reason) {
    std::lock_guard lock(run_mutex_);
    if (!active_) return;
    const auto now = wall_ms();
    drain(now);
    execute(active_->cancel(std::move(reason), now, true));
    after_step();
  }
  /// Pauses campaign `id` (the operator's `reason`). False if it is not the active campaign or
  /// is not running.
  bool pause(std::uint64_t id, std::string reason) {
    std::lock_guard lock(run_mutex_);
    if (!active_ || active_->id() != id) return false;
    drain(wall_ms());
    if (!active_->pause(std::move(reason))) return false;
    dirty_ = true;
    flush();
    return true;
  }
  /// Resumes campaign `id`, retrying its failed devices with `retry_failed`. False if it is not
  /// the active campaign or is not paused.
  bool resume(std::uint64_t id, bool retry_failed = true) {
    std::lock_guard lock(run_mutex_);
    if (!active_ || active_->id() != id) return false;
    const auto now = wall_ms();
    drain(now);
    auto a = active_->resume(now, retry_failed);
    if (!a.changed) return false;
    execute(a);
    after_step();
    return true;
  }
  /// Cancels campaign `id`: its transfers running stop, its devices not done are cancelled.
  /// False if it is not the active campaign.
  bool cancel(std::uint64_t id, std::string reason) {
    std::lock_guard lock(run_mutex_);
    if (!active_ || active_->id() != id) return false;
    const auto now = wall_ms();
    drain(now);
    execute(active_->cancel(std::move(reason), now));
    after_step();
    return true;
  }
  /// A device first seen (hello) that `joins` says belongs to the active campaign's target:
  /// with a continuous target it joins the last wave. False otherwise.
  template <class Matches>
  bool seen(const std::string& id, Matches&& matches) {
    std::lock_guard lock(run_mutex_);
    if (stopped_ || !active_ || !active_->spec().target.continuous ||
        active_->find(id) != nullptr) {
      return false;
    }
    if (!matches(active_->spec().target)) return false;
    if (!active_->add_device(id, wall_ms())) return false;
    dirty_ = true;
    flush();
    return true;
  }

  /// One step at `now` (the timer thread's; tests may call it): the queued news, then the
  /// time (start, timeouts, admissions).
  void step(campaign_ms now) {
    std::lock_guard lock(run_mutex_);
    if (!active_ || stopped_) return;
    drain(now);
    if (!active_) return;
    execute(active_->tick(now));
    after_step();
  }

  /// The active campaign's rollout (0: none); any thread, no lock.
  [[nodiscard]] std::uint32_t active_rollout() const noexcept {
    return rollout_.load(std::memory_order_acquire);
  }
  /// The active campaign's id (std::nullopt: none).
  [[nodiscard]] std::optional<std::uint64_t> active() const {
    std::lock_guard lock(run_mutex_);
    if (!active_) return std::nullopt;
    return active_->id();
  }
  /// Calls `f(const campaign&, rollout)` with campaign `id` under the run lock; false if no
  /// such campaign is kept.
  template <class F>
  bool with(std::uint64_t id, F&& f) const {
    std::lock_guard lock(run_mutex_);
    if (active_ && active_->id() == id) {
      f(static_cast<const campaign&>(*active_), active_rollout_);
      return true;
    }
    for (const auto& e : ended_) {
      if (e.c->id() == id) {
        f(static_cast<const campaign&>(*e.c), e.rollout);
        return true;
      }
    }
    return false;
  }
  /// Calls `f(const campaign&, rollout)` for each kept campaign, newest first, under the run
  /// lock.
  template <class F>
  void each(F&& f) const {
    std::lock_guard lock(run_mutex_);
    if (active_) f(static_cast<const campaign&>(*active_), active_rollout_);
    for (auto it = ended_.rbegin(); it != ended_.rend(); ++it) {
      f(static_cast<const campaign&>(*it->c), it->rollout);
    }
  }
  /// Campaign `id` as the operator API shows it (std::nullopt: not kept).
  [[nodiscard]] std::optional<nlohmann::json> describe(std::uint64_t id) const {
    std::optional<nlohmann::json> out;
    with(id, [&](const campaign& c, std::uint32_t r) { out = to_json(c, r); });
    return out;
  }
  /// The newest kept campaign (the active one, else the last ended) as `describe` shows it
  /// (std::nullopt: none yet).
  [[nodiscard]] std::optional<nlohmann::json> latest() const {
    std::lock_guard lock(run_mutex_);
    if (active_) return to_json(*active_, active_rollout_);
    if (!ended_.empty()) return to_json(*ended_.back().c, ended_.back().rollout);
    return std::nullopt;
  }
  /// Appends the kept campaigns' figures to `out` in the Prometheus text format: devices per
  /// status (`devgate_campaign_devices`) and per wave and status
  /// (`devgate_campaign_wave_devices`), the state (`devgate_campaign_state`, 1 for the
  /// current one), admissions, retries and timeouts (`_total` counters), labelled by campaign.
  void render_prometheus(std::string& out) const {
    std::lock_guard lock(run_mutex_);
    std::vector<const campaign*> all;
    if (active_) all.push_back(active_.get());
    for (const auto& e : ended_) all.push_back(e.c.get());
    auto family = [&](const char* name, const char* type, const char* help) {
      out += "# HELP devgate_";
      out += name;
      out += ' ';
      out += help;
      out += "\n# TYPE devgate_";
      out += name;
      out += ' ';
      out += type;
      out += '\n';
    };
    auto line = [&](const char* name, const campaign& c, const std::string& more,
                    std::uint64_t value) {
      out += "devgate_";
      out += name;
      out += "{campaign=\"" + std::to_string(c.id()) + '"' + more + "} " + std::to_string(value) +
             '\n';
    };
    family("campaign_devices", "gauge", "Devices of a rollout campaign with each status.");
    for (const auto* c : all) {
      for (std::size_t s = 0; s < campaign_device_statuses; ++s) {
        const auto st = static_cast<campaign_device_status>(s);
        line("campaign_devices", *c, std::string(",status=\"") + to_string(st) + '"', c->count(st));
      }
    }
    family("campaign_wave_devices", "gauge", "Devices of a campaign's wave with each status.");
    for (const auto* c : all) {
      for (std::size_t w = 0; w < c->waves().size(); ++w) {
        for (std::size_t s = 0; s < campaign_device_statuses; ++s) {
          line("campaign_wave_devices", *c,
               ",wave=\"" + std::to_string(w + 1) + "\",status=\"" +
                   to_string(static_cast<campaign_device_status>(s)) + '"',
               c->waves()[w].counts[s]);
        }
      }
    }
    family("campaign_state", "gauge", "1 for the campaign's current state.");
    for (const auto* c : all) {
      line("campaign_state", *c, std::string(",state=\"") + to_string(c->state()) + '"', 1);
    }
    family("campaign_admitted_total", "counter", "Attempts a campaign started (retries too).");
    for (const auto* c : all) line("campaign_admitted_total", *c, "", c->admitted());
    family("campaign_retries_total", "counter",
           "Attempts a campaign retried after a failure or a timeout.");
    for (const auto* c : all) line("campaign_retries_total", *c, "", c->retries());
    family("campaign_timeouts_total", "counter",
           "Attempts that ran past a campaign's in-progress timeout.");
    for (const auto* c : all) line("campaign_timeouts_total", *c, "", c->timeouts());
  }
  /// A page of campaign `id`'s devices (`status` filters; `offset`, `limit` page), with the
  /// number matching (std::nullopt: no such campaign).
  [[nodiscard]] std::optional<nlohmann::json> devices(std::uint64_t id,
                                                      std::optional<campaign_device_status> status,
                                                      std::size_t offset, std::size_t limit) const {
    std::optional<nlohmann::json> out;
    with(id, [&](const campaign& c, std::uint32_t) {
      nlohmann::json page = nlohmann::json::array();
      std::size_t matching = 0;
      for (const auto& d : c.devices()) {
        if (status && d.status != *status) continue;
        if (matching >= offset && page.size() < limit) page.push_back(to_json(d));
        ++matching;
      }
      out = nlohmann::json{
          {"total", matching}, {"offset", offset}, {"limit", limit}, {"devices", page}};
    });
    return out;
  }

 private:
  struct news {
    std::string id;
    store::transfer_status status;
    std::string reason;
  };
  struct ended {
    std::unique_ptr<campaign> c;
    std::uint32_t rollout;
  };

  static campaign_ms wall_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  // Feeds the queued news to the active campaign (run lock held). News that the runner's own
  // engine calls queue meanwhile waits for the next step.
  void drain(campaign_ms now) {
    std::vector<news> batch;
    {
      std::lock_guard lock(news_mutex_);
      batch.swap(news_);
    }
    for (const auto& n : batch) execute(active_->on_transfer(n.id, n.status, n.reason, now));
  }
  // Carries out the campaign's decisions on the engine (run lock held).
  void execute(const campaign_actions& a) {
    for (const auto& [id, reason] : a.stop) engine_.stop(id, active_rollout_, reason);
    for (const auto& id : a.admit) (void)engine_.admit(id, active_rollout_);
    dirty_ = dirty_ || a.changed;
  }
  // Tells the change hook, once per step, when the campaign changed (run lock held).
  void flush() {
    if (active_ && !stopped_) {
      active_->take_changed(changed_);
      if ((dirty_ || !changed_.empty()) && on_change_) {
        on_change_(*active_, active_rollout_, changed_);
      }
    }
    dirty_ = false;
  }
  // After a step or a command: an ended campaign moves to the kept list.
  void after_step() {
    flush();
    if (active_ && is_over(active_->state())) retire();
  }
  void retire() {
    ended_.push_back({std::move(active_), active_rollout_});
    while (ended_.size() > keep_) ended_.pop_front();
    rollout_.store(0, std::memory_order_release);
  }

  Engine& engine_;
  const std::chrono::milliseconds tick_;
  const std::size_t keep_;
  mutable std::mutex run_mutex_;
  std::unique_ptr<campaign> active_;
  std::uint32_t active_rollout_ = 0;
  std::deque<ended> ended_;
  std::uint64_t next_id_ = 1;
  change_hook on_change_;
  bool stopped_ = false;                // `stop` ran: nothing more reaches the change hook
  bool dirty_ = false;                  // the active campaign changed since the hook was last told
  std::vector<std::uint32_t> changed_;  // its devices that did (reused)
  std::atomic<std::uint32_t> rollout_{0};  // the active campaign's rollout, for on_status
  std::mutex news_mutex_;
  std::vector<news> news_;
  detail::ticker ticker_;  // last: stopped first
};

}  // namespace devgate::firmware
