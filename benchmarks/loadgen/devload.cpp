// devgate_devload: the load generator of the device-path benchmarks (benchmarks/README.md,
// benchmarks/run.sh --device): devices sending small messages to a gateway or a broker, each
// message completed by its acknowledgement (or, where the protocol has none, by its receipt at
// the sink), C connections with W messages in flight each.
//
// Built like devgate_loadgen: one thread, one epoll set, every connection non-blocking and
// edge-triggered, bound to its own loopback source address 127.0.0.X. Every protocol is written
// here once at the byte level (its own WebSocket client framing, MQTT 3.1.1 packets, NATS text
// protocol, Engine.IO/Socket.IO packets), independent of devgate's codecs.
//
// Scenarios (--scenario):
//   v1        devgate protocol v1 (docs/PROTOCOL.md): upgrade to /ws/dev<N>, hello, welcome, then
//             {"type":"send","id":N,"data":"<payload>"} completed by {"type":"sent","id":N}.
//             --subscribers K adds K connections (/ws/sub<N>) subscribed to the `server` topic,
//             whose events are counted. `deliver`s (the demo server's receipts) are acknowledged
//             once per read batch, as a device does.
//   mqtt      MQTT 3.1.1: publishers PUBLISH to devices/dev<N> at --qos 0 or 1 (QoS 1 completed by
//             PUBACK, QoS 0 by the sink's receipt); one sink connection subscribed to devices/#.
//   nats      NATS: publishers PUB to devices.dev<N>, one sink connection SUB devices.>; a message
//             is completed by its receipt at the sink, or with --ack 1 by the reply the sink
//             sends to the publisher's inbox (request-reply).
//   socketio  Engine.IO 4 / Socket.IO 5 over WebSocket: 42<id>["msg","<payload>"] completed by
//             the server's 43<id>[...] acknowledgement.
//
// Every payload is --size (64) ASCII bytes: the send time (16 hex digits of CLOCK_MONOTONIC ns),
// the publisher's index (8 hex digits), then 'x'. Latency is send to acknowledgement, or send to
// sink receipt where there is no acknowledgement. `complete` says the sink received every
// message that was acknowledged (or sent, without acknowledgements): the generator's own sink
// counts for mqtt and nats, the server's count (HTTP GET --count-path) for v1 and socketio.
//
// Output: one JSON line on stdout. Server cost from /proc/<server-pid>/stat and status.
//
//   devgate_devload --port P --server-pid PID --server NAME --scenario S [--connections C]
//                   [--window W] [--size BYTES] [--seconds S] [--warmup S] [--subscribers K]
//                   [--qos 0|1] [--ack 0|1] [--count-path /count] [--concurrency K]

#include <arpa/inet.h>     // htonl
#include <netinet/in.h>    // sockaddr_in, IP_BIND_ADDRESS_NO_PORT
#include <netinet/tcp.h>   // TCP_NODELAY
#include <sys/epoll.h>     // the event loop
#include <sys/resource.h>  // RLIMIT_NOFILE
#include <sys/socket.h>    // sockets
#include <unistd.h>        // close

#include <algorithm>    // std::sort, std::min
#include <cerrno>       // EAGAIN, EINPROGRESS
#include <cstdint>      // fixed-width integers
#include <cstdio>       // std::printf
#include <cstdlib>      // std::strtoull
#include <cstring>      // std::memcpy, std::strerror
#include <sstream>      // JSON output
#include <string>       // buffers, options
#include <string_view>  // parsing
#include <utility>      // std::pair
#include <vector>       // connections, samples

#include "connect.hpp"  // open_loopback: a client socket from its own loopback address
#include "proc.hpp"     // the server's CPU time and RSS, the generator's CPU time
#include "stamp.hpp"    // now_ns: the clock of the latency stamps

