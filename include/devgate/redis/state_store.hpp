#pragma once
// An optional part: needs hiredis (CMake target devgate::redis, meson devgate_redis_dep). The
// umbrella header devgate/devgate.hpp does not include it.

#include <algorithm>              // std::min
#include <asio/io_context.hpp>    // the heartbeat's loop
#include <asio/steady_timer.hpp>  // the heartbeat
#include <atomic>                 // counters
#include <charconv>               // numbers in replies
#include <chrono>                 // deadlines, the heartbeat
#include <condition_variable>     // a batch waits for its replies
#include <cstddef>                // std::byte
#include <cstdint>                // fence tokens, counters
#include <cstring>                // std::memcpy
#include <functional>             // the release handler
#include <memory>                 // the shared core
#include <mutex>                  // the owned table, the batch
#include <optional>               // owner lookups
#include <random>                 // a new epoch
#include <span>                   // a write's arguments
#include <stdexcept>              // std::invalid_argument at set-up
#include <string>                 // keys, ids
#include <string_view>            // argv
#include <system_error>           // errors as values
#include <thread>                 // the batching thread
#include <unordered_map>          // the owned table
#include <unordered_set>          // the devices whose claim failed
#include <utility>                // std::move
#include <vector>                 // argv, replay entries

#include "devgate/firmware/rollout.hpp"  // fleet totals
#include "devgate/firmware/slots.hpp"    // slot usage, for the lease
#include "devgate/redis/connection.hpp"
#include "devgate/redis/error.hpp"
#include "devgate/store/state_store.hpp"

namespace devgate::redis {

/// How a `redis::state_store` names its node and keys and how long it waits.
struct state_store_options {
  /// This node's name, unique in the cluster: 1 to 64 characters from `[A-Za-z0-9._-]`.
  std::string node_id;
  /// Every key starts with it (several fleets can share one Redis under different prefixes).
  std::string prefix = "devgate:";
  /// How long a call waits for Redis (a load, a batch's replies) before `errc::timeout`.
  std::chrono::milliseconds reply_timeout{2000};
  /// How often the node renews its heartbeat key and looks for dead nodes.
  std::chrono::milliseconds heartbeat_period{1000};
  /// How long a heartbeat key lives: a node silent this long is dead, and its devices are
  /// released (ownerless) by the first live node that notices. Longer than a Redis restart you
  /// want to ride out: a node cut off from Redis that long loses its devices' ownership.
  std::chrono::milliseconds heartbeat_ttl{10000};
  /// Messages that may wait in Redis for the node that holds a device to take them
  /// (`route`); one more is refused with `errc::routed_full`.
  std::size_t max_routed = 1000;
  /// Campaigns this node keeps (`save_campaign`): the newest; older ones are deleted.
  std::size_t max_campaigns = 16;
};

/// A device state store in Redis shared by several gateway nodes (a `store::durable_state_store`
/// and `store::transactional_store`): each device's record in a hash `<prefix>{<id>}:d`, its
/// replay buffer in a sorted set `<prefix>{<id>}:r` (scored by sequence number), the current
/// rollout in `<prefix>rollout`. It also keeps **ownership**: loading a device claims it for
/// this node (`owner` in its hash) with a fencing token (`fence`, incremented by every claim);
/// every write is a Lua script that applies only while this node still owns the device under the
/// token of its claim, so a node that lost a device can never overwrite the new owner's state.
/// A claim tells the previous owner on its control channel (`<prefix>node:<node>:control`), and
/// that node's store calls the release handler (`on_release`), which lets the device go on its
/// hub (`hub::release_device`: its session is closed with 4000); a write refused by the fence
/// also calls it. Nodes renew heartbeat keys (`<prefix>node:<node>:alive`, expiring after
/// `heartbeat_ttl`); a live node releases the devices of a node whose key expired. With
/// `share_figures`, each heartbeat also shares the node's figures and reads the fleet's sum.
///
/// **Routing** (`store::fleet_delivery_store`): a message for a device another live node owns
/// waits in `<prefix>{<id>}:in` and that node is told (`in <id>` on its control channel, handed
/// to `on_routed`); the node numbers it and keeps it in the replay set while removing it from
/// the list, in one fenced script, so it is delivered once whether the device stays or moves
/// (a claim reports how many wait).
///
/// **Campaigns** (`store::fleet_campaign_store`, docs/ROLLOUTS.md "Across nodes"): a campaign's
/// gated rollout is the fleet's, marked `gated`; the node running it admits and stops devices
/// on every node (`<prefix>rollout:admitted` and the fleet channel) and hears the others'
/// progress; it keeps the campaign under its node id (`store::campaign_store`).
///
/// The **epoch** (`<prefix>epoch`, random, made by the first claim that finds none) changes only
/// when Redis lost its data; each device record carries the epoch it was made in, and the hub
/// tells it to the device in `welcome`, so a device that sees it change knows its history is
/// gone (its `last_seq` is then beyond the store's: the hub also answers `bad_resume`).
///
/// Threads: calls block on Redis, so the hub calls the store from its store thread only
/// (`store::write_behind`); the writes of one batch are pipelined and waited for once, in
/// `commit_batch`. The connections' loop must run on another thread. Copies share one store.
class state_store {
 public:
  /// Called when this node lost device `id` to another node (`fenced` false: a claim elsewhere
  /// told us) or found out on a write the fence refused (`fenced` true). Runs on the loop's
  /// thread; hand it to `hub::release_device`.
  using release_fn = std::function<void(const std::string& id, bool fenced)>;

  /// A store for node `options.node_id` through `commands` (pipelined calls; may be shared with
  /// other users) and `control` (this store's alone: it subscribes to the node's control
  /// channel), both driven by `io`. Throws std::invalid_argument for a bad node id or an empty
  /// prefix.
  state_store(asio::io_context& io, connection& commands, connection& control,
              state_store_options options)
      : core_(std::make_shared<core>(io, commands, control, std::move(options))) {
    const auto& id = core_->options.node_id;
    bool ok = !id.empty() && id.size() <= 64;
    for (const char ch : id) {
      ok = ok && ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-');
    }
    if (!ok) {
      throw std::invalid_argument(
          "devgate::redis::state_store: node_id must be 1 to 64 characters of [A-Za-z0-9._-]");
    }
    if (core_->options.prefix.empty()) {
      throw std::invalid_argument("devgate::redis::state_store: prefix must not be empty");
    }
    control.on_message([c = core_](std::string_view channel, std::string_view body) {
      if (channel == c->fleet_channel) {
        c->heard(body);
      } else {
        c->told(body);
      }
    });
  }

  /// Several nodes share it: the hub reloads a device's state for each new session.
  [[nodiscard]] bool shared() const noexcept { return true; }

  /// Called with a rollout another node published (or one this node missed while Redis was
  /// away, found at a heartbeat). Runs on the loop's thread; hand it to `hub::adopt_firmware`.
  using rollout_fn = std::function<void(const store::rollout_record&)>;
  /// This node's transfer slots, read by the lease (`hub::slots().usage()`).
  using usage_fn = std::function<firmware::slot_usage()>;
  /// Sets this node's slot limit to its lease (`hub::set_transfer_limit`).
  using limit_fn = std::function<void(std::size_t)>;

  /// Sets the release handler (before `start`).
  void on_release(release_fn f) { core_->on_release = std::move(f); }
  /// Called when another node routed messages to device `id`, which this node owns
  /// (`route`). Runs on the loop's thread; hand it to `hub::take_routed`.
  using routed_fn = std::function<void(const std::string& id)>;
  /// Sets the handler of messages routed here (before `start`).
  void on_routed(routed_fn f) { core_->on_routed = std::move(f); }
  /// Sets the handler of rollouts published elsewhere (before `start`).
  void on_rollout(rollout_fn f) { core_->on_rollout = std::move(f); }
  /// Called with what another node said of the campaign running on the fleet's gated rollout
  /// (admissions and stops from the node running it; progress and hellos from the nodes that
  /// hold its devices; and, after this node adopted the rollout or reconnected, the admitted
  /// set, as `admit` without `retry`). This node's own words are not handed back. Runs on the
  /// loop's thread; hand it to `hub::take_campaign_event`.
  using campaign_fn = std::function<void(const store::campaign_event&)>;
  /// Sets the campaign handler (before `start`).
  void on_campaign(campaign_fn f) { core_->on_campaign = std::move(f); }

  // ---- campaigns across nodes (store::fleet_campaign_store); none of these blocks but the
  // last two, and any thread may call them -------------------------------------------------

  /// Admits `ids` into gated rollout `rollout` on every node: adds them to its admitted set
  /// (`<prefix>rollout:admitted`) and tells the fleet, in one script; nothing when `rollout`
  /// is no longer the fleet's.
  void campaign_admit(std::uint32_t rollout, const std::vector<std::string>& ids);
  /// Stops device `id`'s part in gated rollout `rollout` on every node, for `reason` (it
  /// leaves the admitted set).
  void campaign_stop(std::uint32_t rollout, const std::string& id, const std::string& reason);
  /// Tells the fleet (the node running the campaign) that device `id` moved to `t.status`.
  void campaign_news(std::uint32_t rollout, const std::string& id, const store::transfer_state& t);
  /// Tells the fleet that device `id`, not admitted, said hello with `attributes` (JSON).
  void campaign_seen(std::uint32_t rollout, const std::string& id, const std::string& attributes);
  /// The devices admitted into gated rollout `rollout` (none when it is not the fleet's); it
  /// blocks: at start.
  [[nodiscard]] std::vector<std::string> campaign_admitted(std::uint32_t rollout);
  /// The devices the live nodes hold (the union of their device sets); it blocks: for a
  /// campaign's target, off the network threads.
  [[nodiscard]] std::vector<std::string> fleet_devices();

