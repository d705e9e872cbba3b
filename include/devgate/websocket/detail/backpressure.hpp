#pragma once

#include <atomic>       // the reserved-bytes counter, shared with other threads
#include <cstddef>      // std::size_t
#include <cstdint>      // 32-bit counters
#include <optional>     // no close under drop_oldest
#include <string_view>  // the close reason
#include <utility>      // std::exchange

#include "devgate/transport/transport.hpp"
#include "devgate/websocket/detail/out_queue.hpp"

namespace devgate::websocket::detail {

// The back-pressure policy of a session's outbound bytes, in one place:
// - every data message is reserved against `backpressure_options::max_buffered_bytes` before it
//   is queued (from any thread), and given back as it is written;
// - past the limit: close with 1008 or 1013 (`overflow_close`), or, under drop_oldest, drop the
//   oldest messages no write has started (`outbound_budget::trim`); the reservation may pass
//   the limit up to twice its size until the session's thread has trimmed, and never beyond;
// - replies from the session's own thread take their bytes from a credit the session reserves
//   a few KiB at a time, so a burst of replies costs one atomic operation, not one each;
// - HTTP responses (before the upgrade) are charged as they are queued, whatever the limit; a
//   session whose responses reach the limit (`outbound_budget::full`) answers no further
//   pipelined request and reads nothing more until they are written, so a client that sends
//   requests without reading holds at most the limit plus one response, its unread requests
//   waiting in its own socket buffers (and the request deadline ends it).

/// Reservation credit a session takes on its own thread beyond what it needs.
inline constexpr std::size_t reserve_credit = 4096;

/// The close reason sent with `overflow_close`'s code.
inline constexpr std::string_view overflow_reason = "outbound buffer full";

/// What a session that passed its limit gets: the close code, or nothing under drop_oldest
/// (the message is refused and the session trims its queue instead).
[[nodiscard]] inline std::optional<close_code> overflow_close(
    const backpressure_options& bp) noexcept {
  switch (bp.on_overflow) {
    case overflow_action::close_policy_violation:
      return close_code::policy_violation;
    case overflow_action::close_try_again_later:
      return close_code::try_again_later;
    case overflow_action::drop_oldest:
      break;
  }
  return std::nullopt;
}

/// One session's outbound bytes held against its limit: the reserved count (read by any thread,
/// server::start keeps it within 32 bits) and the credit its own thread holds.
class outbound_budget {
 public:
  /// Bytes reserved: queued and not yet written, plus the unused credit.
  [[nodiscard]] std::size_t buffered() const noexcept {
    return buffered_.load(std::memory_order_relaxed);
  }

  /// Reserves `bytes` from any thread; false means over the limit (the caller applies
  /// `overflow_close`).
  [[nodiscard]] bool reserve(std::size_t bytes, const backpressure_options& bp) noexcept {
    if (bytes > bp.max_buffered_bytes) return false;
    return add(bytes, bp);
  }

  /// reserve() on the session's own thread: taken from the credit when that suffices, otherwise
  /// from the shared counter together with `reserve_credit` more. The credit is given back when
  /// the queue drains (settle); until then it counts against the limit too.
  [[nodiscard]] bool reserve_local(std::size_t bytes, const backpressure_options& bp) noexcept {
    if (credit_ >= bytes) {
      credit_ -= static_cast<std::uint32_t>(bytes);
      return true;
    }
    if (bytes > bp.max_buffered_bytes) return false;
    const std::size_t need = bytes - credit_;
    if (add(need + reserve_credit, bp)) {
      credit_ = reserve_credit;
      return true;
    }
    if (!add(need, bp)) return false;  // near the limit: exactly what is needed
    credit_ = 0;
    return true;
  }

  /// Counts `bytes` queued on the session's own thread whatever the limit (HTTP responses: the
  /// session stops reading instead while `full`).
  void charge(std::size_t bytes) noexcept {
    buffered_.fetch_add(static_cast<std::uint32_t>(bytes), std::memory_order_relaxed);
  }

  /// True when the bytes queued (the credit aside) reached the limit: the session reads no
  /// further HTTP request until they are written. On the session's thread.
  [[nodiscard]] bool full(const backpressure_options& bp) const noexcept {
    return buffered() - credit_ >= bp.max_buffered_bytes;
  }

  /// Gives back a reservation that will not be queued (any thread).
  void unreserve(std::size_t bytes) noexcept {
    buffered_.fetch_sub(static_cast<std::uint32_t>(bytes), std::memory_order_relaxed);
  }

  /// Gives back `bytes` of a message the session will not queue (it is no longer open), and the
  /// credit with them. On the session's thread.
  void refund(std::size_t bytes) noexcept { unreserve(bytes + std::exchange(credit_, 0)); }

  /// Bytes no longer queued, on the session's thread: kept as credit (up to twice
  /// `reserve_credit`) while the queue is in use; settle() gives all of it back.
  void give_back(std::size_t bytes) noexcept {
    credit_ += static_cast<std::uint32_t>(bytes);
    if (credit_ > 2 * reserve_credit) {
      unreserve(credit_ - reserve_credit);
      credit_ = reserve_credit;
    }
  }

  /// The queue drained: the credit goes back, so an idle session's buffered() is 0.
  void settle() noexcept {
    if (credit_ > 0) unreserve(std::exchange(credit_, 0));
  }

  /// drop_oldest: drops the oldest whole messages no write has started until the queue is
  /// within the limit again (the newest message always stays). On the session's thread.
  void trim(out_queue& q, const backpressure_options& bp) noexcept {
    if (bp.on_overflow != overflow_action::drop_oldest) return;
    while (buffered() - credit_ > bp.max_buffered_bytes && q.can_drop_oldest()) {
      give_back(q.drop_oldest());
    }
  }

 private:
  // The hard bound: drop_oldest may pass the limit up to twice its size until the session's
  // thread trims older messages; nothing passes the bound.
  [[nodiscard]] bool add(std::size_t bytes, const backpressure_options& bp) noexcept {
    const std::size_t hard = bp.on_overflow == overflow_action::drop_oldest
                                 ? 2 * bp.max_buffered_bytes
                                 : bp.max_buffered_bytes;
    std::uint32_t cur = buffered_.load(std::memory_order_relaxed);
    do {
      if (cur + bytes > hard) return false;
    } while (!buffered_.compare_exchange_weak(cur, cur + static_cast<std::uint32_t>(bytes),
                                              std::memory_order_relaxed));
    return true;
  }

  std::atomic<std::uint32_t> buffered_{0};
  std::uint32_t credit_ = 0;  // part of buffered_ reserved but unused (own thread only)
};

}  // namespace devgate::websocket::detail
