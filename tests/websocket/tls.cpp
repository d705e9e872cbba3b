// Tests of include/devgate/websocket/tls.hpp (TLS in websocket::server) against real clients:
// Node's `ws` and python3-websockets over wss, OpenSSL as a client (resumption, ALPN, the
// certificate after a reload), and raw TCP peers that attack the TLS port. Certificates are
// made at test time with the `openssl` command (a CA, server and client certificates, ECDSA
// P-256) in a temporary directory.
#include "devgate/websocket/tls.hpp"

#include <arpa/inet.h>     // inet_pton
#include <netinet/in.h>    // sockaddr_in
#include <openssl/err.h>   // client errors
#include <openssl/ssl.h>   // the OpenSSL client
#include <openssl/x509.h>  // certificate names
#include <poll.h>          // waiting for the server's close
#include <signal.h>        // SIGHUP, SIGTERM to echo_server
#include <spawn.h>         // posix_spawn for echo_server
#include <sys/socket.h>    // raw client sockets
#include <sys/wait.h>      // WEXITSTATUS
#include <unistd.h>        // close

#include <catch2/catch.hpp>

#include <atomic>      // identify's record
#include <chrono>      // bounds
#include <cstdlib>     // std::system, mkdtemp
#include <filesystem>  // certificate files
#include <fstream>     // the openssl config
#include <mutex>       // identify's record
#include <optional>    // identify results
#include <span>        // message batches
#include <string>      // commands
#include <thread>      // peers beside the test
#include <vector>      // bytes

#include "devgate/websocket/server.hpp"
#include "support.hpp"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
namespace ws = devgate::websocket;
using devgate::testing::eventually;