  // ---- campaigns kept (store::campaign_store): the campaigns this node runs, under its node
  // id, so that it continues them when it restarts with the same id ----------------------

  /// Keeps campaign `c` and the device rows given, in one script: `<prefix>campaign:<node>:<id>`
  /// (a hash: rollout, version, state, image until it ends), its devices in
  /// `...:<id>:devices` (position -> id and state), its id in `<prefix>campaigns:<node>`; the
  /// newest `max_campaigns` stay.
  std::error_code save_campaign(const store::campaign_record& c,
                                const std::vector<store::campaign_device_record>& devices);
  /// The campaigns this node keeps, oldest first, each with its devices by position.
  [[nodiscard]] store::campaign_load_result load_campaigns();
  /// Sets what runs (on the loop) when the commands connection is back after it dropped: the
  /// writes made meanwhile failed, so write again what must be current
  /// (`hub::rewrite_transfers`). Before `start`.
  void on_reconnect(std::function<void()> f) { core_->on_reconnect = std::move(f); }
  /// Leases this node its share of `fleet_cap` transfer slots (before `start`; the hub has
  /// `hub_options::leased_transfer_slots`). The leases live in `<prefix>slots` (node -> slots);
  /// their sum never exceeds `fleet_cap` (give every node the same). A node asks for what its
  /// waiting devices need (at each heartbeat, on `want_slots`, and when another node gave some
  /// back), gets what is free, and gives back what it no longer uses: it lowers its own limit
  /// first, so the transfers it runs never exceed its lease. A dead node's lease returns to the
  /// fleet when it is reaped (its transfers go back to pending in Redis at the same moment).
  void lease_transfer_slots(std::size_t fleet_cap, usage_fn usage, limit_fn set_limit) {
    core_->lease.emplace(core::lease_state{fleet_cap, std::move(usage), std::move(set_limit)});
  }
  /// Asks for a lease round soon (any thread; coalesced): `hub_options::on_slot_demand`.
  void want_slots() {
    if (!core_->lease || core_->lease_posted.exchange(true)) return;
    asio::post(core_->io, [c = core_] {
      c->lease_posted.store(false);
      c->lease_round();
    });
  }
  /// The fleet's totals of the current rollout as Redis keeps them (counted by the devices'
  /// writes, so every node reads the same), refreshed at each heartbeat; std::nullopt before
  /// the first. For `hub_options::fleet_rollout_totals`: it does not block.
  [[nodiscard]] std::optional<firmware::rollout_totals> rollout_totals() const {
    std::lock_guard lock(core_->totals_mutex);
    return core_->totals;
  }
  /// This node's figures, read at each heartbeat (`hub::figures`).
  using figures_fn = std::function<store::gateway_figures()>;
  /// Shares this node's figures with the fleet (before `start`): at each heartbeat they go to
  /// `<prefix>figures` (node -> figures, stamped with Redis' clock; `msgs_per_s` from
  /// `dispatched` since the previous heartbeat) and the sum over the nodes that wrote theirs
  /// within three heartbeat periods comes back (`fleet_figures`). A node that stops removes
  /// its entry; a dead one's is removed after `heartbeat_ttl`.
  void share_figures(figures_fn own) { core_->own_figures = std::move(own); }
  /// The fleet's figures summed over its live nodes (with `share_figures`), refreshed at each
  /// heartbeat; std::nullopt before the first. For `hub_options::fleet_figures`: it does not
  /// block.
  [[nodiscard]] std::optional<store::gateway_figures> fleet_figures() const {
    std::lock_guard lock(core_->totals_mutex);
    return core_->fleet;
  }
  /// Slots this node holds of the fleet's cap (its last lease).
  [[nodiscard]] std::size_t leased_slots() const noexcept { return core_->held.load(); }
  /// Subscribes to the node's control channel and starts the heartbeat (renewed every
  /// `heartbeat_period` from the loop). Start the connections too.
  void start() {
    core_->control.subscribe(core_->control_channel);
    core_->control.subscribe(core_->fleet_channel);
    asio::post(core_->io, [c = core_] { c->beat(); });
  }
  /// Stops the heartbeat and the control subscription (the heartbeat key expires by itself).
  /// The loop runs the last of it, which still uses the connections: keep them until the loop
  /// ran what was posted before they go.
  void stop() {
    core_->stopped.store(true);
    core_->control.unsubscribe(core_->control_channel);
    core_->control.unsubscribe(core_->fleet_channel);
    asio::post(core_->io, [c = core_] {
      c->timer.cancel();
      if (c->own_figures) {  // gone from the fleet's sum at once, not after three periods
        c->commands.command({"HDEL", c->figures_key, c->options.node_id},
                            [](std::error_code, const redisReply*) {});
      }
    });
  }

  /// Claims device `id` for this node and reads its state (one script: the claim, the record,
  /// the replay buffer). A default state for a device Redis does not know.
  [[nodiscard]] store::load_result load(const std::string& id);
  /// Reads device `id`'s state without claiming it.
  [[nodiscard]] store::load_result peek(const std::string& id);
  /// Adds `n` to the device's message count.
  std::error_code add_messages_sent(const std::string& id, std::uint64_t n) {
    const auto v = std::to_string(n);
    return core_->write(id, "add", {v});
  }
  /// Records activity at `unix_ms`.
  std::error_code touch(const std::string& id, std::int64_t unix_ms) {
    const auto v = std::to_string(unix_ms);
    return core_->write(id, "set", {"seen", v});
  }
  /// Records the firmware version the device runs.
  std::error_code set_firmware_version(const std::string& id, const std::string& version) {
    return core_->write(id, "set", {"fw", version});
  }
  /// Records the device's firmware transfer, and its move in the fleet's totals.
  std::error_code set_transfer(const std::string& id, const store::transfer_state& t) {
    const auto rollout = std::to_string(t.rollout);
    const auto status = std::to_string(static_cast<unsigned>(t.status));
    const auto offset = std::to_string(t.offset);
    return core_->write(id, "tr",
                        {rollout, t.version, status, offset, t.reason, core_->totals_key});
  }
  /// Records the last sequence number assigned to the device.
  std::error_code set_last_seq(const std::string& id, std::uint64_t seq) {
    const auto v = std::to_string(seq);
    return core_->write(id, "set", {"seq", v});
  }
  /// Forgets everything kept about the device (whoever owns it).
  std::error_code forget(const std::string& id);
  /// Keeps sequenced message `seq` (replacing one kept under the same number) and raises the
  /// device's `last_seq` to it.
  std::error_code append_replay(const std::string& id, std::uint64_t seq, std::string_view frame) {
    const auto v = std::to_string(seq);
    return core_->write(id, "append", {v, frame});
  }
  /// Forgets the device's kept messages numbered `seq` and below.
  std::error_code forget_replay(const std::string& id, std::uint64_t seq) {
    const auto v = std::to_string(seq);
    return core_->write(id, "trim", {v});
  }
  /// The sink took `r`: adds 1 to the count and puts `r.id` into the dispatch window.
  std::error_code record_dispatched(const std::string& id, const store::dispatch_record& r);
  /// Keeps `r` as the current rollout (fleet-wide: not fenced).
  std::error_code save_rollout(const store::rollout_record& r);
  /// Keeps rollout `r` fleet-wide under a new id above every earlier one (and above
  /// `r.rollout`) and tells the other nodes (`on_rollout`), in one script; the id is returned.
  [[nodiscard]] store::rollout_publish_result publish_rollout(const store::rollout_record& r);
  /// The rollout kept, if any.
  [[nodiscard]] store::rollout_load_result load_rollout();
  /// If another live node owns device `id`, keeps `data` (a `deliver`'s data, JSON text) in
  /// `<prefix>{<id>}:in` and tells that node, in one script (`routed`); else nothing. Refused
  /// with `errc::routed_full` when `max_routed` messages wait already.
  [[nodiscard]] store::route_result route(const std::string& id, std::string_view data);
  /// The messages routed to device `id`, oldest first (at most `max_routed`), if this node
  /// owns it; none otherwise.
  [[nodiscard]] store::routed_messages routed(const std::string& id);
  /// Keeps `entries` in the device's replay set and removes as many routed messages, in one
  /// fenced script (`refused` when this node no longer owns the device: the release handler
  /// hears of it). Waits for the reply, also inside a batch.
  [[nodiscard]] store::keep_routed_result keep_routed(
      const std::string& id, const std::vector<store::replay_entry>& entries);

  /// Starts a batch: the writes until `commit_batch` are pipelined and not waited for.
  std::error_code begin_batch() {
    std::lock_guard lock(core_->m);
    core_->batcher = std::this_thread::get_id();
    return {};
  }
  /// Waits (at most `reply_timeout`) for the batch's replies; the first failure, if any (a
  /// write the fence refused is not one: it is counted and reported to the release handler).
  std::error_code commit_batch() {
    core_->flush_dispatched({});
    std::unique_lock lock(core_->m);
    core_->batcher = {};
    const bool done = core_->replies.wait_for(lock, core_->options.reply_timeout,
                                              [&] { return core_->outstanding == 0; });
    std::error_code ec = done ? core_->batch_error : std::error_code(errc::timeout);
    core_->batch_error = {};
    return ec;
  }

