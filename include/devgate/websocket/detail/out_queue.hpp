#pragma once

#include <sys/uio.h>  // iovec

#include <algorithm>  // std::min
#include <array>      // frame headers, iovecs
#include <cstddef>    // std::byte, std::size_t
#include <cstdint>    // compact fields
#include <cstring>    // memcpy into the scratch run
#include <memory>     // the scratch run
#include <span>       // payload views, iovecs
#include <utility>    // std::move
#include <vector>     // the FIFOs

#include "devgate/core/bytes.hpp"
#include "devgate/websocket/frame.hpp"

namespace devgate::websocket::detail {

/// Outbound messages larger than this are sent as fragments of this size (RFC 6455 5.4), so a
/// ping, pong or close waits behind at most one write, never behind a whole 16 MiB frame.
inline constexpr std::size_t fragment_size = 64u * 1024u;

/// Bytes of the unmasked header of a server frame with `len` payload bytes (RFC 6455 5.2).
[[nodiscard]] constexpr std::size_t frame_header_size(std::size_t len) noexcept {
  return len <= 125 ? 2 : len <= 0xFFFF ? 4 : 10;
}

/// Wire bytes of a data message of `len` payload bytes sent as `fragment_size` fragments (at
/// least one frame: an empty message is a 2-byte frame).
[[nodiscard]] constexpr std::size_t wire_size(std::size_t len) noexcept {
  const std::size_t full = len / fragment_size;
  const std::size_t last = len % fragment_size;
  std::size_t total = len + full * frame_header_size(fragment_size);
  if (last > 0 || full == 0) total += frame_header_size(last);
  return total;
}

/// Something waiting to be written, in one of two forms:
/// - a whole data message (`lazy`): its payload, shared and never copied (a broadcast's
///   recipients all point at one buffer), cut into frames of at most `fragment_size` whose
///   headers are encoded while it is written, so a message is one queue entry whatever its size;
/// - literal bytes, `head` then `body`: control frames, HTTP responses, and the one frame of a
///   data message that a full socket buffer cut in the middle.
struct out_frame {
  /// What the frame is: `data` and `raw` (HTTP response) bytes count against the session's
  /// outbound limit, control and close frames do not.
  enum kind_t : std::uint8_t { data, control, close, raw };
  shared_bytes body;
  std::array<std::byte, 10> head{};  // literal only; RFC 6455 5.2: at most 10 bytes
  std::uint8_t head_len = 0;
  kind_t kind = data;
  websocket::opcode op = websocket::opcode::binary;  // lazy: the opcode of its next frame
  bool lazy = false;
  /// Bytes it puts on the wire (for a lazy message, what is left of it).
  [[nodiscard]] std::size_t size() const noexcept {
    return lazy ? wire_size(body.size()) : head_len + body.size();
  }
};

/// A data message for the queue: the payload shared, headers encoded while it is written.
[[nodiscard]] inline out_frame message_frame(websocket::opcode op, shared_bytes payload) noexcept {
  out_frame m;
  m.body = std::move(payload);
  m.op = op;
  m.lazy = true;
  return m;
}

/// Literal bytes of `kind` (an encoded control frame, or HTTP response bytes).
[[nodiscard]] inline out_frame literal_frame(out_frame::kind_t kind, shared_bytes bytes) noexcept {
  out_frame f;
  f.body = std::move(bytes);
  f.kind = kind;
  return f;
}

/// One gather write being assembled on a worker thread: small pieces (frame headers, small
/// payloads) are copied into one contiguous scratch run, so a burst of 64-byte replies is one
/// iovec instead of two per frame; large payloads are referenced where they are (never copied).
/// The write is synchronous, so the scratch is free again when the write returns.
struct gather {
  static constexpr std::size_t max_iov = 64;                // iovecs per write
  static constexpr std::size_t scratch_size = 16u * 1024u;  // copied bytes per write
  static constexpr std::size_t copy_limit = 512;            // larger pieces are referenced
  static constexpr std::size_t max_bytes = 2048u * 1024u;   // stop adding frames past this

  std::array<::iovec, max_iov> iov;
  std::unique_ptr<std::byte[]> scratch{new std::byte[scratch_size]};
  std::size_t count = 0;  // iovecs used
  std::size_t used = 0;   // scratch bytes used
  std::size_t bytes = 0;  // total bytes in the write
  bool run_open = false;  // iov[count - 1] is the scratch run and may grow

