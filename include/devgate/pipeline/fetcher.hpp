#pragma once

#include <algorithm>    // heaps, std::sort
#include <atomic>       // tickets and claims
#include <cstddef>      // std::size_t
#include <cstdint>      // tickets
#include <functional>   // std::hash
#include <memory>       // partitions live behind unique_ptr (atomics do not move)
#include <string_view>  // hashing device ids
#include <thread>       // std::this_thread::yield while a producer finishes an enqueue
#include <utility>      // std::move
#include <vector>       // partitions, batches, pending

#include "devgate/core/bytes.hpp"
#include "devgate/pipeline/demand.hpp"
#include "devgate/pipeline/message.hpp"
#include "devgate/pipeline/queue.hpp"

namespace devgate {

/// A message in a partition queue, with the ticket that fixes its place in the partition's order.
struct queued_message {
  message msg;                  ///< The message.
  std::uint64_t ticket = 0;     ///< Position in its partition's arrival order.
  std::uint32_t partition = 0;  ///< The partition (hash of the device id).
};

/// The demand-driven fetcher: a passive coordinator, not a thread. Workers pull through it with
/// their demand; it hands each one up to that many messages in bulk, in order per partition.
///
/// Messages are partitioned by a hash of the device id. Each partition has its own queue, a
/// ticket counter producers take from (so arrival order across producer threads is fixed even
/// though the lock-free queue is FIFO only per producer), and a claim flag: a partition is
/// fetched and dispatched by at most one worker at a time, so per-device order survives any
/// number of workers coming and going.
template <queue_policy Queue, demand_policy Demand>
class fetcher {
  using queue_type = typename Queue::template queue<queued_message>;

 public:
  /// What a worker holds between `fetch` and `release`: the batch and the partitions it claimed.
  class batch {
   public:
    /// A batch buffer for demands up to `max_demand`.
    explicit batch(std::size_t max_demand) : items_(max_demand) { claims_.reserve(16); }
    /// The messages fetched, in dispatch order per partition.
    [[nodiscard]] queued_message* begin() noexcept { return items_.data(); }
    /// End of the fetched messages.
    [[nodiscard]] queued_message* end() noexcept { return items_.data() + size_; }
    /// How many messages were fetched.
    [[nodiscard]] std::size_t size() const noexcept { return size_; }
    /// The demand announced for this batch.
    [[nodiscard]] std::size_t asked() const noexcept { return asked_; }
    /// The last partition claimed (workers resume their scan after it, for fairness).
    [[nodiscard]] std::uint32_t last_partition() const noexcept {
      return claims_.empty() ? 0 : claims_.back();
    }

   private:
    friend class fetcher;
    std::vector<queued_message> items_;
    std::vector<std::uint32_t> claims_;
    std::size_t size_ = 0;
    std::size_t asked_ = 0;
  };

  /// A producer's private path into every partition (one per producing thread).
  class producer {
   public:
    /// Tokens for every partition of `f`.
    explicit producer(fetcher& f) {
      tokens_.reserve(f.partitions_.size());
      for (auto& p : f.partitions_) tokens_.emplace_back(p->queue);
    }

   private:
    friend class fetcher;
    std::vector<typename queue_type::producer_token> tokens_;
  };

  /// `partitions` queues; demand state for `workers` worker slots.
  fetcher(std::size_t partitions, std::size_t workers, const demand_options& demand) {
    partitions_.reserve(partitions);
    for (std::size_t i = 0; i < partitions; ++i)
      partitions_.push_back(std::make_unique<partition>());
    demands_.reserve(workers);
    for (std::size_t i = 0; i < workers; ++i) demands_.emplace_back(demand);
  }

  /// Number of partitions.
  [[nodiscard]] std::size_t partitions() const noexcept { return partitions_.size(); }
  /// The partition a device's messages go to.
  [[nodiscard]] std::uint32_t partition_of(const shared_bytes& device_id) const noexcept {
    return static_cast<std::uint32_t>(std::hash<std::string_view>{}(device_id.view()) %
                                      partitions_.size());
  }
  /// The demand state of worker `id`.
  [[nodiscard]] Demand& demand(std::size_t id) noexcept { return demands_[id]; }

