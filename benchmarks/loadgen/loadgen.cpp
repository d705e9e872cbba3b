// devgate_loadgen: the load generator of the side-by-side benchmarks (benchmarks/README.md).
//
// One thread, one epoll set, every connection non-blocking and edge-triggered. Each connection is
// bound to its own loopback source address 127.0.0.X (X = 1..254, IP_BIND_ADDRESS_NO_PORT) so
// that 19,000 connections to one port never run out of ephemeral ports. It speaks the bench
// protocol over WebSocket (its own masked-frame encoder and unmasked-frame parser, independent of
// devgate's codecs so that a codec bug cannot hide in both ends) or over the raw length-prefixed
// framing of benchmarks/peers/raw_tcp_server.cpp.
//
// With --tls-ca FILE every connection is a TLS client (OpenSSL, non-blocking, SSL_set_fd, driven
// by the same epoll loop): the server's certificate must chain to FILE and name --tls-name (SNI
// and verification; default localhost). Sessions are never resumed, so every connection costs
// the server a full handshake. The plain path pays one check per read and per write for it.
//
// Scenarios (--scenario): echo, ingest, broadcast, idle, handshake (TLS only: --concurrency
// connections in their TLS handshake at once; each one that completes is closed and replaced).
// Output: one JSON line per result on stdout. Server cost comes from /proc/<server-pid>/stat
// (utime + stime) and /proc/<pid>/status.
//
//   devgate_loadgen --port P --server-pid PID --server NAME [--proto ws|raw] --scenario S
//                   [--connections C] [--window W] [--size BYTES] [--seconds S] [--warmup S]
//                   [--reps R] [--idle N] [--idle-step N] [--concurrency K]
//                   [--tls-ca FILE] [--tls-name NAME]

#include <arpa/inet.h>     // htonl
#include <netinet/in.h>    // sockaddr_in, IP_BIND_ADDRESS_NO_PORT
#include <netinet/tcp.h>   // TCP_NODELAY
#include <openssl/err.h>   // ERR_clear_error
#include <openssl/ssl.h>   // the TLS client
#include <sys/epoll.h>     // the event loop
#include <sys/resource.h>  // RLIMIT_NOFILE, getrusage
#include <sys/socket.h>    // sockets
#include <unistd.h>        // close, read, sysconf

#include <algorithm>  // std::sort, std::min
#include <cerrno>     // EAGAIN, EINPROGRESS
#include <cstdint>    // fixed-width integers
#include <cstdio>     // std::printf
#include <cstdlib>    // std::strtod
#include <cstring>    // std::memcpy, std::strcmp
#include <ctime>      // clock_gettime
#include <fstream>    // /proc files
#include <sstream>    // /proc parsing, JSON
#include <string>     // options, JSON
#include <vector>     // connections, samples

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
  bool raw = false;  // raw length-prefixed framing instead of WebSocket
  std::string scenario = "echo";
  std::string server = "unknown";
  int server_pid = 0;
  unsigned connections = 100;
  unsigned window = 16;
  std::size_t size = 64;
  double seconds = 5;
  double warmup = 1;
  unsigned reps = 5;
  unsigned idle = 19000;
  unsigned idle_step = 1000;
  unsigned concurrency = 128;          // connections being set up at once
  std::string tls_ca;                  // CA file: TLS on every connection when set
  std::string tls_name = "localhost";  // SNI and the name the certificate must carry
};

// System-wide kernel memory: TCP buffer pages from /proc/net/sockstat, Slab from /proc/meminfo.
long sockstat_tcp_mem_pages() {
  std::ifstream f("/proc/net/sockstat");
  std::string word;
  bool tcp = false;
  while (f >> word) {
    if (word == "TCP:") tcp = true;
    if (tcp && word == "mem") {
      long v = 0;
      f >> v;
      return v;
    }
  }
  return 0;
}
long meminfo_kb(const char* key) {
  std::ifstream f("/proc/meminfo");
  std::string line;
  const std::size_t n = std::strlen(key);
  while (std::getline(f, line)) {
    if (line.compare(0, n, key) == 0) return std::strtol(line.c_str() + n, nullptr, 10);
  }
  return 0;
}

// ---- connections ---------------------------------------------------------------------------
enum class phase : std::uint8_t { connecting, tls_handshaking, handshaking, open, closed };

struct connection {
  int fd = -1;
  SSL* ssl = nullptr;  // the TLS client when --tls-ca is set
  phase state = phase::closed;
  std::string handshake;  // HTTP response bytes until the blank line
  std::vector<char> out;  // bytes not yet written
  std::size_t out_off = 0;
  // Frame parser (server frames are unmasked; raw frames have a 4-byte header).
  unsigned char hdr[14] = {};
  unsigned hdr_have = 0;
  unsigned hdr_need = 0;
  std::uint64_t payload_left = 0;
  bool in_payload = false;
  bool frame_fin = false;
  unsigned char frame_op = 0;
  unsigned char msg_op = 0;  // opcode of the data message being assembled
  std::uint64_t msg_size = 0;
  unsigned char first[8] = {};  // first 8 bytes of the data message (the send timestamp)
  std::string control;          // payload of a control frame (ping, close) or a text reply
  bool keep_text = false;       // keep the whole text message (stats replies)
  std::string text;
  unsigned in_flight = 0;
  unsigned round = 0;  // broadcast: last round this connection received
};

