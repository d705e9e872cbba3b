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

/// The demand-driven fetcher: a passive coordinator, not a thread. Workers pull through it with
/// their demand; it hands each one up to that many messages in bulk, in order per partition.
///
/// Messages are partitioned by a hash of the device id. Each partition has its own queue, a
/// ticket counter producers take from (so arrival order across producer threads is fixed even
/// though the lock-free queue is FIFO only per producer), and a claim flag: a partition is
/// fetched and dispatched by at most one worker at a time, so per-device order survives any
/// number of workers coming and going. Where other workers exist, a worker holds one claim at
/// a time: its batch visits the partitions one after another (see `batch`), so other workers
/// dispatch other devices meanwhile.
template <queue_policy Queue, demand_policy Demand>
class fetcher {
  using queue_type = typename Queue::template queue<queued_message>;

 public:
  /// What a worker holds between `fetch` and `release`: the demand it announced, the messages
  /// taken so far, and the claims on the partitions it took them from. When other workers could
  /// take partitions this one has not reached (`fetch(..., spread = true)`), a batch is served
  /// one partition at a time: `fetch` claims the first partition with work and takes its share
  /// (up to the whole demand); after it is dispatched, `fetch_next` releases that partition and
  /// takes the next one's share. So a worker never holds a partition while it dispatches another
  /// one's messages, and different devices run in parallel on different workers. A lone worker
  /// (`spread = false`) takes every share in one pass and holds all those claims until
  /// `release`: nobody else could use them, and one run over many small shares is cheaper.
  class batch {
   public:
    /// A batch buffer for demands up to `max_demand`.
    explicit batch(std::size_t max_demand) : items_(max_demand) { held_.reserve(16); }
    /// The messages of the current share, in dispatch order per partition.
    [[nodiscard]] queued_message* begin() noexcept { return items_.data() + share_; }
    /// End of the current share.
    [[nodiscard]] queued_message* end() noexcept { return items_.data() + taken_; }
    /// How many messages the current share holds.
    [[nodiscard]] std::size_t size() const noexcept { return taken_ - share_; }
    /// How many messages the batch has taken so far, over every share.
    [[nodiscard]] std::size_t taken() const noexcept { return taken_; }
    /// The demand announced for this batch.
    [[nodiscard]] std::size_t asked() const noexcept { return asked_; }
    /// True when the last `fetch` found a partition whose next ticket was taken but whose
    /// message was not visible yet (its producer is mid-enqueue): work is coming, so the worker
    /// must look again rather than sleep.
    [[nodiscard]] bool in_flight() const noexcept { return in_flight_; }
    /// The last partition claimed (workers resume their scan after it, for fairness).
    [[nodiscard]] std::uint32_t last_partition() const noexcept { return last_; }

   private:
    friend class fetcher;
    std::vector<queued_message> items_;  // every share of the batch, one after another
    std::vector<std::uint32_t> held_;    // partitions claimed and not released yet
    std::size_t share_ = 0;              // where the current share begins in items_
    std::size_t taken_ = 0;
    std::size_t asked_ = 0;
    std::size_t start_ = 0;    // where this batch's scan began
    std::size_t scanned_ = 0;  // partitions this batch's scan has looked at
    std::uint32_t last_ = 0;
    bool spread_ = true;
    bool in_flight_ = false;
  };

  /// A producer's private path into every partition (one per producing thread), with the
  /// scratch space `enqueue_bulk` sorts a batch in (it grows to the largest batch, then stays).
  class producer {
   public:
    /// Tokens for every partition of `f`.
    explicit producer(fetcher& f) : count_(f.partitions_.size(), 0) {
      tokens_.reserve(f.partitions_.size());
      for (auto& p : f.partitions_) tokens_.emplace_back(p->queue);
    }

   private:
    friend class fetcher;
    std::vector<typename queue_type::producer_token> tokens_;
    std::vector<std::uint32_t> count_;    // per partition: messages of this batch (0 between)
    std::vector<std::uint32_t> touched_;  // partitions this batch uses, first-seen order
    std::vector<std::uint32_t> part_;     // per message of the batch: its partition
    std::vector<std::uint32_t> order_;    // message indices grouped by partition
  };

