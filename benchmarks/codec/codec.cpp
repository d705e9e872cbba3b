// Micro-benchmarks of the WebSocket codecs: run a Release build, e.g.
//   cmake -S . -B build-rel -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVGATE_BUILD_BENCHMARKS=ON
//   cmake --build build-rel --target devgate_bench_codec &&
//   build-rel/benchmarks/codec/devgate_bench_codec
#include <benchmark/benchmark.h>

#include <cstddef>  // std::byte
#include <string>   // request text, UTF-8 corpora
#include <vector>   // wire buffers

#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/handshake.hpp"
#include "devgate/websocket/http.hpp"
#include "devgate/websocket/reader.hpp"
#include "devgate/websocket/utf8.hpp"

namespace {

using namespace devgate::websocket;

constexpr std::array<std::byte, 4> key{std::byte{0x37}, std::byte{0xfa}, std::byte{0x21},
                                       std::byte{0x3d}};

std::span<const std::byte> bytes_of(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

void frame_header_encode(benchmark::State& state) {
  const auto length = static_cast<std::uint64_t>(state.range(0));
  std::array<std::byte, 10> out;
  for (auto _ : state) {
    benchmark::DoNotOptimize(length);
    const std::size_t n = encode_frame_header(out, opcode::binary, true, length);
    benchmark::DoNotOptimize(out);
    benchmark::DoNotOptimize(n);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(frame_header_encode)->Arg(64)->Arg(4096)->Arg(1 << 20);

void frame_header_decode(benchmark::State& state) {
  const std::vector<std::byte> payload(static_cast<std::size_t>(state.range(0)));
  const auto wire = encode_client_frame(opcode::binary, true, payload, key);
  const std::span<const std::byte> head(wire.data(), max_frame_header_size);
  frame_header fh;
  for (auto _ : state) {
    benchmark::DoNotOptimize(head.data());
    const std::size_t n = decode_frame_header(head, fh);
    benchmark::DoNotOptimize(fh);
    benchmark::DoNotOptimize(n);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(frame_header_decode)->Arg(64)->Arg(4096)->Arg(1 << 20);

void mask(benchmark::State& state) {
  std::vector<std::byte> data(static_cast<std::size_t>(state.range(0)) + 1, std::byte{0x5a});
  // Offset by one byte: payloads rarely start 8-byte aligned after a 6/8/14-byte header.
  const std::span<std::byte> payload(data.data() + 1, data.size() - 1);
  for (auto _ : state) {
    apply_mask(payload, key, 0);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(payload.size()));
}
BENCHMARK(mask)->Arg(64)->Arg(4096)->Arg(1 << 20);

std::string utf8_corpus(bool mixed, std::size_t size) {
  // Mixed: roughly what device JSON with some non-ASCII strings looks like.
  const std::string unit =
      mixed ? "{\"name\":\"Z\xc3\xbcrich caf\xc3\xa9\",\"t\":\"\xe2\x82\xac\xf0\x9f\x98\x80\"} "
            : "{\"name\":\"Zurich cafe\",\"temperature\":21.5,\"ok\":true} ";
  std::string out;
  while (out.size() + unit.size() <= size) out += unit;
  return out;
}

void utf8_validate(benchmark::State& state, bool mixed) {
  const std::string text = utf8_corpus(mixed, static_cast<std::size_t>(state.range(0)));
  for (auto _ : state) {
    const bool ok = is_valid_utf8(bytes_of(text));
    benchmark::DoNotOptimize(ok);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(text.size()));
}
BENCHMARK_CAPTURE(utf8_validate, ascii, false)->Arg(64)->Arg(4096)->Arg(1 << 20);
BENCHMARK_CAPTURE(utf8_validate, mixed, true)->Arg(64)->Arg(4096)->Arg(1 << 20);

struct counting_handler {
  std::size_t messages = 0;
  std::size_t bytes = 0;
  void on_message(devgate::payload_kind, devgate::shared_bytes b) {
    ++messages;
    bytes += b.size();
  }
  void on_ping(std::span<const std::byte>) {}
  void on_pong(std::span<const std::byte>) {}
  void on_close(std::uint16_t, std::string_view) {}
};

// 1024 client messages of 64 bytes in one buffer, read `chunk` bytes at a time (0: all at once).
void reader_64b(benchmark::State& state, opcode op) {
  const std::size_t count = 1024;
  const std::size_t chunk = static_cast<std::size_t>(state.range(0));
  const std::string payload(64, 'x');
  std::vector<std::byte> wire;
  for (std::size_t i = 0; i < count; ++i) {
    const auto f = encode_client_frame(op, true, bytes_of(payload), key);
    wire.insert(wire.end(), f.begin(), f.end());
  }
  std::vector<std::byte> buf(wire.size());
  counting_handler h;
  for (auto _ : state) {
    // The reader unmasks in place: restore the masked wire (costs one memcpy per pass).
    std::memcpy(buf.data(), wire.data(), wire.size());
    frame_reader reader;
    const std::span<std::byte> all(buf);
    for (std::size_t at = 0; at < all.size();) {
      const std::size_t n = chunk == 0 ? all.size() : std::min(chunk, all.size() - at);
      if (reader.consume(all.subspan(at, n), h) != read_status::ok) state.SkipWithError("error");
      at += n;
    }
  }
  if (h.messages != count * state.iterations()) state.SkipWithError("lost messages");
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(count));
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(wire.size()));
}
BENCHMARK_CAPTURE(reader_64b, binary, opcode::binary)->Arg(0)->Arg(4096)->Arg(100);
BENCHMARK_CAPTURE(reader_64b, text, opcode::text)->Arg(0)->Arg(4096);

constexpr std::string_view upgrade_request =
    "GET /devices/sensor-0042 HTTP/1.1\r\n"
    "Host: gateway.example.com:8080\r\n"
    "User-Agent: devgate-bench/1.0\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Origin: http://example.com\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "\r\n";

void handshake_parse(benchmark::State& state) {
  for (auto _ : state) {
    http_request_parser p;
    if (p.feed(bytes_of(upgrade_request)) != http_request_parser::status::complete) {
      state.SkipWithError("parse failed");
    }
    benchmark::DoNotOptimize(p.request().headers.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(handshake_parse);

void handshake_full(benchmark::State& state) {
  for (auto _ : state) {
    http_request_parser p;
    if (p.feed(bytes_of(upgrade_request)) != http_request_parser::status::complete ||
        check_upgrade(p.request()).status != 101) {
      state.SkipWithError("handshake failed");
    }
    const std::string response = upgrade_response(p.request().header("Sec-WebSocket-Key"));
    benchmark::DoNotOptimize(response.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(handshake_full);

void handshake_accept_key(benchmark::State& state) {
  for (auto _ : state) {
    const std::string k = accept_key("dGhlIHNhbXBsZSBub25jZQ==");
    benchmark::DoNotOptimize(k.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(handshake_accept_key);

}  // namespace

BENCHMARK_MAIN();