constexpr unsigned char mask_key[4] = {0x37, 0xfa, 0x21, 0x3d};

class loadgen {
 public:
  explicit loadgen(options o) : o_(std::move(o)) {
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (!o_.tls_ca.empty()) make_tls_context();
    rbuf_.resize(1u << 18);
    // No reallocation: connections are found by their index, and the slots never move.
    conns_.reserve(std::max<std::size_t>({o_.idle, o_.connections, o_.concurrency}) + 2);
    // Pre-masked payload template: only the 8 timestamp bytes are masked per message.
    payload_.assign(o_.size < 8 ? 8 : o_.size, 'x');
    masked_payload_ = payload_;
    for (std::size_t i = 0; i < masked_payload_.size(); ++i) {
      masked_payload_[i] = static_cast<char>(masked_payload_[i] ^ mask_key[i % 4]);
    }
  }

  loadgen(const loadgen&) = delete;
  loadgen& operator=(const loadgen&) = delete;
  ~loadgen() {
    for (auto& c : conns_) SSL_free(c.ssl);
    SSL_CTX_free(tls_);
  }

  [[nodiscard]] bool ready() const { return o_.tls_ca.empty() || tls_ != nullptr; }

  int run() {
    if (o_.scenario == "echo" || o_.scenario == "ingest") return run_echo();
    if (o_.scenario == "handshake") return run_handshake();
    if (o_.scenario == "broadcast") return run_broadcast();
    if (o_.scenario == "idle") return run_idle();
    std::fprintf(stderr, "loadgen: unknown scenario %s\n", o_.scenario.c_str());
    return 2;
  }

 private:
  // ---- TLS ----
  // A client context: TLS 1.2 minimum, the server verified against the CA file, no session
  // cache (every handshake is a full one), partial writes from a buffer that may move.
  void make_tls_context() {
    tls_ = SSL_CTX_new(TLS_client_method());
    if (tls_ == nullptr) return;
    SSL_CTX_set_min_proto_version(tls_, TLS1_2_VERSION);
    SSL_CTX_set_session_cache_mode(tls_, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(tls_, SSL_OP_NO_TICKET);
    SSL_CTX_set_mode(tls_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    // Thousands of idle clients would each keep 2 x 16 KiB records otherwise.
    if (o_.scenario == "idle") SSL_CTX_set_mode(tls_, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_verify(tls_, SSL_VERIFY_PEER, nullptr);
    if (SSL_CTX_load_verify_locations(tls_, o_.tls_ca.c_str(), nullptr) != 1) {
      std::fprintf(stderr, "loadgen: cannot read the CA file %s\n", o_.tls_ca.c_str());
      SSL_CTX_free(tls_);
      tls_ = nullptr;
    }
  }

  // The TCP connection is up: start the TLS handshake on it.
  void start_tls(connection& c) {
    c.ssl = SSL_new(tls_);
    if (c.ssl == nullptr || SSL_set_fd(c.ssl, c.fd) != 1 ||
        SSL_set_tlsext_host_name(c.ssl, o_.tls_name.c_str()) != 1 ||
        SSL_set1_host(c.ssl, o_.tls_name.c_str()) != 1) {
      note_error("SSL_new", 0);
      close_conn(c);
      return;
    }
    c.state = phase::tls_handshaking;
    continue_tls(c);
  }

  // Drives the handshake as far as the socket allows; when it completes, the connection goes on
  // to the WebSocket upgrade (or, in the handshake scenario, is counted and replaced).
  void continue_tls(connection& c) {
    ERR_clear_error();
    const int r = SSL_connect(c.ssl);
    if (r == 1) {
      if (mode_ == mode_t::handshake) {
        tls_done(c);
        return;
      }
      begin_upgrade(c);
      return;
    }
    const int e = SSL_get_error(c.ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return;
    if (errors_ == 0) {
      const long v = SSL_get_verify_result(c.ssl);
      first_tls_error_ = v != X509_V_OK ? X509_verify_cert_error_string(v) : "";
    }
    note_error(first_tls_error_.empty() ? "TLS handshake" : "TLS verification", 0);
    close_conn(c);
  }

  // ---- set-up ----
  bool start_connection() {
    const auto index = static_cast<unsigned>(conns_.size());
    conns_.emplace_back();
    return open_slot(index);
  }

  // Opens slot `index` of conns_ (new, or closed and being reused).
  bool open_slot(unsigned index) {
    connection& c = conns_[index];
    const auto o = devgate_bench::open_loopback(index, o_.host, o_.port, ep_);
    if (o.fd < 0) {
      note_error(o.failed, o.error);
      ++failed_open_;  // the slot stays, closed, so open_until() counts it as done
      return false;
    }
    c.fd = o.fd;
    c.state = phase::connecting;
    ++pending_;
    return true;
  }

  // Opens connections until `target` exist, at most `concurrency` in set-up at once; returns
  // when all are open or failed, or after `timeout_s`.
  bool open_until(std::size_t target, double timeout_s) {
    const std::uint64_t deadline = now_ns() + static_cast<std::uint64_t>(timeout_s * 1e9);
    while (now_ns() < deadline) {
      while (conns_.size() < target && pending_ < o_.concurrency) {
        if (!start_connection()) break;
      }
      if (open_ + failed_open_ >= target || (conns_.size() < target && pending_ == 0)) break;
      poll(2);
    }
    return open_ >= target;
  }

  void close_conn(connection& c) {
    if (c.ssl != nullptr) {
      SSL_free(c.ssl);
      c.ssl = nullptr;
    }
    if (c.fd >= 0) ::close(c.fd);
    if (c.state == phase::connecting || c.state == phase::tls_handshaking ||
        c.state == phase::handshaking) {
      --pending_;
      ++failed_open_;
    }
    if (c.state == phase::open) --open_;
    c.fd = -1;
    c.state = phase::closed;
  }

  // ---- event loop ----
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
        if (tls_ != nullptr) {
          start_tls(c);
          if (c.state != phase::handshaking) continue;  // still in (or failed) the TLS handshake
        } else {
          begin_upgrade(c);
        }
      } else if (c.state == phase::tls_handshaking) {
        continue_tls(c);
        if (c.state != phase::handshaking) continue;
      }
      if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) on_readable(c);
      if (c.state != phase::closed) flush(c);
    }
  }

