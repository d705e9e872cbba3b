// libFuzzer target: frame_reader fed whole and in random-sized pieces must produce the same
// events and verdict; delivered text is valid UTF-8; the incremental utf8_validator agrees with
// is_valid_utf8 on the whole input.
//
// Input layout: byte 0 picks the message limit, byte 1 seeds the piece sizes, the rest is the
// wire (client frames).
#include <cstddef>  // std::byte
#include <cstdint>  // fuzzer entry point
#include <cstdlib>  // std::abort
#include <span>     // pieces
#include <string>   // events
#include <vector>   // events, copies

#include "devgate/websocket/reader.hpp"
#include "devgate/websocket/utf8.hpp"

namespace {

using namespace devgate::websocket;

void check(bool ok) {
  if (!ok) std::abort();
}

struct recorder {
  std::vector<std::string> events;
  bool closed = false;
  void on_message(devgate::payload_kind k, devgate::shared_bytes b) {
    check(!closed);
    if (k == devgate::payload_kind::text) check(is_valid_utf8(b.bytes()));
    events.push_back((k == devgate::payload_kind::text ? "t" : "b") + std::string(b.view()));
  }
  void on_ping(std::span<const std::byte> p) {
    check(!closed && p.size() <= max_control_payload);
    events.push_back("i" + std::string(reinterpret_cast<const char*>(p.data()), p.size()));
  }
  void on_pong(std::span<const std::byte> p) {
    check(!closed && p.size() <= max_control_payload);
    events.push_back("o" + std::string(reinterpret_cast<const char*>(p.data()), p.size()));
  }
  void on_close(std::uint16_t code, std::string_view reason) {
    check(!closed);
    closed = true;
    check(code == 1005 || is_valid_close_code(code));
    check(reason.size() <= max_control_payload - 2);
    events.push_back("c" + std::to_string(code) + std::string(reason));
  }
};

struct outcome {
  std::vector<std::string> events;
  read_status status = read_status::ok;
  devgate::close_code error{};
  bool operator==(const outcome&) const = default;
};

outcome run(std::span<const std::byte> wire, reader_limits limits, std::uint32_t seed) {
  std::vector<std::byte> copy(wire.begin(), wire.end());  // unmasked in place
  frame_reader reader(limits);
  recorder rec;
  outcome out;
  std::size_t at = 0;
  while (at < copy.size()) {
    std::size_t n = copy.size() - at;
    if (seed != 0) {
      seed = seed * 1103515245u + 12345u;
      n = std::min<std::size_t>(n, 1 + (seed >> 16) % 23);
    }
    const read_status st = reader.consume(std::span<std::byte>(copy).subspan(at, n), rec);
    at += n;
    if (st == read_status::error) {
      out.status = st;
      check(reader.error() == devgate::close_code::protocol_error ||
            reader.error() == devgate::close_code::invalid_payload ||
            reader.error() == devgate::close_code::message_too_big);
      check(reader.idle() && reader.finished());
      break;
    }
  }
  if (rec.closed) check(reader.idle() && reader.finished());
  out.events = std::move(rec.events);
  out.error = reader.error();
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  reader_limits limits;
  if (data[0] & 1) limits.max_message_size = data[0] * 4u;
  const std::uint32_t seed = data[1] | 1u;
  const auto wire = std::as_bytes(std::span<const std::uint8_t>(data + 2, size - 2));
  check(run(wire, limits, 0) == run(wire, limits, seed));

  // The incremental validator, fed the same bytes in pieces, agrees with the one-shot check.
  utf8_validator v;
  bool ok = true;
  std::uint32_t s = seed;
  for (std::size_t at = 0; at < wire.size();) {
    s = s * 1103515245u + 12345u;
    const std::size_t n = std::min<std::size_t>(wire.size() - at, (s >> 16) % 19);
    ok = v.feed(wire.subspan(at, n)) && ok;
    at += n;
  }
  check((ok && v.complete()) == is_valid_utf8(wire));
  return 0;
}
