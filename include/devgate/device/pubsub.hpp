#pragma once

#include <atomic>         // subscriber counts, subscription tokens
#include <cstddef>        // std::size_t
#include <cstdint>        // tokens
#include <functional>     // host subscribers, transparent hashing
#include <memory>         // topic entries, publish snapshots
#include <mutex>          // per-topic and per-session locks
#include <shared_mutex>   // the topic table: publishers share it
#include <span>           // recipients
#include <string>         // topic names
#include <string_view>    // topic names
#include <unordered_map>  // topic table, member positions, per-session topics
#include <utility>        // std::move
#include <vector>         // members, snapshots

#include "devgate/core/bytes.hpp"
#include "devgate/transport/reply_channel.hpp"  // the type-erased way to the transport
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// Carries a pubsub's topics to other gateway nodes (`redis::topic_bridge` is one): the pubsub
/// hands it every publish that other nodes may want, asks it whether they want a topic (so a
/// publisher with no subscriber anywhere builds nothing), and tells it when a topic may have
/// gained its first or lost its last local subscriber. Called from any thread: keep it quick
/// and never block.
class relay {
 public:
  virtual ~relay() = default;
  /// True when other nodes have subscribers to `topic`, or the relay cannot tell yet.
  [[nodiscard]] virtual bool remote_interest(std::string_view topic) const = 0;
  /// Takes a local publish on to the other nodes (the payload is shared, not copied).
  virtual void forward(std::string_view topic, const shared_bytes& payload, payload_kind kind) = 0;
  /// `topic`'s local subscribers may have gone from none to some or back (re-read them with
  /// `pubsub::has_local_subscribers`: notifications from two threads may arrive out of order).
  virtual void interest_changed(std::string_view topic) = 0;
};

/// Topics with two kinds of subscriber: sessions (devices, reached through the transport) and
/// host callbacks. Subscribe, unsubscribe and publish from any thread. A publish encodes
/// nothing itself: the caller hands it one payload, which every subscriber shares.
///
/// Cost: subscribing and unsubscribing a session are O(1) amortised (a topic keeps its members
/// in a vector with each member's position, and removes by moving the last member into the
/// gap), so a reconnect storm of N devices costs O(N), not a copy of the list per hello. A
/// publish sends to an immutable snapshot of the members, rebuilt by the first publish after a
/// change (O(members), the size of the broadcast itself) and shared by later publishes; it takes
/// the topic's own mutex just long enough to copy one shared_ptr, and sends with no lock held.
/// Topics are never removed (there are a few: the hub's three and the host's own), so the
/// topic table's lock is exclusive only when a topic is first used.
class pubsub {
 public:
  /// A host subscriber: receives the topic and the payload (the JSON text devices receive).
  using callback = std::function<void(std::string_view topic, const shared_bytes& payload)>;
  /// Identifies a host subscription (for `unsubscribe`).
  using token = std::uint64_t;

  /// Sets the way to devices (the hub sets its gateway's channel before any publish).
  void set_channel(const reply_channel* channel) noexcept { channel_ = channel; }
  /// Sets the relay to other nodes (before anything is published; nullptr: this node alone).
  /// It is told at once about every topic that already has local subscribers.
  void set_relay(relay* r) {
    relay_.store(r, std::memory_order_release);
    if (r == nullptr) return;
    std::vector<std::string> names;
    {
      std::shared_lock lock(table_mutex_);
      for (const auto& [name, e] : entries_) {
        if (e->count.load(std::memory_order_relaxed) != 0) names.push_back(name);
      }
    }
    for (const auto& n : names) r->interest_changed(n);
  }