namespace {

fs::path repo_root() {
  if (const char* env = std::getenv("DEVGATE_SOURCE_DIR")) return env;
  return fs::path(__FILE__).parent_path().parent_path().parent_path();
}

fs::path peers_dir() { return repo_root() / "tests" / "websocket" / "peers"; }

int run(const std::string& command) {
  const std::string cmd = "timeout 300 " + command;
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

void ensure_node_ws() {
  static std::once_flag once;
  std::call_once(once, [] {
    const fs::path peers = repo_root() / "tests" / "peers";
    if (fs::exists(peers / "node_modules" / "ws" / "package.json")) return;
    const std::string cmd = "npm ci --no-audit --no-fund --prefix '" + peers.string() + "' >&2";
    REQUIRE(std::system(cmd.c_str()) == 0);
  });
}

// ---- certificates made with the openssl command ---------------------------------------------

// A CA, two server certificates for 127.0.0.1 and localhost (the second for the reload test), a
// client certificate signed by the CA (CN "device-7") and a self-signed one no CA vouches for.
struct certificates {
  fs::path dir;

  certificates() {
    std::string tmpl = (fs::temp_directory_path() / "devgate-tls-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    std::ofstream(dir / "server.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                         "extendedKeyUsage=serverAuth\n";
    std::ofstream(dir / "client.ext") << "extendedKeyUsage=clientAuth\n";
    const std::string d = "'" + dir.string() + "'";
    const std::string q = " 2>/dev/null";
    const auto key = [&](const std::string& name) {
      return "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " + d + "/" +
             name + ".key" + q;
    };
    const auto signed_by_ca = [&](const std::string& name, const std::string& cn,
                                  const std::string& ext) {
      return key(name) + " && openssl req -new -key " + d + "/" + name + ".key -subj '/CN=" + cn +
             "' -out " + d + "/" + name + ".csr" + q + " && openssl x509 -req -in " + d + "/" +
             name + ".csr -CA " + d + "/ca.pem -CAkey " + d + "/ca.key -CAcreateserial -days 2" +
             " -extfile " + d + "/" + ext + " -out " + d + "/" + name + ".pem" + q;
    };
    const std::string cmd = key("ca") + " && openssl req -x509 -new -key " + d +
                            "/ca.key -subj '/CN=devgate test CA'" + " -days 2 -out " + d +
                            "/ca.pem" + q + " && " +
                            signed_by_ca("server", "devgate server one", "server.ext") + " && " +
                            signed_by_ca("server2", "devgate server two", "server.ext") + " && " +
                            signed_by_ca("client", "device-7", "client.ext") + " && " +
                            key("rogue") + " && openssl req -x509 -new -key " + d +
                            "/rogue.key -subj '/CN=device-7' -days 2 -out " + d + "/rogue.pem" + q;
    REQUIRE(std::system(cmd.c_str()) == 0);
  }
  ~certificates() {
    std::error_code ignored;
    fs::remove_all(dir, ignored);
  }
  [[nodiscard]] std::string file(const std::string& name) const { return (dir / name).string(); }

  [[nodiscard]] ws::tls_options options(bool mutual = false) const {
    ws::tls_options t;
    t.certificate_chain_file = file("server.pem");
    t.private_key_file = file("server.key");
    if (mutual) t.client_ca_file = file("ca.pem");
    return t;
  }
};

const certificates& certs() {
  static const certificates c;
  return c;
}

// ---- an echo server over TLS ------------------------------------------------------------------

struct tls_echo {
  explicit tls_echo(ws::server_options o) : server(std::move(o)) {
    devgate::transport_handlers h;
    h.on_open = [this](const devgate::session_info& info) {
      last = info.id;
      ++opened;
    };
    h.on_close = [this](devgate::session_id, devgate::close_code code) {
      last_code = code;
      ++closed;
    };
    // Echoes; "!close <code> <reason>" closes the session (node_client.js close-server).
    h.on_messages = [this](std::span<devgate::inbound_message> batch) {
      for (auto& m : batch) {
        const std::string_view text = m.payload.view();
        if (m.kind == devgate::payload_kind::text && text.starts_with("!close ")) {
          const auto sp = text.find(' ', 7);
          const int code = std::stoi(std::string(text.substr(7, sp - 7)));
          server.close(m.session, static_cast<devgate::close_code>(code), text.substr(sp + 1));
          continue;
        }
        (void)server.send(m.session, m.kind, std::move(m.payload));
      }
      return devgate::batch_result{batch.size(), {}};
    };
    server.set_handlers(std::move(h));
    REQUIRE_FALSE(server.start());
    port = server.local_port();
  }
  ~tls_echo() { server.stop(); }

  static ws::server_options options(bool mutual = false) {
    ws::server_options o;
    o.address = "127.0.0.1";
    o.threads = 2;
    o.backpressure.max_buffered_bytes = 64u << 20;
    o.reader.max_message_size = 32u << 20;
    o.tls = certs().options(mutual);
    return o;
  }

  [[nodiscard]] std::string url(const std::string& path) const {
    return "wss://127.0.0.1:" + std::to_string(port) + path;
  }

  ws::server server;
  std::uint16_t port = 0;
  std::atomic<int> opened{0}, closed{0};
  std::atomic<devgate::session_id> last{0};
  std::atomic<devgate::close_code> last_code{devgate::close_code::normal};
};

int run_python(const std::string& env, const std::string& url, const std::string& scenario,
               const std::string& args = "") {
  return run("env DEVGATE_TLS_CA='" + certs().file("ca.pem") + "' " + env + " /usr/bin/python3 '" +
             (peers_dir() / "python_client.py").string() + "' " + url + " " + scenario + " " +
             args);
}

int run_node(const std::string& url, const std::string& scenario, const std::string& args = "") {
  ensure_node_ws();
  return run("env NODE_EXTRA_CA_CERTS='" + certs().file("ca.pem") + "' node '" +
             (peers_dir() / "node_client.js").string() + "' " + url + " " + scenario + " " + args);
}

// ---- raw TCP and OpenSSL clients ----------------------------------------------------------------

// A TCP connection to the server; `rcvbuf` (if set) is the receive buffer, set before the
// handshake so that TCP's window matches it.
int connect_tcp(std::uint16_t port, int rcvbuf = 0) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  if (rcvbuf > 0) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  ::sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  ::inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  REQUIRE(::connect(fd, reinterpret_cast<const ::sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

void send_all(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    const auto n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    REQUIRE(n > 0);
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
}

// How long until the server ends the connection (EOF or reset), reading and discarding what it
// sends; `limit` if it does not.
std::chrono::milliseconds time_to_close(int fd, std::chrono::milliseconds limit) {
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + limit;
  char buf[4096];
  for (;;) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= end) return limit;
    ::pollfd p{fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - now);
    if (::poll(&p, 1, static_cast<int>(left.count()) + 1) <= 0) continue;
    if (::recv(fd, buf, sizeof buf, 0) <= 0) {
      return std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now() - start);
    }
  }
}

// A blocking OpenSSL client that trusts the test CA.
struct tls_client {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL* ssl = nullptr;
  int fd = -1;

  explicit tls_client(const std::string& alpn = "", int max_version = 0) {
    REQUIRE(ctx);
    REQUIRE(SSL_CTX_load_verify_locations(ctx, certs().file("ca.pem").c_str(), nullptr) == 1);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    if (max_version) SSL_CTX_set_max_proto_version(ctx, max_version);
    if (!alpn.empty()) {
      std::string wire;
      for (std::size_t b = 0; b < alpn.size();) {
        std::size_t e = alpn.find(',', b);
        if (e == std::string::npos) e = alpn.size();
        wire.push_back(static_cast<char>(e - b));
        wire.append(alpn, b, e - b);
        b = e + 1;
      }
      SSL_CTX_set_alpn_protos(ctx, reinterpret_cast<const unsigned char*>(wire.data()),
                              static_cast<unsigned>(wire.size()));
    }
  }
  ~tls_client() {
    disconnect();
    SSL_CTX_free(ctx);
  }
  // Handshakes with the server (resuming `session` if given); false when it fails.
  bool connect(std::uint16_t port, SSL_SESSION* session = nullptr, int rcvbuf = 0) {
    disconnect();
    fd = connect_tcp(port, rcvbuf);
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set1_host(ssl, "127.0.0.1");
    if (session) SSL_set_session(ssl, session);
    const bool ok = SSL_connect(ssl) == 1;
    ERR_clear_error();
    return ok;
  }
  // Closes the connection: with close_notify, or (`drop`) like a device that loses its network,
  // which still keeps its session for resumption.
  void disconnect(bool drop = false) {
    if (ssl) {
      if (drop) {
        SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);  // send nothing
      } else {
        SSL_shutdown(ssl);
      }
      SSL_free(ssl);
    }
    ssl = nullptr;
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  // Writes `bytes` and reads until `until` appears in what came back (or the connection ends).
  std::string exchange(std::string_view bytes, std::string_view until) {
    REQUIRE(SSL_write(ssl, bytes.data(), static_cast<int>(bytes.size())) ==
            static_cast<int>(bytes.size()));
    std::string got;
    char buf[4096];
    while (got.find(until) == std::string::npos) {
      const int n = SSL_read(ssl, buf, sizeof buf);
      if (n <= 0) break;
      got.append(buf, static_cast<std::size_t>(n));
    }
    return got;
  }
  // Reads exactly `n` bytes (false if the connection ends first).
  bool read_exact(char* out, std::size_t n) {
    while (n > 0) {
      const int got = SSL_read(ssl, out, static_cast<int>(std::min<std::size_t>(n, 1u << 20)));
      if (got <= 0) return false;
      out += got;
      n -= static_cast<std::size_t>(got);
    }
    return true;
  }
  // The payload of the next unmasked server frame (nullopt if the connection ends).
  std::optional<std::string> read_frame() {
    unsigned char head[2];
    if (!read_exact(reinterpret_cast<char*>(head), 2)) return std::nullopt;
    std::uint64_t len = head[1] & 0x7F;
    if (len >= 126) {
      unsigned char ext[8];
      const std::size_t n = len == 126 ? 2 : 8;
      if (!read_exact(reinterpret_cast<char*>(ext), n)) return std::nullopt;
      len = 0;
      for (std::size_t i = 0; i < n; ++i) len = len << 8 | ext[i];
    }
    std::string payload(len, '\0');
    if (!read_exact(payload.data(), len)) return std::nullopt;
    return payload;
  }
  // The common name of the server's certificate.
  [[nodiscard]] std::string peer_name() const {
    X509* cert = SSL_get1_peer_certificate(ssl);
    if (!cert) return {};
    char name[256] = {};
    X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, name, sizeof name);
    X509_free(cert);
    return name;
  }
};

constexpr std::string_view upgrade_request =
    "GET /dev HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

}  // namespace