namespace {

using devgate_bench::now_ns;
using devgate_bench::proc_cpu_seconds;
using devgate_bench::proc_status_kb;
using devgate_bench::self_cpu_seconds;

struct options {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::string scenario = "v1";
  std::string server = "unknown";
  int server_pid = 0;
  unsigned connections = 100;
  unsigned window = 16;
  std::size_t size = 64;
  double seconds = 5;
  double warmup = 1;
  unsigned subscribers = 0;
  bool batch = false;  // v1 subscribers ask for the batched server log (one frame per batch)
  unsigned qos = 1;
  bool ack = false;
  std::string count_path = "/count";
  unsigned concurrency = 128;  // connections being set up at once
};

enum class proto : std::uint8_t { v1, mqtt, nats, socketio };
enum class role : std::uint8_t { publisher, sink, subscriber };
// connecting: TCP; upgrading: WebSocket handshake; greeting: the protocol's own opening;
// ready: may send load.
enum class phase : std::uint8_t { connecting, upgrading, greeting, ready, closed };

struct connection {
  int fd = -1;
  phase state = phase::closed;
  role kind = role::publisher;
  unsigned index = 0;  // publisher index (names, payload), subscriber index
  std::string in;      // received bytes not yet parsed
  std::string out;     // bytes not yet written
  std::size_t out_off = 0;
  bool dirty = false;                                            // in the flush list
  std::vector<std::pair<std::uint32_t, std::uint64_t>> pending;  // (id, send time)
  std::uint32_t next_id = 0;
  unsigned in_flight = 0;
  std::string message;            // WebSocket: data message being assembled
  std::uint64_t deliver_seq = 0;  // v1: highest `deliver` seq received
  std::uint64_t acked_seq = 0;    // v1: highest seq acknowledged to the server
  std::uint64_t events = 0;       // v1 subscriber: events received while measuring
};

constexpr unsigned char mask_key[4] = {0x37, 0xfa, 0x21, 0x3d};
constexpr char hex_digits[] = "0123456789abcdef";

// ---- small parsing helpers ---------------------------------------------------------------------
std::uint64_t parse_hex(std::string_view s) {
  std::uint64_t v = 0;
  for (const char ch : s) {
    const unsigned d =
        ch >= 'a' ? static_cast<unsigned>(ch - 'a' + 10) : static_cast<unsigned>(ch - '0');
    v = (v << 4) | (d & 15u);
  }
  return v;
}

std::uint64_t parse_dec(std::string_view s, std::size_t& at) {
  std::uint64_t v = 0;
  while (at < s.size() && s[at] >= '0' && s[at] <= '9')
    v = v * 10 + static_cast<unsigned>(s[at++] - '0');
  return v;
}

// The string value of `"key":"..."` in a flat JSON text (the server's replies), or empty.
std::string_view json_string(std::string_view text, std::string_view key_quoted_colon) {
  const auto k = text.find(key_quoted_colon);
  if (k == std::string_view::npos) return {};
  auto at = k + key_quoted_colon.size();
  while (at < text.size() && text[at] == ' ') ++at;
  if (at >= text.size() || text[at] != '"') return {};
  const auto end = text.find('"', at + 1);
  if (end == std::string_view::npos) return {};
  return text.substr(at + 1, end - at - 1);
}

// The unsigned value of `"key":N`, or nullopt-like `found = false`.
bool json_uint(std::string_view text, std::string_view key_quoted_colon, std::uint64_t& v) {
  const auto k = text.find(key_quoted_colon);
  if (k == std::string_view::npos) return false;
  auto at = k + key_quoted_colon.size();
  while (at < text.size() && text[at] == ' ') ++at;
  if (at >= text.size() || text[at] < '0' || text[at] > '9') return false;
  v = parse_dec(text, at);
  return true;
}

class devload {
 public:
  explicit devload(options o) : o_(std::move(o)) {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    rbuf_.resize(1u << 18);
    if (o_.scenario == "v1") {
      proto_ = proto::v1;
    } else if (o_.scenario == "mqtt") {
      proto_ = proto::mqtt;
    } else if (o_.scenario == "nats") {
      proto_ = proto::nats;
    } else if (o_.scenario == "socketio") {
      proto_ = proto::socketio;
    } else {
      bad_scenario_ = true;
    }
    if (o_.size < 24) o_.size = 24;
    // Acknowledged: completed by an answer to the publisher; else by the sink's receipt.
    acked_ = proto_ == proto::v1 || proto_ == proto::socketio ||
             (proto_ == proto::mqtt && o_.qos == 1) || (proto_ == proto::nats && o_.ack);
    has_sink_conn_ = proto_ == proto::mqtt || proto_ == proto::nats;
    conns_.reserve(o_.connections + o_.subscribers + 2);  // no reallocation: indices in epoll
  }

  int run() {
    if (bad_scenario_) {
      std::fprintf(stderr, "devload: unknown scenario %s\n", o_.scenario.c_str());
      return 2;
    }
    // The sink (and the v1 subscribers) first, so that nothing is published before they listen.
    const std::size_t listeners = (has_sink_conn_ ? 1 : 0) + o_.subscribers;
    for (std::size_t i = 0; i < listeners; ++i) {
      if (i == 0 && has_sink_conn_) {
        add_role(role::sink, 0);
      } else {
        add_role(role::subscriber, static_cast<unsigned>(i - (has_sink_conn_ ? 1 : 0)));
      }
    }
    if (!open_until(listeners, 60)) return fail("could not open the sink/subscriber connections");
    for (unsigned i = 0; i < o_.connections; ++i) add_role(role::publisher, i);
    if (!open_until(listeners + o_.connections, 120)) return fail("could not open all connections");
    return measure();
  }

 private:
  // ---- set-up
  // ------------------------------------------------------------------------------------
  void add_role(role r, unsigned index) { planned_.push_back({r, index}); }

  bool start_connection() {
    const auto slot = static_cast<unsigned>(conns_.size());
    const auto plan = planned_[slot];
    conns_.emplace_back();
    connection& c = conns_.back();
    c.kind = plan.first;
    c.index = plan.second;
    c.pending.reserve(o_.window);
    const auto o = devgate_bench::open_loopback(slot, o_.host, o_.port, ep_);
    if (o.fd < 0) {
      note_error(o.failed, o.error);
      ++failed_open_;
      return false;
    }
    c.fd = o.fd;
    c.state = phase::connecting;
    ++pending_open_;
    return true;
  }

  bool open_until(std::size_t target, double timeout_s) {
    const std::uint64_t deadline = now_ns() + static_cast<std::uint64_t>(timeout_s * 1e9);
    while (now_ns() < deadline) {
      while (conns_.size() < target && pending_open_ < o_.concurrency) {
        if (!start_connection()) break;
      }
      if (ready_ + failed_open_ >= target || (conns_.size() < target && pending_open_ == 0)) break;
      poll(2);
    }
    return ready_ >= target;
  }

  void close_conn(connection& c) {
    if (c.fd >= 0) ::close(c.fd);
    if (c.state == phase::connecting || c.state == phase::upgrading || c.state == phase::greeting) {
      --pending_open_;
      ++failed_open_;
    }
    if (c.state == phase::ready) {
      --ready_;
      ++closed_ready_;
    }
    c.fd = -1;
    c.state = phase::closed;
  }