  // The byte stream is up (TCP, or TLS over it): queue the WebSocket upgrade request.
  void begin_upgrade(connection& c) {
    c.state = phase::handshaking;
    if (!o_.raw) {
      const auto slot = static_cast<std::size_t>(&c - conns_.data());
      const std::string req = "GET /d" + std::to_string(slot) + " HTTP/1.1\r\nHost: " + o_.host +
                              "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                              "Sec-WebSocket-Version: 13\r\n\r\n";
      c.out.insert(c.out.end(), req.begin(), req.end());
    } else {
      c.hdr_need = 4;  // the raw server greets with an empty frame
    }
  }

  // One read into rbuf_: bytes (> 0), 0 at the end of the stream, -1 with nothing to read now,
  // -2 on an error (noted).
  ssize_t read_some(connection& c) {
    if (c.ssl == nullptr) {
      const ssize_t n = ::recv(c.fd, rbuf_.data(), rbuf_.size(), 0);
      if (n >= 0) return n;
      if (errno == EAGAIN) return -1;
      note_error("recv", errno);
      return -2;
    }
    const int n = SSL_read(c.ssl, rbuf_.data(), static_cast<int>(rbuf_.size()));
    if (n > 0) return n;
    const int e = SSL_get_error(c.ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return -1;
    if (e == SSL_ERROR_ZERO_RETURN) return 0;
    if (e == SSL_ERROR_SYSCALL && errno == 0) return 0;  // EOF without close_notify
    note_error("SSL_read", e == SSL_ERROR_SYSCALL ? errno : 0);
    ERR_clear_error();
    return -2;
  }

  // One write from `p`: bytes written, -1 when the socket is full, -2 on an error (noted).
  ssize_t write_some(connection& c, const char* p, std::size_t n) {
    if (c.ssl == nullptr) {
      const ssize_t w = ::send(c.fd, p, n, MSG_NOSIGNAL);
      if (w >= 0) return w;
      if (errno == EAGAIN) return -1;
      note_error("send", errno);
      return -2;
    }
    const int w = SSL_write(c.ssl, p, static_cast<int>(std::min<std::size_t>(n, 1u << 30)));
    if (w > 0) return w;
    const int e = SSL_get_error(c.ssl, w);
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) return -1;
    note_error("SSL_write", e == SSL_ERROR_SYSCALL ? errno : 0);
    ERR_clear_error();
    return -2;
  }

  void flush(connection& c) {
    while (c.out_off < c.out.size()) {
      const ssize_t n = write_some(c, c.out.data() + c.out_off, c.out.size() - c.out_off);
      if (n < 0) {
        if (n == -2) close_conn(c);
        return;
      }
      c.out_off += static_cast<std::size_t>(n);
    }
    c.out.clear();
    c.out_off = 0;
  }

