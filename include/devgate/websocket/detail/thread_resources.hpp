#pragma once

#include <asio.hpp>

#include <cstddef>  // std::byte, std::size_t
#include <memory>   // pooled objects, the read buffer
#include <span>     // the read buffer
#include <vector>   // pools

#include "devgate/transport/transport.hpp"
#include "devgate/websocket/detail/core.hpp"
#include "devgate/websocket/detail/out_queue.hpp"
#include "devgate/websocket/detail/read_batch.hpp"
#include "devgate/websocket/reader.hpp"

namespace devgate::websocket::detail {

class session;

/// What a worker thread lends the sessions it runs, and all a session sees of its worker: the
/// io_context it posts to, the read buffer and the write being assembled (both shared by every
/// session of the thread, since a session reads and writes synchronously), the batch of messages
/// being delivered, and pools of frame readers and outbound queues, so that busy sessions do not
/// allocate one per read or write burst and idle sessions hold none. The reactor (reactor.hpp)
/// is a thread_resources with the epoll set, the registry and the timer around it.
struct thread_resources {
  static constexpr std::size_t read_buffer_size = 64u * 1024u;
  static constexpr std::size_t pool_size = 64;  // readers and queues kept for reuse

  /// Called by a session as it finishes (on this thread, its socket still open): the reactor
  /// takes it out of its epoll set and registry and keeps it alive until the current event
  /// batch ends.
  using retire_fn = void (*)(thread_resources&, session&);

  thread_resources(server_core& c, retire_fn on_retire)
      : core(c), retire(on_retire), read_buffer(new std::byte[read_buffer_size]) {}
  thread_resources(const thread_resources&) = delete;
  thread_resources& operator=(const thread_resources&) = delete;

  server_core& core;
  asio::io_context ioc{1};
  retire_fn retire;
  std::unique_ptr<std::byte[]> read_buffer;
  clock::time_point read_time{};  // when the current read burst arrived (message timestamps)
  gather write;                   // the write being assembled (one at a time per thread)
  read_batch batch;               // the messages of the read being delivered
  std::vector<std::unique_ptr<websocket::frame_reader>> reader_pool;
  std::vector<std::unique_ptr<out_queue>> queue_pool;
  std::size_t pending_authentications = 0;  // upgrades waiting for server_options::authenticate

  /// The read buffer every session of this thread reads into.
  [[nodiscard]] std::span<std::byte> buffer() const noexcept {
    return {read_buffer.get(), read_buffer_size};
  }
  /// True on this worker's thread (inside its io_context's run()).
  [[nodiscard]] bool on_this_thread() noexcept {
    return ioc.get_executor().running_in_this_thread();
  }
  /// A frame reader for a session with a frame or message in progress.
  std::unique_ptr<websocket::frame_reader> take_reader() {
    if (reader_pool.empty()) {
      return std::make_unique<websocket::frame_reader>(core.options.reader);
    }
    auto r = std::move(reader_pool.back());
    reader_pool.pop_back();
    return r;
  }
  /// Returns a reader: kept when it is idle and healthy, freed otherwise.
  void give_reader(std::unique_ptr<websocket::frame_reader> r) {
    if (r && r->idle() && !r->finished() && reader_pool.size() < pool_size)
      reader_pool.push_back(std::move(r));
  }
  /// An empty outbound queue for a session with something to write.
  std::unique_ptr<out_queue> take_queue() {
    if (queue_pool.empty()) return std::make_unique<out_queue>();
    auto q = std::move(queue_pool.back());
    queue_pool.pop_back();
    return q;
  }
  /// Returns a queue (emptied).
  void give_queue(std::unique_ptr<out_queue> q) {
    if (!q) return;
    q->clear();
    if (queue_pool.size() < pool_size) queue_pool.push_back(std::move(q));
  }
};

}  // namespace devgate::websocket::detail
