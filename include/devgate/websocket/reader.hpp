#pragma once

#include <algorithm>    // std::min, std::max
#include <array>        // header and control buffers
#include <concepts>     // frame_handler
#include <cstddef>      // std::byte, std::size_t
#include <cstdint>      // lengths, codes
#include <cstring>      // std::memcpy
#include <memory>       // std::unique_ptr (message in assembly)
#include <span>         // input, control payloads
#include <string_view>  // close reasons

#include "devgate/core/bytes.hpp"
#include "devgate/transport/transport.hpp"  // payload_kind, close_code
#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/utf8.hpp"

namespace devgate::websocket {

/// Which end of the connection a reader serves. RFC 6455 5.1: a server must fail a connection
/// on an unmasked frame, and a client must fail one on a masked frame.
enum class reader_role : std::uint8_t {
  server,  ///< Frames must be masked (the default: devgate's server).
  client,  ///< Frames must be unmasked (devgate's C++ device client).
};

/// Limits the frame reader enforces.
struct reader_limits {
  /// Largest message (all fragments together) accepted; larger ones fail with 1009 as soon as
  /// a frame header announces them, before any of the payload is buffered. Also bounds what a
  /// single connection can make the server hold in memory.
  std::size_t max_message_size = 16u << 20;
  /// Most frames one message may take (its first frame and continuations); one more fails with
  /// 1008 at that frame's header. Fragments cost the server a header to parse and a call each,
  /// so a message of millions of empty fragments is work without payload; senders that
  /// fragment use large pieces (devgate's own sides cut at 64 KiB: 256 for 16 MiB). Raise it
  /// with max_message_size if peers send big messages in small pieces.
  std::uint32_t max_fragments = 1024;
  /// Server (masked frames required) or client (unmasked frames required).
  reader_role role = reader_role::server;
};

/// Result of `frame_reader::consume`.
enum class read_status {
  ok,     ///< All input consumed (events delivered; after a close frame the rest is ignored).
  error,  ///< The peer broke the protocol: close with `frame_reader::error()`.
};

/// What `frame_reader::consume` calls, in the order frames arrive.
template <class H>
concept frame_handler = requires(H& h, payload_kind k, shared_bytes b, std::span<const std::byte> s,
                                 std::uint16_t code, std::string_view reason) {
  h.on_message(k, std::move(b));  // a whole text or binary message
  h.on_ping(s);                   // ping payload (answer with a pong carrying it, 5.5.2)
  h.on_pong(s);                   // pong payload
  h.on_close(code, reason);       // close frame: code 1005 if it had none (7.1.5)
};

/// The per-connection inbound protocol state machine of a WebSocket server (RFC 6455 5 and 6.2).
///
/// Feed it whatever the socket produced; it unmasks, checks every rule a server must enforce,
/// reassembles fragmented messages, validates text incrementally and calls the handler.
/// Memory: the object is small (see `sizeof`), and holds heap memory only while a message or
/// a split control frame is in flight — an idle connection costs nothing more.
class frame_reader {
 public:
  /// A reader enforcing `limits`.
  explicit frame_reader(reader_limits limits = {}) noexcept : limits_(limits) {}

  /// Consumes ALL of `data`, unmasking it in place (hence mutable). Partial headers and partial
  /// messages are kept inside the reader between calls, so the caller may reuse its read
  /// buffer. Calls `handler` events in order. On a protocol violation returns
  /// `read_status::error`, and `error()` gives the close code to send:
  /// 1002 unmasked frame, RSV bits set, reserved opcode, control frame over 125 bytes or
  /// fragmented, continuation without a start, new data frame inside a fragmented message,
  /// 64-bit length with the top bit set, close payload of 1 byte or with an invalid code;
  /// 1007 invalid UTF-8 in a text message (detected at the first bad byte) or close reason;
  /// 1008 message of more than `max_fragments` frames (at the header of the one too many);
  /// 1009 message over `max_message_size` (from the header, before buffering).
  /// After `on_close` or an error, further input is ignored.
  template <class Handler>
  requires frame_handler<Handler> read_status consume(std::span<std::byte> data, Handler& handler);