  void became_ready(connection& c) {
    c.state = phase::ready;
    --pending_open_;
    ++ready_;
  }

  // The opening bytes once TCP is up.
  void on_connected(connection& c) {
    if (proto_ == proto::v1 || proto_ == proto::socketio) {
      c.state = phase::upgrading;
      std::string target;
      if (proto_ == proto::socketio) {
        target = "/socket.io/?EIO=4&transport=websocket";
      } else {
        target = (c.kind == role::subscriber ? "/ws/sub" : "/ws/dev") + std::to_string(c.index);
      }
      out(c,
          "GET " + target + " HTTP/1.1\r\nHost: " + o_.host +
              "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
      return;
    }
    c.state = phase::greeting;
    if (proto_ == proto::mqtt) mqtt_connect(c);
    // NATS: the server speaks first (INFO).
  }

  // ---- event loop
  // ----------------------------------------------------------------------------------
  void poll(int timeout_ms) {
    epoll_event events[512];
    const int n = epoll_wait(ep_, events, 512, timeout_ms);
    for (int i = 0; i < n; ++i) {
      connection& c = conns_[events[i].data.u32];
      if (c.state == phase::closed) continue;
      if (c.state == phase::connecting && (events[i].events & (EPOLLOUT | EPOLLERR))) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
          note_error("connect", err);
          close_conn(c);
          continue;
        }
        on_connected(c);
      }
      if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) on_readable(c);
      if (c.state != phase::closed && (events[i].events & EPOLLOUT)) mark(c);
    }
    // Everything produced by this batch of events leaves now, one write per connection.
    for (const auto slot : dirty_) {
      connection& c = conns_[slot];
      c.dirty = false;
      if (c.state != phase::closed) flush(c);
    }
    dirty_.clear();
  }

  void mark(connection& c) {
    if (!c.dirty) {
      c.dirty = true;
      dirty_.push_back(static_cast<unsigned>(&c - conns_.data()));
    }
  }

  void out(connection& c, std::string_view bytes) {
    c.out.append(bytes);
    mark(c);
  }

  void flush(connection& c) {
    while (c.out_off < c.out.size()) {
      const ssize_t n =
          ::send(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN) return;  // EPOLLOUT marks it again
        note_error("send", errno);
        close_conn(c);
        return;
      }
      c.out_off += static_cast<std::size_t>(n);
    }
    c.out.clear();
    c.out_off = 0;
  }

  void on_readable(connection& c) {
    for (;;) {
      const ssize_t n = ::recv(c.fd, rbuf_.data(), rbuf_.size(), 0);
      if (n == 0) {
        if (!stopping_) note_error("closed by the server", 0);
        close_conn(c);
        return;
      }
      if (n < 0) {
        if (errno != EAGAIN) {
          note_error("recv", errno);
          close_conn(c);
        }
        break;
      }
      c.in.append(rbuf_.data(), static_cast<std::size_t>(n));
      std::size_t used = 0;
      switch (proto_) {
        case proto::v1:
        case proto::socketio:
          used = parse_ws(c);
          break;
        case proto::mqtt:
          used = parse_mqtt(c);
          break;
        case proto::nats:
          used = parse_nats(c);
          break;
      }
      if (c.state == phase::closed) return;
      c.in.erase(0, used);
    }
    // v1: acknowledge the `deliver`s of this read batch at once, as a device does.
    if (proto_ == proto::v1 && c.deliver_seq > c.acked_seq) {
      c.acked_seq = c.deliver_seq;
      ws_text(c, "{\"type\":\"ack\",\"seq\":" + std::to_string(c.acked_seq) + "}");
    }
  }

  // ---- payloads
  // ------------------------------------------------------------------------------------ Writes the
  // payload (send time, publisher index, padding) at `p`.
  void stamp(char* p, std::uint64_t t, unsigned index) const {
    for (int i = 15; i >= 0; --i, t >>= 4) p[i] = hex_digits[t & 15];
    std::uint32_t x = index;
    for (int i = 23; i >= 16; --i, x >>= 4) p[i] = hex_digits[x & 15];
    std::memset(p + 24, 'x', o_.size - 24);
  }

  // One message from publisher `c`, stamped now.
  void send_one(connection& c) {
    const std::uint64_t t = now_ns();
    char payload[4096];
    const std::size_t size = std::min<std::size_t>(o_.size, sizeof payload);
    stamp(payload, t, c.index);
    const std::string_view pl(payload, size);
    ++c.in_flight;
    ++sent_total_;
    switch (proto_) {
      case proto::v1: {
        const std::uint32_t id = ++c.next_id;
        c.pending.emplace_back(id, t);
        std::string m = "{\"type\":\"send\",\"id\":" + std::to_string(id) + ",\"data\":\"";
        m.append(pl);
        m += "\"}";
        ws_text(c, m);
        break;
      }
      case proto::socketio: {
        const std::uint32_t id = ++c.next_id;
        c.pending.emplace_back(id, t);
        std::string m = "42" + std::to_string(id) + "[\"msg\",\"";
        m.append(pl);
        m += "\"]";
        ws_text(c, m);
        break;
      }
      case proto::mqtt: {
        std::uint16_t packet_id = 0;
        if (o_.qos == 1) {
          if (++c.next_id > 0xffff) c.next_id = 1;
          packet_id = static_cast<std::uint16_t>(c.next_id);
          c.pending.emplace_back(packet_id, t);
        }
        mqtt_publish(c, "devices/dev" + std::to_string(c.index), pl, packet_id);
        break;
      }
      case proto::nats: {
        std::string m = "PUB devices.dev" + std::to_string(c.index);
        if (o_.ack) m += " _INBOX.dev" + std::to_string(c.index);
        m += ' ';
        m += std::to_string(size);
        m += "\r\n";
        m.append(pl);
        m += "\r\n";
        out(c, m);
        break;
      }
    }
  }

  // A message of publisher `c` is complete (acknowledged, or received by the sink) after `lat` ns.
  void complete(connection& c, std::uint64_t sent_at) {
    if (c.in_flight > 0) --c.in_flight;
    ++completed_total_;
    if (measuring_) {
      ++completed_;
      const std::uint64_t lat = now_ns() - sent_at;
      latencies_.push_back(static_cast<std::uint32_t>(std::min<std::uint64_t>(lat, 0xffffffffu)));
    }
    if (sending_ && c.state == phase::ready) send_one(c);
  }

  // An acknowledgement `id` for publisher `c`: completes the pending message with that id.
  void acknowledged(connection& c, std::uint32_t id) {
    for (std::size_t i = 0; i < c.pending.size(); ++i) {
      if (c.pending[i].first == id) {
        const std::uint64_t t = c.pending[i].second;
        // Keeps the send order (the front is the oldest: see the refusals in on_ws_message).
        c.pending.erase(c.pending.begin() + static_cast<std::ptrdiff_t>(i));
        complete(c, t);
        return;
      }
    }
    ++unmatched_;
  }

  // The sink received `payload`: counts it and, without acknowledgements, completes it.
  void sink_received(std::string_view payload) {
    ++sink_count_;
    if (payload.size() < 24) {
      ++unmatched_;
      return;
    }
    if (acked_) return;
    const std::uint64_t t = parse_hex(payload.substr(0, 16));
    const auto index = static_cast<std::size_t>(parse_hex(payload.substr(16, 8)));
    const std::size_t slot = first_publisher_ + index;
    if (index >= o_.connections || slot >= conns_.size()) {
      ++unmatched_;
      return;
    }
    complete(conns_[slot], t);
  }

  // ---- WebSocket client framing (v1, socketio)
  // -------------------------------------------------------
  void ws_text(connection& c, std::string_view text) {
    char h[14];
    std::size_t hn = 0;
    const std::size_t n = text.size();
    h[hn++] = static_cast<char>(0x81);
    if (n < 126) {
      h[hn++] = static_cast<char>(0x80 | n);
    } else if (n < 65536) {
      h[hn++] = static_cast<char>(0x80 | 126);
      h[hn++] = static_cast<char>(n >> 8);
      h[hn++] = static_cast<char>(n & 0xff);
    } else {
      h[hn++] = static_cast<char>(0x80 | 127);
      for (int i = 7; i >= 0; --i)
        h[hn++] = static_cast<char>((static_cast<std::uint64_t>(n) >> (8 * i)) & 0xff);
    }
    std::memcpy(h + hn, mask_key, 4);
    hn += 4;
    c.out.append(h, hn);
    const std::size_t at = c.out.size();
    c.out.append(text);
    for (std::size_t i = 0; i < n; ++i)
      c.out[at + i] = static_cast<char>(c.out[at + i] ^ mask_key[i & 3]);
    mark(c);
  }

  void ws_control(connection& c, unsigned op, std::string_view payload) {
    char h[6] = {static_cast<char>(0x80 | op), static_cast<char>(0x80 | payload.size())};
    std::memcpy(h + 2, mask_key, 4);
    c.out.append(h, 6);
    const std::size_t at = c.out.size();
    c.out.append(payload);
    for (std::size_t i = 0; i < payload.size(); ++i)
      c.out[at + i] = static_cast<char>(c.out[at + i] ^ mask_key[i & 3]);
    mark(c);
  }

  // Parses the handshake response and whole frames in c.in; returns the bytes used.
  std::size_t parse_ws(connection& c) {
    std::string_view s(c.in);
    std::size_t at = 0;
    if (c.state == phase::upgrading) {
      const auto end = s.find("\r\n\r\n");
      if (end == std::string_view::npos) {
        if (s.size() > 8192) close_conn(c);
        return 0;
      }
      if (s.substr(0, 12) != "HTTP/1.1 101") {
        note_error("handshake (no 101)", 0);
        close_conn(c);
        return 0;
      }
      at = end + 4;
      c.state = phase::greeting;
      if (proto_ == proto::v1) ws_text(c, R"({"type":"hello","protocol":1})");
      // Socket.IO: the server sends the Engine.IO open packet first.
    }
    while (s.size() - at >= 2) {
      const auto b0 = static_cast<unsigned char>(s[at]);
      const auto b1 = static_cast<unsigned char>(s[at + 1]);
      std::size_t hlen = 2;
      std::uint64_t len = b1 & 0x7f;
      if (len == 126) {
        hlen = 4;
        if (s.size() - at < hlen) break;
        len = (std::uint64_t{static_cast<unsigned char>(s[at + 2])} << 8) |
              static_cast<unsigned char>(s[at + 3]);
      } else if (len == 127) {
        hlen = 10;
        if (s.size() - at < hlen) break;
        len = 0;
        for (int i = 0; i < 8; ++i)
          len = (len << 8) | static_cast<unsigned char>(s[at + 2 + static_cast<std::size_t>(i)]);
      }
      if (b1 & 0x80) hlen += 4;  // a server must not mask; tolerated
      if (s.size() - at < hlen + len) break;
      const std::string_view payload = s.substr(at + hlen, static_cast<std::size_t>(len));
      at += hlen + static_cast<std::size_t>(len);
      const unsigned op = b0 & 0x0f;
      const bool fin = (b0 & 0x80) != 0;
      if (op == 9) {
        ws_control(c, 0xA, payload.substr(0, 125));
        continue;
      }
      if (op == 8) {
        if (!stopping_) note_error("WebSocket close from the server", 0);
        close_conn(c);
        return at;
      }
      if (op == 0xA) continue;
      if (op != 0 || !c.message.empty() || !fin) {  // fragmented: assemble
        c.message.append(payload);
        if (!fin) continue;
        const std::string whole = std::move(c.message);
        c.message.clear();
        on_ws_message(c, whole);
      } else {
        on_ws_message(c, payload);
      }
      if (c.state == phase::closed) return at;
    }
    return at;
  }

  void on_ws_message(connection& c, std::string_view m) {
    if (proto_ == proto::socketio) {
      on_socketio(c, m);
      return;
    }
    const auto type = json_string(m, "\"type\":");
    if (type == "sent") {
      std::uint64_t id = 0;
      if (json_uint(m, "\"id\":", id)) acknowledged(c, static_cast<std::uint32_t>(id));
    } else if (type == "event") {
      if (measuring_) ++c.events;
      ++events_total_;
    } else if (type == "events") {  // a batch of server-log lines (--batch 1): one per device
      std::uint64_t lines = 0;
      for (auto at = m.find("{\"device\":"); at != std::string_view::npos;
           at = m.find("{\"device\":", at + 1)) {
        ++lines;
      }
      if (measuring_) c.events += lines;
      events_total_ += lines;
    } else if (type == "deliver") {
      std::uint64_t seq = 0;
      if (json_uint(m, "\"seq\":", seq) && seq > c.deliver_seq) c.deliver_seq = seq;
    } else if (type == "welcome") {
      if (c.kind == role::subscriber) {
        ws_text(c, o_.batch ? R"({"type":"subscribe","topic":"server","batch":true})"
                            : R"({"type":"subscribe","topic":"server"})");
      } else if (c.state == phase::greeting) {
        became_ready(c);
      }
    } else if (type == "subscribed") {
      if (c.state == phase::greeting) became_ready(c);
    } else if (type == "error") {
      const auto code = json_string(m, "\"code\":");
      if ((code == "queue_full" || code == "closed") && !c.pending.empty()) {
        // The oldest send was refused (replies keep the order of the requests).
        c.pending.erase(c.pending.begin());
        if (c.in_flight > 0) --c.in_flight;
        ++refused_;
        if (sending_) send_one(c);
      } else {
        note_error("protocol error from the server", 0);
        if (first_error_detail_.empty()) first_error_detail_ = std::string(m.substr(0, 200));
      }
    }
  }

  // Engine.IO packet types: 0 open, 2 ping, 3 pong, 4 message; Socket.IO within 4: 0 connect,
  // 2 event, 3 ack, 4 connect error.
  void on_socketio(connection& c, std::string_view m) {
    if (m.empty()) return;
    if (m[0] == '0') {
      ws_text(c, "40");
    } else if (m[0] == '2') {
      ws_text(c, "3");
    } else if (m.size() >= 2 && m[0] == '4' && m[1] == '0') {
      if (c.state == phase::greeting) became_ready(c);
    } else if (m.size() >= 3 && m[0] == '4' && m[1] == '3') {
      std::size_t at = 2;
      const auto id = parse_dec(m, at);
      acknowledged(c, static_cast<std::uint32_t>(id));
    } else if (m.size() >= 2 && m[0] == '4' && m[1] == '4') {
      note_error("socket.io connect error", 0);
    }
  }

  // ---- MQTT 3.1.1
  // -------------------------------------------------------------------------------------
  static void put_u16(std::string& s, std::size_t v) {
    s += static_cast<char>((v >> 8) & 0xff);
    s += static_cast<char>(v & 0xff);
  }
  static void put_str(std::string& s, std::string_view v) {
    put_u16(s, v.size());
    s.append(v);
  }
  void mqtt_packet(connection& c, unsigned char first, std::string_view body) {
    char h[5];
    std::size_t hn = 0;
    h[hn++] = static_cast<char>(first);
    std::size_t len = body.size();
    do {  // remaining length: 7 bits per byte, low first, bit 7 = more
      unsigned char b = static_cast<unsigned char>(len & 0x7f);
      len >>= 7;
      if (len > 0) b |= 0x80;
      h[hn++] = static_cast<char>(b);
    } while (len > 0);
    c.out.append(h, hn);
    c.out.append(body);
    mark(c);
  }
  void mqtt_connect(connection& c) {
    std::string body;
    put_str(body, "MQTT");
    body += static_cast<char>(4);     // protocol level 3.1.1
    body += static_cast<char>(0x02);  // clean session
    put_u16(body, 600);               // keepalive, s (longer than any run: no PINGREQ)
    put_str(body, c.kind == role::sink ? std::string("sink") : "dev" + std::to_string(c.index));
    mqtt_packet(c, 0x10, body);
  }
  void mqtt_publish(connection& c, const std::string& topic, std::string_view payload,
                    std::uint16_t packet_id) {
    std::string body;
    body.reserve(topic.size() + payload.size() + 4);
    put_str(body, topic);
    if (o_.qos == 1) put_u16(body, packet_id);
    body.append(payload);
    mqtt_packet(c, static_cast<unsigned char>(0x30 | (o_.qos << 1)), body);
  }
  std::size_t parse_mqtt(connection& c) {
    std::string_view s(c.in);
    std::size_t at = 0;
    for (;;) {
      if (s.size() - at < 2) break;
      std::size_t len = 0;
      std::size_t i = at + 1;
      unsigned shift = 0;
      bool whole_length = false;
      while (i < s.size() && shift <= 21) {
        const auto b = static_cast<unsigned char>(s[i++]);
        len |= static_cast<std::size_t>(b & 0x7f) << shift;
        shift += 7;
        if ((b & 0x80) == 0) {
          whole_length = true;
          break;
        }
      }
      if (!whole_length || s.size() - i < len) break;
      const auto type = static_cast<unsigned char>(s[at]) >> 4;
      const unsigned flags = static_cast<unsigned char>(s[at]) & 15u;
      const std::string_view body = s.substr(i, len);
      at = i + len;
      on_mqtt(c, type, flags, body);
      if (c.state == phase::closed) return at;
    }
    return at;
  }
  void on_mqtt(connection& c, unsigned type, unsigned flags, std::string_view body) {
    auto u16 = [&](std::size_t k) {
      return static_cast<unsigned>((static_cast<unsigned char>(body[k]) << 8) |
                                   static_cast<unsigned char>(body[k + 1]));
    };
    switch (type) {
      case 2:  // CONNACK
        if (body.size() < 2 || body[1] != 0) {
          note_error("mqtt CONNACK refused", 0);
          close_conn(c);
          return;
        }
        if (c.kind == role::sink) {
          std::string sub;
          put_u16(sub, 1);
          put_str(sub, "devices/#");
          sub += static_cast<char>(0);  // QoS 0 to the sink: it only counts
          mqtt_packet(c, 0x82, sub);
        } else {
          became_ready(c);
        }
        break;
      case 9:  // SUBACK
        if (c.state == phase::greeting) became_ready(c);
        break;
      case 4:  // PUBACK
        if (body.size() >= 2) acknowledged(c, u16(0));
        break;
      case 3: {  // PUBLISH (to the sink)
        if (body.size() < 2) return;
        const std::size_t tlen = u16(0);
        std::size_t p = 2 + tlen;
        if (((flags >> 1) & 3) > 0) p += 2;
        if (p > body.size()) return;
        sink_received(body.substr(p));
        break;
      }
      default:
        break;
    }
  }

  // ---- NATS
  // ---------------------------------------------------------------------------------------------
  std::size_t parse_nats(connection& c) {
    std::string_view s(c.in);
    std::size_t at = 0;
    for (;;) {
      const auto eol = s.find("\r\n", at);
      if (eol == std::string_view::npos) break;
      const std::string_view line = s.substr(at, eol - at);
      if (line.substr(0, 4) == "MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        const auto last_space = line.rfind(' ');
        std::size_t k = last_space + 1;
        const auto n = static_cast<std::size_t>(parse_dec(line, k));
        if (s.size() - (eol + 2) < n + 2) break;  // the payload is not all here yet
        const std::string_view payload = s.substr(eol + 2, n);
        std::string_view reply;
        {
          // Fields between MSG and #bytes: subject, sid, optional reply-to.
          std::string_view rest = line.substr(4, last_space - 4);
          std::string_view fields[3];
          std::size_t nf = 0;
          while (!rest.empty() && nf < 3) {
            const auto sp = rest.find(' ');
            fields[nf++] = rest.substr(0, sp);
            if (sp == std::string_view::npos) break;
            rest = rest.substr(sp + 1);
          }
          if (nf == 3) reply = fields[2];
        }
        at = eol + 2 + n + 2;
        on_nats_msg(c, payload, reply);
      } else {
        at = eol + 2;
        if (line.substr(0, 4) == "PING") {
          out(c, "PONG\r\n");
        } else if (line.substr(0, 4) == "PONG") {
          if (c.state == phase::greeting) became_ready(c);
        } else if (line.substr(0, 4) == "INFO") {
          std::string m =
              "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"name\":\"";
          m += c.kind == role::sink ? std::string("sink") : "dev" + std::to_string(c.index);
          m += "\"}\r\n";
          if (c.kind == role::sink) m += "SUB devices.> 1\r\n";
          if (c.kind == role::publisher && o_.ack)
            m += "SUB _INBOX.dev" + std::to_string(c.index) + " 1\r\n";
          m += "PING\r\n";  // its PONG says the subscriptions are in place
          out(c, m);
        } else if (line.substr(0, 4) == "-ERR") {
          note_error("nats -ERR", 0);
          if (first_error_detail_.empty()) first_error_detail_ = std::string(line);
        }
      }
      if (c.state == phase::closed) return at;
    }
    return at;
  }
  void on_nats_msg(connection& c, std::string_view payload, std::string_view reply) {
    if (c.kind == role::sink) {
      sink_received(payload);
      if (o_.ack && !reply.empty()) {
        std::string m = "PUB ";
        m.append(reply);
        m += ' ';
        m += std::to_string(payload.size());
        m += "\r\n";
        m.append(payload);
        m += "\r\n";
        out(c, m);
      }
      return;
    }
    // A reply to this publisher's request: it carries the request's payload (its send time).
    if (payload.size() >= 16) complete(c, parse_hex(payload.substr(0, 16)));
  }

  // ---- the run
  // -------------------------------------------------------------------------------------------
  int measure() {
    first_publisher_ = static_cast<std::size_t>((has_sink_conn_ ? 1 : 0) + o_.subscribers);
    // The server's sink may have counted before (a reused server): only what follows is ours.
    const long long sink_base = has_sink_conn_ ? 0 : http_count();
    sending_ = true;
    for (std::size_t i = first_publisher_; i < conns_.size(); ++i) {
      for (unsigned w = 0; w < o_.window; ++w) send_one(conns_[i]);
    }
    const std::uint64_t t_begin = now_ns() + static_cast<std::uint64_t>(o_.warmup * 1e9);
    const std::uint64_t t_end = t_begin + static_cast<std::uint64_t>(o_.seconds * 1e9);
    std::uint64_t m0 = 0;
    std::uint64_t m1 = 0;
    double cpu0 = 0;
    double cpu1 = 0;
    double gen0 = 0;
    double gen1 = 0;
    std::uint64_t events0 = 0;
    for (;;) {
      poll(1);
      const std::uint64_t t = now_ns();
      if (!measuring_ && m0 == 0 && t >= t_begin) {
        measuring_ = true;
        m0 = t;
        cpu0 = proc_cpu_seconds(o_.server_pid);
        gen0 = self_cpu_seconds();
        events0 = events_total_;
      }
      if (measuring_ && t >= t_end) {
        measuring_ = false;
        sending_ = false;
        m1 = t;
        cpu1 = proc_cpu_seconds(o_.server_pid);
        gen1 = self_cpu_seconds();
        break;
      }
      if (closed_ready_ > 0) return fail("connections closed during the run");
    }
    const std::uint64_t events_measured = events_total_ - events0;
    // Drain what is in flight (bounded), then compare with the sink's count.
    const std::uint64_t drain_deadline = now_ns() + 10'000'000'000ull;
    auto in_flight = [&] {
      std::uint64_t n = 0;
      for (std::size_t i = first_publisher_; i < conns_.size(); ++i) n += conns_[i].in_flight;
      return n;
    };
    while (in_flight() > 0 && now_ns() < drain_deadline) poll(5);
    const std::uint64_t lost = in_flight();
    // The sink may lag behind the acknowledgements (a queue between them): it gets 30 s more.
    const std::uint64_t count_deadline = now_ns() + 30'000'000'000ull;
    // The sink's count: ours (mqtt, nats), the server's (v1, socketio), read once it is stable.
    long long sink = -1;
    if (has_sink_conn_) {
      // The sink may still be receiving what was acknowledged: wait until it has it all.
      while (sink_count_ < completed_total_ && now_ns() < count_deadline) poll(5);
      sink = static_cast<long long>(sink_count_);
    } else {
      std::uint64_t last_change = now_ns();
      long long prev = -2;
      for (;;) {
        const long long now_count = http_count();
        sink = now_count < 0 || sink_base < 0 ? -1 : now_count - sink_base;
        if (sink >= static_cast<long long>(completed_total_)) break;
        if (sink != prev) last_change = now_ns();
        // Stuck below for 2 s, or still short at the deadline: incomplete.
        if (now_ns() - last_change > 2'000'000'000ull || now_ns() > count_deadline) break;
        prev = sink;
        wait_ms(20);
      }
    }
    stopping_ = true;
    const bool complete = sink >= 0 && static_cast<std::uint64_t>(sink) >= completed_total_ &&
                          lost == 0 && unmatched_ == 0;
    const double secs = static_cast<double>(m1 - m0) / 1e9;
    const double cpu = cpu1 - cpu0;
    std::sort(latencies_.begin(), latencies_.end());
    auto j = header();
    j.kv("C", o_.connections).kv("W", o_.window).kv("size", static_cast<double>(o_.size));
    if (proto_ == proto::mqtt) j.kv("qos", o_.qos);
    if (proto_ == proto::nats) j.kv("ack", o_.ack ? 1 : 0);
    j.raw("acknowledged", acked_ ? "true" : "false");
    j.kv("msgs", static_cast<double>(completed_)).kv("seconds", secs);
    j.kv("msgs_per_s", static_cast<double>(completed_) / secs);
    j.kv("p50_us", pct(0.5)).kv("p99_us", pct(0.99)).kv("p999_us", pct(0.999));
    j.kv("server_cpu_s", cpu);
    j.kv("msgs_per_cpu_s", cpu > 0 ? static_cast<double>(completed_) / cpu : 0);
    j.kv("gen_cpu_s", gen1 - gen0);
    j.kv("server_rss_kb", static_cast<double>(proc_status_kb(o_.server_pid, "VmRSS:")));
    if (o_.subscribers > 0) {
      j.kv("subscribers", o_.subscribers);
      j.kv("batched_log", o_.batch);
      j.kv("events_per_s", static_cast<double>(events_measured) / secs);
      j.kv("events_per_subscriber_per_s",
           static_cast<double>(events_measured) / secs / o_.subscribers);
    }
    j.kv("sent_total", static_cast<double>(sent_total_));
    j.kv("completed_total", static_cast<double>(completed_total_));
    j.kv("sink_count", static_cast<double>(sink));
    j.kv("lost", static_cast<double>(lost)).kv("unmatched", static_cast<double>(unmatched_));
    j.kv("refused", static_cast<double>(refused_)).kv("errors", static_cast<double>(errors_));
    if (errors_ > 0)
      j.kv("first_error",
           first_error_ + (first_error_detail_.empty() ? "" : " " + first_error_detail_));
    j.raw("complete", complete ? "true" : "false");
    j.print();
    return 0;
  }

  // GET count_path on the server's port, blocking (off the measured path); -1 when unreadable.
  // Understands {"count":N} and Prometheus text (devgate_dispatched_total N).
  long long http_count() {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    sockaddr_in dst{};
    dst.sin_family = AF_INET;
    dst.sin_port = htons(o_.port);
    inet_pton(AF_INET, o_.host.c_str(), &dst.sin_addr);
    timeval tv{2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::string resp;
    if (connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst) == 0) {
      const std::string req = "GET " + o_.count_path + " HTTP/1.1\r\nHost: " + o_.host +
                              "\r\nConnection: close\r\n\r\n";
      if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
        char buf[8192];
        for (;;) {
          const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
          if (n <= 0) break;
          resp.append(buf, static_cast<std::size_t>(n));
        }
      }
    }
    ::close(fd);
    std::uint64_t v = 0;
    if (json_uint(resp, "\"count\":", v)) return static_cast<long long>(v);
    const auto k = resp.find("\ndevgate_dispatched_total ");
    if (k == std::string::npos) return -1;
    std::size_t at = k + std::string_view("\ndevgate_dispatched_total ").size();
    return static_cast<long long>(parse_dec(resp, at));
  }

  // ---- output
  // ----------------------------------------------------------------------------------------------
  struct json {
    std::ostringstream s;
    bool first = true;
    json& kv(const char* k, const std::string& v) {
      s << (first ? "{" : ",") << '"' << k << "\":\"";
      for (const char ch : v) {
        if (ch == '"' || ch == '\\') s << '\\';
        if (static_cast<unsigned char>(ch) >= 0x20) s << ch;
      }
      s << '"';
      first = false;
      return *this;
    }
    json& kv(const char* k, double v) {
      s << (first ? "{" : ",") << '"' << k << "\":" << v;
      first = false;
      return *this;
    }
    json& raw(const char* k, const std::string& v) {
      s << (first ? "{" : ",") << '"' << k << "\":" << v;
      first = false;
      return *this;
    }
    void print() {
      s << "}\n";
      std::fputs(s.str().c_str(), stdout);
      std::fflush(stdout);
    }
  };

  json header() {
    json j;
    j.s.precision(6);
    j.kv("scenario", o_.scenario).kv("server", o_.server);
    return j;
  }

  double pct(double p) const {
    if (latencies_.empty()) return 0;
    const auto k = static_cast<std::size_t>(p * static_cast<double>(latencies_.size() - 1));
    return latencies_[k] / 1000.0;
  }

  void note_error(const char* where, int err) {
    if (errors_++ == 0) {
      first_error_ = std::string(where) + (err != 0 ? std::string(": ") + std::strerror(err) : "");
    }
  }

  void wait_ms(int ms) {
    const std::uint64_t until = now_ns() + static_cast<std::uint64_t>(ms) * 1000000u;
    while (now_ns() < until) poll(5);
  }

  int fail(const std::string& why) {
    auto j = header();
    j.kv("error", why)
        .kv("open", static_cast<double>(ready_))
        .kv("errors", static_cast<double>(errors_))
        .kv("first_error",
            first_error_ + (first_error_detail_.empty() ? "" : " " + first_error_detail_));
    j.print();
    return 1;
  }

  options o_;
  proto proto_ = proto::v1;
  bool bad_scenario_ = false;
  bool acked_ = true;
  bool has_sink_conn_ = false;
  int ep_ = -1;
  std::vector<std::pair<role, unsigned>> planned_;  // role and index of each connection slot
  std::vector<connection> conns_;
  std::vector<unsigned> dirty_;  // connections with bytes to write after this event batch
  std::vector<char> rbuf_;
  std::size_t first_publisher_ = 0;
  std::size_t pending_open_ = 0;
  std::size_t ready_ = 0;
  std::size_t failed_open_ = 0;
  std::size_t closed_ready_ = 0;
  std::uint64_t errors_ = 0;
  std::string first_error_;
  std::string first_error_detail_;
  bool sending_ = false;
  bool measuring_ = false;
  bool stopping_ = false;
  std::uint64_t sent_total_ = 0;
  std::uint64_t completed_total_ = 0;
  std::uint64_t completed_ = 0;
  std::uint64_t sink_count_ = 0;
  std::uint64_t events_total_ = 0;
  std::uint64_t unmatched_ = 0;
  std::uint64_t refused_ = 0;
  std::vector<std::uint32_t> latencies_;
};

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const char* v = argv[i + 1];
    if (k == "--host") {
      o.host = v;
    } else if (k == "--port") {
      o.port = static_cast<std::uint16_t>(std::strtoul(v, nullptr, 10));
    } else if (k == "--scenario") {
      o.scenario = v;
    } else if (k == "--server") {
      o.server = v;
    } else if (k == "--server-pid") {
      o.server_pid = std::atoi(v);
    } else if (k == "--connections") {
      o.connections = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (k == "--window") {
      o.window = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (k == "--size") {
      o.size = std::strtoull(v, nullptr, 10);
    } else if (k == "--seconds") {
      o.seconds = std::strtod(v, nullptr);
    } else if (k == "--warmup") {
      o.warmup = std::strtod(v, nullptr);
    } else if (k == "--subscribers") {
      o.subscribers = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (k == "--batch") {
      o.batch = std::strtoul(v, nullptr, 10) != 0;
    } else if (k == "--qos") {
      o.qos = std::strtoul(v, nullptr, 10) == 0 ? 0 : 1;
    } else if (k == "--ack") {
      o.ack = std::strtoul(v, nullptr, 10) != 0;
    } else if (k == "--count-path") {
      o.count_path = v;
    } else if (k == "--concurrency") {
      o.concurrency = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else {
      std::fprintf(stderr,
                   "devload: unknown option %s (see the comment at the top of devload.cpp)\n",
                   k.c_str());
      return 2;
    }
  }
  if (o.port == 0 || o.server_pid <= 0) {
    std::fprintf(stderr, "devload: --port and --server-pid are required\n");
    return 2;
  }
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  return devload(o).run();
}