  /// The iovecs assembled so far.
  [[nodiscard]] std::span<const ::iovec> iovecs() const noexcept { return {iov.data(), count}; }
  /// Starts an empty write.
  void reset() noexcept { count = used = bytes = 0, run_open = false; }
  /// Adds one frame from byte `skip` (a lazy message: as many of its frames as fit); false when
  /// not all of it fits, so that the caller adds nothing after it.
  bool add(const out_frame& f, std::size_t skip) noexcept {
    if (f.lazy) return add_message(f.op, f.body.bytes());
    if (count + 2 > max_iov || (bytes > 0 && bytes + f.size() - skip > max_bytes)) return false;
    if (skip < f.head_len) {
      piece(f.head.data() + skip, f.head_len - skip);
      skip = 0;
    } else {
      skip -= f.head_len;
    }
    if (skip < f.body.size()) piece(f.body.data() + skip, f.body.size() - skip);
    return true;
  }
  /// Adds a data message (`op` for its first frame) as frames of at most `fragment_size`;
  /// false when not all of it fits.
  bool add_message(websocket::opcode op, std::span<const std::byte> body) noexcept {
    const std::size_t total = body.size();
    std::size_t off = 0;
    do {
      const std::size_t len = std::min(fragment_size, total - off);
      const bool fin = off + len == total;
      // The header is encoded here, so it must land in the scratch run.
      if (count + 2 > max_iov || used + 10 > scratch_size ||
          (bytes > 0 && bytes + frame_header_size(len) + len > max_bytes)) {
        return false;
      }
      std::array<std::byte, 10> head;
      piece(head.data(), websocket::encode_frame_header(head, op, fin, len));
      if (len > 0) piece(body.data() + off, len);
      off += len;
      op = websocket::opcode::continuation;
    } while (off < total);
    return true;
  }

 private:
  void piece(const std::byte* p, std::size_t n) noexcept {
    bytes += n;
    if (n <= copy_limit && used + n <= scratch_size) {
      std::memcpy(scratch.get() + used, p, n);
      if (run_open) {
        iov[count - 1].iov_len += n;
      } else {
        iov[count++] = {scratch.get() + used, n};
        run_open = true;
      }
      used += n;
      return;
    }
    iov[count++] = {const_cast<std::byte*>(p), n};  // iovec is not const-correct; only read
    run_open = false;
  }
};

/// A session's outbound queue, allocated only while something waits to be written (idle sessions
/// hold a null pointer) and recycled through a per-worker pool. Writes are synchronous and
/// non-blocking, so nothing is "in flight": a frame is either queued, written, or the one
/// `partial` frame a full socket buffer cut in the middle.
///
/// Order on the wire: the partial frame, then control frames (they jump ahead of data, but only
/// at frame boundaries), then the data FIFO. A close that answers the peer goes at the end of
/// the data FIFO, after the replies queued before it.
struct out_queue {
  std::vector<out_frame> control;  // FIFO; jumps ahead of data at frame boundaries
  std::vector<out_frame> data;     // FIFO from data_head: lazy messages, maybe a last close
  std::size_t data_head = 0;
  out_frame partial;  // written up to `offset`; goes first in the next write
  std::size_t offset = 0;
  bool has_partial = false;
  bool mid_message = false;  // the last data frame a write started was not its message's last

  /// No data message waits (a partial frame may).
  [[nodiscard]] bool data_empty() const noexcept { return data_head == data.size(); }
  /// Nothing waits to be written.
  [[nodiscard]] bool empty() const noexcept {
    return control.empty() && data_empty() && !has_partial;
  }
  /// Forgets everything (the queue goes back to its pool).
  void clear() noexcept {
    control.clear();
    data.clear();
    data_head = 0;
    partial = {};
    offset = 0;
    has_partial = false;
    mid_message = false;
  }

  /// Queues an encoded pong. RFC 6455 5.5.3 allows answering only the most recent ping, so a
  /// pong still waiting is replaced (a ping flood from a peer that does not read cannot grow
  /// the queue); true when the pong was added rather than replaced.
  bool push_pong(shared_bytes pong) {
    for (auto& f : control) {
      if (f.kind == out_frame::control && f.body.size() > 1 &&
          (static_cast<std::uint8_t>(f.body.data()[0]) & 0x0F) == 0xA) {
        f.body = std::move(pong);
        return false;
      }
    }
    control.push_back(literal_frame(out_frame::control, std::move(pong)));
    return true;
  }