  /// The close code to send after `consume` returned `error` (`close_code{}` before that).
  [[nodiscard]] close_code error() const noexcept { return error_; }

  /// True when nothing is buffered: no partial header, no message or control frame in flight,
  /// no heap memory held.
  [[nodiscard]] bool idle() const noexcept {
    return state_ != state::payload && hdr_len_ == 0 && !in_message_ && !assembly_;
  }

  /// True once a close frame was received or an error found (input is ignored from then on).
  [[nodiscard]] bool finished() const noexcept { return state_ == state::done; }

 private:
  enum class state : std::uint8_t { header, payload, done };

  // Heap state of a message or control frame in flight. The message lives in a shared_bytes
  // created by shared_bytes::build, whose mutable span we keep writing through until we hand
  // the buffer over; no one else can see it before then, so it is immutable once shared.
  struct assembly {
    shared_bytes storage;
    std::byte* data = nullptr;  // writable view of storage
    std::size_t size = 0;       // message bytes so far
    std::size_t capacity = 0;
    std::array<std::byte, max_control_payload> control;  // a control frame split across reads
    std::uint8_t control_len = 0;
  };

  // Up-front allocation bound for a frame whose payload is still to come: a peer announcing a
  // 16 MiB frame and then stalling makes us hold at most this much until more bytes arrive.
  static constexpr std::size_t prealloc_bound = 64u << 10;

  read_status fail(close_code code) noexcept {
    error_ = code;
    state_ = state::done;
    in_message_ = false;
    hdr_len_ = 0;
    assembly_.reset();
    return read_status::error;
  }

  template <class Handler>
  read_status begin_frame(const frame_header& fh, Handler& handler);
  template <class Handler>
  read_status on_payload(std::span<std::byte> chunk, bool whole_frame, Handler& handler);
  template <class Handler>
  read_status deliver_control(std::span<const std::byte> payload, Handler& handler);
  template <class Handler>
  read_status finish_message(Handler& handler);
  void append_message(std::span<const std::byte> chunk);

