#pragma once

#include <cstddef>  // std::size_t
#include <span>     // the batch handed to on_messages
#include <vector>   // the reused messages

#include "devgate/core/bytes.hpp"
#include "devgate/transport/transport.hpp"

namespace devgate::websocket::detail {

/// The messages decoded from one read of one session, collected to be handed to the engine in
/// one call. One per worker thread, reused read after read: its inbound_message objects stay
/// between reads (only their payloads go), so collecting a message allocates nothing once the
/// batch has grown to the largest read, and a session's device id is assigned again only when
/// another session reads or the handler took it.
class read_batch {
 public:
  /// Marks a batch as collecting for the scope's lifetime and empties it at the end, exceptions
  /// included (the payloads the handler did not take go then).
  class scope {
   public:
    /// Starts collecting into `b`.
    explicit scope(read_batch& b) noexcept : b_(b) { b_.busy_ = true; }
    scope(const scope&) = delete;
    scope& operator=(const scope&) = delete;
    ~scope() {
      b_.clear();
      b_.busy_ = false;
    }

   private:
    read_batch& b_;
  };

  /// True while a session collects into it (a nested read on this thread must use another).
  [[nodiscard]] bool busy() const noexcept { return busy_; }
  /// No message collected.
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }

  /// The next message of session `session` (whose device id is `device_id`): everything but the
  /// kind, payload and timestamp is filled in; `sequence` is the caller's.
  inbound_message& next(session_id session, const shared_bytes& device_id) {
    if (size_ == items_.size()) items_.emplace_back();
    inbound_message& m = items_[size_++];
    if (m.device_id.data() != device_id.data() || m.device_id.size() != device_id.size()) {
      m.device_id = device_id;
    }
    m.session = session;
    return m;
  }

  /// The messages collected, in order (the handler may move out of them).
  [[nodiscard]] std::span<inbound_message> messages() noexcept { return {items_.data(), size_}; }

  /// Drops the payloads of the messages collected and empties the batch, keeping the objects.
  void clear() noexcept {
    for (std::size_t i = 0; i < size_; ++i) items_[i].payload = {};
    size_ = 0;
  }

  /// Frees the objects when more than `keep` were kept (after a read of many tiny messages).
  void shrink(std::size_t keep) {
    if (busy_ || items_.size() <= keep) return;
    items_.clear();
    items_.shrink_to_fit();
  }

 private:
  std::vector<inbound_message> items_;
  std::size_t size_ = 0;
  bool busy_ = false;
};

}  // namespace devgate::websocket::detail