// =============================================================================================

TEST_CASE("tls: node ws over wss: messages of 0 bytes to 16 MiB, fragments, 100 clients",
          "[websocket][tls][node]") {
  tls_echo fx(tls_echo::options());
  CHECK(run_node(fx.url("/node"), "messages") == 0);
  CHECK(run_node(fx.url("/node"), "fragmented") == 0);
  CHECK(run_node(fx.url("/node"), "close-server") == 0);
  CHECK(run_node(fx.url("/node"), "concurrent", "100 50") == 0);
  CHECK(eventually([&] { return fx.closed == fx.opened; }));
}

TEST_CASE("tls: python websockets over wss: messages, ping, close, 100 clients",
          "[websocket][tls][python]") {
  tls_echo fx(tls_echo::options());
  CHECK(run_python("", fx.url("/py"), "messages") == 0);
  CHECK(run_python("", fx.url("/py"), "ping") == 0);
  CHECK(run_python("", fx.url("/py"), "close-client") == 0);
  CHECK(run_python("", fx.url("/py"), "concurrent", "100 50") == 0);
  CHECK(eventually([&] { return fx.closed == fx.opened; }));
}

TEST_CASE("tls: TLS 1.2 minimum, ALPN http/1.1, session resumption", "[websocket][tls]") {
  tls_echo fx(tls_echo::options());
  {
    tls_client tls11("", TLS1_1_VERSION);
    CHECK_FALSE(tls11.connect(fx.port));  // refused: below TLS 1.2
  }
  tls_client client("h2,http/1.1");
  REQUIRE(client.connect(fx.port));
  const unsigned char* proto = nullptr;
  unsigned len = 0;
  SSL_get0_alpn_selected(client.ssl, &proto, &len);
  CHECK(std::string(reinterpret_cast<const char*>(proto), len) == "http/1.1");
  CHECK(client.exchange(upgrade_request, "\r\n\r\n").starts_with("HTTP/1.1 101"));
  // TLS 1.3 tickets arrive after the handshake: the session is resumable once read.
  SSL_SESSION* session = SSL_get1_session(client.ssl);
  REQUIRE(session);
  CHECK(SSL_SESSION_is_resumable(session) == 1);
  REQUIRE(client.connect(fx.port, session));
  CHECK(SSL_session_reused(client.ssl) == 1);
  SSL_SESSION_free(session);

  // TLS 1.2 without tickets: resumption from the server's session cache, also after the device's
  // previous connection ended without close_notify (the server has finished that connection by
  // then).
  tls_client tls12("", TLS1_2_VERSION);
  SSL_CTX_set_options(tls12.ctx, SSL_OP_NO_TICKET);  // a session id, not a ticket
  REQUIRE(tls12.connect(fx.port));
  CHECK(tls12.exchange(upgrade_request, "\r\n\r\n").starts_with("HTTP/1.1 101"));
  SSL_SESSION* s12 = SSL_get1_session(tls12.ssl);
  tls12.disconnect(true);
  REQUIRE(eventually([&] { return fx.server.connection_count() == 0; }));
  REQUIRE(tls12.connect(fx.port, s12));
  CHECK(SSL_session_reused(tls12.ssl) == 1);
  CHECK(SSL_version(tls12.ssl) == TLS1_2_VERSION);
  SSL_SESSION_free(s12);
}