  /// Enqueues into partition `p` through the calling thread's implicit producer.
  void enqueue(std::uint32_t p, message&& m) {
    auto& part = *partitions_[p];
    queued_message q{std::move(m), part.tail.fetch_add(1, std::memory_order_acq_rel), p};
    // The ticket is taken: the enqueue must happen or the partition stalls at this gap, so an
    // out-of-memory enqueue is retried rather than abandoned.
    while (!part.queue.push(std::move(q))) std::this_thread::yield();
  }
  /// Enqueues into partition `p` through `prod`'s token.
  void enqueue(std::uint32_t p, message&& m, producer& prod) {
    auto& part = *partitions_[p];
    queued_message q{std::move(m), part.tail.fetch_add(1, std::memory_order_acq_rel), p};
    while (!part.queue.push(prod.tokens_[p], std::move(q))) std::this_thread::yield();
  }

  /// Total tickets handed out (every message ever accepted).
  [[nodiscard]] std::uint64_t tickets() const noexcept {
    std::uint64_t n = 0;
    for (const auto& p : partitions_) n += p->tail.load(std::memory_order_relaxed);
    return n;
  }

  /// Fills `b` with up to `demand(worker).demand()` in-order messages from partitions it claims,
  /// scanning from `start`. Returns the number fetched; the claims stay held until `release`.
  std::size_t fetch(std::size_t worker, batch& b, std::size_t start) {
    b.size_ = 0;
    b.asked_ = demands_[worker].demand();
    const std::size_t n = partitions_.size();
    for (std::size_t i = 0; i < n && b.size_ < b.asked_; ++i) {
      const auto index = static_cast<std::uint32_t>((start + i) % n);
      auto& part = *partitions_[index];
      if (!part.has_work() || !part.try_claim()) continue;
      const std::size_t got = pull(part, b.items_.data() + b.size_, b.asked_ - b.size_);
      if (got == 0) {
        part.release();
        continue;
      }
      b.size_ += got;
      b.claims_.push_back(index);
    }
    return b.size_;
  }

  /// Releases the claims of `b` and lets the worker's demand policy learn from the batch.
  void release(std::size_t worker, batch& b, const batch_feedback& feedback) {
    for (auto index : b.claims_) partitions_[index]->release();
    b.claims_.clear();
    demands_[worker].record(feedback);
  }

  /// Releases the claims of `b`, first putting messages [from, size) back at the front of their
  /// partitions (a stop deadline interrupted the batch).
  void give_back(batch& b, std::size_t from) {
    for (std::size_t i = from; i < b.size_; ++i) {
      auto& item = b.items_[i];
      auto& part = *partitions_[item.partition];
      // Rewind the partition so these come out first again (we still hold its claim).
      if (item.ticket < part.head.load(std::memory_order_relaxed)) {
        part.head.store(item.ticket, std::memory_order_relaxed);
      }
      hold(part, std::move(item));
    }
    for (auto index : b.claims_) partitions_[index]->release();
    b.claims_.clear();
    b.size_ = 0;
  }

  /// Removes the oldest ready message of partition `preferred` (else of any partition it can
  /// claim) into `out`. Returns false when no partition could give one right now.
  bool evict_one(std::uint32_t preferred, queued_message& out) {
    const std::size_t n = partitions_.size();
    for (std::size_t i = 0; i < n; ++i) {
      auto& part = *partitions_[(preferred + i) % n];
      if (!part.has_work() || !part.try_claim()) continue;
      const std::size_t got = pull(part, &out, 1);
      part.release();
      if (got == 1) return true;
    }
    return false;
  }

