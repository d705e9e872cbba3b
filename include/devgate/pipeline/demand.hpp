#pragma once

#include <algorithm>  // std::clamp
#include <chrono>     // latency target
#include <concepts>   // demand_policy
#include <cstddef>    // std::size_t

namespace devgate {

/// Runtime knobs the demand policies read (part of `pipeline_options`).
struct demand_options {
  /// Smallest batch the adaptive policy asks for.
  std::size_t min_batch = 1;
  /// Largest batch the adaptive policy asks for; bigger batches amortise the fetch but make the
  /// last message of a batch wait for the ones before it.
  std::size_t max_batch = 256;
  /// The adaptive policy halves its batch when dispatching one batch takes longer than this, so
  /// batching never adds more than about this much to a message's latency.
  std::chrono::microseconds latency_target{500};
};

/// What a worker reports after dispatching a batch.
struct batch_feedback {
  std::size_t asked = 0;                ///< The demand the worker announced.
  std::size_t taken = 0;                ///< How many messages the fetcher handed over.
  std::chrono::nanoseconds duration{};  ///< How long dispatching them took.
};

/// A demand policy decides how many messages a worker asks for, GenStage-style. Each worker owns
/// one instance (no sharing, no atomics). Requirements:
/// - constructible from `const demand_options&`;
/// - `d.demand()`: how many messages to ask for now, in [1, d.max_demand()];
/// - `d.max_demand()`: an upper bound that never changes (workers size their buffers with it);
/// - `d.record(feedback)`: learn from the batch just dispatched.
/// A `Traits::demand_type` that does not fit stops the build with: "devgate::pipeline:
/// Traits::demand_type must be a demand policy such as devgate::adaptive_demand or
/// devgate::fixed_demand<N> (requirements in demand.hpp)".
template <class D>
concept demand_policy = std::constructible_from<D, const demand_options&> &&
    requires(D& d, const D& cd, const batch_feedback& f) {
  { cd.demand() } -> std::convertible_to<std::size_t>;
  { cd.max_demand() } -> std::convertible_to<std::size_t>;
  d.record(f);
};

/// Always asks for N messages: predictable batches, no adaptation.
template <std::size_t N>
struct fixed_demand {
  static_assert(N >= 1, "fixed_demand<N>: a worker must ask for at least one message (N >= 1)");
  /// Ignores the options: N is fixed at compile time.
  explicit fixed_demand(const demand_options& /*unused*/ = {}) noexcept {}
  /// Always N.
  [[nodiscard]] static constexpr std::size_t demand() noexcept { return N; }
  /// Always N.
  [[nodiscard]] static constexpr std::size_t max_demand() noexcept { return N; }
  /// Nothing to learn.
  static constexpr void record(const batch_feedback& /*unused*/) noexcept {}
};

/// Grows the batch (x2) while the fetcher fills it (backlog), shrinks it (/2) when batches come
/// back mostly empty (idle) or take longer than the latency target to dispatch.
class adaptive_demand {
 public:
  /// Starts at `min_batch` (the pipeline validates the options at construction).
  explicit adaptive_demand(const demand_options& options = {}) noexcept
      : min_(std::max<std::size_t>(1, options.min_batch)),
        max_(std::max(min_, options.max_batch)),
        target_(options.latency_target),
        current_(min_) {}
  /// The batch size to ask for now.
  [[nodiscard]] std::size_t demand() const noexcept { return current_; }
  /// `max_batch`.
  [[nodiscard]] std::size_t max_demand() const noexcept { return max_; }
  /// Adapts to the batch just dispatched.
  void record(const batch_feedback& f) noexcept {
    if (f.duration > target_) {
      current_ = std::max(min_, current_ / 2);  // batches too slow: latency first
    } else if (f.taken >= f.asked) {
      current_ = std::min(max_, current_ * 2);  // backlog: amortise more per fetch
    } else if (f.taken * 4 < f.asked) {
      current_ = std::max(min_, current_ / 2);  // mostly idle: small batches wake fast
    }
  }

 private:
  std::size_t min_;
  std::size_t max_;
  std::chrono::nanoseconds target_;
  std::size_t current_;
};

static_assert(demand_policy<fixed_demand<64>>);
static_assert(demand_policy<adaptive_demand>);

}  // namespace devgate