  /// `partitions` queues; demand state for `workers` worker slots.
  fetcher(std::size_t partitions, std::size_t workers, const demand_options& demand)
      : mask_((partitions & (partitions - 1)) == 0 ? partitions - 1 : 0) {
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
    const auto h = std::hash<std::string_view>{}(device_id.view());
    // A power-of-two count (the default 32) takes a mask instead of a 64-bit division.
    return static_cast<std::uint32_t>(
        mask_ != 0 || partitions_.size() == 1 ? h & mask_ : h % partitions_.size());
  }
  /// The demand state of worker `id`.
  [[nodiscard]] Demand& demand(std::size_t id) noexcept { return demands_[id]; }

  /// Enqueues into partition `p` through the calling thread's implicit producer.
  void enqueue(std::uint32_t p, message&& m) {
    auto& part = *partitions_[p];
    // seq_cst: the pipeline's wake-up pairs this RMW with the workers' seq_cst re-check of
    // `tail` (detail::eventcount::notify_one_after_sc_rmw).
    queued_message q{std::move(m), part.tail.fetch_add(1, std::memory_order_seq_cst), p};
    // The ticket is taken: the enqueue must happen or the partition stalls at this gap, so an
    // out-of-memory enqueue is retried rather than abandoned.
    while (!part.queue.push(std::move(q))) std::this_thread::yield();
  }
  /// Enqueues into partition `p` through `prod`'s token.
  void enqueue(std::uint32_t p, message&& m, producer& prod) {
    auto& part = *partitions_[p];
    queued_message q{std::move(m), part.tail.fetch_add(1, std::memory_order_seq_cst), p};
    while (!part.queue.push(prod.tokens_[p], std::move(q))) std::this_thread::yield();
  }