  /// The node that owns device `id` now, if it has one whose heartbeat is alive.
  [[nodiscard]] std::optional<std::string> owner(const std::string& id);
  /// The current epoch (empty while none was made, or on error).
  [[nodiscard]] std::string epoch();
  /// This node's name.
  [[nodiscard]] const std::string& node_id() const noexcept { return core_->options.node_id; }

  /// Devices claimed by this node so far.
  [[nodiscard]] std::uint64_t claims() const noexcept { return core_->claims.load(); }
  /// Claims that took a device from another node (which was told).
  [[nodiscard]] std::uint64_t takeovers() const noexcept { return core_->takeovers.load(); }
  /// Devices this node was told it lost to another node's claim.
  [[nodiscard]] std::uint64_t lost() const noexcept { return core_->lost.load(); }
  /// Writes the fence refused (this node no longer owned the device).
  [[nodiscard]] std::uint64_t fenced() const noexcept { return core_->fenced_writes.load(); }
  /// Writes not sent because this node did not own the device at all.
  [[nodiscard]] std::uint64_t not_owned() const noexcept { return core_->not_owned.load(); }
  /// Devices of dead nodes this node released.
  [[nodiscard]] std::uint64_t reaped() const noexcept { return core_->reaped.load(); }
  /// Messages this node routed to the node that holds their device.
  [[nodiscard]] std::uint64_t routed_out() const noexcept { return core_->routed_out.load(); }
  /// Routed messages this node took and numbered.
  [[nodiscard]] std::uint64_t routed_in() const noexcept { return core_->routed_in.load(); }
  /// Messages refused because too many waited for their device's node.
  [[nodiscard]] std::uint64_t routed_refused() const noexcept {
    return core_->routed_refused.load();
  }
  /// Heartbeats that Redis took.
  [[nodiscard]] std::uint64_t heartbeats() const noexcept { return core_->heartbeats.load(); }

 private:
  // The scripts. KEYS: the device's hash and replay set. Keys of other nodes are built in the
  // script from the prefix (a single Redis, or every key of a fleet on one cluster slot).
  static constexpr std::string_view claim_script = R"lua(
local ep = redis.call('GET', KEYS[3])
if not ep then
  redis.call('SET', KEYS[3], ARGV[2])
  ep = ARGV[2]
end
redis.call('HSETNX', KEYS[1], 'epoch', ep)
local token = redis.call('HINCRBY', KEYS[1], 'fence', 1)
local old = redis.call('HGET', KEYS[1], 'owner')
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('SADD', ARGV[3] .. 'node:' .. ARGV[1] .. ':devices', ARGV[4])
if old and old ~= ARGV[1] then
  redis.call('SREM', ARGV[3] .. 'node:' .. old .. ':devices', ARGV[4])
  redis.call('PUBLISH', ARGV[3] .. 'node:' .. old .. ':control', token .. ' ' .. ARGV[4])
else
  old = ''
end
return {token, old, redis.call('HGETALL', KEYS[1]),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'), redis.call('LLEN', KEYS[4])}
)lua";
  static constexpr std::string_view write_script = R"lua(
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or
   redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then
  return 0
end
local op = ARGV[3]
if op == 'add' then
  redis.call('HINCRBY', KEYS[1], 'sent', ARGV[4])
elseif op == 'set' then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
elseif op == 'append' then
  local seq = tonumber(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], seq, seq)
  redis.call('ZADD', KEYS[2], seq, ARGV[5])
  if tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') < seq then
    redis.call('HSET', KEYS[1], 'seq', ARGV[4])
  end
elseif op == 'trim' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[4])
elseif op == 'tr' then
  -- ARGV[4..9]: rollout, version, status, offset, reason, the totals key. The fleet's totals
  -- of the newest rollout move with the device: out of its old status, into the new one.
  local r, st, tk = ARGV[4], ARGV[6], ARGV[9]
  local old = redis.call('HMGET', KEYS[1], 'trr', 'trs', 'tro')
  local cur = redis.call('HGET', tk, 'rollout')
  if r ~= '0' and (not cur or tonumber(cur) < tonumber(r)) then
    redis.call('DEL', tk)
    redis.call('HSET', tk, 'rollout', r)
    cur = r
  end
  if cur == r then
    local bytes = tonumber(ARGV[7])
    if old[1] == r then
      redis.call('HINCRBY', tk, 's' .. old[2], -1)
      bytes = bytes - tonumber(old[3] or '0')
    end
    redis.call('HINCRBY', tk, 's' .. st, 1)
    if bytes ~= 0 then redis.call('HINCRBY', tk, 'bytes', bytes) end
    if st == '4' and ARGV[8] == 'timed_out' and old[2] ~= '4' then
      redis.call('HINCRBY', tk, 'timed_out', 1)
    end
  end
  redis.call('HSET', KEYS[1], 'trr', r, 'trv', ARGV[5], 'trs', st, 'tro', ARGV[7], 'trw', ARGV[8])
elseif op == 'disp' then
  redis.call('HINCRBY', KEYS[1], 'sent', ARGV[4])
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'win', ARGV[5]) end
elseif op == 'keepin' then
  -- ARGV[4..]: seq, frame, ... of routed messages numbered here; as many leave KEYS[3].
  local top = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
  local n = 0
  for i = 4, #ARGV - 1, 2 do
    local seq = tonumber(ARGV[i])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], seq, seq)
    redis.call('ZADD', KEYS[2], seq, ARGV[i + 1])
    if seq > top then top = seq end
    n = n + 1
  end
  redis.call('HSET', KEYS[1], 'seq', top)
  redis.call('LTRIM', KEYS[3], n, -1)
end
return 1
)lua";
  static constexpr std::string_view peek_script = R"lua(
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')}
)lua";
  static constexpr std::string_view forget_script = R"lua(
local o = redis.call('HGET', KEYS[1], 'owner')
if o then redis.call('SREM', ARGV[1] .. 'node:' .. o .. ':devices', ARGV[2]) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
)lua";
  // KEYS: the device's hash and routed list. ARGV: this node, the prefix, the device, the
  // data, the most that may wait. 1: routed (the owner told); 0: no other live node owns the
  // device; -1: too many wait.
  static constexpr std::string_view route_script = R"lua(
local o = redis.call('HGET', KEYS[1], 'owner')
if not o or o == ARGV[1] or redis.call('EXISTS', ARGV[2] .. 'node:' .. o .. ':alive') == 0 then
  return 0
end
if redis.call('LLEN', KEYS[2]) >= tonumber(ARGV[5]) then return -1 end
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[2] .. 'node:' .. o .. ':control', 'in ' .. ARGV[3])
return 1
)lua";
  // KEYS: the device's hash and routed list. ARGV: this node, its claim's token, the most to
  // read. The routed messages, or false when this node does not own the device under it.
  static constexpr std::string_view routed_script = R"lua(
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or
   redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then
  return false
end
return redis.call('LRANGE', KEYS[2], 0, tonumber(ARGV[3]) - 1)
)lua";
  static constexpr std::string_view owner_script = R"lua(
local o = redis.call('HGET', KEYS[1], 'owner')
if o and redis.call('EXISTS', ARGV[1] .. 'node:' .. o .. ':alive') == 1 then return o end
return false
)lua";
  static constexpr std::string_view reap_script = R"lua(
local released = 0
local tk = ARGV[1] .. 'rollout:totals'
local cur = redis.call('HGET', tk, 'rollout')
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'node:' .. n .. ':alive') == 0 then
    local set = ARGV[1] .. 'node:' .. n .. ':devices'
    for _, d in ipairs(redis.call('SMEMBERS', set)) do
      local h = ARGV[1] .. '{' .. d .. '}:d'
      if redis.call('HGET', h, 'owner') == n then
        redis.call('HDEL', h, 'owner')
        released = released + 1
        -- Its transfer stopped with the node: pending again (it resumes where it acked), and
        -- its slot returns to the fleet below, at the same moment.
        if redis.call('HGET', h, 'trs') == '2' then
          redis.call('HSET', h, 'trs', '1')
          if redis.call('HGET', h, 'trr') == cur then
            redis.call('HINCRBY', tk, 's2', -1)
            redis.call('HINCRBY', tk, 's1', 1)
          end
        end
      end
    end
    redis.call('DEL', set)
    redis.call('HDEL', ARGV[1] .. 'slots', n)
    redis.call('SREM', KEYS[1], n)
  end
end
return released
)lua";

  static constexpr std::string_view publish_script = R"lua(