  /// Queues an encoded close frame after every data message queued so far, as the data FIFO's
  /// last entry (a close that answers the peer goes after the replies to its messages).
  void push_close_after_data(shared_bytes frame) {
    data.push_back(literal_frame(out_frame::close, std::move(frame)));
  }

  /// Drops the data messages no write has started (RFC 6455 5.5.1: no data after a close);
  /// returns the bytes they had reserved.
  std::size_t drop_unstarted_data() noexcept {
    std::size_t reserved = 0;
    for (std::size_t i = data_head; i < data.size(); ++i) {
      if (data[i].kind == out_frame::data) reserved += data[i].size();
    }
    data.clear();
    data_head = 0;
    return reserved;
  }

  /// True when the oldest data message may be dropped: no write has started it and it is not
  /// the newest.
  [[nodiscard]] bool can_drop_oldest() const noexcept {
    return !mid_message && data_head + 1 < data.size() && data[data_head].kind == out_frame::data &&
           data[data_head].lazy;
  }
  /// Drops the oldest data message (see can_drop_oldest); returns the bytes it had reserved.
  std::size_t drop_oldest() noexcept {
    const std::size_t n = data[data_head].size();
    data[data_head++] = {};
    return n;
  }

  /// Assembles the next write into `g`, in wire order, up to what one write takes.
  void fill(gather& g) const noexcept {
    g.reset();
    bool fits = !has_partial || g.add(partial, offset);
    for (std::size_t i = 0; fits && i < control.size(); ++i) fits = g.add(control[i], 0);
    for (std::size_t i = data_head; fits && i < data.size(); ++i) fits = g.add(data[i], 0);
  }

  /// Removes the first `n` bytes that fill() put in the write, which the socket took; the frame
  /// cut short becomes `partial`. Returns the data and HTTP bytes written (to give back to the
  /// limit).
  std::size_t consume(std::size_t n) noexcept;
};

inline std::size_t out_queue::consume(std::size_t n) noexcept {
  std::size_t released = 0;
  auto done = [&](out_frame& f) {
    if (f.kind == out_frame::data || f.kind == out_frame::raw) released += f.size();
    f = {};
  };
  if (has_partial) {
    const std::size_t rest = partial.size() - offset;
    if (n < rest) {
      offset += n;
      return 0;
    }
    n -= rest;
    done(partial);
    has_partial = false;
    offset = 0;
  }
  std::size_t c = 0;
  for (; c < control.size() && n > 0; ++c) {
    auto& f = control[c];
    if (n < f.size()) {
      partial = std::move(f);
      offset = n;
      has_partial = true;
      n = 0;
    } else {
      n -= f.size();
      done(f);
    }
  }
  control.erase(control.begin(), control.begin() + static_cast<std::ptrdiff_t>(c));
  // Lazy messages: walk their frames as fill() encoded them.
  while (!data_empty() && n > 0) {
    auto& m = data[data_head];
    if (!m.lazy) {  // the close queued after the data
      if (n < m.size()) {
        partial = std::move(m);
        offset = n;
        has_partial = true;
        n = 0;
      } else {
        n -= m.size();
        done(m);
      }
      m = {};
      ++data_head;
      continue;
    }
    const std::size_t left = m.body.size();
    const std::size_t len = std::min(fragment_size, left);
    const bool fin = len == left;
    const std::size_t frame = frame_header_size(len) + len;
    mid_message = !fin;
    if (n < frame) {
      // Cut in the middle: this frame becomes literal bytes, the message keeps the rest.
      partial.head_len =
          static_cast<std::uint8_t>(websocket::encode_frame_header(partial.head, m.op, fin, len));
      partial.body = fin ? std::move(m.body) : m.body.slice(0, len);
      partial.kind = out_frame::data;
      partial.lazy = false;
      offset = n;
      has_partial = true;
      n = 0;
    } else {
      n -= frame;
      released += frame;
    }
    if (fin) {
      m = {};
      ++data_head;
    } else {
      m.body = m.body.slice(len, left - len);
      m.op = websocket::opcode::continuation;
    }
  }
  if (data_empty()) {
    data.clear();
    data_head = 0;
  } else if (data_head > 64 && data_head * 2 > data.size()) {
    data.erase(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(data_head));
    data_head = 0;
  }
  return released;
}

}  // namespace devgate::websocket::detail
