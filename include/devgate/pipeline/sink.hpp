#pragma once

#include <concepts>      // sink
#include <cstddef>       // std::size_t, std::ptrdiff_t
#include <cstdint>       // partition numbers
#include <span>          // broadcast recipients, batch results
#include <system_error>  // results
#include <tuple>         // fanout_sink
#include <type_traits>   // std::invoke_result_t
#include <utility>       // std::move

#include "devgate/core/bytes.hpp"
#include "devgate/core/error.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/transport/reply_channel.hpp"  // dispatch_context replies through it
#include "devgate/transport/transport.hpp"

namespace devgate {

/// What a sink learns about the dispatch besides the message itself.
struct dispatch_context {
  std::size_t worker_id = 0;    ///< The stable id of the worker dispatching (0..max_workers-1).
  std::uint32_t partition = 0;  ///< The partition the message came from (hash of its device id).
  unsigned attempt = 0;         ///< 0 on the first try, then 1, 2, ... on retries.
  const reply_channel* channel = nullptr;  ///< Set when a transport is attached.

  /// Sends `bytes` back to the session `m` arrived on (`errc::unknown_session` without one).
  std::error_code reply(const message& m, shared_bytes bytes,
                        payload_kind kind = payload_kind::text) const {
    return send(m.session, kind, std::move(bytes));
  }
  /// Sends to any session through the transport.
  std::error_code send(session_id s, payload_kind kind, shared_bytes bytes) const {
    if (channel == nullptr || channel->send == nullptr) return errc::unknown_session;
    return channel->send(channel->target, s, kind, std::move(bytes));
  }
  /// Sends one payload to many sessions; returns how many it was queued to.
  std::size_t broadcast(std::span<const session_id> sessions, payload_kind kind,
                        shared_bytes bytes) const {
    if (channel == nullptr || channel->broadcast == nullptr) return 0;
    return channel->broadcast(channel->target, sessions, kind, std::move(bytes));
  }
};

/// Where dispatched messages go. Requirement: `s.consume(m, ctx)` returns an empty error_code on
/// success or the failure; the pipeline retries failures with backoff, then dead-letters them.
/// Workers call `consume` concurrently (for different partitions), so a sink must be
/// thread-safe; messages of one device never reach it concurrently, and arrive in order.
/// Optionally, `s.end_batch(ctx)` is called by each worker after it dispatched a batch (a sink
/// may gather per batch, per worker thread, and flush there), and a sink may take whole shares
/// of a batch (see `batch_sink`).
/// A pipeline, gateway or hub given something else stops the build with (pipeline's words):
/// "devgate::pipeline: Sink needs `std::error_code consume(const devgate::message&,
/// devgate::dispatch_context&)` (wrap a lambda in devgate::callback_sink)".
template <class S>
concept sink = requires(S& s, const message& m, dispatch_context& ctx) {
  { s.consume(m, ctx) } -> std::same_as<std::error_code>;
};

/// A share of a worker's batch, as a batch sink's `consume_batch` sees it: its messages in
/// dispatch order (each device's in the order they arrived). With other workers around a share
/// is one partition's messages; a lone worker's share holds every partition it took, one run
/// after another (`partition(i)`). A view: valid only during the call.
class message_batch {
 public:
  /// Iterates the messages (`const message&`).
  class iterator {
   public:
    using value_type = message;              ///< What it yields.
    using difference_type = std::ptrdiff_t;  ///< Distance between two iterators.
    iterator() = default;                    ///< A singular iterator.
    /// At `item`.
    explicit iterator(const queued_message* item) noexcept : item_(item) {}
    /// The message.
    const message& operator*() const noexcept { return item_->msg; }
    /// The message's members.
    const message* operator->() const noexcept { return &item_->msg; }
    /// The next message.
    iterator& operator++() noexcept {
      ++item_;
      return *this;
    }
    /// The next message (postfix).
    iterator operator++(int) noexcept {
      iterator before = *this;
      ++item_;
      return before;
    }
    /// Same position.
    bool operator==(const iterator&) const noexcept = default;

   private:
    const queued_message* item_ = nullptr;
  };

  /// Views `count` queued messages from `items`.
  message_batch(const queued_message* items, std::size_t count) noexcept
      : items_(items), size_(count) {}
  /// How many messages.
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  /// True when there are none.
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  /// The i-th message (i < size()).
  const message& operator[](std::size_t i) const noexcept { return items_[i].msg; }
  /// The partition the i-th message came from.
  [[nodiscard]] std::uint32_t partition(std::size_t i) const noexcept {
    return items_[i].partition;
  }
  /// The first message.
  [[nodiscard]] iterator begin() const noexcept { return iterator(items_); }
  /// Past the last message.
  [[nodiscard]] iterator end() const noexcept { return iterator(items_ + size_); }

 private:
  const queued_message* items_;
  std::size_t size_;
};

/// A sink that also takes a share of a batch whole (see `message_batch`), so it can write the
/// messages as one request and wait once: `s.consume_batch(batch, ctx, results)` sets
/// `results[i]` (sized to the batch, cleared beforehand) to `batch[i]`'s outcome, as `consume`
/// would return it; `ctx.partition` is the first message's partition and `ctx.attempt` is 0. The
/// pipeline then calls `consume` for each failed message in batch order (attempts 1, 2, ...,
/// with backoff, then the dead letter), so a message that failed is retried after the later
/// messages the sink took. A sink that must keep each device's order across failures reports
/// every later message of a device after one of its failures as failed too (it may have taken
/// them: at-least-once). An exception from `consume_batch` fails the whole share
/// (`errc::handler_threw`, counted) and each message is retried.
template <class S>
concept batch_sink = sink<S> &&
    requires(S& s, message_batch b, dispatch_context& ctx, std::span<std::error_code> results) {
  s.consume_batch(b, ctx, results);
};

/// A sink that calls `f(message, ctx)`; `f` returns std::error_code, or void for "always succeeds".
template <class F>
class callback_sink {
 public:
  /// Wraps `f` (stored by value; called concurrently from workers).
  explicit callback_sink(F f) : f_(std::move(f)) {}
  /// Calls the callback.
  std::error_code consume(const message& m, dispatch_context& ctx) {
    if constexpr (std::is_void_v<std::invoke_result_t<F&, const message&, dispatch_context&>>) {
      f_(m, ctx);
      return {};
    } else {
      return f_(m, ctx);
    }
  }

 private:
  F f_;
};

/// Hands each message to every sink in turn. Every sink is called even if one fails; the result
/// is the first failure, so a retry re-delivers to all of them (at-least-once per sink).
template <sink... Sinks>
class fanout_sink {
 public:
  /// Takes the sinks by value.
  explicit fanout_sink(Sinks... sinks) : sinks_(std::move(sinks)...) {}
  /// Delivers to all sinks.
  std::error_code consume(const message& m, dispatch_context& ctx) {
    std::error_code first;
    std::apply(
        [&](auto&... s) {
          (([&] {
             auto ec = s.consume(m, ctx);
             if (ec && !first) first = ec;
           }()),
           ...);
        },
        sinks_);
    return first;
  }
  /// The I-th sink (for inspection in tests and host code).
  template <std::size_t I>
  auto& get() noexcept {
    return std::get<I>(sinks_);
  }

 private:
  std::tuple<Sinks...> sinks_;
};

/// A sink that accepts and ignores every message (benchmarks, tests).
struct null_sink {
  /// Always succeeds.
  std::error_code consume(const message& /*unused*/, dispatch_context& /*unused*/) noexcept {
    return {};
  }
};

static_assert(sink<null_sink>);

}  // namespace devgate