  reader_limits limits_;
  std::unique_ptr<assembly> assembly_;  // only while something is in flight
  std::uint64_t remaining_ = 0;         // payload bytes of the current frame still to come
  std::array<std::byte, max_frame_header_size> hdr_{};  // a header split across reads
  std::array<std::byte, 4> key_{};                      // current frame's masking key
  utf8_validator utf8_;                                 // text message validation, across fragments
  close_code error_{};
  std::uint32_t fragments_ = 0;  // frames of the current message so far
  state state_ = state::header;
  std::uint8_t hdr_len_ = 0;
  opcode op_ = opcode::continuation;  // current frame's opcode
  // One byte for these (sizeof stays within 64 with the fragment count).
  std::uint8_t mask_pos_ : 2 = 0;  // payload offset of the next byte, mod 4
  bool fin_ : 1 = false;           // current frame is final
  bool partial_ : 1 = false;       // part of the current frame's payload was consumed
  bool in_message_ : 1 = false;    // a fragmented message is in progress
  bool text_ : 1 = false;          // the message in progress is text
};

// ---- implementation ---------------------------------------------------------------------------

template <class Handler>
requires frame_handler<Handler> read_status frame_reader::consume(std::span<std::byte> data,
                                                                  Handler& handler) {
  std::byte* p = data.data();
  std::size_t n = data.size();
  while (n > 0 && state_ != state::done) {
    if (state_ == state::header) {
      frame_header fh;
      if (hdr_len_ == 0) {
        // Common case: the whole header is in this read; decode it in place.
        const std::size_t used = decode_frame_header({p, n}, fh);
        if (used == 0) {  // n < 14 here
          std::memcpy(hdr_.data(), p, n);
          hdr_len_ = static_cast<std::uint8_t>(n);
          return read_status::ok;
        }
        p += used;
        n -= used;
      } else {
        const std::size_t take = std::min(n, max_frame_header_size - hdr_len_);
        std::memcpy(hdr_.data() + hdr_len_, p, take);
        const std::size_t used =
            decode_frame_header(std::span<const std::byte>(hdr_.data(), hdr_len_ + take), fh);
        if (used == 0) {
          hdr_len_ = static_cast<std::uint8_t>(hdr_len_ + take);
          p += take;
          n -= take;
          continue;
        }
        const std::size_t from_input = used - hdr_len_;
        p += from_input;
        n -= from_input;
        hdr_len_ = 0;
      }
      if (begin_frame(fh, handler) == read_status::error) return read_status::error;
    } else {
      const std::size_t take = static_cast<std::size_t>(std::min<std::uint64_t>(remaining_, n));
      const bool whole_frame = !partial_ && take == remaining_;
      if (limits_.role == reader_role::server) apply_mask({p, take}, key_, mask_pos_);  // 5.3
      mask_pos_ = static_cast<std::uint8_t>((mask_pos_ + take) & 3u);
      remaining_ -= take;
      partial_ = remaining_ != 0;
      if (on_payload({p, take}, whole_frame, handler) == read_status::error) {
        return read_status::error;
      }
      p += take;
      n -= take;
    }
  }
  return error_ == close_code{} ? read_status::ok : read_status::error;
}

template <class Handler>
read_status frame_reader::begin_frame(const frame_header& fh, Handler& handler) {
  // RFC 6455 5.2: RSV1-3 must be 0 unless an extension defines them (we negotiate none).
  if (fh.rsv != 0) return fail(close_code::protocol_error);
  // 5.2: reserved opcodes fail the connection.
  if (!is_known_opcode(fh.op)) return fail(close_code::protocol_error);
  // 5.1: a server MUST close on an unmasked client frame, a client on a masked server frame.
  if (fh.masked != (limits_.role == reader_role::server)) return fail(close_code::protocol_error);
  // 5.2: the most significant bit of the 64-bit length MUST be 0.
  if (fh.payload_length >> 63) return fail(close_code::protocol_error);
  if (is_control(fh.op)) {
    // 5.5: control frames carry at most 125 bytes and are never fragmented (they may arrive
    // between the fragments of a message, 5.4).
    if (fh.payload_length > max_control_payload || !fh.fin) {
      return fail(close_code::protocol_error);
    }
  } else {
    // 5.4: a continuation needs a message in progress; text/binary must not start a new one
    // inside a fragmented message.
    if ((fh.op == opcode::continuation) != in_message_) return fail(close_code::protocol_error);
    const std::size_t so_far = assembly_ ? assembly_->size : 0;
    if (fh.payload_length > limits_.max_message_size - so_far) {
      return fail(close_code::message_too_big);  // 7.4.1: 1009, before buffering a byte
    }
    fragments_ = fh.op == opcode::continuation ? fragments_ + 1 : 1;
    if (fragments_ > limits_.max_fragments) return fail(close_code::policy_violation);
    if (fh.op != opcode::continuation) {
      text_ = fh.op == opcode::text;
      if (text_) utf8_.reset();
    }
  }
  op_ = fh.op;
  fin_ = fh.fin;
  key_ = fh.mask_key;
  mask_pos_ = 0;
  partial_ = false;
  remaining_ = fh.payload_length;
  if (remaining_ != 0) {
    state_ = state::payload;
    return read_status::ok;
  }
  // An empty frame is complete already.
  if (is_control(op_)) return deliver_control({}, handler);
  if (!fin_) {
    in_message_ = true;
    return read_status::ok;
  }
  return finish_message(handler);
}

template <class Handler>
read_status frame_reader::on_payload(std::span<std::byte> chunk, bool whole_frame,
                                     Handler& handler) {
  const bool frame_done = remaining_ == 0;
  if (frame_done) state_ = state::header;
  if (is_control(op_)) {
    if (whole_frame) return deliver_control(chunk, handler);  // straight from the read buffer
    if (!assembly_) assembly_ = std::make_unique<assembly>();
    std::memcpy(assembly_->control.data() + assembly_->control_len, chunk.data(), chunk.size());
    assembly_->control_len = static_cast<std::uint8_t>(assembly_->control_len + chunk.size());
    if (!frame_done) return read_status::ok;
    const std::span<const std::byte> payload(assembly_->control.data(), assembly_->control_len);
    assembly_->control_len = 0;
    return deliver_control(payload, handler);
  }
  // 8.1: fail fast on invalid text, at the first bad byte even mid-frame.
  if (text_ && !utf8_.feed(chunk)) return fail(close_code::invalid_payload);
  if (whole_frame && fin_ && op_ != opcode::continuation) {
    // An unfragmented message that arrived in one read: the one copy, of the exact size.
    if (text_ && !utf8_.complete()) return fail(close_code::invalid_payload);
    handler.on_message(text_ ? payload_kind::text : payload_kind::binary,
                       shared_bytes::copy_of(chunk));
    return read_status::ok;
  }
  append_message(chunk);
  if (!frame_done) return read_status::ok;
  if (!fin_) {
    in_message_ = true;
    return read_status::ok;
  }
  return finish_message(handler);
}

inline void frame_reader::append_message(std::span<const std::byte> chunk) {
  if (!assembly_) assembly_ = std::make_unique<assembly>();
  assembly& a = *assembly_;
  const std::size_t need = a.size + chunk.size();
  if (need > a.capacity) {
    // Grow: to the end of this frame when that is near, geometrically otherwise, but never past
    // a known end of the message (final frame) nor past max_message_size.
    const std::size_t frame_left = chunk.size() + static_cast<std::size_t>(remaining_);
    std::size_t want = a.size + std::min(frame_left, std::max(chunk.size(), prealloc_bound));
    const std::size_t ceiling = fin_ ? a.size + frame_left : limits_.max_message_size;
    want = std::max(want, std::min(a.capacity * 2, ceiling));
    std::byte* fresh = nullptr;
    shared_bytes grown = shared_bytes::build(want, [&](std::span<std::byte> out) {
      fresh = out.data();
      if (a.size != 0) std::memcpy(fresh, a.data, a.size);
    });
    a.storage = std::move(grown);
    a.data = fresh;
    a.capacity = want;
  }
  if (!chunk.empty()) std::memcpy(a.data + a.size, chunk.data(), chunk.size());
  a.size = need;
}

template <class Handler>
read_status frame_reader::finish_message(Handler& handler) {
  in_message_ = false;
  if (text_ && !utf8_.complete()) return fail(close_code::invalid_payload);  // 8.1
  shared_bytes message;
  if (assembly_) {
    assembly& a = *assembly_;
    // Hand the buffer over without copying unless it is mostly slack (then copy to exact size
    // so the consumer does not hold the slack for the message's lifetime).
    if (a.capacity - a.size <= a.capacity / 8) {
      message = a.storage.slice(0, a.size);
    } else {
      message = shared_bytes::copy_of(std::span<const std::byte>(a.data, a.size));
    }
    assembly_.reset();
  }
  handler.on_message(text_ ? payload_kind::text : payload_kind::binary, std::move(message));
  return read_status::ok;
}

template <class Handler>
read_status frame_reader::deliver_control(std::span<const std::byte> payload, Handler& handler) {
  if (op_ == opcode::ping || op_ == opcode::pong) {
    if (op_ == opcode::ping) {
      handler.on_ping(payload);
    } else {
      handler.on_pong(payload);
    }
    // Delivered (payload may have pointed into the assembly): free it unless a message needs it.
    if (assembly_ && !in_message_) assembly_.reset();
  } else {
    // 5.5.1 / 7.1.5: an optional 2-byte code then a UTF-8 reason; 1 byte is malformed.
    std::uint16_t code = static_cast<std::uint16_t>(close_code::no_status);
    std::string_view reason;
    if (payload.size() == 1) return fail(close_code::protocol_error);
    if (payload.size() >= 2) {
      code = static_cast<std::uint16_t>((static_cast<std::uint8_t>(payload[0]) << 8) |
                                        static_cast<std::uint8_t>(payload[1]));
      if (!is_valid_close_code(code)) return fail(close_code::protocol_error);  // 7.4
      const auto text = payload.subspan(2);
      if (!is_valid_utf8(text)) return fail(close_code::invalid_payload);
      reason = {reinterpret_cast<const char*>(text.data()), text.size()};
    }
    state_ = state::done;
    in_message_ = false;
    // Deliver before freeing: `reason` may point into the control buffer.
    handler.on_close(code, reason);
    assembly_.reset();
  }
  return read_status::ok;
}

}  // namespace devgate::websocket