local id = redis.call('INCR', KEYS[2])
local kept = tonumber(redis.call('HGET', KEYS[1], 'id') or '0')
if id <= kept then id = kept + 1 end
if id < tonumber(ARGV[1]) then id = tonumber(ARGV[1]) end
redis.call('SET', KEYS[2], id)
redis.call('HSET', KEYS[1], 'id', id, 'version', ARGV[2], 'image', ARGV[3], 'gated', ARGV[5])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[4], 'rollout ' .. id)
return id
)lua";
  // KEYS[1]: the rollout, KEYS[2]: its admitted set. ARGV: the rollout id, the fleet channel,
  // this node, 'admit' or 'stop', then the ids (admit) or the id and the reason (stop). Only
  // for the fleet's current rollout: a late word about an older one changes nothing.
  static constexpr std::string_view campaign_script = R"lua(
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
if ARGV[4] == 'admit' then
  local ids = {}
  for i = 5, #ARGV do
    redis.call('SADD', KEYS[2], ARGV[i])
    ids[#ids + 1] = ARGV[i]
  end
  redis.call('PUBLISH', ARGV[2], 'admit ' .. ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. table.concat(ids, ' '))
else
  redis.call('SREM', KEYS[2], ARGV[5])
  redis.call('PUBLISH', ARGV[2], 'stop ' .. ARGV[1] .. ' ' .. ARGV[3] .. ' ' .. ARGV[5] .. ' ' .. ARGV[6])
end
return 1
)lua";
  // KEYS[1]: the campaign, KEYS[2]: its devices, KEYS[3]: the node's campaigns. ARGV: id,
  // rollout, version, state, ended, image ('' keeps the one kept), how many to keep, the
  // campaigns' key prefix, then position and row pairs.
  static constexpr std::string_view save_campaign_script = R"lua(
redis.call('HSET', KEYS[1], 'rollout', ARGV[2], 'version', ARGV[3], 'state', ARGV[4],
           'ended', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'image', ARGV[6]) end
if ARGV[5] == '1' then redis.call('HDEL', KEYS[1], 'image') end
for i = 9, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
local over = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[7])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[3], 0, over - 1)) do
    redis.call('ZREM', KEYS[3], old)
    redis.call('DEL', ARGV[8] .. old, ARGV[8] .. old .. ':devices')
  end
end
return 1
)lua";
  // KEYS[1]: the rollout, KEYS[2]: its admitted set; ARGV[1]: the rollout id.
  static constexpr std::string_view admitted_script = R"lua(
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return {} end
return redis.call('SMEMBERS', KEYS[2])
)lua";
  // KEYS[1]: the nodes; ARGV[1]: the prefix. The devices of every live node.
  static constexpr std::string_view fleet_devices_script = R"lua(
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. 'node:' .. n .. ':alive') == 1 then
    for _, d in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'node:' .. n .. ':devices')) do
      out[#out + 1] = d
    end
  end
end
return out
)lua";
  // KEYS[1]: the leases (node -> slots; fields from ':' are the script's own). ARGV: node, cap,
  // in use (this node's limit now: never granted below it), wanted, whether this node's
  // connection dropped since its last round, the hold in ms. Grants what the other nodes'
  // leases leave free, up to what is wanted. A hash that is gone when a node comes back from a
  // dropped connection means Redis lost the leases: nobody grows for the hold (heartbeat_ttl),
  // the time every live node takes to register what it holds again.
  static constexpr std::string_view lease_script = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('HGET', KEYS[1], ':made') then
  redis.call('HSET', KEYS[1], ':made', now)
  if ARGV[5] == '1' then redis.call('HSET', KEYS[1], ':hold', now + tonumber(ARGV[6])) end
end
local others = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i] ~= ARGV[1] and string.sub(all[i], 1, 1) ~= ':' then
    others = others + tonumber(all[i + 1])
  end
end
local g = math.min(tonumber(ARGV[4]), tonumber(ARGV[2]) - others)
if now < tonumber(redis.call('HGET', KEYS[1], ':hold') or '0') then g = 0 end
if g < tonumber(ARGV[3]) then g = tonumber(ARGV[3]) end
if g > 0 then redis.call('HSET', KEYS[1], ARGV[1], g) else redis.call('HDEL', KEYS[1], ARGV[1]) end
if others + g > tonumber(redis.call('HGET', KEYS[1], ':peak') or '0') then
  redis.call('HSET', KEYS[1], ':peak', others + g)
