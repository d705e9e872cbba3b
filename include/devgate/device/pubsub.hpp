#pragma once

#include <algorithm>      // std::find, std::erase
#include <atomic>         // subscription tokens
#include <cstddef>        // std::size_t
#include <cstdint>        // tokens
#include <functional>     // host subscribers
#include <memory>         // copy-on-write topic entries
#include <mutex>          // writers
#include <shared_mutex>   // readers (publish) share the table
#include <span>           // recipients
#include <string>         // topic names
#include <string_view>    // topic names
#include <unordered_map>  // topic table, per-session topics
#include <utility>        // std::move
#include <vector>         // recipients

#include "devgate/core/bytes.hpp"
#include "devgate/transport/reply_channel.hpp"  // the type-erased way to the transport
#include "devgate/transport/transport.hpp"

namespace devgate::device {

/// Topics with two kinds of subscriber: sessions (devices, reached through the transport) and
/// host callbacks. Subscribe, unsubscribe and publish from any thread. A publish encodes
/// nothing itself: the caller hands it one payload, which every subscriber shares.
///
/// Subscriber lists are copy-on-write: publish takes a shared lock just long enough to copy
/// one shared_ptr, then sends with no lock held.
class pubsub {
 public:
  /// A host subscriber: receives the topic and the payload (the JSON text devices receive).
  using callback = std::function<void(std::string_view topic, const shared_bytes& payload)>;
  /// Identifies a host subscription (for `unsubscribe`).
  using token = std::uint64_t;

  /// Sets the way to devices (the hub sets its gateway's channel before any publish).
  void set_channel(const reply_channel* channel) noexcept { channel_ = channel; }

  /// Subscribes session `s` to `topic`; false if it already was.
  bool subscribe(std::string_view topic, session_id s) {
    std::unique_lock lock(mutex_);
    auto& e = entries_[std::string(topic)];
    auto next = e ? std::make_shared<entry>(*e) : std::make_shared<entry>();
    if (std::find(next->sessions.begin(), next->sessions.end(), s) != next->sessions.end()) {
      return false;
    }
    next->sessions.push_back(s);
    e = std::move(next);
    by_session_[s].emplace_back(topic);
    return true;
  }
  /// Unsubscribes session `s` from `topic`; false if it was not subscribed.
  bool unsubscribe(std::string_view topic, session_id s) {
    std::unique_lock lock(mutex_);
    if (!remove_locked(std::string(topic), s)) return false;
    if (auto it = by_session_.find(s); it != by_session_.end()) {
      std::erase(it->second, std::string(topic));
      if (it->second.empty()) by_session_.erase(it);
    }
    return true;
  }
  /// Removes every subscription of session `s` (when it closes).
  void unsubscribe_all(session_id s) {
    std::unique_lock lock(mutex_);
    auto it = by_session_.find(s);
    if (it == by_session_.end()) return;
    for (const auto& t : it->second) remove_locked(t, s);
    by_session_.erase(it);
  }
  /// Subscribes a host callback to `topic` (it runs on the publishing thread, with no lock
  /// held; keep it quick). Returns the token for `unsubscribe`.
  token subscribe(std::string_view topic, callback cb) {
    const token t = next_token_.fetch_add(1, std::memory_order_relaxed) + 1;
    std::unique_lock lock(mutex_);
    auto& e = entries_[std::string(topic)];
    auto next = e ? std::make_shared<entry>(*e) : std::make_shared<entry>();
    next->callbacks.emplace_back(t, std::make_shared<const callback>(std::move(cb)));
    e = std::move(next);
    return t;
  }
  /// Removes a host subscription. A publish already running may still call it once.
  void unsubscribe(token t) {
    std::unique_lock lock(mutex_);
    for (auto& [name, e] : entries_) {
      if (!e) continue;
      for (std::size_t i = 0; i < e->callbacks.size(); ++i) {
        if (e->callbacks[i].first != t) continue;
        auto next = std::make_shared<entry>(*e);
        next->callbacks.erase(next->callbacks.begin() + static_cast<std::ptrdiff_t>(i));
        e = std::move(next);
        return;
      }
    }
  }

  /// True when `topic` has any subscriber (lets publishers skip building a payload).
  [[nodiscard]] bool has_subscribers(std::string_view topic) const {
    const auto e = find(topic);
    return e && (!e->sessions.empty() || !e->callbacks.empty());
  }
  /// The sessions subscribed to `topic` now.
  [[nodiscard]] std::vector<session_id> sessions(std::string_view topic) const {
    const auto e = find(topic);
    return e ? e->sessions : std::vector<session_id>{};
  }

  /// Sends `payload` (one buffer, shared by all) to every subscriber of `topic`. Returns how
  /// many sessions took it plus how many callbacks ran.
  std::size_t publish(std::string_view topic, const shared_bytes& payload,
                      payload_kind kind = payload_kind::text) const {
    const auto e = find(topic);
    if (!e) return 0;
    std::size_t n = 0;
    if (!e->sessions.empty() && channel_ != nullptr && channel_->broadcast != nullptr) {
      n += channel_->broadcast(channel_->target, std::span<const session_id>(e->sessions), kind,
                               payload);
    }
    for (const auto& [t, cb] : e->callbacks) {
      (*cb)(topic, payload);
      ++n;
    }
    return n;
  }

 private:
  struct entry {
    std::vector<session_id> sessions;
    std::vector<std::pair<token, std::shared_ptr<const callback>>> callbacks;
  };

  std::shared_ptr<const entry> find(std::string_view topic) const {
    std::shared_lock lock(mutex_);
    const auto it = entries_.find(std::string(topic));
    return it == entries_.end() ? nullptr : it->second;
  }
  bool remove_locked(const std::string& topic, session_id s) {
    auto it = entries_.find(topic);
    if (it == entries_.end() || !it->second) return false;
    const auto& cur = it->second->sessions;
    const auto pos = std::find(cur.begin(), cur.end(), s);
    if (pos == cur.end()) return false;
    auto next = std::make_shared<entry>(*it->second);
    next->sessions.erase(next->sessions.begin() + (pos - cur.begin()));
    it->second = std::move(next);
    return true;
  }

  const reply_channel* channel_ = nullptr;
  std::atomic<token> next_token_{0};
  mutable std::shared_mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<const entry>> entries_;
  std::unordered_map<session_id, std::vector<std::string>> by_session_;
};

}  // namespace devgate::device