TEST_CASE("tls: a reader that stalls then reads gets every send and broadcast, whole and in order",
          "[websocket][tls][backpressure]") {
  tls_echo fx(tls_echo::options());
  tls_client client;
  // A small socket buffer: most of what is sent waits in the server.
  REQUIRE(client.connect(fx.port, nullptr, 8192));
  REQUIRE(client.exchange(upgrade_request, "\r\n\r\n").starts_with("HTTP/1.1 101"));
  REQUIRE(eventually([&] { return fx.opened == 1; }));
  const devgate::session_id id = fx.last;
  // Sizes that cross record boundaries, small frames to coalesce, and 64 KiB fragments.
  std::vector<std::string> sent;
  for (int i = 0; i < 800; ++i) {
    const std::size_t size = (i % 7 == 0) ? 70'000 + i : (i % 3 == 0) ? 16'380 + i : 10 + i;
    std::string payload(size, static_cast<char>('a' + i % 26));
    payload.replace(0, std::to_string(i).size(), std::to_string(i));
    const auto bytes = devgate::shared_bytes::copy_of(std::string_view(payload));
    if (i % 2 == 0) {
      REQUIRE_FALSE(fx.server.send(id, devgate::payload_kind::binary, bytes));
    } else {
      const devgate::session_id ids[] = {id};
      REQUIRE(fx.server.broadcast(ids, devgate::payload_kind::binary, bytes) == 1);
    }
    sent.push_back(std::move(payload));
  }
  std::this_thread::sleep_for(200ms);  // the server fills the socket and waits for room
  CHECK(fx.server.buffered_bytes(id) > 0);
  for (std::size_t i = 0; i < sent.size(); ++i) {
    const auto got = client.read_frame();
    INFO("message " << i);
    REQUIRE(got);
    // Messages over 64 KiB arrive as fragments: gather them.
    std::string whole = *got;
    while (whole.size() < sent[i].size()) {
      const auto more = client.read_frame();
      REQUIRE(more);
      whole += *more;
    }
    REQUIRE(whole == sent[i]);
  }
  CHECK(eventually([&] { return fx.server.buffered_bytes(id) == 0; }));
}