  void on_readable(connection& c) {
    for (;;) {
      const ssize_t n = read_some(c);
      if (n == 0) {
        close_conn(c);
        return;
      }
      if (n < 0) {
        if (n == -2) close_conn(c);
        return;
      }
      const char* p = rbuf_.data();
      std::size_t left = static_cast<std::size_t>(n);
      if (c.state == phase::handshaking && !o_.raw) {
        // Accumulate the HTTP response; anything after the blank line is frames.
        const std::size_t before = c.handshake.size();
        c.handshake.append(p, left);
        const auto end = c.handshake.find("\r\n\r\n");
        if (end == std::string::npos) {
          if (c.handshake.size() > 8192) close_conn(c);
          continue;
        }
        if (c.handshake.compare(0, 12, "HTTP/1.1 101") != 0) {
          note_error("handshake (no 101)", 0);
          close_conn(c);
          return;
        }
        const std::size_t used = end + 4 - before;
        p += used;
        left -= used;
        std::string().swap(c.handshake);
        became_open(c);
      }
      parse(c, p, left);
      if (c.state == phase::closed) return;
    }
  }

  void became_open(connection& c) {
    c.state = phase::open;
    --pending_;
    ++open_;
    c.hdr_have = 0;
    c.hdr_need = o_.raw ? 4 : 2;
  }

  // Streams frames out of `p`: never buffers payloads, only the first 8 bytes of each data
  // message and the payloads of control frames.
  void parse(connection& c, const char* p, std::size_t n) {
    while (n > 0 && c.state != phase::closed) {
      if (!c.in_payload) {
        while (c.hdr_have < c.hdr_need && n > 0) {
          c.hdr[c.hdr_have++] = static_cast<unsigned char>(*p++);
          --n;
          if (!o_.raw && c.hdr_have == 2) {
            const unsigned len7 = c.hdr[1] & 0x7f;
            c.hdr_need = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + ((c.hdr[1] & 0x80) ? 4 : 0);
          }
        }
        if (c.hdr_have < c.hdr_need) return;
        begin_frame(c);
        if (c.state == phase::closed) return;
        if (!c.in_payload) continue;  // the raw server's greeting
        if (c.payload_left == 0) {
          end_frame(c);
          continue;
        }
      }
      const std::size_t take = static_cast<std::size_t>(std::min<std::uint64_t>(c.payload_left, n));
      if (c.frame_op >= 8 || c.keep_text) {
        c.control.append(p, take);
      }
      if (c.frame_op < 8) {
        for (std::size_t i = 0; i < take && c.msg_size + i < 8; ++i) {
          c.first[c.msg_size + i] = static_cast<unsigned char>(p[i]);
        }
        c.msg_size += take;
      }
      c.payload_left -= take;
      p += take;
      n -= take;
      if (c.payload_left == 0) end_frame(c);
    }
  }

  void begin_frame(connection& c) {
    c.in_payload = true;
    if (o_.raw) {
      std::uint32_t h = 0;
      std::memcpy(&h, c.hdr, 4);  // little-endian hosts only (x86-64, arm64)
      c.frame_fin = true;
      c.frame_op = (h & 0x80000000u) ? 1 : 2;
      c.payload_left = h & 0x7fffffffu;
      if (c.state == phase::handshaking) {
        became_open(c);
        c.in_payload = false;
        return;
      }
    } else {
      c.frame_fin = (c.hdr[0] & 0x80) != 0;
      c.frame_op = c.hdr[0] & 0x0f;
      const unsigned len7 = c.hdr[1] & 0x7f;
      if (len7 < 126) {
        c.payload_left = len7;
      } else if (len7 == 126) {
        c.payload_left = (std::uint64_t{c.hdr[2]} << 8) | c.hdr[3];
      } else {
        c.payload_left = 0;
        for (int i = 0; i < 8; ++i) c.payload_left = (c.payload_left << 8) | c.hdr[2 + i];
      }
    }
    if (c.frame_op == 1 || c.frame_op == 2) {  // first frame of a data message
      c.msg_op = c.frame_op;
      c.msg_size = 0;
      c.keep_text = c.frame_op == 1;
      c.control.clear();
    } else if (c.frame_op >= 8) {
      c.keep_text = false;
      c.control.clear();
    }
  }

  void end_frame(connection& c) {
    c.in_payload = false;
    c.hdr_have = 0;
    c.hdr_need = o_.raw ? 4 : 2;
    if (c.frame_op == 9) {  // RFC 6455 5.5.2: answer a ping with a pong carrying its payload
      send_frame(c, 0xA, c.control.data(), c.control.size());
      return;
    }
    if (c.frame_op == 8) {
      close_conn(c);
      return;
    }
    if (c.frame_op == 0xA) return;
    if (!c.frame_fin) return;
    std::uint64_t ts = 0;
    if (c.msg_size >= 8) std::memcpy(&ts, c.first, 8);
    if (c.msg_op == 1) {
      c.text = std::move(c.control);
      c.control.clear();
      c.keep_text = false;
    }
    on_message(c, c.msg_op, c.msg_size, ts);
  }