  /// Subscribes session `s` to `topic`; false if it already was.
  bool subscribe(std::string_view topic, session_id s) {
    topic_entry& e = entry_for(topic);
    bool first = false;
    {
      std::lock_guard lock(e.mutex);
      if (!e.position.emplace(s, e.members.size()).second) return false;
      e.members.push_back(s);
      e.snap.reset();
      first = e.count.fetch_add(1, std::memory_order_relaxed) == 0;
    }
    if (first) interest_changed(e);
    std::lock_guard lock(sessions_mutex_);
    by_session_[s].push_back(&e);
    return true;
  }
  /// Unsubscribes session `s` from `topic`; false if it was not subscribed.
  bool unsubscribe(std::string_view topic, session_id s) {
    topic_entry* e = find(topic);
    if (e == nullptr || !remove(*e, s)) return false;
    std::lock_guard lock(sessions_mutex_);
    if (auto it = by_session_.find(s); it != by_session_.end()) {
      std::erase(it->second, e);
      if (it->second.empty()) by_session_.erase(it);
    }
    return true;
  }
  /// Removes every subscription of session `s` (when it closes).
  void unsubscribe_all(session_id s) {
    std::vector<topic_entry*> topics;
    {
      std::lock_guard lock(sessions_mutex_);
      auto it = by_session_.find(s);
      if (it == by_session_.end()) return;
      topics = std::move(it->second);
      by_session_.erase(it);
    }
    for (auto* e : topics) remove(*e, s);
  }
  /// Subscribes a host callback to `topic` (it runs on the publishing thread, with no lock
  /// held; keep it quick). Returns the token for `unsubscribe`.
  token subscribe(std::string_view topic, callback cb) {
    const token t = next_token_.fetch_add(1, std::memory_order_relaxed) + 1;
    topic_entry& e = entry_for(topic);
    bool first = false;
    {
      std::lock_guard lock(e.mutex);
      e.callbacks.emplace_back(t, std::make_shared<const callback>(std::move(cb)));
      e.snap.reset();
      first = e.count.fetch_add(1, std::memory_order_relaxed) == 0;
    }
    if (first) interest_changed(e);
    return t;
  }
  /// Removes a host subscription. A publish already running may still call it once.
  void unsubscribe(token t) {
    topic_entry* emptied = nullptr;
    {
      std::shared_lock table(table_mutex_);
      bool found = false;
      for (auto& [name, e] : entries_) {
        std::lock_guard lock(e->mutex);
        for (auto it = e->callbacks.begin(); it != e->callbacks.end(); ++it) {
          if (it->first != t) continue;
          e->callbacks.erase(it);
          e->snap.reset();
          if (e->count.fetch_sub(1, std::memory_order_relaxed) == 1) emptied = e.get();
          found = true;
          break;
        }
        if (found) break;
      }
    }
    if (emptied != nullptr) interest_changed(*emptied);
  }

  /// True when `topic` has any subscriber, on this node or (with a relay) on another (lets
  /// publishers skip building a payload). Takes no lock but the topic table's shared one, and
  /// allocates nothing.
  [[nodiscard]] bool has_subscribers(std::string_view topic) const {
    if (has_local_subscribers(topic)) return true;
    const relay* r = relay_.load(std::memory_order_acquire);
    return r != nullptr && r->remote_interest(topic);
  }
  /// True when `topic` has a subscriber on this node.
  [[nodiscard]] bool has_local_subscribers(std::string_view topic) const {
    const topic_entry* e = find(topic);
    return e != nullptr && e->count.load(std::memory_order_relaxed) != 0;
  }
  /// The sessions subscribed to `topic` now (in no particular order).
  [[nodiscard]] std::vector<session_id> sessions(std::string_view topic) const {
    const auto snap = snapshot(topic);
    return snap ? snap->sessions : std::vector<session_id>{};
  }