TEST_CASE("tls: a client that never reads is closed with 1013", "[websocket][tls][backpressure]") {
  auto o = tls_echo::options();
  o.backpressure.max_buffered_bytes = 256u << 10;
  o.close_timeout = 300ms;
  tls_echo fx(std::move(o));
  tls_client client;
  REQUIRE(client.connect(fx.port, nullptr, 4096));
  REQUIRE(client.exchange(upgrade_request, "\r\n\r\n").starts_with("HTTP/1.1 101"));
  REQUIRE(eventually([&] { return fx.opened == 1; }));
  const devgate::session_id id = fx.last;
  const auto chunk = devgate::shared_bytes::copy_of(std::string(32u << 10, 'z'));
  std::error_code ec;
  for (int i = 0; i < 100000 && !ec; ++i)
    ec = fx.server.send(id, devgate::payload_kind::binary, chunk);
  CHECK(ec == devgate::errc::backpressure);
  REQUIRE(eventually([&] { return fx.closed == 1; }));
  CHECK(fx.last_code == devgate::close_code::try_again_later);
}

TEST_CASE("tls: mutual TLS: a CA-signed client certificate reaches the upgrade; none is refused",
          "[websocket][tls][mtls]") {
  auto o = tls_echo::options(true);
  std::mutex m;
  std::vector<std::string> seen;  // the CN of each upgrade's verified client certificate
  bool der_empty = false;         // checked on this thread: Catch is not thread-safe
  o.identify = [&](const ws::http_request& req) -> std::optional<std::string> {
    std::string cn = "(none)";
    bool empty = false;
    if (req.peer_certificate) {
      char name[256] = {};
      X509_NAME_get_text_by_NID(X509_get_subject_name(req.peer_certificate), NID_commonName, name,
                                sizeof name);
      cn = name;
      empty = ws::certificate_der(req.peer_certificate).empty();
    }
    std::lock_guard lock(m);
    seen.push_back(cn);
    der_empty = der_empty || empty;
    return cn;
  };
  tls_echo fx(std::move(o));
  const std::string client = "DEVGATE_TLS_CLIENT_CERT='" + certs().file("client.pem") +
                             "' DEVGATE_TLS_CLIENT_KEY='" + certs().file("client.key") + "'";
  CHECK(run_python(client, fx.url("/py"), "messages") == 0);
  const std::string rogue = "DEVGATE_TLS_CLIENT_CERT='" + certs().file("rogue.pem") +
                            "' DEVGATE_TLS_CLIENT_KEY='" + certs().file("rogue.key") + "'";
  CHECK(run_python(rogue, fx.url("/py"), "tls-refused") == 0);
  CHECK(run_python("", fx.url("/py"), "tls-refused") == 0);
  std::lock_guard lock(m);
  CHECK(seen == std::vector<std::string>{"device-7"});
  CHECK_FALSE(der_empty);
}