  /// Takes every message still held, partition by partition in order (call with no worker
  /// running and no producer pushing).
  void drain_into(std::vector<message>& out) {
    std::vector<queued_message> buffer(256);
    for (auto& p : partitions_) {
      auto& pending = p->pending;
      for (;;) {
        const std::size_t got = p->queue.pop_bulk(buffer.data(), buffer.size());
        if (got == 0) break;
        for (std::size_t i = 0; i < got; ++i) pending.push_back(std::move(buffer[i]));
      }
      std::sort(pending.begin(), pending.end(), by_ticket);
      for (auto& item : pending) out.push_back(std::move(item.msg));
      pending.clear();
      p->head.store(p->tail.load(std::memory_order_relaxed), std::memory_order_relaxed);
    }
  }

 private:
  struct partition {
    /// Next ticket to hand out; written by producers.
    alignas(64) std::atomic<std::uint64_t> tail{0};
    /// Next ticket to fetch; written only by the claim holder, read by scanners.
    alignas(64) std::atomic<std::uint64_t> head{0};
    std::atomic<bool> claimed{false};
    /// Messages popped ahead of their turn (another producer's earlier ticket was not popped
    /// yet), a min-heap on ticket (touched only by the claim holder).
    std::vector<queued_message> pending;
    queue_type queue;

    [[nodiscard]] bool has_work() const noexcept {
      return tail.load(std::memory_order_acquire) != head.load(std::memory_order_relaxed);
    }
    [[nodiscard]] bool try_claim() noexcept {
      return !claimed.load(std::memory_order_relaxed) &&
             !claimed.exchange(true, std::memory_order_acquire);
    }
    void release() noexcept { claimed.store(false, std::memory_order_release); }
  };

  static bool by_ticket(const queued_message& a, const queued_message& b) noexcept {
    return a.ticket < b.ticket;
  }
  // Heap order for `pending`: the smallest ticket on top.
  static bool later(const queued_message& a, const queued_message& b) noexcept {
    return a.ticket > b.ticket;
  }
  // Holds an out-of-order arrival in the partition's min-heap: each message costs O(log n),
  // however the producers interleave.
  static void hold(partition& part, queued_message&& item) {
    part.pending.push_back(std::move(item));
    std::push_heap(part.pending.begin(), part.pending.end(), later);
  }

  // Moves up to `max` messages, in ticket order starting at the partition's head, into `out`.
  // The caller holds the claim.
  std::size_t pull(partition& part, queued_message* out, std::size_t max) {
    std::uint64_t head = part.head.load(std::memory_order_relaxed);
    if (part.pending.empty()) {
      const std::size_t got = part.queue.pop_bulk(out, max);
      // Fast path: one producer per partition (or no interleaving) gives consecutive tickets.
      bool consecutive = true;
      for (std::size_t i = 0; i < got; ++i) {
        if (out[i].ticket != head + i) {
          consecutive = false;
          break;
        }
      }
      if (consecutive) {
        part.head.store(head + got, std::memory_order_relaxed);
        return got;
      }
      for (std::size_t i = 0; i < got; ++i) hold(part, std::move(out[i]));
    }
    auto& pending = part.pending;
    // The next ticket may still sit in the queue behind other producers' items: keep pulling
    // until it shows up or the queue is empty (then its producer is mid-enqueue and will notify).
    while (pending.empty() || pending.front().ticket != head) {
      const std::size_t got = part.queue.pop_bulk(out, max);
      if (got == 0) break;
      for (std::size_t i = 0; i < got; ++i) hold(part, std::move(out[i]));
    }
    std::size_t k = 0;
    while (k < max && !pending.empty() && pending.front().ticket == head + k) {
      std::pop_heap(pending.begin(), pending.end(), later);
      out[k++] = std::move(pending.back());
      pending.pop_back();
    }
    part.head.store(head + k, std::memory_order_relaxed);
    return k;
  }

  std::vector<std::unique_ptr<partition>> partitions_;
  std::vector<Demand> demands_;
};

}  // namespace devgate
