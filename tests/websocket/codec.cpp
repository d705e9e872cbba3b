// Tests of the pure WebSocket codecs: http.hpp, handshake.hpp, frame.hpp, utf8.hpp, reader.hpp.
#include "devgate/websocket/frame.hpp"
#include "devgate/websocket/handshake.hpp"
#include "devgate/websocket/http.hpp"
#include "devgate/websocket/reader.hpp"
#include "devgate/websocket/utf8.hpp"

#include <catch2/catch.hpp>

#include <random>       // random splits
#include <string>       // request text
#include <string_view>  // views
#include <vector>       // byte buffers

using namespace devgate::websocket;
using devgate::close_code;
using devgate::payload_kind;
using devgate::shared_bytes;
using parse_status = http_request_parser::status;

namespace {

std::span<const std::byte> bytes_of(std::string_view s) {
  return std::as_bytes(std::span<const char>(s.data(), s.size()));
}

std::string_view text_of(std::span<const std::byte> b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

// The opening handshake of RFC 6455 section 1.3.
constexpr std::string_view rfc_request =
    "GET /chat HTTP/1.1\r\n"
    "Host: server.example.com\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Origin: http://example.com\r\n"
    "Sec-WebSocket-Protocol: chat, superchat\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "\r\n";

// Feeds `text` whole and returns the error status (0 when complete).
int parse_error(std::string_view text, http_limits limits = {}) {
  http_request_parser p(limits);
  const auto st = p.feed(bytes_of(text));
  if (st == parse_status::complete) return 0;
  if (st == parse_status::incomplete || st == parse_status::body_announced) return -1;
  return p.error_status();
}

// Parses a full request (must be complete) and runs check_upgrade on it.
upgrade_result upgrade_of(std::string_view text) {
  http_request_parser p;
  REQUIRE(p.feed(bytes_of(text)) == parse_status::complete);
  return check_upgrade(p.request());
}

}  // namespace

// ---- http.hpp -------------------------------------------------------------------------------

TEST_CASE("http parser reads the RFC 6455 1.3 request, whole and byte by byte",
          "[websocket][http]") {
  for (const bool byte_by_byte : {false, true}) {
    http_request_parser p;
    parse_status st = parse_status::incomplete;
    if (byte_by_byte) {
      for (std::size_t i = 0; i < rfc_request.size(); ++i) {
        REQUIRE(st == parse_status::incomplete);
        st = p.feed(bytes_of(rfc_request.substr(i, 1)));
      }
    } else {
      st = p.feed(bytes_of(rfc_request));
    }
    REQUIRE(st == parse_status::complete);
    const http_request& r = p.request();
    CHECK(r.method == "GET");
    CHECK(r.target == "/chat");
    CHECK(r.version_minor == 1);
    CHECK(r.headers.size() == 7);
    CHECK(r.header("host") == "server.example.com");
    CHECK(r.header("SEC-WEBSOCKET-KEY") == "dGhlIHNhbXBsZSBub25jZQ==");
    CHECK(r.header("X-Absent").empty());
    CHECK(r.header_has_token("Sec-WebSocket-Protocol", "superchat"));
    CHECK(r.header_has_token("connection", "upgrade"));
    CHECK_FALSE(r.header_has_token("Sec-WebSocket-Protocol", "super"));
    CHECK(r.keep_alive());
    CHECK(p.leftover().empty());
  }
}

TEST_CASE("http header values lose surrounding whitespace; tokens are found in lists",
          "[websocket][http]") {
  http_request_parser p;
  REQUIRE(p.feed(bytes_of("GET / HTTP/1.1\r\nHost:h\r\nConnection: \t keep-alive ,  Upgrade\t\r\n"
                          "Connection: foo\r\nX-Empty:\r\n\r\n")) == parse_status::complete);
  const auto& r = p.request();
  CHECK(r.header("Host") == "h");
  CHECK(r.header("Connection") == "keep-alive ,  Upgrade");
  CHECK(r.header_has_token("Connection", "UPGRADE"));
  CHECK(r.header_has_token("Connection", "foo"));  // second Connection header is searched too
  CHECK(r.header("X-Empty").empty());
  CHECK(r.headers.size() == 4);
}

TEST_CASE("http keep_alive follows RFC 9112 9.3", "[websocket][http]") {
  const auto ka = [](std::string_view text) {
    http_request_parser p;
    REQUIRE(p.feed(bytes_of(text)) == parse_status::complete);
    return p.request().keep_alive();
  };
  CHECK(ka("GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
  CHECK_FALSE(ka("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"));
  CHECK_FALSE(ka("GET / HTTP/1.0\r\n\r\n"));
  CHECK(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
}

TEST_CASE("http pipelined requests: leftover and reset", "[websocket][http]") {
  const std::string two =
      "GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HT";
  http_request_parser p;
  REQUIRE(p.feed(bytes_of(two)) == parse_status::complete);
  CHECK(p.request().target == "/a");
  CHECK(text_of(p.leftover()) == "GET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HT");
  // More bytes after complete join the leftover, and the request's views stay valid.
  REQUIRE(p.feed(bytes_of(std::string(1000, 'x'))) == parse_status::complete);
  CHECK(p.request().target == "/a");
  CHECK(p.request().header("host") == "h");
  CHECK(p.leftover().size() == 1000 + 37);
  p.reset();
  // The leftover parses at reset: the second request is complete before any more bytes arrive.
  REQUIRE(p.state() == parse_status::complete);
  CHECK(p.request().target == "/b");
  CHECK(text_of(p.leftover()).substr(0, 9) == "GET /c HT");
}

TEST_CASE("http leftover keeps early WebSocket bytes after the upgrade request",
          "[websocket][http]") {
  std::string req(rfc_request);
  req += std::string("\x81\x85\x01\x02\x03\x04", 6);
  http_request_parser p;
  REQUIRE(p.feed(bytes_of(req)) == parse_status::complete);
  CHECK(text_of(p.leftover()) == std::string_view("\x81\x85\x01\x02\x03\x04", 6));
  CHECK(p.request().header("Sec-WebSocket-Key") == "dGhlIHNhbXBsZSBub25jZQ==");
}

TEST_CASE("http reset starts clean and ignores a leading empty line", "[websocket][http]") {
  http_request_parser p;
  REQUIRE(p.feed(bytes_of("GET /x HTTP/1.1\r\nHost: h\r\n\r\n")) == parse_status::complete);
  p.reset();
  CHECK(p.state() == parse_status::incomplete);
  CHECK(p.feed({}) == parse_status::incomplete);
  REQUIRE(p.feed(bytes_of("\r\nGET /y HTTP/1.1\r\nHost: h\r\n\r\n")) == parse_status::complete);
  CHECK(p.request().target == "/y");
  CHECK(p.request().headers.size() == 1);
}

TEST_CASE("http parser moves with its request views", "[websocket][http]") {
  http_request_parser p;
  // Short enough for std::string's small buffer, which moves with the object.
  REQUIRE(p.feed(bytes_of("GET /s HTTP/1.0\r\n\r\nX")) == parse_status::complete);
  http_request_parser q(std::move(p));
  CHECK(q.request().target == "/s");
  CHECK(text_of(q.leftover()) == "X");
  http_request_parser r;
  r = std::move(q);
  CHECK(r.request().method == "GET");
  CHECK(r.request().version_minor == 0);
  REQUIRE(r.feed(bytes_of("GET /t HTTP/1.1\r\nHost: h\r\n\r\n")) == parse_status::complete);
  CHECK(text_of(r.leftover()).substr(0, 7) == "XGET /t");
}

TEST_CASE("http 400 for malformed requests", "[websocket][http]") {
  const char* bad[] = {
      "GET\r\n\r\n",                                       // no target
      "GET /\r\n\r\n",                                     // no version
      "G(T / HTTP/1.1\r\nHost: h\r\n\r\n",                 // bad method token
      "GET  / HTTP/1.1\r\nHost: h\r\n\r\n",                // double space
      "GET / HTTP/1.1 \r\nHost: h\r\n\r\n",                // trailing space
      "GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",              // space in target
      "GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n",           // fragment
      "GET a/b HTTP/1.1\r\nHost: h\r\n\r\n",               // not origin/absolute form
      "GET * HTTP/1.1\r\nHost: h\r\n\r\n",                 // asterisk-form only for OPTIONS
      "GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n",             // DEL in target
      "GET / http/1.1\r\nHost: h\r\n\r\n",                 // version is case-sensitive
      "GET / HTTP/1.10\r\nHost: h\r\n\r\n",                // malformed version
      "GET / HTTP/1.1\nHost: h\r\n\r\n",                   // bare LF
      "GET / HTTP/1.1\r\nHost: h\n\r\n",                   // bare LF in headers
      "GET / HTTP/1.1\r\nHost: h\r\n\n",                   // bare LF ends headers
      "GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",              // bare CR
      "GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",      // header without colon
      "GET / HTTP/1.1\r\nHost : h\r\n\r\n",                // whitespace before colon
      "GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n",          // empty name
      "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n  b\r\n\r\n",  // obs-fold
      "GET / HTTP/1.1\r\nHost: h\r\nX: a\x01\r\n\r\n",     // control character
      "GET / HTTP/1.1\r\n\r\n",                            // missing Host
      "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",      // two Hosts
      "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
  };
  for (const char* text : bad) {
    INFO(text);
    CHECK(parse_error(text) == 400);
  }
  CHECK(parse_error(std::string_view("GET / HTTP/1.1\r\nHost: h\r\nX: \0\r\n\r\n", 33)) == 400);
  // Valid corner cases.
  CHECK(parse_error("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
  CHECK(parse_error("GET http://h/x?y=1 HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
  CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n") == 0);
  CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nX: caf\xc3\xa9\r\n\r\n") == 0);  // obs-text
}

TEST_CASE("http 505 / 501 / 413", "[websocket][http]") {
  CHECK(parse_error("GET / HTTP/2.0\r\nHost: h\r\n\r\n") == 505);
  CHECK(parse_error("GET / HTTP/1.2\r\nHost: h\r\n\r\n") == 505);
  CHECK(parse_error("GET / HTTP/0.9\r\n\r\n") == 505);
  CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n") == 501);
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: gzip\r\n\r\n") == 501);
  CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n") == 413);
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n") == 413);
  CHECK(parse_error(
            "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n") == 413);
}

TEST_CASE("http bodies: announced, bounded by the route before they are read, whole or split",
          "[websocket][http]") {
  http_limits limits;
  limits.max_body_bytes = 16;
  const std::string_view head = "POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n";
  const std::string wire = std::string(head) + "hello" + "GET /next HTTP/1.1\r\nHost: h\r\n\r\n";
  // Whole: the header section stops at body_announced, nothing of the body is in the request.
  {
    http_request_parser p(limits);
    REQUIRE(p.feed(bytes_of(wire)) == parse_status::body_announced);
    CHECK(p.request().method == "POST");
    CHECK(p.request().content_length == 5);
    CHECK(p.request().body.empty());
    CHECK(p.leftover().empty());
    REQUIRE(p.accept_body(5) == parse_status::complete);
    CHECK(p.request().body == "hello");
    CHECK(p.request().target == "/api/x");
    CHECK(std::string_view(reinterpret_cast<const char*>(p.leftover().data()),
                           p.leftover().size()) == "GET /next HTTP/1.1\r\nHost: h\r\n\r\n");
    p.reset();  // the pipelined request after the body
    REQUIRE(p.state() == parse_status::complete);
    CHECK(p.request().target == "/next");
    CHECK(p.request().body.empty());
  }
  // Byte by byte: the body arrives after accept_body, piece by piece.
  {
    http_request_parser p(limits);
    std::size_t i = 0;
    auto st = parse_status::incomplete;
    for (; i < head.size() && st == parse_status::incomplete; ++i) {
      st = p.feed(bytes_of(head.substr(i, 1)));
    }
    REQUIRE(st == parse_status::body_announced);
    REQUIRE(p.accept_body(100) == parse_status::incomplete);
    for (const char c : std::string_view("hell")) {
      CHECK(p.feed(bytes_of(std::string_view(&c, 1))) == parse_status::incomplete);
    }
    REQUIRE(p.feed(bytes_of("o")) == parse_status::complete);
    CHECK(p.request().body == "hello");
    http_request_parser moved(std::move(p));  // the body view follows the buffer
    CHECK(moved.request().body == "hello");
  }
  // The route's bound: one byte short is 413 before the body is read.
  {
    http_request_parser p(limits);
    REQUIRE(p.feed(bytes_of(head)) == parse_status::body_announced);
    CHECK(p.accept_body(4) == parse_status::error);
    CHECK(p.error_status() == 413);
  }
  // The server-wide ceiling: 413 from the header section, whatever the route would say.
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 17\r\n\r\n", limits) == 413);
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                    limits) == 413);
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n", limits) == 400);
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 16\r\n\r\n", limits) == -1);
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", limits) == 0);
  // Chunked bodies are refused (a route must know the length before it reads anything).
  CHECK(parse_error("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"
                    "\r\n0\r\n\r\n",
                    limits) == 501);
}

TEST_CASE("http 431 as soon as a limit is passed", "[websocket][http]") {
  http_limits small;
  small.max_request_line = 32;
  small.max_header_bytes = 64;
  small.max_headers = 3;

  SECTION("request line: exactly at the limit passes, one more fails without waiting for CRLF") {
    const std::string ok = "GET /" + std::string(32 - 14, 'a') + " HTTP/1.1";
    REQUIRE(ok.size() == 32);
    CHECK(parse_error(ok + "\r\nHost: h\r\n\r\n", small) == 0);
    const std::string long_target = "GET /" + std::string(40, 'a');  // no CRLF yet
    CHECK(parse_error(long_target, small) == 431);
    // Fed byte by byte it fails on the first byte past the limit (+1 for a CR).
    http_request_parser p(small);
    std::size_t fed = 0;
    for (const char c : long_target) {
      ++fed;
      if (p.feed(bytes_of(std::string_view(&c, 1))) == parse_status::error) break;
    }
    CHECK(p.error_status() == 431);
    CHECK(fed == 34);
  }
  SECTION("header bytes: exactly at the limit passes, beyond fails mid-line") {
    // "Host: h\r\n" (9) + "X: " + value + "\r\n" = 64
    const std::string value(64 - 9 - 5, 'v');
    CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nX: " + value + "\r\n\r\n", small) == 0);
    CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nX: " + value + "v\r\n\r\n", small) == 431);
    CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nX: " + std::string(200, 'v'), small) == 431);
  }
  SECTION("header count") {
    CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n", small) == 0);
    CHECK(parse_error("GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", small) == 431);
  }
  SECTION("endless empty lines before the request line") {
    std::string crlfs;
    for (int i = 0; i < 40; ++i) crlfs += "\r\n";
    CHECK(parse_error(crlfs, small) == 431);
  }
  SECTION("an error is sticky") {
    http_request_parser p(small);
    REQUIRE(p.feed(bytes_of(std::string(100, 'G'))) == parse_status::error);
    CHECK(p.feed(bytes_of("GET / HTTP/1.1\r\nHost: h\r\n\r\n")) == parse_status::error);
    CHECK(p.leftover().empty());
  }
}

// ---- handshake.hpp --------------------------------------------------------------------------

TEST_CASE("handshake: RFC 6455 1.3 example", "[websocket][handshake]") {
  CHECK(accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  http_request_parser p;
  REQUIRE(p.feed(bytes_of(rfc_request)) == parse_status::complete);
  CHECK(is_websocket_upgrade(p.request()));
  const upgrade_result r = check_upgrade(p.request());
  CHECK(r.status == 101);
  CHECK(r.reason.empty());
  CHECK(upgrade_response(p.request().header("Sec-WebSocket-Key")) ==
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n");
}

TEST_CASE("handshake: refusals", "[websocket][handshake]") {
  const auto with = [](std::string_view from, std::string_view to) {
    std::string s(rfc_request);
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    s.replace(at, from.size(), to);
    return s;
  };
  CHECK(upgrade_of(with("GET", "POST")).status == 405);
  CHECK(upgrade_of(with("HTTP/1.1", "HTTP/1.0")).status == 400);
  CHECK(upgrade_of(with("Upgrade: websocket\r\n", "")).status == 400);
  CHECK(upgrade_of(with("Upgrade: websocket", "Upgrade: h2c")).status == 400);
  CHECK(upgrade_of(with("Upgrade: websocket", "Upgrade: WebSocket")).status == 101);
  CHECK(upgrade_of(with("Connection: Upgrade", "Connection: keep-alive")).status == 400);
  CHECK(upgrade_of(with("Connection: Upgrade", "Connection: keep-alive, Upgrade")).status == 101);
  CHECK(upgrade_of(with("Sec-WebSocket-Version: 13\r\n", "")).status == 400);
  CHECK(upgrade_of(with("Version: 13", "Version: 8")).status == 426);
  CHECK(upgrade_of(with("Version: 13", "Version: 13\r\nSec-WebSocket-Version: 8")).status == 426);
  CHECK(upgrade_of(with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")).status == 400);
  // 15 and 17 bytes, bad alphabet, whitespace inside, two keys.
  CHECK(upgrade_of(with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25j")).status == 400);
  CHECK(upgrade_of(with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ=")).status == 400);
  CHECK(upgrade_of(with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ")).status == 400);
  CHECK(upgrade_of(with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZWU=")).status == 400);
  CHECK(upgrade_of(with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBs*SBub25jZQ==")).status == 400);
  CHECK(upgrade_of(with("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBs SBub25jZQ==")).status == 400);
  CHECK(upgrade_of(with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
            .status == 400);
  // A plain GET is no upgrade.
  http_request_parser p;
  REQUIRE(p.feed(bytes_of("GET /health HTTP/1.1\r\nHost: h\r\n\r\n")) == parse_status::complete);
  CHECK_FALSE(is_websocket_upgrade(p.request()));
  CHECK(check_upgrade(p.request()).status == 400);
}

TEST_CASE("handshake: http_response and status_reason", "[websocket][handshake]") {
  CHECK(http_response(404, "no such device\n") ==
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: 15\r\nConnection: close\r\n\r\nno such device\n");
  CHECK(http_response(426, "", true) ==
        "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Length: 0\r\nConnection: keep-alive\r\nSec-WebSocket-Version: 13\r\n\r\n");
  CHECK(http_response(405, "x", false, "application/json", "Allow: GET\r\n") ==
        "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\n"
        "Content-Length: 1\r\nConnection: close\r\nAllow: GET\r\n\r\nx");
  for (const int s : {400, 401, 403, 409, 411, 413, 431, 501, 505, 426, 405, 101, 200, 202}) {
    CHECK_FALSE(status_reason(s).empty());
  }
  CHECK(status_reason(799).empty());
}

// ---- frame.hpp ------------------------------------------------------------------------------

namespace {

std::vector<std::byte> vec_of(std::string_view s) {
  const auto b = bytes_of(s);
  return {b.begin(), b.end()};
}

constexpr std::array<std::byte, 4> test_key{std::byte{0x37}, std::byte{0xfa}, std::byte{0x21},
                                            std::byte{0x3d}};

}  // namespace

TEST_CASE("frame header encode at the length boundaries, and decode back", "[websocket][frame]") {
  struct row {
    std::uint64_t length;
    std::size_t size;
    std::uint8_t len7;
  };
  for (const row r : {row{0, 2, 0}, row{125, 2, 125}, row{126, 4, 126}, row{65535, 4, 126},
                      row{65536, 10, 127}, row{std::uint64_t{1} << 40, 10, 127}}) {
    INFO(r.length);
    std::array<std::byte, 10> h{};
    REQUIRE(encode_frame_header(h, opcode::binary, true, r.length) == r.size);
    CHECK(h[0] == std::byte{0x82});
    CHECK((static_cast<std::uint8_t>(h[1]) & 0x7F) == r.len7);
    CHECK((static_cast<std::uint8_t>(h[1]) & 0x80) == 0);  // server frames are unmasked
    frame_header fh;
    CHECK(decode_frame_header(std::span<const std::byte>(h).first(r.size - 1), fh) == 0);
    REQUIRE(decode_frame_header(std::span<const std::byte>(h).first(r.size), fh) == r.size);
    CHECK(fh.fin);
    CHECK(fh.op == opcode::binary);
    CHECK_FALSE(fh.masked);
    CHECK(fh.payload_length == r.length);
  }
  std::array<std::byte, 10> h{};
  REQUIRE(encode_frame_header(h, opcode::text, false, 126) == 4);
  CHECK(h[0] == std::byte{0x01});
  CHECK(h[2] == std::byte{0x00});
  CHECK(h[3] == std::byte{126});
  // RFC 6455 5.7: a single-frame unmasked text message "Hello".
  const shared_bytes hello = encode_frame(opcode::text, bytes_of("Hello"));
  CHECK(hello.view() == std::string_view("\x81\x05Hello", 7));
  CHECK(encode_frame(opcode::pong, {}).view() == std::string_view("\x8a\x00", 2));
}

TEST_CASE("client frames: RFC 6455 5.7 masked example and round trip", "[websocket][frame]") {
  const std::array<std::byte, 4> key{std::byte{0x37}, std::byte{0xfa}, std::byte{0x21},
                                     std::byte{0x3d}};
  const auto frame = encode_client_frame(opcode::text, true, bytes_of("Hello"), key);
  CHECK(text_of(frame) == std::string_view("\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58", 11));
  for (const std::size_t len : {0u, 5u, 125u, 126u, 65535u, 65536u}) {
    const std::vector<std::byte> payload(len, std::byte{'z'});
    const auto f = encode_client_frame(opcode::binary, false, payload, key, 5);
    frame_header fh;
    const std::size_t hs = decode_frame_header(f, fh);
    REQUIRE(hs == f.size() - len);
    CHECK(hs == (len <= 125 ? 6u : len <= 65535 ? 8u : 14u));
    CHECK_FALSE(fh.fin);
    CHECK(fh.rsv == 5);
    CHECK(fh.masked);
    CHECK(fh.mask_key == key);
    CHECK(fh.payload_length == len);
    std::vector<std::byte> body(f.begin() + static_cast<std::ptrdiff_t>(hs), f.end());
    apply_mask(body, fh.mask_key, 0);
    CHECK(body == payload);
  }
}

TEST_CASE("apply_mask matches the byte-wise definition at every offset and alignment",
          "[websocket][frame]") {
  std::vector<std::byte> storage(200);
  for (std::size_t len = 0; len <= 80; ++len) {
    for (std::size_t align = 0; align < 8; ++align) {
      for (std::size_t offset = 0; offset < 8; ++offset) {
        std::span<std::byte> data(storage.data() + align, len);
        for (std::size_t i = 0; i < len; ++i) data[i] = static_cast<std::byte>(i * 7 + 3);
        apply_mask(data, test_key, offset);
        bool ok = true;
        for (std::size_t i = 0; i < len; ++i) {
          // RFC 6455 5.3: transformed-octet-i = original-octet-i XOR masking-key-octet-(i mod 4)
          ok &= data[i] == (static_cast<std::byte>(i * 7 + 3) ^ test_key[(offset + i) % 4]);
        }
        INFO("len " << len << " align " << align << " offset " << offset);
        REQUIRE(ok);
      }
    }
  }
  // Masking in two pieces at any split point equals masking at once.
  std::vector<std::byte> whole(100), split(100);
  for (std::size_t i = 0; i < 100; ++i) whole[i] = split[i] = static_cast<std::byte>(i);
  apply_mask(whole, test_key, 0);
  for (std::size_t cut = 0; cut <= 100; ++cut) {
    auto copy = split;
    apply_mask(std::span<std::byte>(copy).first(cut), test_key, 0);
    apply_mask(std::span<std::byte>(copy).subspan(cut), test_key, cut);
    REQUIRE(copy == whole);
  }
}

TEST_CASE("close codes and close payloads (RFC 6455 7.4, 5.5.1)", "[websocket][frame]") {
  for (const std::uint16_t ok : {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                                 1014, 3000, 3999, 4000, 4999}) {
    CHECK(is_valid_close_code(ok));
  }
  for (const std::uint16_t bad :
       {0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535}) {
    CHECK_FALSE(is_valid_close_code(bad));
  }
  CHECK(text_of(encode_close_payload(close_code::normal, "bye")) == std::string_view("\x03\xe8"
                                                                                     "bye",
                                                                                     5));
  CHECK(encode_close_payload(close_code::try_again_later, "").size() == 2);
  // 123 bytes of reason at most, cut on a character boundary: 61 two-byte characters + "ab".
  std::string reason = "ab";
  for (int i = 0; i < 80; ++i) reason += "\xc3\xa9";
  const auto payload = encode_close_payload(close_code::going_away, reason);
  CHECK(payload.size() == 2 + 122);
  CHECK(is_valid_utf8(std::span<const std::byte>(payload).subspan(2)));
  CHECK(encode_close_payload(close_code::going_away, std::string(200, 'x')).size() == 125);
}

// ---- utf8.hpp -------------------------------------------------------------------------------

TEST_CASE("UTF-8 validation: Markus Kuhn style cases", "[websocket][utf8]") {
  const auto valid = [](std::string_view s) { return is_valid_utf8(bytes_of(s)); };
  CHECK(valid(""));
  CHECK(valid("plain ASCII, long enough to take the 8- and 16-byte fast paths ......."));
  CHECK(valid("\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"));  // κόσμε
  CHECK(valid("\x7f"));
  CHECK(valid("\xc2\x80"));                   // U+0080, first 2-byte
  CHECK(valid("\xdf\xbf"));                   // U+07FF
  CHECK(valid("\xe0\xa0\x80"));               // U+0800, first 3-byte
  CHECK(valid("\xed\x9f\xbf"));               // U+D7FF, just below the surrogates
  CHECK(valid("\xee\x80\x80"));               // U+E000, just above
  CHECK(valid("\xef\xbf\xbf"));               // U+FFFF (a noncharacter, but valid UTF-8)
  CHECK(valid("\xf0\x90\x80\x80"));           // U+10000, first 4-byte
  CHECK(valid("\xf4\x8f\xbf\xbf"));           // U+10FFFF, the last code point
  CHECK(valid(std::string_view("a\0b", 3)));  // NUL is a character

  CHECK_FALSE(valid("\x80"));  // lone continuation
  CHECK_FALSE(valid("\xbf"));
  CHECK_FALSE(valid("\xc0\xaf"));                  // overlong '/'
  CHECK_FALSE(valid("\xc1\xbf"));                  // overlong U+007F
  CHECK_FALSE(valid("\xe0\x80\xaf"));              // overlong '/'
  CHECK_FALSE(valid("\xe0\x9f\xbf"));              // overlong U+07FF
  CHECK_FALSE(valid("\xf0\x80\x80\xaf"));          // overlong '/'
  CHECK_FALSE(valid("\xf0\x8f\xbf\xbf"));          // overlong U+FFFF
  CHECK_FALSE(valid("\xf8\x88\x80\x80\x80"));      // 5-byte form
  CHECK_FALSE(valid("\xfc\x84\x80\x80\x80\x80"));  // 6-byte form
  CHECK_FALSE(valid("\xed\xa0\x80"));              // U+D800
  CHECK_FALSE(valid("\xed\xbf\xbf"));              // U+DFFF
  CHECK_FALSE(valid("\xed\xa0\x80\xed\xb0\x80"));  // surrogate pair in UTF-8 (CESU)
  CHECK_FALSE(valid("\xf4\x90\x80\x80"));          // U+110000
  CHECK_FALSE(valid("\xf5\x80\x80\x80"));
  CHECK_FALSE(valid("\xfe"));
  CHECK_FALSE(valid("\xff"));
  CHECK_FALSE(valid("\xc3"));  // truncated
  CHECK_FALSE(valid("\xe2\x82"));
  CHECK_FALSE(valid("\xf0\x9f\x98"));
  CHECK_FALSE(valid("\xc3\x28"));
  CHECK_FALSE(valid("\xe2\x28\xa1"));      // bad second byte of three
  CHECK_FALSE(valid("\xe2\x82\x28"));      // bad third byte of three
  CHECK_FALSE(valid("\xf0\x90\x28\xbc"));  // bad third byte of four
  CHECK_FALSE(valid(
      "\xf0\x90\x8c\x28"));  // bad fourth byte of four                  // continuation missing
  CHECK_FALSE(valid("01234567890123456789\xc3"));  // after the fast path
  CHECK_FALSE(
      valid("0123456789012345678901234567890\x80"
            "0123456789"));
}

TEST_CASE("UTF-8 validator works incrementally across feeds", "[websocket][utf8]") {
  const std::string_view emoji = "\xf0\x9f\x98\x80";  // U+1F600
  for (std::size_t cut = 0; cut <= emoji.size(); ++cut) {
    utf8_validator v;
    REQUIRE(v.feed(bytes_of(emoji.substr(0, cut))));
    CHECK(v.complete() == (cut == 0 || cut == 4));
    REQUIRE(v.feed(bytes_of(emoji.substr(cut))));
    CHECK(v.complete());
  }
  // Fails at the first impossible byte, before the sequence would end, and stays failed.
  utf8_validator v;
  REQUIRE(v.feed(bytes_of("ok \xed")));
  CHECK_FALSE(v.complete());
  CHECK_FALSE(v.feed(bytes_of("\xa0")));  // surrogate decided at the second byte
  CHECK_FALSE(v.feed(bytes_of("fine")));
  CHECK_FALSE(v.complete());
  v.reset();
  CHECK(v.feed(bytes_of("fine")));
  CHECK(v.complete());
  // Every split of a mixed string into three feeds agrees with the one-shot answer.
  const std::string mixed = "h\xc3\xa9llo w\xe2\x82\xacrld \xf0\x9f\x98\x80!";
  for (std::size_t a = 0; a <= mixed.size(); ++a) {
    for (std::size_t b = a; b <= mixed.size(); ++b) {
      utf8_validator w;
      const std::string_view m = mixed;
      REQUIRE(w.feed(bytes_of(m.substr(0, a))));
      REQUIRE(w.feed(bytes_of(m.substr(a, b - a))));
      REQUIRE(w.feed(bytes_of(m.substr(b))));
      REQUIRE(w.complete());
    }
  }
}

// ---- reader.hpp -----------------------------------------------------------------------------

namespace {

// Records every event as text, so event sequences compare with ==.
struct recorder {
  std::vector<std::string> events;
  std::vector<shared_bytes> messages;
  void on_message(payload_kind k, shared_bytes b) {
    events.push_back((k == payload_kind::text ? "text:" : "binary:") + std::string(b.view()));
    messages.push_back(std::move(b));
  }
  void on_ping(std::span<const std::byte> p) {
    events.push_back("ping:" + std::string(text_of(p)));
  }
  void on_pong(std::span<const std::byte> p) {
    events.push_back("pong:" + std::string(text_of(p)));
  }
  void on_close(std::uint16_t code, std::string_view reason) {
    events.push_back("close:" + std::to_string(code) + ":" + std::string(reason));
  }
};
static_assert(frame_handler<recorder>);

std::vector<std::byte> client(opcode op, std::string_view payload, bool fin = true,
                              std::uint8_t rsv = 0) {
  return encode_client_frame(op, fin, bytes_of(payload), test_key, rsv);
}

std::vector<std::byte> concat(std::initializer_list<std::vector<std::byte>> parts) {
  std::vector<std::byte> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

struct run_result {
  std::vector<std::string> events;
  read_status status = read_status::ok;
  close_code error{};
  bool idle = false;
};

// Feeds `wire` in pieces of the sizes `next_piece()` returns (a copy: the reader unmasks in place).
template <class Next>
run_result run(std::vector<std::byte> wire, Next next_piece, reader_limits limits = {}) {
  frame_reader reader(limits);
  recorder rec;
  run_result out;
  std::size_t at = 0;
  while (at < wire.size() && out.status == read_status::ok) {
    const std::size_t n = std::min(next_piece(), wire.size() - at);
    out.status = reader.consume(std::span<std::byte>(wire).subspan(at, n), rec);
    at += n;
  }
  out.events = rec.events;
  out.error = reader.error();
  out.idle = reader.idle();
  return out;
}

run_result run_whole(std::vector<std::byte> wire, reader_limits limits = {}) {
  const std::size_t n = wire.size();
  return run(
      std::move(wire), [n] { return n; }, limits);
}

run_result run_bytewise(std::vector<std::byte> wire, reader_limits limits = {}) {
  return run(
      std::move(wire), [] { return std::size_t{1}; }, limits);
}

}  // namespace

TEST_CASE("frame_reader is small", "[websocket][reader]") {
  STATIC_REQUIRE(sizeof(frame_reader) <= 64);
}

TEST_CASE("frame_reader gives the same events whole, byte by byte and in random pieces",
          "[websocket][reader]") {
  const std::string big(70000, 'B');
  const std::string mid(300, 'm');
  const auto wire = concat({
      client(opcode::text, "Hello"),
      client(opcode::binary, ""),
      client(opcode::text, ""),
      client(opcode::binary, mid),
      client(opcode::text, "fra", false),
      client(opcode::ping, "p1"),  // control frames may sit between fragments (5.4)
      client(opcode::continuation, "gm\xc3", false),
      client(opcode::pong, ""),
      client(opcode::continuation, "\xa9nt", true),
      client(opcode::binary, big),
      client(opcode::binary, "", false),
      client(opcode::continuation, "", false),
      client(opcode::continuation, "x", true),
      client(opcode::ping, std::string(125, 'P')),
      client(opcode::close,
             "\x03\xe8"
             "done"),
      client(opcode::text, "ignored after close"),
  });
  const std::vector<std::string> expected = {
      "text:Hello",
      "binary:",
      "text:",
      "binary:" + mid,
      "ping:p1",
      "pong:",
      "text:fragm\xc3\xa9nt",
      "binary:" + big,
      "binary:x",
      "ping:" + std::string(125, 'P'),
      "close:1000:done",
  };
  const run_result whole = run_whole(wire);
  CHECK(whole.status == read_status::ok);
  CHECK(whole.events == expected);
  CHECK(whole.idle);
  const run_result bytewise = run_bytewise(wire);
  CHECK(bytewise.status == read_status::ok);
  CHECK(bytewise.events == expected);
  CHECK(bytewise.idle);
  std::mt19937 rng(12345);
  for (int round = 0; round < 20; ++round) {
    std::uniform_int_distribution<std::size_t> piece(1, round < 10 ? 20 : 5000);
    const run_result r = run(wire, [&] { return piece(rng); });
    INFO("round " << round);
    CHECK(r.status == read_status::ok);
    CHECK(r.events == expected);
  }
}

TEST_CASE("frame_reader: protocol violations give the right close code", "[websocket][reader]") {
  struct row {
    const char* what;
    std::vector<std::byte> wire;
    close_code code;
  };
  auto unmasked = vec_of(std::string_view("\x81\x02hi", 4));
  auto big_control = client(opcode::ping, std::string(126, 'x'));
  auto huge_len = client(opcode::binary, "");
  huge_len[1] = std::byte{0xFF};  // masked, 127: 64-bit length follows
  huge_len.insert(huge_len.begin() + 2, {std::byte{0x80}, std::byte{}, std::byte{}, std::byte{},
                                         std::byte{}, std::byte{}, std::byte{}, std::byte{1}});
  const row rows[] = {
      {"unmasked client frame", unmasked, close_code::protocol_error},
      {"RSV1", client(opcode::text, "x", true, 4), close_code::protocol_error},
      {"RSV2", client(opcode::text, "x", true, 2), close_code::protocol_error},
      {"RSV3", client(opcode::ping, "", true, 1), close_code::protocol_error},
      {"reserved opcode 3", client(static_cast<opcode>(3), "x"), close_code::protocol_error},
      {"reserved opcode 7", client(static_cast<opcode>(7), ""), close_code::protocol_error},
      {"reserved opcode B", client(static_cast<opcode>(0xB), ""), close_code::protocol_error},
      {"reserved opcode F", client(static_cast<opcode>(0xF), ""), close_code::protocol_error},
      {"control frame of 126 bytes", big_control, close_code::protocol_error},
      {"fragmented ping", client(opcode::ping, "x", false), close_code::protocol_error},
      {"fragmented close", client(opcode::close, "", false), close_code::protocol_error},
      {"continuation without start", client(opcode::continuation, "x"), close_code::protocol_error},
      {"text inside fragmented message",
       concat({client(opcode::text, "a", false), client(opcode::text, "b")}),
       close_code::protocol_error},
      {"binary inside fragmented message",
       concat({client(opcode::binary, "a", false), client(opcode::ping, ""),
               client(opcode::binary, "b")}),
       close_code::protocol_error},
      {"64-bit length with top bit", huge_len, close_code::protocol_error},
      {"close payload of 1 byte", client(opcode::close, "\x03"), close_code::protocol_error},
      {"close code 1005 on the wire", client(opcode::close, "\x03\xed"),
       close_code::protocol_error},
      {"close code 999", client(opcode::close, "\x03\xe7"), close_code::protocol_error},
      {"close code 5000", client(opcode::close, "\x13\x88"), close_code::protocol_error},
      {"close reason not UTF-8", client(opcode::close, "\x03\xe8\xff"),
       close_code::invalid_payload},
      {"text not UTF-8", client(opcode::text, "a\xc0\xaf"), close_code::invalid_payload},
      {"text truncated UTF-8", client(opcode::text, "a\xe2\x82"), close_code::invalid_payload},
      {"surrogate across fragments",
       concat({client(opcode::text, "a\xed", false), client(opcode::continuation, "\xa0\x80")}),
       close_code::invalid_payload},
      {"fragmented text ends inside a character",
       concat({client(opcode::text, "a\xf0\x9f", false), client(opcode::continuation, "\x98")}),
       close_code::invalid_payload},
  };
  for (const row& r : rows) {
    INFO(r.what);
    const run_result whole = run_whole(r.wire);
    CHECK(whole.status == read_status::error);
    CHECK(whole.error == r.code);
    CHECK(whole.idle);  // an error releases everything
    const run_result bytewise = run_bytewise(r.wire);
    CHECK(bytewise.status == read_status::error);
    CHECK(bytewise.error == r.code);
    CHECK(bytewise.events == whole.events);
  }
}

TEST_CASE("frame_reader: invalid UTF-8 fails fast, before the message or frame ends",
          "[websocket][reader]") {
  // The first fragment is bad: no need to wait for the rest (RFC 6455 8.1, Autobahn 6.4).
  auto first = client(opcode::text, "ok\xc0", false);
  frame_reader reader;
  recorder rec;
  CHECK(reader.consume(first, rec) == read_status::error);
  CHECK(reader.error() == close_code::invalid_payload);
  // Within one frame: the bad byte arrives, the rest of the frame has not.
  auto frame = client(opcode::text, "okay \xff and a long tail that never arrives");
  frame_reader r2;
  CHECK(r2.consume(std::span<std::byte>(frame).first(12), rec) == read_status::error);
  CHECK(r2.error() == close_code::invalid_payload);
  CHECK(rec.events.empty());
}

TEST_CASE("frame_reader: 1009 from the header, before buffering the payload",
          "[websocket][reader]") {
  reader_limits limits;
  limits.max_message_size = 1000;
  // Exactly at the limit is fine, also across fragments.
  CHECK(run_whole(client(opcode::binary, std::string(1000, 'a')), limits).events.size() == 1);
  CHECK(run_whole(concat({client(opcode::text, std::string(600, 'a'), false),
                          client(opcode::continuation, std::string(400, 'a'))}),
                  limits)
            .events.size() == 1);
  // Only the header of a too-big frame arrives: rejected at once.
  auto header_only = client(opcode::binary, std::string(1001, 'a'));
  header_only.resize(8);
  frame_reader reader(limits);
  recorder rec;
  CHECK(reader.consume(header_only, rec) == read_status::error);
  CHECK(reader.error() == close_code::message_too_big);
  CHECK(reader.idle());
  // The second fragment pushes the message over: rejected at its header.
  auto two = concat({client(opcode::text, std::string(600, 'a'), false),
                     client(opcode::continuation, std::string(401, 'a'))});
  two.resize(two.size() - 401);
  const run_result r = run_whole(two, limits);
  CHECK(r.status == read_status::error);
  CHECK(r.error == close_code::message_too_big);
  // A 2^62-byte announcement with the default limit.
  auto huge = client(opcode::binary, std::string(70000, 'a'));
  huge[2] = std::byte{0x40};  // top bits of the 64-bit length
  huge.resize(14);
  CHECK(run_whole(huge).error == close_code::message_too_big);
}

// A message of many tiny fragments is refused at the header of the one too many (1008), and
// the count starts again with every message. Before, any number of fragments was taken.
TEST_CASE("frame_reader: 1008 past max_fragments, at that frame's header", "[websocket][reader]") {
  reader_limits limits;
  limits.max_fragments = 8;
  auto join = [](const std::vector<std::vector<std::byte>>& parts) {
    std::vector<std::byte> out;
    for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  auto fragments = [&](int n) {
    std::vector<std::vector<std::byte>> parts;
    parts.push_back(client(opcode::binary, "a", n == 1));
    for (int i = 2; i <= n; ++i) parts.push_back(client(opcode::continuation, "b", i == n));
    return join(parts);
  };
  CHECK(run_whole(fragments(8), limits).events.size() == 1);
  CHECK(run_whole(concat({fragments(8), fragments(8)}), limits).events.size() == 2);
  auto over = fragments(9);
  over.resize(over.size() - 1);  // the payload of the ninth never comes: refused at its header
  const run_result r = run_whole(over, limits);
  CHECK(r.status == read_status::error);
  CHECK(r.error == close_code::policy_violation);
  CHECK(r.events.empty());
  // The default refuses a message of 100,000 empty fragments.
  std::vector<std::vector<std::byte>> empty_parts{client(opcode::binary, "", false)};
  for (int i = 0; i < 100000; ++i) empty_parts.push_back(client(opcode::continuation, "", false));
  CHECK(run_whole(join(empty_parts)).error == close_code::policy_violation);
}

TEST_CASE("frame_reader: idle() and heap use follow messages in flight", "[websocket][reader]") {
  frame_reader reader;
  recorder rec;
  CHECK(reader.idle());
  auto hello = client(opcode::text, "Hello");
  REQUIRE(reader.consume(hello, rec) == read_status::ok);
  CHECK(reader.idle());
  // Partial header: not idle.
  auto second = client(opcode::binary, "abc");
  REQUIRE(reader.consume(std::span<std::byte>(second).first(1), rec) == read_status::ok);
  CHECK_FALSE(reader.idle());
  REQUIRE(reader.consume(std::span<std::byte>(second).subspan(1, 7), rec) == read_status::ok);
  CHECK_FALSE(reader.idle());  // one payload byte to go
  REQUIRE(reader.consume(std::span<std::byte>(second).subspan(8), rec) == read_status::ok);
  CHECK(reader.idle());
  // First fragment complete, message not: not idle.
  auto frag = client(opcode::text, "part", false);
  REQUIRE(reader.consume(frag, rec) == read_status::ok);
  CHECK_FALSE(reader.idle());
  auto ping = client(opcode::ping, "x");
  REQUIRE(reader.consume(ping, rec) == read_status::ok);
  CHECK_FALSE(reader.idle());
  auto last = client(opcode::continuation, "s");
  REQUIRE(reader.consume(last, rec) == read_status::ok);
  CHECK(reader.idle());
  // A split ping while no message is in flight: idle again once delivered.
  auto split_ping = client(opcode::ping, "hello ping");
  REQUIRE(reader.consume(std::span<std::byte>(split_ping).first(9), rec) == read_status::ok);
  CHECK_FALSE(reader.idle());
  REQUIRE(reader.consume(std::span<std::byte>(split_ping).subspan(9), rec) == read_status::ok);
  CHECK(reader.idle());
  const std::vector<std::string> expected = {"text:Hello", "binary:abc", "ping:x", "text:parts",
                                             "ping:hello ping"};
  CHECK(rec.events == expected);
  // Every delivered message is the sole owner of its buffer (no hidden extra references).
  for (const auto& m : rec.messages) CHECK(m.use_count() == 1);
}

TEST_CASE("frame_reader: close frames", "[websocket][reader]") {
  CHECK(run_whole(client(opcode::close, "")).events == std::vector<std::string>{"close:1005:"});
  CHECK(run_whole(client(opcode::close, "\x0f\xa0")).events ==
        std::vector<std::string>{"close:4000:"});
  CHECK(run_bytewise(client(opcode::close, "\x03\xe9g\xc3\xa9")).events ==
        std::vector<std::string>{"close:1001:g\xc3\xa9"});
  // After close, later bytes (even garbage) are ignored and consume reports ok.
  frame_reader reader;
  recorder rec;
  auto wire = concat({client(opcode::close, "\x03\xe8"), vec_of("garbage")});
  CHECK(reader.consume(wire, rec) == read_status::ok);
  CHECK(reader.finished());
  auto more = client(opcode::text, "late");
  CHECK(reader.consume(more, rec) == read_status::ok);
  CHECK(rec.events == std::vector<std::string>{"close:1000:"});
  CHECK(reader.idle());
}

TEST_CASE("frame_reader: large fragmented message is handed over without slack",
          "[websocket][reader]") {
  std::vector<std::byte> wire;
  std::string expected;
  for (int i = 0; i < 50; ++i) {
    const std::string part(3000 + i, static_cast<char>('a' + i % 26));
    expected += part;
    const auto f = client(i == 0 ? opcode::binary : opcode::continuation, part, i == 49);
    wire.insert(wire.end(), f.begin(), f.end());
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::size_t> piece(1, 9000);
  const run_result r = run(wire, [&] { return piece(rng); });
  REQUIRE(r.events.size() == 1);
  CHECK(r.events[0] == "binary:" + expected);
}