TEST_CASE("attack: a TLS slowloris (a partial ClientHello, then silence) is closed in time",
          "[websocket][tls][attack]") {
  auto o = tls_echo::options();
  o.handshake_timeout = 500ms;
  tls_echo fx(std::move(o));
  // A TLS record header announcing a 512-byte handshake message, and its first 4 bytes.
  const int fd = connect_tcp(fx.port);
  send_all(fd, std::string_view("\x16\x03\x01\x02\x00\x01\x00\x01\xfc", 9));
  const auto t = time_to_close(fd, 10s);
  ::close(fd);
  CHECK(t >= 400ms);
  CHECK(t < 2s);
  // The same after a complete handshake: the HTTP request must come within the timeout too.
  tls_client client;
  REQUIRE(client.connect(fx.port));
  CHECK(time_to_close(client.fd, 10s) < 2s);
}

TEST_CASE("attack: plain HTTP on the TLS port is closed at once", "[websocket][tls][attack]") {
  auto o = tls_echo::options();
  o.handshake_timeout = 10s;  // so that only the first-byte check can close it quickly
  tls_echo fx(std::move(o));
  for (const std::string_view request : {upgrade_request, std::string_view("G")}) {
    const int fd = connect_tcp(fx.port);
    send_all(fd, request);
    CHECK(time_to_close(fd, 5s) < 1s);
    ::close(fd);
  }
  CHECK(eventually([&] { return fx.server.connection_count() == 0; }));
}

