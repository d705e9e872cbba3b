// libFuzzer target: http_request_parser fed in random-sized pieces must agree with the same
// bytes fed at once, never exceed its limits, and keep its invariants, request bodies included
// (announced, then accepted or refused by a route bound before any of them is read).
//
// Input layout: byte 0 picks the limits (default or tiny, with or without bodies), byte 1 seeds
// the piece sizes and the route's body bound, the rest is the wire.
#include <cstddef>  // std::byte
#include <cstdint>  // fuzzer entry point
#include <cstdlib>  // std::abort
#include <span>     // pieces
#include <string>   // snapshots
#include <vector>   // snapshots

#include "devgate/websocket/handshake.hpp"
#include "devgate/websocket/http.hpp"

namespace {

using devgate::websocket::http_limits;
using devgate::websocket::http_request_parser;
using status = http_request_parser::status;

void check(bool ok) {
  if (!ok) std::abort();
}

// Everything observable about one parse, to compare a split feed with a whole feed.
struct snapshot {
  status st = status::incomplete;
  int error = 0;
  std::vector<std::string> fields;
  std::string leftover;
  bool operator==(const snapshot&) const = default;
};

// Parses every request in `wire` (pipelined via reset()), feeding it in pieces chosen by `seed`
// (seed 0: all at once).
std::vector<snapshot> parse_all(std::span<const std::byte> wire, http_limits limits,
                                std::size_t route_max, std::uint32_t seed) {
  std::vector<snapshot> out;
  http_request_parser p(limits);
  std::size_t at = 0;
  status st = status::incomplete;
  for (int requests = 0; requests < 64; ++requests) {
    for (;;) {
      while (st == status::incomplete && at < wire.size()) {
        std::size_t n = wire.size() - at;
        if (seed != 0) {
          seed = seed * 1103515245u + 12345u;
          n = std::min<std::size_t>(n, 1 + (seed >> 16) % 37);
        }
        const status prev = st;
        st = p.feed(wire.subspan(at, n));
        check(prev == status::incomplete);
        at += n;
      }
      if (st != status::body_announced) break;
      // The route decides from the header section alone: nothing of the body is in it yet.
      const auto& r = p.request();
      check(r.content_length > 0 && r.content_length <= limits.max_body_bytes);
      check(r.body.empty());
      check(p.leftover().empty());
      st = p.accept_body(route_max);
      check(st != status::body_announced);
      if (r.content_length > route_max) check(st == status::error && p.error_status() == 413);
    }
    snapshot s;
    s.st = st;
    check(st == p.state());
    if (st == status::error) {
      s.error = p.error_status();
      check(s.error == 400 || s.error == 413 || s.error == 431 || s.error == 501 || s.error == 505);
      check(p.leftover().empty());
      // An error is sticky.
      check(p.feed(wire.first(std::min<std::size_t>(wire.size(), 3))) == status::error);
    }
    if (st == status::complete) {
      const auto& r = p.request();
      check(!r.method.empty() && !r.target.empty());
      check(r.version_minor == 0 || r.version_minor == 1);
      check(r.headers.size() <= limits.max_headers);
      check(r.body.size() == r.content_length);
      check(r.content_length <= limits.max_body_bytes && r.content_length <= route_max);
      check(r.method.size() + r.target.size() + 10 <= limits.max_request_line + 1);
      s.fields.emplace_back(r.method);
      s.fields.emplace_back(r.target);
      for (const auto& h : r.headers) {
        check(!h.name.empty());
        check(h.name.find_first_of(" \t\r\n:") == std::string_view::npos);
        check(h.value.find_first_of("\r\n") == std::string_view::npos);
        check(h.value.empty() || (h.value.front() != ' ' && h.value.back() != ' '));
        s.fields.emplace_back(h.name);
        s.fields.emplace_back(h.value);
      }
      s.fields.emplace_back(r.body);
      std::size_t hosts = 0;
      for (const auto& h : r.headers)
        hosts += devgate::websocket::detail_http::iequals(h.name, "host");
      check(hosts <= 1 && (r.version_minor == 0 || hosts == 1));
      (void)r.keep_alive();
      const auto up = devgate::websocket::check_upgrade(r);
      check(up.status == 101 || up.status == 400 || up.status == 405 || up.status == 426);
      if (up.status == 101) {
        check(devgate::websocket::is_websocket_upgrade(r));
        check(devgate::websocket::accept_key(r.header("Sec-WebSocket-Key")).size() == 28);
      }
      const auto lo = p.leftover();
      s.leftover.assign(reinterpret_cast<const char*>(lo.data()), lo.size());
      // Everything fed so far is the request plus the leftover (nothing lost, nothing made up).
      check(lo.size() <= at);
    }
    out.push_back(std::move(s));
    if (st != status::complete) break;
    // Bytes not fed yet belong after the leftover: the whole-feed parse has them in its leftover.
    p.reset();
    st = p.state();
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  http_limits limits;
  if (data[0] & 1) {
    limits.max_request_line = 1 + data[0] % 64;
    limits.max_header_bytes = 1 + data[0] % 128;
    limits.max_headers = data[0] % 5;
  }
  // Half the inputs allow bodies (up to 64 bytes server-wide; the route's bound from byte 1).
  if (data[0] & 2) limits.max_body_bytes = 64;
  const std::size_t route_max = data[1] % 80;
  const std::uint32_t seed = data[1] | 1u;
  const auto wire = std::as_bytes(std::span<const std::uint8_t>(data + 2, size - 2));
  const auto whole = parse_all(wire, limits, route_max, 0);
  const auto split = parse_all(wire, limits, route_max, seed);
  // Both parses see the same bytes in the end, so they find the same requests with the same
  // fields and the same final status; only the leftover differs (a split parse has not been fed
  // the later pieces yet), and it is a prefix of the whole parse's leftover.
  check(whole.size() == split.size());
  for (std::size_t i = 0; i < whole.size(); ++i) {
    check(whole[i].st == split[i].st);
    check(whole[i].error == split[i].error);
    check(whole[i].fields == split[i].fields);
    check(whole[i].leftover.compare(0, split[i].leftover.size(), split[i].leftover) == 0);
  }
  return 0;
}