end
return g
)lua";

  // KEYS[1]: the nodes' figures (node -> "<Redis ms> <figures>"). ARGV: node, its figures, how
  // old (ms) an entry may be to count, how old it may be to stay. Returns the entries counted.
  static constexpr std::string_view figures_script = R"lua(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. ARGV[2])
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local age = now - (tonumber(string.match(all[i + 1], '^%d+')) or 0)
  if age > tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], all[i])
  elseif age <= tonumber(ARGV[3]) then
    out[#out + 1] = all[i + 1]
  end
end
return out
)lua";

  struct owned {
    std::uint64_t token = 0;
    store::dispatch_window window;  // authoritative while owned: this node alone writes it
  };
  struct dispatched_run {
    std::uint64_t token = 0;  // the claim they were made under
    std::uint64_t count = 0;  // messages the sink took
    bool window = false;      // one had an id: the window changed
  };
  struct id_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };

  struct core : std::enable_shared_from_this<core> {
    core(asio::io_context& io_context, connection& c, connection& ctl, state_store_options o)
        : io(io_context),
          commands(c),
          control(ctl),
          options(std::move(o)),
          control_channel(options.prefix + "node:" + options.node_id + ":control"),
          alive_key(options.prefix + "node:" + options.node_id + ":alive"),
          nodes_key(options.prefix + "nodes"),
          fleet_channel(options.prefix + "fleet"),
          rollout_key(options.prefix + "rollout"),
          admitted_key(options.prefix + "rollout:admitted"),
          totals_key(options.prefix + "rollout:totals"),
          slots_key(options.prefix + "slots"),
          figures_key(options.prefix + "figures"),
          timer(io_context) {}

    [[nodiscard]] std::string hash_key(std::string_view id) const {
      std::string k;
      k.reserve(options.prefix.size() + id.size() + 4);
      k.append(options.prefix).append("{").append(id).append("}:d");
      return k;
    }
    [[nodiscard]] std::string replay_key(std::string_view id) const {
      std::string k;
      k.reserve(options.prefix.size() + id.size() + 4);
      k.append(options.prefix).append("{").append(id).append("}:r");
      return k;
    }
    [[nodiscard]] std::string routed_key(std::string_view id) const {
      std::string k;
      k.reserve(options.prefix.size() + id.size() + 5);
      k.append(options.prefix).append("{").append(id).append("}:in");
      return k;
    }

    // A fenced write: `op` and its arguments after the script's fixed ones.
    std::error_code write(const std::string& id, std::string_view op,
                          std::initializer_list<std::string_view> args) {
      return write(id, op, std::span<const std::string_view>(args.begin(), args.size()));
    }
    std::error_code write(const std::string& id, std::string_view op,
                          std::span<const std::string_view> args) {
      std::uint64_t token = 0;
      bool batching = false;
      {
        std::lock_guard lock(m);
        const auto it = owned_devices.find(id);
        if (it == owned_devices.end()) {
          not_owned.fetch_add(1, std::memory_order_relaxed);
          return errc::not_owner;
        }
        token = it->second.token;
        batching = batcher == std::this_thread::get_id();
        if (batching) ++outstanding;
      }
      return send_write(id, token, op, args, batching);
    }
    std::error_code send_write(const std::string& id, std::uint64_t token, std::string_view op,
                               std::span<const std::string_view> args, bool batching) {
      const auto h = hash_key(id);
      const auto r = replay_key(id);
      const auto in = routed_key(id);
      const auto t = std::to_string(token);
      std::vector<std::string_view> argv{"EVAL", write_script,    "3", h, r,
                                         in,     options.node_id, t,   op};
      argv.insert(argv.end(), args.begin(), args.end());
      if (batching) {
        commands.command(
            argv, [c = shared_from_this(), id, token](std::error_code ec, const redisReply* rep) {
              if (!ec && rep->type == REDIS_REPLY_INTEGER && rep->integer == 0) {
                c->refused(id, token);
              }
              std::lock_guard lock(c->m);
              if (ec && !c->batch_error) c->batch_error = ec;
              if (--c->outstanding == 0) c->replies.notify_all();
            });
        return {};
      }
      const auto res = commands.call(argv, options.reply_timeout);
      if (res.ec) return res.ec;
      if (res.value.type == reply_type::integer && res.value.integer == 0) refused(id, token);
      return {};
    }
    // Sends the batch's dispatch figures: one write per device (its count and window), of every
    // device (`only` empty) or of one (before reading or forgetting it).
    void flush_dispatched(std::string_view only) {
      std::vector<std::pair<std::string, dispatched_run>> runs;
      std::vector<std::string> windows;
      bool batching = false;
      {
        std::lock_guard lock(m);
        auto take = [&](auto it) {
          const auto o = owned_devices.find(it->first);
          windows.push_back(o != owned_devices.end() && it->second.window
                                ? o->second.window.to_bytes()
                                : std::string());
          runs.emplace_back(it->first, it->second);
        };
        if (only.empty()) {
          for (auto it = dispatched.begin(); it != dispatched.end(); ++it) take(it);
          dispatched.clear();
        } else if (const auto it = dispatched.find(only); it != dispatched.end()) {
          take(it);
          dispatched.erase(it);
        }
        batching = batcher == std::this_thread::get_id();
        if (batching) outstanding += runs.size();
      }
      for (std::size_t i = 0; i < runs.size(); ++i) {
        const auto n = std::to_string(runs[i].second.count);
        const std::string_view args[] = {n, windows[i]};
        (void)send_write(runs[i].first, runs[i].second.token, "disp", args, batching);
      }
    }
    // The fence refused a write made under `token`: the device is no longer ours.
    void refused(const std::string& id, std::uint64_t token) {
      fenced_writes.fetch_add(1, std::memory_order_relaxed);
      if (drop(id, token)) release(id, true);
    }
    // Forgets our claim on `id` if it is still the one made under `token` or an older one.
    bool drop(std::string_view id, std::uint64_t token) {
      std::lock_guard lock(m);
      const auto it = owned_devices.find(id);
      if (it == owned_devices.end() || it->second.token > token) return false;
      owned_devices.erase(it);
      return true;
    }
    void release(const std::string& id, bool fenced) {
      if (!on_release) return;
      try {
        on_release(id, fenced);
      } catch (...) {  // a throwing handler loses one release, not the loop
      }
    }
    // A message on the control channel: "<token> <device id>", a claim made elsewhere.
    void told(std::string_view body) {
      if (body.starts_with("in ")) {  // messages routed to a device of ours
        if (!on_routed) return;
        try {
          on_routed(std::string(body.substr(3)));
        } catch (...) {  // a throwing handler: they wait for the device's next claim
        }
        return;
      }
      const auto space = body.find(' ');
      if (space == std::string_view::npos) return;
      std::uint64_t token = 0;
      const auto [p, e] = std::from_chars(body.data(), body.data() + space, token);
      if (e != std::errc{} || p != body.data() + space || token == 0) return;
      const std::string id(body.substr(space + 1));
      // Our claim, if newer than theirs (the device came back here meanwhile), stands.
      if (!drop(id, token - 1)) return;
      lost.fetch_add(1, std::memory_order_relaxed);
      release(id, false);
    }
    // Raises the newest rollout known here to `id`; false if it knew `id` or a newer one.
    bool know_rollout(std::uint32_t id) {
      auto seen = known_rollout.load();
      while (seen < id && !known_rollout.compare_exchange_weak(seen, id)) {
      }
      return seen < id;
    }
    // A message on the fleet channel: "rollout <id>" (published by a node), "slots" (a node
    // gave slots back), or a campaign's word (`campaign_word`). On the loop.
    void heard(std::string_view body) {
      if (body == "slots") {
        lease_round();
      } else if (body.substr(0, 8) == "rollout ") {
        std::uint32_t id = 0;
        const auto [p, e] = std::from_chars(body.data() + 8, body.data() + body.size(), id);
        if (e == std::errc{} && p == body.data() + body.size()) fetch_rollout(id);
      } else if (on_campaign) {
        campaign_word(body);
      }
    }
    // "<word> <rollout> <node> ...": "admit R N id...", "stop R N id reason", "news R N status
    // id reason", "seen R N id attributes". Another node's words go to the campaign handler.
    void campaign_word(std::string_view body) {
      auto next = [&body]() {
        const auto sp = body.find(' ');
        const auto word = body.substr(0, sp);
        body = sp == std::string_view::npos ? std::string_view{} : body.substr(sp + 1);
        return word;
      };
      store::campaign_event e;
      const auto word = next();
      if (word == "admit") {
        e.what = store::campaign_event::kind::admit;
      } else if (word == "stop") {
        e.what = store::campaign_event::kind::stop;
      } else if (word == "news") {
        e.what = store::campaign_event::kind::news;
      } else if (word == "seen") {
        e.what = store::campaign_event::kind::seen;
      } else {
        return;
      }
      const auto rollout = next();
      e.rollout = static_cast<std::uint32_t>(to_u64(rollout));
      if (e.rollout == 0 || next() == options.node_id) return;  // ours: the hub knows it
      switch (e.what) {
        case store::campaign_event::kind::admit:
          while (!body.empty()) e.ids.emplace_back(next());
          break;
        case store::campaign_event::kind::stop:
          e.ids.emplace_back(next());
          e.reason = body;
          break;
        case store::campaign_event::kind::news: {
          const auto status = to_u64(next());
          if (status > static_cast<std::uint64_t>(store::transfer_status::skipped)) return;
          e.status = static_cast<store::transfer_status>(status);
          e.ids.emplace_back(next());
          e.reason = body;
          break;
        }
        case store::campaign_event::kind::seen:
          e.ids.emplace_back(next());
          e.attributes = body;
          break;
      }
      if (e.ids.empty() || e.ids.front().empty()) return;
      tell(e);
    }
    void tell(const store::campaign_event& e) {
      try {
        on_campaign(e);
      } catch (...) {  // a throwing handler misses one word, not the loop
      }
    }
    // Hands the gated rollout's admitted set over as one `admit` without retry (after this
    // node adopted the rollout, or its connection came back: words may have been missed).
    void fetch_admitted(std::uint32_t rollout) {
      if (!on_campaign || rollout == 0) return;
      const auto id = std::to_string(rollout);
      commands.command({"EVAL", admitted_script, "2", rollout_key, admitted_key, id},
                       [c = shared_from_this(), rollout](std::error_code ec, const redisReply* r) {
                         if (ec || r->type != REDIS_REPLY_ARRAY || r->elements == 0) return;
                         store::campaign_event e;
                         e.rollout = rollout;
                         e.retry = false;
                         for (std::size_t i = 0; i < r->elements; ++i) {
                           const auto* el = r->element[i];
                           if (el->type == REDIS_REPLY_STRING) e.ids.emplace_back(el->str, el->len);
                         }
                         c->tell(e);
                       });
    }
    // Reads the rollout kept in Redis and hands it over if it is newer than `id` - 1 and than
    // any this node knows. On the loop.
    void fetch_rollout(std::uint32_t id) {
      if (!on_rollout || fetching || id <= known_rollout.load()) return;
      fetching = true;
      commands.command({"HGETALL", rollout_key},
                       [c = shared_from_this()](std::error_code ec, const redisReply* r) {
                         c->fetching = false;
                         if (ec) return;  // the next heartbeat looks again
                         auto rec = parse_rollout(reply::from(r));
                         if (!rec) return;
                         // Only ever forwards: a slower reply for an older id changes nothing.
                         if (!c->know_rollout(rec->rollout)) return;
                         c->gated_rollout.store(rec->gated ? rec->rollout : 0);
                         try {
                           c->on_rollout(*rec);
                         } catch (...) {  // a throwing handler misses one rollout, not the loop
                         }
                         // Devices the campaign admitted before this node took part.
                         if (rec->gated) c->fetch_admitted(rec->rollout);
                       });
    }
    // One round of the slot lease (on the loop; one script in flight at a time).
    void lease_round() {
      if (!lease || stopped.load()) return;
      if (leasing || !commands.connected()) {
        lease_again = leasing;
        return;
      }
      if (const auto drops = commands.drops(); drops != lease_drops_seen) {
        lease_drops_seen = drops;
        lease_check = true;
      }
      const auto u = lease->usage();
      const auto want = std::min(u.active + u.waiting, lease->cap);
      auto keep = u.limit;
      if (want < keep) {
        // Giving back: the limit goes down here first, so that what runs never exceeds the
        // lease, even while the script is on its way.
        keep = std::max(u.active, want);
        lease->set_limit(keep);
      }
      // Nothing to change, unless the connection dropped: then the lease is registered again
      // (Redis may have lost it).
      if (want == keep && keep == held.load() && !lease_check) return;
      leasing = true;
      const auto node = options.node_id;
      const auto cap = std::to_string(lease->cap);
      const auto in_use = std::to_string(keep);
      const auto wanted = std::to_string(want);
      const auto hold = std::to_string(options.heartbeat_ttl.count());
      commands.command({"EVAL", lease_script, "1", slots_key, node, cap, in_use, wanted,
                        lease_check ? "1" : "0", hold},
                       [c = shared_from_this(), keep](std::error_code ec, const redisReply* r) {
                         c->leasing = false;
                         if (!ec) c->lease_check = false;
                         if (!ec && r->type == REDIS_REPLY_INTEGER && r->integer >= 0) {
                           const auto granted = static_cast<std::size_t>(r->integer);
                           const auto before = c->held.exchange(granted);
                           if (granted > keep) c->lease->set_limit(granted);
                           if (granted < before) {  // others may use them now
                             c->commands.command({"PUBLISH", c->fleet_channel, "slots"},
                                                 [](std::error_code, const redisReply*) {});
                           }
                         }
                         if (std::exchange(c->lease_again, false)) c->lease_round();
                       });
    }
    // On the loop: renews the heartbeat, releases dead nodes' devices, and rearms.
    void beat() {
      if (stopped.load()) return;
      if (!commands.connected()) {  // not up yet, or reconnecting: beat as soon as it is
        rearm(std::min(options.heartbeat_period, std::chrono::milliseconds(20)));
        return;
      }
      if (const auto drops = commands.drops(); drops != drops_seen) {
        drops_seen = drops;
        // Devices whose claim failed while Redis was away run on a default state that is
        // never written (this node does not own them): let them go, they reconnect and load.
        std::unordered_set<std::string> failed;
        {
          std::lock_guard lock(m);
          failed.swap(unclaimed);
        }
        for (const auto& id : failed) release(id, true);
        fetch_admitted(gated_rollout.load());  // admissions told while it was away
        if (on_reconnect) {
          try {
            on_reconnect();
          } catch (...) {  // a throwing handler loses one resync, not the loop
          }
        }
      }
      const auto ttl = std::to_string(options.heartbeat_ttl.count());
      commands.command({"SET", alive_key, "1", "PX", ttl},
                       [c = shared_from_this()](std::error_code ec, const redisReply*) {
                         if (!ec) c->heartbeats.fetch_add(1, std::memory_order_relaxed);
                       });
      commands.command({"SADD", nodes_key, options.node_id},
                       [](std::error_code, const redisReply*) {});
      commands.command({"EVAL", reap_script, "1", nodes_key, options.prefix},
                       [c = shared_from_this()](std::error_code ec, const redisReply* r) {
                         if (!ec && r->type == REDIS_REPLY_INTEGER && r->integer > 0) {
                           c->reaped.fetch_add(static_cast<std::uint64_t>(r->integer));
                         }
                       });
      // A rollout announced while this node could not hear it is found here.
      commands.command({"HGET", rollout_key, "id"}, [c = shared_from_this()](std::error_code ec,
                                                                             const redisReply* r) {
        if (ec || r->type != REDIS_REPLY_STRING) return;
        c->fetch_rollout(static_cast<std::uint32_t>(to_u64(std::string_view(r->str, r->len))));
      });
      commands.command({"HGETALL", totals_key},
                       [c = shared_from_this()](std::error_code ec, const redisReply* r) {
                         if (!ec) c->read_totals(reply::from(r));
                       });
      commands.command({"HGET", slots_key, ":peak"},
                       [c = shared_from_this()](std::error_code ec, const redisReply* r) {
                         if (!ec && r->type == REDIS_REPLY_STRING) {
                           c->slot_peak.store(to_u64(std::string_view(r->str, r->len)));
                         }
                       });
      share();
      lease_round();
      rearm(options.heartbeat_period);
    }
    // On the loop (a heartbeat): writes this node's figures and reads the fleet's sum.
    void share() {
      if (!own_figures) return;
      store::gateway_figures f;
      try {
        f = own_figures();
      } catch (...) {  // a throwing provider skips one heartbeat's figures
        return;
      }
      const auto now = std::chrono::steady_clock::now();
      double rate = 0;
      if (figures_at != std::chrono::steady_clock::time_point{} &&
          f.dispatched >= last_dispatched) {
        const double secs = std::chrono::duration<double>(now - figures_at).count();
        if (secs > 0) rate = static_cast<double>(f.dispatched - last_dispatched) / secs;
      }
      figures_at = now;
      last_dispatched = f.dispatched;
      // The rate travels in thousandths, so that every field is an integer.
      const auto text = std::to_string(f.connected) + ' ' + std::to_string(f.devices) + ' ' +
                        std::to_string(f.enqueued) + ' ' + std::to_string(f.dispatched) + ' ' +
                        std::to_string(f.queue_depth) + ' ' + std::to_string(f.workers_alive) +
                        ' ' + std::to_string(static_cast<std::uint64_t>(rate * 1000 + 0.5));
      const auto fresh = std::to_string(3 * options.heartbeat_period.count());
      const auto ttl = std::to_string(options.heartbeat_ttl.count());
      commands.command(
          {"EVAL", figures_script, "1", figures_key, options.node_id, text, fresh, ttl},
          [c = shared_from_this()](std::error_code ec, const redisReply* r) {
            if (!ec) c->read_figures(reply::from(r));
          });
    }
    // The fleet's figures from the entries counted ("<ms> connected devices enqueued dispatched
    // queue workers rate-in-thousandths" each).
    void read_figures(const reply& entries) {
      store::gateway_figures sum;
      for (const auto& e : entries.elements) {
        std::uint64_t v[8] = {};
        const char* p = e.str.data();
        const char* const end = p + e.str.size();
        int n = 0;
        for (; n < 8 && p < end; ++n) {
          const auto [q, ec] = std::from_chars(p, end, v[n]);
          if (ec != std::errc{}) break;
          p = q < end ? q + 1 : q;
        }
        if (n != 8) continue;  // not written by this version: not counted
        ++sum.nodes;
        sum.connected += v[1];
        sum.devices += v[2];
        sum.enqueued += v[3];
        sum.dispatched += v[4];
        sum.queue_depth += v[5];
        sum.workers_alive += v[6];
        sum.msgs_per_s += static_cast<double>(v[7]) / 1000;
      }
      std::lock_guard lock(totals_mutex);
      fleet = sum;
    }
    // The fleet's totals from their hash (rollout, s<status>, bytes, timed_out).
    void read_totals(const reply& fields) {
      firmware::rollout_totals t;
      for (std::size_t i = 0; i + 1 < fields.elements.size(); i += 2) {
        const std::string_view k = fields.elements[i].str;
        const auto v = to_u64(fields.elements[i + 1].str);
        if (k == "rollout") t.rollout = static_cast<std::uint32_t>(v);
        if (k == "s1") t.pending = static_cast<std::size_t>(v);
        if (k == "s2") t.transferring = static_cast<std::size_t>(v);
        if (k == "s3") t.verified = static_cast<std::size_t>(v);
        if (k == "s4") t.failed = static_cast<std::size_t>(v);
        if (k == "s5") t.skipped = static_cast<std::size_t>(v);
        if (k == "bytes") t.bytes_acked = v;
        if (k == "timed_out") t.timed_out = static_cast<std::size_t>(v);
      }
      t.peak_transferring = static_cast<std::size_t>(slot_peak.load());
      std::lock_guard lock(totals_mutex);
      if (t.rollout == 0) {
        totals.reset();
      } else {
        totals = std::move(t);
      }
    }
    void rearm(std::chrono::milliseconds after) {
      timer.expires_after(after);
      timer.async_wait([c = shared_from_this()](std::error_code ec) {
        if (!ec) c->beat();
      });
    }

    asio::io_context& io;
    connection& commands;
    connection& control;
    const state_store_options options;
    const std::string control_channel;
    const std::string alive_key;
    const std::string nodes_key;
    const std::string fleet_channel;  // rollouts published, slots given back
    const std::string rollout_key;
    const std::string admitted_key;  // the gated rollout's admitted devices
    const std::string totals_key;
    const std::string slots_key;
    const std::string figures_key;
    asio::steady_timer timer;  // the loop's only
    release_fn on_release;
    rollout_fn on_rollout;
    campaign_fn on_campaign;
    routed_fn on_routed;
    std::function<void()> on_reconnect;
    std::uint64_t drops_seen = 0;  // the loop's: the connection's drops at the last heartbeat

    // The rollout: the newest id this node published, loaded or handed over (any thread), and
    // whether a fetch is in flight (the loop's).
    std::atomic<std::uint32_t> known_rollout{0};
    std::atomic<std::uint32_t> gated_rollout{0};  // the known rollout, when it is gated
    bool fetching = false;
    mutable std::mutex totals_mutex;
    std::optional<firmware::rollout_totals> totals;  // behind totals_mutex
    std::optional<store::gateway_figures> fleet;     // behind totals_mutex

    // The figures shared (the provider is set before start; the rest is the loop's).
    figures_fn own_figures;
    std::chrono::steady_clock::time_point figures_at{};
    std::uint64_t last_dispatched = 0;

    // The slot lease; all but `lease_posted` and `held` are the loop's.
    struct lease_state {
      std::size_t cap = 0;
      usage_fn usage;
      limit_fn set_limit;
    };
    std::optional<lease_state> lease;
    std::atomic<bool> lease_posted{false};
    std::atomic<std::size_t> held{0};  // the lease Redis granted last
    bool leasing = false;              // a lease script is in flight
    bool lease_again = false;          // another round was asked for meanwhile
    bool lease_check = false;          // the connection dropped since the last round
    std::uint64_t lease_drops_seen = 0;
    std::atomic<bool> stopped{false};

    std::mutex m;  // guards the owned table and the batch below
    std::unordered_map<std::string, owned, id_hash, std::equal_to<>> owned_devices;
    std::unordered_set<std::string> unclaimed;  // loads that failed (Redis away)
    std::thread::id batcher{};                  // the thread between begin_batch and commit_batch
    // The batch's dispatched messages per device, written once per device at commit (the
    // window goes as it is then): most batches carry many messages of each device.
    std::unordered_map<std::string, dispatched_run, id_hash, std::equal_to<>> dispatched;
    std::size_t outstanding = 0;
    std::error_code batch_error;
    std::condition_variable replies;

    std::atomic<std::uint64_t> claims{0};
    std::atomic<std::uint64_t> takeovers{0};
    std::atomic<std::uint64_t> lost{0};
    std::atomic<std::uint64_t> fenced_writes{0};
    std::atomic<std::uint64_t> not_owned{0};
    std::atomic<std::uint64_t> reaped{0};
    std::atomic<std::uint64_t> heartbeats{0};
    std::atomic<std::uint64_t> routed_out{0};
    std::atomic<std::uint64_t> routed_in{0};
    std::atomic<std::uint64_t> routed_refused{0};
    std::atomic<std::uint64_t> slot_peak{0};  // most slots leased at once, fleet-wide
  };

  // A rollout from its hash (HGETALL: id, version, image, gated); none when it has no id.
  static std::optional<store::rollout_record> parse_rollout(const reply& fields) {
    store::rollout_record rec;
    for (std::size_t i = 0; i + 1 < fields.elements.size(); i += 2) {
      const std::string_view k = fields.elements[i].str;
      const std::string& v = fields.elements[i + 1].str;
      if (k == "id") {
        rec.rollout = static_cast<std::uint32_t>(to_u64(v));
      } else if (k == "version") {
        rec.version = v;
      } else if (k == "image") {
        rec.image.resize(v.size());
        std::memcpy(rec.image.data(), v.data(), v.size());
      } else if (k == "gated") {
        rec.gated = v == "1";
      }
    }
    if (rec.rollout == 0) return std::nullopt;
    return rec;
  }
  // Fills `st` from a device hash (HGETALL: field, value, ...) and replay set (ZRANGE ...
  // WITHSCORES: member, score, ...).
  static void parse(const reply& fields, const reply& replay, store::device_state& st);
  static std::uint64_t to_u64(std::string_view s) noexcept {
    std::uint64_t v = 0;
    std::from_chars(s.data(), s.data() + s.size(), v);
    return v;
  }
  static std::string new_epoch() {
    std::random_device rd;
    const std::uint64_t v = (std::uint64_t{rd()} << 32) ^ rd();
    char buf[17];
    static constexpr char hex[] = "0123456789abcdef";
    for (int i = 0; i < 16; ++i) buf[i] = hex[(v >> (60 - 4 * i)) & 0xf];
    return std::string(buf, 16);
  }

  std::shared_ptr<core> core_;
};