TEST_CASE("tls: reload_tls: new connections get the new certificate, open ones keep theirs",
          "[websocket][tls][reload]") {
  // The server reads the files named in its options, which the test swaps under it.
  const fs::path dir = certs().dir / "reload";
  fs::create_directories(dir);
  fs::copy_file(certs().file("server.pem"), dir / "cert.pem", fs::copy_options::overwrite_existing);
  fs::copy_file(certs().file("server.key"), dir / "key.pem", fs::copy_options::overwrite_existing);
  auto o = tls_echo::options();
  o.tls->certificate_chain_file = (dir / "cert.pem").string();
  o.tls->private_key_file = (dir / "key.pem").string();
  tls_echo fx(std::move(o));

  tls_client before;
  REQUIRE(before.connect(fx.port));
  CHECK(before.peer_name() == "devgate server one");
  CHECK(before.exchange(upgrade_request, "\r\n\r\n").starts_with("HTTP/1.1 101"));

  fs::copy_file(certs().file("server2.pem"), dir / "cert.pem",
                fs::copy_options::overwrite_existing);
  fs::copy_file(certs().file("server2.key"), dir / "key.pem", fs::copy_options::overwrite_existing);
  REQUIRE_FALSE(fx.server.reload_tls());

  tls_client after;
  REQUIRE(after.connect(fx.port));
  CHECK(after.peer_name() == "devgate server two");
  CHECK(after.exchange(upgrade_request, "\r\n\r\n").starts_with("HTTP/1.1 101"));
  // The connection made before the reload still works (a masked "hi" text frame is echoed).
  const std::string frame("\x81\x82\x00\x00\x00\x00hi", 8);
  CHECK(before.exchange(frame, "hi").ends_with("hi"));

  // A broken file: the reload fails with a reason and the current certificate stays.
  std::ofstream(dir / "key.pem") << "not a key\n";
  CHECK(fx.server.reload_tls() == ws::tls_errc::private_key);
  tls_client still;
  REQUIRE(still.connect(fx.port));
  CHECK(still.peer_name() == "devgate server two");
}

TEST_CASE("examples/echo_server --tls-cert/--tls-key serves wss and reloads on SIGHUP",
          "[websocket][tls][echo_server]") {
  const char* env = std::getenv("DEVGATE_ECHO_SERVER");  // tests/websocket/CMakeLists.txt
  REQUIRE(env != nullptr);
  const fs::path dir = certs().dir / "echo";
  fs::create_directories(dir);
  fs::copy_file(certs().file("server.pem"), dir / "cert.pem", fs::copy_options::overwrite_existing);
  fs::copy_file(certs().file("server.key"), dir / "key.pem", fs::copy_options::overwrite_existing);
  int out[2];
  REQUIRE(::pipe(out) == 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  posix_spawn_file_actions_addclose(&actions, out[0]);
  std::vector<std::string> args{env,
                                "--port",
                                "0",
                                "--address",
                                "127.0.0.1",
                                "--tls-cert",
                                (dir / "cert.pem").string(),
                                "--tls-key",
                                (dir / "key.pem").string()};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  REQUIRE(::posix_spawn(&pid, env, &actions, nullptr, argv.data(), environ) == 0);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  std::string first;
  char c = 0;
  while (::read(out[0], &c, 1) == 1 && c != '\n') first.push_back(c);
  ::close(out[0]);
  REQUIRE(first.starts_with("listening on "));
  const auto port = static_cast<std::uint16_t>(std::stoul(first.substr(13)));
  const std::string url = "wss://localhost:" + std::to_string(port) + "/echo";
  CHECK(run_python("", url, "messages") == 0);
  CHECK(run_node(url, "fragmented") == 0);

  fs::copy_file(certs().file("server2.pem"), dir / "cert.pem",
                fs::copy_options::overwrite_existing);
  fs::copy_file(certs().file("server2.key"), dir / "key.pem", fs::copy_options::overwrite_existing);
  ::kill(pid, SIGHUP);
  CHECK(eventually([&] {
    tls_client client;
    return client.connect(port) && client.peer_name() == "devgate server two";
  }));
  ::kill(pid, SIGTERM);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

TEST_CASE("tls: start() refuses unusable files with a reason", "[websocket][tls]") {
  auto o = tls_echo::options();
  o.tls->private_key_file = certs().file("client.key");  // another certificate's key
  ws::server mismatched(o);
  CHECK(mismatched.start() == ws::tls_errc::key_mismatch);
  o.tls->certificate_chain_file = certs().file("missing.pem");
  ws::server missing(o);
  const auto ec = missing.start();
  CHECK(ec == ws::tls_errc::certificate_chain);
  CHECK(ec.message().find("certificate_chain_file") != std::string::npos);
  ws::server plain;
  CHECK(plain.reload_tls() == ws::tls_errc::not_enabled);
}