  // ---- sending ----
  void send_frame(connection& c, unsigned op, const char* data, std::size_t n) {
    if (o_.raw) {
      std::uint32_t h = static_cast<std::uint32_t>(n) | (op == 1 ? 0x80000000u : 0u);
      const char* hp = reinterpret_cast<const char*>(&h);
      c.out.insert(c.out.end(), hp, hp + 4);
      c.out.insert(c.out.end(), data, data + n);
      return;
    }
    char h[14];
    std::size_t hn = 0;
    h[hn++] = static_cast<char>(0x80 | op);
    if (n < 126) {
      h[hn++] = static_cast<char>(0x80 | n);
    } else if (n < 65536) {
      h[hn++] = static_cast<char>(0x80 | 126);
      h[hn++] = static_cast<char>(n >> 8);
      h[hn++] = static_cast<char>(n & 0xff);
    } else {
      h[hn++] = static_cast<char>(0x80 | 127);
      for (int i = 7; i >= 0; --i) h[hn++] = static_cast<char>((n >> (8 * i)) & 0xff);
    }
    std::memcpy(h + hn, mask_key, 4);
    hn += 4;
    c.out.insert(c.out.end(), h, h + hn);
    const std::size_t at = c.out.size();
    c.out.insert(c.out.end(), data, data + n);
    for (std::size_t i = 0; i < n; ++i)
      c.out[at + i] = static_cast<char>(c.out[at + i] ^ mask_key[i % 4]);
  }

  // One binary bench message: the send time in the first 8 bytes, then filler.
  void send_stamped(connection& c) {
    const std::uint64_t ts = now_ns();
    const std::size_t n = payload_.size();
    if (o_.raw) {
      const auto h = static_cast<std::uint32_t>(n);
      const char* hp = reinterpret_cast<const char*>(&h);
      c.out.insert(c.out.end(), hp, hp + 4);
      const std::size_t at = c.out.size();
      c.out.insert(c.out.end(), payload_.begin(), payload_.end());
      std::memcpy(c.out.data() + at, &ts, 8);
    } else {
      char h[8];
      std::size_t hn = 0;
      h[hn++] = static_cast<char>(0x82);
      if (n < 126) {
        h[hn++] = static_cast<char>(0x80 | n);
      } else {
        h[hn++] = static_cast<char>(0x80 | 126);
        h[hn++] = static_cast<char>(n >> 8);
        h[hn++] = static_cast<char>(n & 0xff);
      }
      c.out.insert(c.out.end(), h, h + hn);
      c.out.insert(c.out.end(), reinterpret_cast<const char*>(mask_key),
                   reinterpret_cast<const char*>(mask_key) + 4);
      const std::size_t at = c.out.size();
      c.out.insert(c.out.end(), masked_payload_.begin(), masked_payload_.end());
      unsigned char t[8];
      std::memcpy(t, &ts, 8);
      for (std::size_t i = 0; i < 8; ++i) c.out[at + i] = static_cast<char>(t[i] ^ mask_key[i % 4]);
    }
    ++c.in_flight;
  }

  void send_text(connection& c, const std::string& s) {
    send_frame(c, 1, s.data(), s.size());
    flush(c);
  }

  // ---- scenario callbacks ----
  void on_message(connection& c, unsigned op, std::uint64_t size, std::uint64_t ts) {
    if (mode_ == mode_t::echo) {
      if (op == 1) {
        if (&c == control_) {
          last_text_ = c.text;
          ++texts_;
        } else if (c.in_flight > 0) {
          // An error reply (e.g. queue_full): that message was refused, not echoed.
          --c.in_flight;
          ++refused_;
          if (sending_) send_stamped(c);
        }
        return;
      }
      if (c.in_flight > 0) --c.in_flight;
      const std::uint64_t t = now_ns();
      if (measuring_) {
        ++received_;
        const std::uint64_t lat = t - ts;
        latencies_.push_back(static_cast<std::uint32_t>(std::min<std::uint64_t>(lat, 0xffffffffu)));
      }
      if (sending_) {
        send_stamped(c);
      }
    } else if (mode_ == mode_t::broadcast) {
      if (size == o_.size && c.round != round_) {
        c.round = round_;
        ++round_received_;
        round_last_ = now_ns();
      }
    }
  }

  // ---- output ----
  struct json {
    std::ostringstream s;
    bool first = true;
    json& kv(const char* k, const std::string& v) {
      s << (first ? "{" : ",") << '"' << k << "\":\"" << v << '"';
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

  json header(const char* scenario) {
    json j;
    j.s.precision(6);
    j.kv("scenario", scenario).kv("server", o_.server);
    const char* proto = o_.raw ? (tls_ ? "raw+tls" : "raw") : (tls_ ? "wss" : "ws");
    j.kv("proto", mode_ == mode_t::handshake ? "tls" : proto);
    return j;
  }

  static double pct(std::vector<std::uint32_t>& v, double p) {
    if (v.empty()) return 0;
    const auto k = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1));
    return v[k] / 1000.0;
  }