  /// Enqueues `msgs[0..n)` through `prod`, in order per partition: one ticket range and one bulk
  /// enqueue per partition the batch touches, instead of one of each per message. Consecutive
  /// messages of one device (a transport's read) are hashed once. Returns how many partitions
  /// the batch touched.
  std::size_t enqueue_bulk(message* msgs, std::size_t n, producer& prod) {
    if (prod.part_.size() < n) {
      prod.part_.resize(n);
      prod.order_.resize(n);
    }
    // Pass 1: the partition of each message, and how many each partition gets.
    const std::byte* last_id = nullptr;
    std::size_t last_size = 0;
    std::uint32_t last_p = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const auto& id = msgs[i].device_id;
      if (i == 0 || id.data() != last_id || id.size() != last_size) {
        last_id = id.data();
        last_size = id.size();
        last_p = partition_of(id);
      }
      prod.part_[i] = last_p;
      if (prod.count_[last_p]++ == 0) prod.touched_.push_back(last_p);
    }
    const std::size_t touched = prod.touched_.size();
    if (touched == 1) {
      // One device (or partition): the batch is already grouped.
      for (std::size_t i = 0; i < n; ++i) prod.order_[i] = static_cast<std::uint32_t>(i);
      enqueue_group(last_p, msgs, prod.order_.data(), n, prod);
    } else {
      // Pass 2: group the indices by partition (a counting sort, stable: order within a
      // partition is the batch's order), reusing count_ as each group's insertion point.
      std::uint32_t offset = 0;
      for (auto p : prod.touched_) {
        const auto c = prod.count_[p];
        prod.count_[p] = offset;
        offset += c;
      }
      for (std::size_t i = 0; i < n; ++i) {
        prod.order_[prod.count_[prod.part_[i]]++] = static_cast<std::uint32_t>(i);
      }
      // count_[p] is now the end of p's group; groups are laid out in touched_ order.
      std::uint32_t begin = 0;
      for (auto p : prod.touched_) {
        const auto end = prod.count_[p];
        enqueue_group(p, msgs, prod.order_.data() + begin, end - begin, prod);
        begin = end;
      }
    }
    for (auto p : prod.touched_) prod.count_[p] = 0;
    prod.touched_.clear();
    return touched;
  }

  /// Total tickets handed out (every message ever accepted).
  [[nodiscard]] std::uint64_t tickets() const noexcept {
    std::uint64_t n = 0;
    for (const auto& p : partitions_) n += p->tail.load(std::memory_order_relaxed);
    return n;
  }

  /// Starts a batch of up to `demand(worker).demand()` messages, scanning the partitions from
  /// `start`, and takes its first share (see `batch`; `spread`: other workers could take the
  /// partitions this one does not reach). Returns the share's size (0: nothing claimable). Its
  /// claims stay held until `fetch_next`, `release` or `give_back`.
  std::size_t fetch(std::size_t worker, batch& b, std::size_t start, bool spread = true) {
    b.share_ = 0;
    b.taken_ = 0;
    b.in_flight_ = false;
    b.asked_ = demands_[worker].demand();
    b.start_ = start;
    b.scanned_ = 0;
    b.spread_ = spread;
    return claim_next(b);
  }

  /// The current share was dispatched: releases its partition and goes on with the batch's scan,
  /// claiming the next partition with ready work for what is left of the demand. Returns the size
  /// of the new share (0: the demand is met or the scan went round every partition). It costs no
  /// extra claim: the scan claims each partition at most once per batch either way.
  std::size_t fetch_next(batch& b) {
    release_held(b);
    return claim_next(b);
  }

  /// True when partition `index` has messages nobody has fetched yet (a hint: no ordering).
  [[nodiscard]] bool has_work(std::uint32_t index) const noexcept {
    const auto& part = *partitions_[index];
    return part.tail.load(std::memory_order_relaxed) != part.head.load(std::memory_order_relaxed);
  }

  /// Ends the batch: releases the claims still held and lets the worker's demand policy learn
  /// from the whole batch.
  void release(std::size_t worker, batch& b, const batch_feedback& feedback) {
    release_held(b);
    demands_[worker].record(feedback);
  }

  /// Ends the batch early (a stop deadline interrupted it): puts its messages [from, taken)
  /// back at the front of their partitions (all still claimed: earlier shares were dispatched
  /// whole), then releases the claims.
  void give_back(batch& b, std::size_t from) {
    for (std::size_t i = from; i < b.taken_; ++i) {
      auto& item = b.items_[i];
      auto& part = *partitions_[item.partition];
      // Rewind the partition so these come out first again (we still hold its claim).
      if (item.ticket < part.head.load(std::memory_order_relaxed)) {
        part.head.store(item.ticket, std::memory_order_relaxed);
      }
      hold(part, std::move(item));
    }
    release_held(b);
    b.share_ = b.taken_ = from;
  }

  /// Prepares `give_back` when a batch sink took some of the current share's messages from
  /// index `from` on and not others: those with `undelivered(i)` (i counted from the share's
  /// start, i >= from) move, in order, to the end of the share, each onto the last tickets its
  /// partition's run in the share had, so no partition has a gap once they are handed back.
  /// Returns how many they are; hand them back with `give_back(b, b.taken() - count)`.
  template <class Undelivered>
  std::size_t gather_undelivered(batch& b, std::size_t from, Undelivered undelivered) {
    queued_message* share = b.items_.data() + b.share_;
    const std::size_t n = b.taken_ - b.share_;
    if (from >= n) return 0;
    // A share holds one run per partition it claimed (a lone worker's share may hold several),
    // each run one pull: consecutive tickets ending at the partition's head.
    for (std::size_t a = 0; a < n;) {
      std::size_t e = a + 1;
      while (e < n && share[e].partition == share[a].partition) ++e;
      std::size_t kept = 0;
      for (std::size_t j = std::max(a, from); j < e; ++j) kept += undelivered(j) ? 1 : 0;
      std::uint64_t ticket = share[e - 1].ticket - kept;
      for (std::size_t j = std::max(a, from); j < e; ++j) {
        if (undelivered(j)) share[j].ticket = ++ticket;
      }
      a = e;
    }
    std::size_t back = n;  // the undelivered fill [back, n), in their order
    for (std::size_t j = n; j-- > from;) {
      if (!undelivered(j)) continue;
      --back;
      if (back != j) share[back] = std::move(share[j]);
    }
    return n - back;
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

    // seq_cst: a worker's re-check after announcing it will sleep must be ordered with the
    // producers' ticket RMW (see enqueue).
    [[nodiscard]] bool has_work() const noexcept {
      return tail.load(std::memory_order_seq_cst) != head.load(std::memory_order_relaxed);
    }
    [[nodiscard]] bool try_claim() noexcept {
      return !claimed.load(std::memory_order_relaxed) &&
             !claimed.exchange(true, std::memory_order_acquire);
    }
    void release() noexcept { claimed.store(false, std::memory_order_release); }
  };

  // Continues `b`'s scan: claims the next partition with ready work and pulls its share of what
  // is left of the demand into `b` (a lone worker goes on to every partition in this one pass).
  std::size_t claim_next(batch& b) {
    b.share_ = b.taken_;
    const std::size_t n = partitions_.size();
    while (b.scanned_ < n && b.taken_ < b.asked_) {
      const auto index = static_cast<std::uint32_t>((b.start_ + b.scanned_++) % n);
      auto& part = *partitions_[index];
      if (!part.has_work() || !part.try_claim()) continue;
      const std::size_t got = pull(part, b.items_.data() + b.taken_, b.asked_ - b.taken_);
      if (got == 0) {
        part.release();
        b.in_flight_ = true;
        continue;
      }
      b.taken_ += got;
      b.held_.push_back(index);
      b.last_ = index;
      if (b.spread_) break;
    }
    return b.taken_ - b.share_;
  }

  void release_held(batch& b) noexcept {
    for (auto index : b.held_) partitions_[index]->release();
    b.held_.clear();
  }

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

  // Reads messages msgs[index[0]], msgs[index[1]], ... as queued_message prvalues with
  // consecutive tickets, so the bulk enqueue constructs each slot by one move.
  class staging_iterator {
   public:
    staging_iterator(message* msgs, const std::uint32_t* index, std::uint64_t ticket,
                     std::uint32_t p) noexcept
        : msgs_(msgs), index_(index), ticket_(ticket), partition_(p) {}
    queued_message operator*() const noexcept {
      return queued_message{std::move(msgs_[*index_]), ticket_, partition_};
    }
    staging_iterator& operator++() noexcept {
      ++index_;
      ++ticket_;
      return *this;
    }
    staging_iterator operator++(int) noexcept {
      auto before = *this;
      ++*this;
      return before;
    }

   private:
    message* msgs_;
    const std::uint32_t* index_;
    std::uint64_t ticket_;
    std::uint32_t partition_;
  };

  // One partition's share of a bulk enqueue: one ticket range, one bulk enqueue.
  void enqueue_group(std::uint32_t p, message* msgs, const std::uint32_t* index, std::size_t k,
                     producer& prod) {
    auto& part = *partitions_[p];
    auto ticket = part.tail.fetch_add(k, std::memory_order_seq_cst);  // seq_cst: see enqueue
    if constexpr (bulk_queue<queue_type, queued_message>) {
      // The tickets are taken: the enqueue must happen (see enqueue), so out of memory retries.
      while (!part.queue.push_bulk(prod.tokens_[p], staging_iterator(msgs, index, ticket, p), k)) {
        std::this_thread::yield();
      }
    } else {
      for (std::size_t i = 0; i < k; ++i, ++ticket) {
        queued_message q{std::move(msgs[index[i]]), ticket, p};
        while (!part.queue.push(prod.tokens_[p], std::move(q))) std::this_thread::yield();
      }
    }
  }

  std::vector<std::unique_ptr<partition>> partitions_;
  std::vector<Demand> demands_;
  std::size_t mask_;  // partitions - 1 when that is a power of two, else 0 (use %)
};

}  // namespace devgate