// ---- implementation -----------------------------------------------------------------------

inline void state_store::parse(const reply& fields, const reply& replay, store::device_state& st) {
  for (std::size_t i = 0; i + 1 < fields.elements.size(); i += 2) {
    const std::string_view k = fields.elements[i].str;
    const std::string& v = fields.elements[i + 1].str;
    if (k == "sent") {
      st.messages_sent = to_u64(v);
    } else if (k == "seen") {
      st.last_seen_ms = static_cast<std::int64_t>(to_u64(v));
    } else if (k == "fw") {
      st.firmware_version = v;
    } else if (k == "seq") {
      st.last_seq = to_u64(v);
    } else if (k == "trr") {
      st.transfer.rollout = static_cast<std::uint32_t>(to_u64(v));
    } else if (k == "trv") {
      st.transfer.version = v;
    } else if (k == "trs") {
      const auto s = to_u64(v);
      if (s <= static_cast<std::uint64_t>(store::transfer_status::skipped)) {
        st.transfer.status = static_cast<store::transfer_status>(s);
      }
    } else if (k == "tro") {
      st.transfer.offset = to_u64(v);
    } else if (k == "trw") {
      st.transfer.reason = v;
    } else if (k == "win") {
      st.dispatched = store::dispatch_window::from_bytes(v);
    } else if (k == "epoch") {
      st.epoch = v;
    }
  }
  st.replay.reserve(replay.elements.size() / 2);
  for (std::size_t i = 0; i + 1 < replay.elements.size(); i += 2) {
    st.replay.push_back({to_u64(replay.elements[i + 1].str), replay.elements[i].str});
  }
}