  // ---- scenarios ----
  int run_echo() {
    const bool ingest = o_.scenario == "ingest";
    mode_ = mode_t::echo;
    // One more connection controls the ingest server (stats); it sends no load.
    const std::size_t total = o_.connections + (ingest ? 1 : 0);
    if (!open_until(total, 60)) {
      fail("could not open all connections");
      return 1;
    }
    connection* control = ingest ? &conns_.back() : nullptr;
    control_ = control;
    sending_ = true;
    for (std::size_t i = 0; i < o_.connections; ++i) {
      for (unsigned w = 0; w < o_.window; ++w) send_stamped(conns_[i]);
      flush(conns_[i]);
    }
    const std::uint64_t t_begin = now_ns() + static_cast<std::uint64_t>(o_.warmup * 1e9);
    const std::uint64_t t_end = t_begin + static_cast<std::uint64_t>(o_.seconds * 1e9);
    double cpu0 = 0;
    double gen0 = 0;
    std::uint64_t m0 = 0;
    std::uint64_t m1 = 0;
    double cpu1 = 0;
    double gen1 = 0;
    std::string stats;
    for (;;) {
      poll(1);
      const std::uint64_t t = now_ns();
      if (!measuring_ && sending_ && t >= t_begin) {
        if (control != nullptr) {
          // Discard the sink's histogram up to now (warm-up).
          send_text(*control, "stats");
        }
        measuring_ = true;
        m0 = t;
        cpu0 = proc_cpu_seconds(o_.server_pid);
        gen0 = self_cpu_seconds();
      }
      if (measuring_ && t >= t_end) {
        measuring_ = false;
        sending_ = false;
        m1 = t;
        cpu1 = proc_cpu_seconds(o_.server_pid);
        gen1 = self_cpu_seconds();
      }
      if (!sending_ && !measuring_ && m1 != 0) break;
      if (open_ < o_.connections) {
        fail("connections closed during the run");
        return 1;
      }
    }
    // Drain what is in flight (bounded), then ask the ingest sink for its histogram.
    const std::uint64_t drain_deadline = now_ns() + 10'000'000'000ull;
    auto in_flight = [&] {
      std::uint64_t n = 0;
      for (std::size_t i = 0; i < o_.connections; ++i) n += conns_[i].in_flight;
      return n;
    };
    while (in_flight() > 0 && now_ns() < drain_deadline) poll(5);
    if (control != nullptr) {
      // The warm-up "stats" reply may still be on its way: wait for it first.
      while (texts_ < 1 && now_ns() < drain_deadline) poll(5);
      send_text(*control, "stats");
      while (texts_ < 2 && now_ns() < drain_deadline) poll(5);
      stats = texts_ >= 2 ? last_text_ : std::string("null");
    }
    const double secs = static_cast<double>(m1 - m0) / 1e9;
    const double cpu = cpu1 - cpu0;
    std::sort(latencies_.begin(), latencies_.end());
    auto j = header(ingest ? "ingest" : "echo");
    j.kv("C", o_.connections).kv("W", o_.window).kv("size", static_cast<double>(o_.size));
    j.kv("msgs", static_cast<double>(received_)).kv("seconds", secs);
    j.kv("msgs_per_s", static_cast<double>(received_) / secs);
    j.kv("p50_us", pct(latencies_, 0.5)).kv("p99_us", pct(latencies_, 0.99));
    j.kv("p999_us", pct(latencies_, 0.999));
    j.kv("server_cpu_s", cpu);
    j.kv("msgs_per_cpu_s", cpu > 0 ? static_cast<double>(received_) / cpu : 0);
    j.kv("gen_cpu_s", gen1 - gen0);
    j.kv("server_rss_kb", static_cast<double>(proc_status_kb(o_.server_pid, "VmRSS:")));
    j.kv("errors", static_cast<double>(errors_)).kv("refused", static_cast<double>(refused_));
    if (ingest) j.raw("sink", stats.empty() ? "null" : stats);
    j.print();
    return 0;
  }