  /// Sends `payload` (one buffer, shared by all) to every subscriber of `topic`, and with a
  /// relay to the other nodes that want it. Returns how many local sessions took it plus how
  /// many callbacks ran (plus one when the relay took it).
  std::size_t publish(std::string_view topic, const shared_bytes& payload,
                      payload_kind kind = payload_kind::text) const {
    std::size_t n = 0;
    if (relay* r = relay_.load(std::memory_order_acquire);
        r != nullptr && r->remote_interest(topic)) {
      r->forward(topic, payload, kind);
      ++n;
    }
    return n + publish_local(topic, payload, kind);
  }
  /// `publish` to this node's subscribers only (a relay delivers what other nodes published).
  std::size_t publish_local(std::string_view topic, const shared_bytes& payload,
                            payload_kind kind = payload_kind::text) const {
    const auto snap = snapshot(topic);
    if (!snap) return 0;
    std::size_t n = 0;
    if (!snap->sessions.empty() && channel_ != nullptr && channel_->broadcast != nullptr) {
      n += channel_->broadcast(channel_->target, std::span<const session_id>(snap->sessions), kind,
                               payload);
    }
    for (const auto& [t, cb] : snap->callbacks) {
      (*cb)(topic, payload);
      ++n;
    }
    return n;
  }

 private:
  // What a publish sends to: a copy of a topic's subscribers, immutable once built.
  struct snapshot_t {
    std::vector<session_id> sessions;
    std::vector<std::pair<token, std::shared_ptr<const callback>>> callbacks;
  };
  // One topic: its members (unordered; `position` finds each), its callbacks, and the snapshot
  // of both (nullptr after a change, until the next publish builds it).
  struct topic_entry {
    mutable std::mutex mutex;
    std::vector<session_id> members;
    std::unordered_map<session_id, std::size_t> position;
    std::vector<std::pair<token, std::shared_ptr<const callback>>> callbacks;
    mutable std::shared_ptr<const snapshot_t> snap;
    std::atomic<std::size_t> count{0};  // members + callbacks, read without the mutex
    std::string name;                   // the topic (for the relay)
  };
  // Lets the topic table be searched by string_view without building a string.
  struct name_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept {
      return std::hash<std::string_view>{}(s);
    }
  };

  topic_entry* find(std::string_view topic) const {
    std::shared_lock lock(table_mutex_);
    const auto it = entries_.find(topic);
    return it == entries_.end() ? nullptr : it->second.get();
  }
  topic_entry& entry_for(std::string_view topic) {
    if (auto* e = find(topic)) return *e;
    std::unique_lock lock(table_mutex_);
    auto& slot = entries_[std::string(topic)];
    if (!slot) {
      slot = std::make_unique<topic_entry>();
      slot->name = std::string(topic);
    }
    return *slot;
  }
  std::shared_ptr<const snapshot_t> snapshot(std::string_view topic) const {
    const topic_entry* e = find(topic);
    if (e == nullptr) return nullptr;
    std::lock_guard lock(e->mutex);
    if (!e->snap) {
      e->snap = std::make_shared<const snapshot_t>(snapshot_t{e->members, e->callbacks});
    }
    return e->snap;
  }
  // Removes `s` from a topic in O(1): the last member moves into its place.
  bool remove(topic_entry& e, session_id s) {
    bool last = false;
    {
      std::lock_guard lock(e.mutex);
      const auto it = e.position.find(s);
      if (it == e.position.end()) return false;
      const std::size_t at = it->second;
      e.position.erase(it);
      if (at + 1 != e.members.size()) {
        e.members[at] = e.members.back();
        e.position[e.members[at]] = at;
      }
      e.members.pop_back();
      e.snap.reset();
      last = e.count.fetch_sub(1, std::memory_order_relaxed) == 1;
    }
    if (last) interest_changed(e);
    return true;
  }
  // A topic's local subscribers went from none to some or back: the relay re-reads them.
  void interest_changed(const topic_entry& e) {
    if (relay* r = relay_.load(std::memory_order_acquire)) r->interest_changed(e.name);
  }

  const reply_channel* channel_ = nullptr;
  std::atomic<relay*> relay_{nullptr};
  std::atomic<token> next_token_{0};
  mutable std::shared_mutex table_mutex_;
  std::unordered_map<std::string, std::unique_ptr<topic_entry>, name_hash, std::equal_to<>>
      entries_;
  std::mutex sessions_mutex_;
  std::unordered_map<session_id, std::vector<topic_entry*>> by_session_;
};

}  // namespace devgate::device