inline store::load_result state_store::load(const std::string& id) {
  core& c = *core_;
  c.flush_dispatched(id);  // what this batch recorded for it is read back with the rest
  store::load_result out;
  const auto h = c.hash_key(id);
  const auto r = c.replay_key(id);
  const auto epoch_key = c.options.prefix + "epoch";
  const auto fresh = new_epoch();
  const auto in = c.routed_key(id);
  const auto res = c.commands.call({"EVAL", claim_script, "4", h, r, epoch_key, in,
                                    c.options.node_id, fresh, c.options.prefix, id},
                                   c.options.reply_timeout);
  const auto& v = res.value;
  if (!res.ec && (v.type != reply_type::array || v.elements.size() != 5)) {
    out.error = errc::error_reply;
  } else {
    out.error = res.ec;
  }
  if (out.error) {
    std::lock_guard lock(c.m);
    c.unclaimed.insert(id);  // let go when Redis is back (see `beat`)
    return out;
  }
  parse(v.elements[2], v.elements[3], out.state);
  out.state.routed = static_cast<std::size_t>(v.elements[4].integer);
  const auto token = static_cast<std::uint64_t>(v.elements[0].integer);
  {
    std::lock_guard lock(c.m);
    c.unclaimed.erase(id);
    auto& o = c.owned_devices[id];
    o.token = token;
    o.window = out.state.dispatched;
  }
  c.claims.fetch_add(1, std::memory_order_relaxed);
  if (!v.elements[1].str.empty()) c.takeovers.fetch_add(1, std::memory_order_relaxed);
  return out;
}

inline store::load_result state_store::peek(const std::string& id) {
  core& c = *core_;
  c.flush_dispatched(id);
  store::load_result out;
  const auto h = c.hash_key(id);
  const auto r = c.replay_key(id);
  const auto res = c.commands.call({"EVAL", peek_script, "2", h, r}, c.options.reply_timeout);
  if (res.ec) {
    out.error = res.ec;
  } else if (res.value.type != reply_type::array || res.value.elements.size() != 2) {
    out.error = errc::error_reply;
  } else {
    parse(res.value.elements[0], res.value.elements[1], out.state);
  }
  return out;
}

inline std::error_code state_store::forget(const std::string& id) {
  core& c = *core_;
  {
    std::lock_guard lock(c.m);
    c.owned_devices.erase(id);
    c.unclaimed.erase(id);
    c.dispatched.erase(id);
  }
  const auto h = c.hash_key(id);
  const auto r = c.replay_key(id);
  const auto in = c.routed_key(id);
  return c.commands
      .call({"EVAL", forget_script, "3", h, r, in, c.options.prefix, id}, c.options.reply_timeout)
      .ec;
}

inline std::error_code state_store::record_dispatched(const std::string& id,
                                                      const store::dispatch_record& r) {
  core& c = *core_;
  std::uint64_t token = 0;
  std::string window;
  {
    std::lock_guard lock(c.m);
    const auto it = c.owned_devices.find(id);
    if (it == c.owned_devices.end()) {
      c.not_owned.fetch_add(1, std::memory_order_relaxed);
      return errc::not_owner;
    }
    token = it->second.token;
    if (r.id) it->second.window.insert(*r.id);
    if (c.batcher == std::this_thread::get_id()) {
      // Written at commit, once per device (a claim flushes the device's run first, so a run
      // is always of one claim).
      auto& run = c.dispatched[id];
      run.token = token;
      ++run.count;
      run.window = run.window || r.id.has_value();
      return {};
    }
    if (r.id) window = it->second.window.to_bytes();
  }
  const std::string_view args[] = {"1", window};
  return c.send_write(id, token, "disp", args, false);
}

inline std::error_code state_store::save_rollout(const store::rollout_record& r) {
  core& c = *core_;
  const auto key = c.options.prefix + "rollout";
  const auto rid = std::to_string(r.rollout);
  const std::string_view image(reinterpret_cast<const char*>(r.image.data()), r.image.size());
  return c.commands
      .call({"HSET", key, "id", rid, "version", r.version, "image", image, "gated",
             r.gated ? "1" : "0"},
            c.options.reply_timeout)
      .ec;
}

inline store::rollout_load_result state_store::load_rollout() {
  core& c = *core_;
  store::rollout_load_result out;
  const auto res = c.commands.call({"HGETALL", c.rollout_key}, c.options.reply_timeout);
  if (res.ec) {
    out.error = res.ec;
    return out;
  }
  out.rollout = parse_rollout(res.value);
  if (out.rollout) {
    c.know_rollout(out.rollout->rollout);
    c.gated_rollout.store(out.rollout->gated ? out.rollout->rollout : 0);
  }
  return out;
}

inline store::rollout_publish_result state_store::publish_rollout(const store::rollout_record& r) {
  core& c = *core_;
  store::rollout_publish_result out;
  const auto ids = c.options.prefix + "rollout:id";
  const auto candidate = std::to_string(r.rollout);
  const std::string_view image(reinterpret_cast<const char*>(r.image.data()), r.image.size());
  const auto res =
      c.commands.call({"EVAL", publish_script, "3", c.rollout_key, ids, c.admitted_key, candidate,
                       r.version, image, c.fleet_channel, r.gated ? "1" : "0"},
                      c.options.reply_timeout);
  if (res.ec) {
    out.error = res.ec;
  } else if (res.value.type != reply_type::integer || res.value.integer <= 0) {
    out.error = errc::error_reply;
  } else {
    out.rollout = static_cast<std::uint32_t>(res.value.integer);
    c.know_rollout(out.rollout);  // its announcement, heard here too, is not adopted
    c.gated_rollout.store(r.gated ? out.rollout : 0);
  }
  return out;
}

inline void state_store::campaign_admit(std::uint32_t rollout,
                                        const std::vector<std::string>& ids) {
  core& c = *core_;
  if (ids.empty()) return;
  const auto rid = std::to_string(rollout);
  std::vector<std::string_view> argv{"EVAL",          campaign_script,   "2",
                                     c.rollout_key,   c.admitted_key,    rid,
                                     c.fleet_channel, c.options.node_id, "admit"};
  argv.insert(argv.end(), ids.begin(), ids.end());
  c.commands.command(std::span<const std::string_view>(argv),
                     [](std::error_code, const redisReply*) {});
}

inline void state_store::campaign_stop(std::uint32_t rollout, const std::string& id,
                                       const std::string& reason) {
  core& c = *core_;
  const auto rid = std::to_string(rollout);
  c.commands.command({"EVAL", campaign_script, "2", c.rollout_key, c.admitted_key, rid,
                      c.fleet_channel, c.options.node_id, "stop", id, reason},
                     [](std::error_code, const redisReply*) {});
}