  int run_broadcast() {
    mode_ = mode_t::broadcast;
    if (!open_until(o_.connections + 1, 60)) {
      fail("could not open all connections");
      return 1;
    }
    connection& control = conns_.back();
    wait_ms(300);
    const long rss_before = proc_status_kb(o_.server_pid, "VmRSS:");
    const double cpu0 = proc_cpu_seconds(o_.server_pid);
    const double gen0 = self_cpu_seconds();
    std::vector<std::uint32_t> times;  // ns per round (fits: rounds time out at 30 s)
    const std::string command = "broadcast " + std::to_string(o_.size);
    for (unsigned r = 0; r < o_.reps; ++r) {
      round_ = r + 1;
      round_received_ = 0;
      const std::uint64_t t0 = now_ns();
      send_text(control, command);
      const std::uint64_t deadline = t0 + 30'000'000'000ull;
      while (round_received_ < o_.connections && now_ns() < deadline) poll(1);
      if (round_received_ < o_.connections) {
        fail("broadcast round timed out: " + std::to_string(round_received_) + " of " +
             std::to_string(o_.connections));
        return 1;
      }
      times.push_back(static_cast<std::uint32_t>(round_last_ - t0));
      wait_ms(50);
    }
    const double cpu = proc_cpu_seconds(o_.server_pid) - cpu0;
    const double gen = self_cpu_seconds() - gen0;
    const long hwm = proc_status_kb(o_.server_pid, "VmHWM:");
    std::sort(times.begin(), times.end());
    const double median_s = times[times.size() / 2] / 1e9;
    const double deliveries = static_cast<double>(o_.connections) * o_.reps;
    auto j = header("broadcast");
    j.kv("C", o_.connections).kv("size", static_cast<double>(o_.size)).kv("reps", o_.reps);
    j.kv("median_s", median_s).kv("min_s", times.front() / 1e9).kv("max_s", times.back() / 1e9);
    j.kv("deliveries_per_s", o_.connections / median_s);
    j.kv("mb_per_s",
         static_cast<double>(o_.connections) * static_cast<double>(o_.size) / median_s / 1e6);
    j.kv("server_cpu_s", cpu).kv("deliveries_per_cpu_s", cpu > 0 ? deliveries / cpu : 0);
    j.kv("gen_cpu_s", gen);
    j.kv("rss_before_kb", static_cast<double>(rss_before))
        .kv("peak_rss_kb", static_cast<double>(hwm));
    j.kv("rss_growth_kb", static_cast<double>(hwm - rss_before));
    j.kv("errors", static_cast<double>(errors_));
    j.print();
    return 0;
  }

  int run_idle() {
    mode_ = mode_t::idle;
    const unsigned step = std::min(o_.idle_step, o_.idle);
    if (!open_until(step, 60)) {
      fail("could not open the first " + std::to_string(step) + " connections");
      return 1;
    }
    wait_ms(500);
    const long rss1 = proc_status_kb(o_.server_pid, "VmRSS:");
    const long sock1 = sockstat_tcp_mem_pages();
    const long slab1 = meminfo_kb("Slab:");
    const double cpu1 = proc_cpu_seconds(o_.server_pid);
    const double gen1 = self_cpu_seconds();
    const std::uint64_t t1 = now_ns();
    open_until(o_.idle, 120);
    const std::uint64_t t2 = now_ns();
    const double cpu2 = proc_cpu_seconds(o_.server_pid);
    const double gen2 = self_cpu_seconds();
    wait_ms(500);
    const std::size_t reached = open_;
    const long rss2 = proc_status_kb(o_.server_pid, "VmRSS:");
    const long sock2 = sockstat_tcp_mem_pages();
    const long slab2 = meminfo_kb("Slab:");
    const double added = static_cast<double>(reached) - step;
    const double secs = static_cast<double>(t2 - t1) / 1e9;
    auto j = header("idle");
    j.kv("target", o_.idle).kv("reached", static_cast<double>(reached)).kv("step", step);
    j.kv("handshakes", added).kv("seconds", secs).kv("handshakes_per_s", added / secs);
    j.kv("server_cpu_s", cpu2 - cpu1);
    j.kv("handshakes_per_cpu_s", cpu2 > cpu1 ? added / (cpu2 - cpu1) : 0);
    j.kv("gen_cpu_s", gen2 - gen1);
    j.kv("rss_at_step_kb", static_cast<double>(rss1)).kv("rss_kb", static_cast<double>(rss2));
    j.kv("rss_bytes_per_conn", added > 0 ? (rss2 - rss1) * 1024.0 / added : 0);
    j.kv("kernel_tcp_mem_bytes_per_conn",
         added > 0 ? static_cast<double>(sock2 - sock1) *
                         static_cast<double>(sysconf(_SC_PAGESIZE)) / added
                   : 0);
    j.kv("kernel_slab_bytes_per_conn_both_ends", added > 0 ? (slab2 - slab1) * 1024.0 / added : 0);
    j.kv("errors", static_cast<double>(errors_));
    j.print();
    return 0;
  }

  // A TLS handshake completed (handshake scenario): count it and close the connection; the
  // scenario's loop opens its slot again after this poll (a stale event of this batch may still
  // name the slot, and must find it closed).
  void tls_done(connection& c) {
    if (measuring_) ++handshakes_;
    close_conn(c);
    --failed_open_;  // close_conn counted a connection in set-up as failed: this one was not
  }