inline void state_store::campaign_news(std::uint32_t rollout, const std::string& id,
                                       const store::transfer_state& t) {
  core& c = *core_;
  const auto word = "news " + std::to_string(rollout) + ' ' + c.options.node_id + ' ' +
                    std::to_string(static_cast<unsigned>(t.status)) + ' ' + id + ' ' + t.reason;
  c.commands.command({"PUBLISH", c.fleet_channel, word}, [](std::error_code, const redisReply*) {});
}

inline void state_store::campaign_seen(std::uint32_t rollout, const std::string& id,
                                       const std::string& attributes) {
  core& c = *core_;
  const auto word =
      "seen " + std::to_string(rollout) + ' ' + c.options.node_id + ' ' + id + ' ' + attributes;
  c.commands.command({"PUBLISH", c.fleet_channel, word}, [](std::error_code, const redisReply*) {});
}

inline std::vector<std::string> state_store::campaign_admitted(std::uint32_t rollout) {
  core& c = *core_;
  std::vector<std::string> out;
  const auto rid = std::to_string(rollout);
  const auto res = c.commands.call(
      {"EVAL", admitted_script, "2", c.rollout_key, c.admitted_key, rid}, c.options.reply_timeout);
  for (const auto& e : res.value.elements) out.push_back(e.str);
  return out;
}

inline std::error_code state_store::save_campaign(
    const store::campaign_record& rec, const std::vector<store::campaign_device_record>& devices) {
  core& c = *core_;
  const auto base = c.options.prefix + "campaign:" + c.options.node_id + ':';
  const auto key = base + std::to_string(rec.id);
  const auto rows = key + ":devices";
  const auto index = c.options.prefix + "campaigns:" + c.options.node_id;
  const auto id = std::to_string(rec.id);
  const auto rollout = std::to_string(rec.rollout);
  const auto keep = std::to_string(std::max<std::size_t>(c.options.max_campaigns, 1));
  const std::string_view image(reinterpret_cast<const char*>(rec.image.data()), rec.image.size());
  // Each row: the device's id, a newline, its state (ids have no newline).
  std::vector<std::string> positions, values;
  positions.reserve(devices.size());
  values.reserve(devices.size());
  for (const auto& d : devices) {
    positions.push_back(std::to_string(d.position));
    values.push_back(d.device + '\n' + d.state);
  }
  std::vector<std::string_view> argv{
      "EVAL",    save_campaign_script,  "3",   key,  rows, index, id, rollout, rec.version,
      rec.state, rec.ended ? "1" : "0", image, keep, base};
  for (std::size_t i = 0; i < devices.size(); ++i) {
    argv.push_back(positions[i]);
    argv.push_back(values[i]);
  }
  const auto res =
      c.commands.call(std::span<const std::string_view>(argv), c.options.reply_timeout);
  return res.ec;
}

inline store::campaign_load_result state_store::load_campaigns() {
  core& c = *core_;
  store::campaign_load_result out;
  const auto base = c.options.prefix + "campaign:" + c.options.node_id + ':';
  const auto ids =
      c.commands.call({"ZRANGE", c.options.prefix + "campaigns:" + c.options.node_id, "0", "-1"},
                      c.options.reply_timeout);
  if (ids.ec) {
    out.error = ids.ec;
    return out;
  }
  for (const auto& e : ids.value.elements) {
    store::kept_campaign k;
    k.campaign.id = to_u64(e.str);
    const auto head = c.commands.call({"HGETALL", base + e.str}, c.options.reply_timeout);
    const auto rows =
        c.commands.call({"HGETALL", base + e.str + ":devices"}, c.options.reply_timeout);
    if (head.ec || rows.ec) {
      out.error = head.ec ? head.ec : rows.ec;
      return out;
    }
    const auto& f = head.value.elements;
    for (std::size_t i = 0; i + 1 < f.size(); i += 2) {
      const std::string_view name = f[i].str;
      const std::string& v = f[i + 1].str;
      if (name == "rollout") {
        k.campaign.rollout = static_cast<std::uint32_t>(to_u64(v));
      } else if (name == "version") {
        k.campaign.version = v;
      } else if (name == "state") {
        k.campaign.state = v;
      } else if (name == "ended") {
        k.campaign.ended = v == "1";
      } else if (name == "image") {
        k.campaign.image.resize(v.size());
        std::memcpy(k.campaign.image.data(), v.data(), v.size());
      }
    }
    const auto& r = rows.value.elements;
    for (std::size_t i = 0; i + 1 < r.size(); i += 2) {
      const std::string& v = r[i + 1].str;
      const auto nl = v.find('\n');
      if (nl == std::string::npos) continue;
      k.devices.push_back(
          {v.substr(0, nl), static_cast<std::uint32_t>(to_u64(r[i].str)), v.substr(nl + 1)});
    }
    std::sort(k.devices.begin(), k.devices.end(),
              [](const auto& x, const auto& y) { return x.position < y.position; });
    out.campaigns.push_back(std::move(k));
  }
  return out;
}

inline std::vector<std::string> state_store::fleet_devices() {
  core& c = *core_;
  std::vector<std::string> out;
  const auto res = c.commands.call(
      {"EVAL", fleet_devices_script, "1", c.nodes_key, c.options.prefix}, c.options.reply_timeout);
  for (const auto& e : res.value.elements) out.push_back(e.str);
  return out;
}

inline store::route_result state_store::route(const std::string& id, std::string_view data) {
  core& c = *core_;
  store::route_result out;
  const auto h = c.hash_key(id);
  const auto in = c.routed_key(id);
  const auto max = std::to_string(c.options.max_routed);
  const auto res = c.commands.call(
      {"EVAL", route_script, "2", h, in, c.options.node_id, c.options.prefix, id, data, max},
      c.options.reply_timeout);
  if (res.ec) {
    out.error = res.ec;
  } else if (res.value.type != reply_type::integer) {
    out.error = errc::error_reply;
  } else if (res.value.integer < 0) {
    c.routed_refused.fetch_add(1, std::memory_order_relaxed);
    out.error = errc::routed_full;
  } else if (res.value.integer == 1) {
    c.routed_out.fetch_add(1, std::memory_order_relaxed);
    out.routed = true;
  }
  return out;
}

inline store::routed_messages state_store::routed(const std::string& id) {
  core& c = *core_;
  store::routed_messages out;
  std::uint64_t token = 0;
  {
    std::lock_guard lock(c.m);
    const auto it = c.owned_devices.find(id);
    if (it == c.owned_devices.end()) return out;  // not ours: they wait for the owner
    token = it->second.token;
  }
  const auto h = c.hash_key(id);
  const auto in = c.routed_key(id);
  const auto t = std::to_string(token);
  const auto max = std::to_string(c.options.max_routed);
  const auto res = c.commands.call({"EVAL", routed_script, "2", h, in, c.options.node_id, t, max},
                                   c.options.reply_timeout);
  if (res.ec) {
    out.error = res.ec;
  } else if (res.value.type == reply_type::array) {
    out.messages.reserve(res.value.elements.size());
    for (const auto& e : res.value.elements) out.messages.push_back(e.str);
  }
  return out;
}

inline store::keep_routed_result state_store::keep_routed(
    const std::string& id, const std::vector<store::replay_entry>& entries) {
  core& c = *core_;
  store::keep_routed_result out;
  std::uint64_t token = 0;
  {
    std::lock_guard lock(c.m);
    const auto it = c.owned_devices.find(id);
    if (it == c.owned_devices.end()) {
      out.refused = true;
      return out;
    }
    token = it->second.token;
  }
  std::vector<std::string> seqs;
  seqs.reserve(entries.size());
  std::vector<std::string_view> args;
  args.reserve(2 * entries.size());
  for (const auto& e : entries) {
    seqs.push_back(std::to_string(e.seq));
    args.push_back(seqs.back());
    args.push_back(e.frame);
  }
  // Not pipelined with the batch: the caller sends the messages only once they are kept.
  const auto h = c.hash_key(id);
  const auto r = c.replay_key(id);
  const auto in = c.routed_key(id);
  const auto t = std::to_string(token);
  std::vector<std::string_view> argv{"EVAL", write_script,      "3", h,       r,
                                     in,     c.options.node_id, t,   "keepin"};
  argv.insert(argv.end(), args.begin(), args.end());
  const auto res = c.commands.call(argv, c.options.reply_timeout);
  if (res.ec) {
    out.error = res.ec;
  } else if (res.value.type == reply_type::integer && res.value.integer == 0) {
    out.refused = true;
    c.refused(id, token);
  } else {
    c.routed_in.fetch_add(entries.size(), std::memory_order_relaxed);
  }
  return out;
}

inline std::optional<std::string> state_store::owner(const std::string& id) {
  core& c = *core_;
  const auto h = c.hash_key(id);
  const auto res =
      c.commands.call({"EVAL", owner_script, "1", h, c.options.prefix}, c.options.reply_timeout);
  if (res.ec || res.value.type != reply_type::string) return std::nullopt;
  return res.value.str;
}

inline std::string state_store::epoch() {
  core& c = *core_;
  const auto res = c.commands.call({"GET", c.options.prefix + "epoch"}, c.options.reply_timeout);
  return res.ec ? std::string() : res.value.str;
}

static_assert(store::campaign_store<state_store>,
              "redis::state_store keeps the campaigns a node runs");
static_assert(store::fleet_campaign_store<state_store>,
              "redis::state_store carries a campaign between the nodes");

}  // namespace devgate::redis