  // Full TLS handshakes per server CPU-second: `concurrency` connections in their handshake at
  // once; each that completes is closed by the client (no close_notify, no WebSocket upgrade)
  // and its slot opens a new connection at once.
  int run_handshake() {
    if (tls_ == nullptr) {
      fail("the handshake scenario needs --tls-ca");
      return 1;
    }
    mode_ = mode_t::handshake;
    sending_ = true;
    for (unsigned i = 0; i < o_.concurrency; ++i) start_connection();
    const std::uint64_t t_begin = now_ns() + static_cast<std::uint64_t>(o_.warmup * 1e9);
    const std::uint64_t t_end = t_begin + static_cast<std::uint64_t>(o_.seconds * 1e9);
    auto reopen_closed = [&] {
      for (unsigned i = 0; i < conns_.size(); ++i) {
        if (conns_[i].state == phase::closed) {
          conns_[i] = connection{};
          open_slot(i);
        }
      }
    };
    while (now_ns() < t_begin) {
      poll(1);
      reopen_closed();
    }
    measuring_ = true;
    const double cpu0 = proc_cpu_seconds(o_.server_pid);
    const double gen0 = self_cpu_seconds();
    const std::uint64_t errors0 = errors_;
    const std::uint64_t m0 = now_ns();
    while (now_ns() < t_end) {
      poll(1);
      reopen_closed();  // every slot that completed (or failed) opens again
    }
    measuring_ = false;
    sending_ = false;
    const std::uint64_t m1 = now_ns();
    const double cpu = proc_cpu_seconds(o_.server_pid) - cpu0;
    const double gen = self_cpu_seconds() - gen0;
    const double secs = static_cast<double>(m1 - m0) / 1e9;
    auto j = header("handshake");
    j.kv("concurrency", o_.concurrency).kv("handshakes", static_cast<double>(handshakes_));
    j.kv("seconds", secs).kv("handshakes_per_s", static_cast<double>(handshakes_) / secs);
    j.kv("server_cpu_s", cpu);
    j.kv("handshakes_per_cpu_s", cpu > 0 ? static_cast<double>(handshakes_) / cpu : 0);
    j.kv("gen_cpu_s", gen);
    j.kv("server_rss_kb", static_cast<double>(proc_status_kb(o_.server_pid, "VmRSS:")));
    j.kv("errors", static_cast<double>(errors_ - errors0));
    if (errors_ > 0) j.kv("first_error", first_error_);
    j.print();
    return 0;
  }

  // Counts a failure and keeps the first one's description for the JSON line.
  void note_error(const char* where, int err) {
    if (errors_++ == 0) {
      first_error_ = std::string(where) + (err != 0 ? std::string(": ") + std::strerror(err) : "");
      if (!first_tls_error_.empty()) first_error_ += ": " + first_tls_error_;
    }
  }

  void wait_ms(int ms) {
    const std::uint64_t until = now_ns() + static_cast<std::uint64_t>(ms) * 1000000u;
    while (now_ns() < until) poll(5);
  }

  void fail(const std::string& why) {
    auto j = header(o_.scenario.c_str());
    j.kv("error", why)
        .kv("open", static_cast<double>(open_))
        .kv("errors", static_cast<double>(errors_))
        .kv("first_error", first_error_);
    j.print();
  }

  enum class mode_t : std::uint8_t { idle, echo, broadcast, handshake };

  options o_;
  SSL_CTX* tls_ = nullptr;  // the client context when --tls-ca is set
  std::string first_tls_error_;
  std::uint64_t handshakes_ = 0;
  int ep_ = -1;
  std::vector<connection> conns_;
  std::vector<char> rbuf_;
  std::string payload_;
  std::string masked_payload_;
  std::size_t pending_ = 0;
  std::size_t open_ = 0;
  std::size_t failed_open_ = 0;
  std::uint64_t errors_ = 0;
  std::string first_error_;
  mode_t mode_ = mode_t::idle;
  bool sending_ = false;
  bool measuring_ = false;
  std::uint64_t received_ = 0;
  std::vector<std::uint32_t> latencies_;
  std::string last_text_;
  std::uint64_t texts_ = 0;
  std::uint64_t refused_ = 0;
  connection* control_ = nullptr;
  unsigned round_ = 0;
  unsigned round_received_ = 0;
  std::uint64_t round_last_ = 0;
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
    } else if (k == "--proto") {
      o.raw = std::strcmp(v, "raw") == 0;
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
    } else if (k == "--reps") {
      o.reps = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (k == "--idle") {
      o.idle = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (k == "--idle-step") {
      o.idle_step = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (k == "--tls-ca") {
      o.tls_ca = v;
    } else if (k == "--tls-name") {
      o.tls_name = v;
    } else if (k == "--concurrency") {
      o.concurrency = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else {
      std::fprintf(stderr,
                   "loadgen: unknown option %s (see the comment at the top of loadgen.cpp)\n",
                   k.c_str());
      return 2;
    }
  }
  if (o.port == 0 || o.server_pid <= 0) {
    std::fprintf(stderr, "loadgen: --port and --server-pid are required\n");
    return 2;
  }
  // Connections need descriptors: take the hard limit (20,000 here).
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  loadgen gen(o);
  if (!gen.ready()) return 2;
  return gen.run();
}
