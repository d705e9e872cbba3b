// Tests of include/devgate/auth/: tokens minted by PyJWT (tests/auth/peers/mint.py, Debian's
// python3-jwt), keys and certificates made by the `openssl` command at test time, and a live
// server attacked by python3-websockets clients (tests/auth/peers/attack.py).
#include "devgate/auth/token_authenticator.hpp"

#include "devgate/auth/allow_all.hpp"
#include "devgate/auth/authenticator.hpp"
#include "devgate/auth/client_certificate_authenticator.hpp"
#include "devgate/auth/gate.hpp"
#include "devgate/auth/origin.hpp"
#include "devgate/device/device_id.hpp"
#include "devgate/device/hub.hpp"
#include "devgate/websocket/server.hpp"

#include <arpa/inet.h>    // test clients
#include <openssl/pem.h>  // reading certificates
#include <sys/socket.h>   // test clients
#include <unistd.h>       // close

#include <catch2/catch.hpp>

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support.hpp"

namespace auth = devgate::auth;
namespace ws = devgate::websocket;
namespace dev = devgate::device;
namespace fs = std::filesystem;

namespace {

fs::path repo_root() { return fs::path(__FILE__).parent_path().parent_path().parent_path(); }
fs::path peers_dir() { return repo_root() / "tests" / "auth" / "peers"; }

// Runs `command` (bounded in time) and returns its standard output; REQUIREs exit status 0.
std::string output_of(const std::string& command) {
  FILE* p = ::popen(("timeout 300 " + command).c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  std::array<char, 4096> buf{};
  while (const auto n = std::fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
  const int status = ::pclose(p);
  INFO(command);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string trimmed(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  std::size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

// Keys made once per run with the openssl command: hs.key and old.key (HS256 secrets), es.pem
// and es.pub (an ES256 pair), es2.pem (another ES256 private key).
const fs::path& keys() {
  static const fs::path dir = [] {
    std::string tmpl = (fs::temp_directory_path() / "devgate-auth-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    const fs::path d = tmpl;
    const std::string q = "'" + d.string() + "/";
    output_of("openssl rand -base64 48 > " + q + "hs.key'");
    output_of("openssl rand -base64 48 > " + q + "old.key'");
    output_of("openssl ecparam -name prime256v1 -genkey -noout -out " + q + "es.pem' 2>&1");
    output_of("openssl ec -in " + q + "es.pem' -pubout -out " + q + "es.pub' 2>&1");
    output_of("openssl ecparam -name prime256v1 -genkey -noout -out " + q + "es2.pem' 2>&1");
    return d;
  }();
  return dir;
}

// A token minted by PyJWT: `mint("hs.key", "HS256", "sub=a exp=+60", "kid")`.
std::string mint(const std::string& keyfile, const std::string& alg, const std::string& claims,
                 const std::string& kid = "") {
  std::string cmd = "/usr/bin/python3 '" + (peers_dir() / "mint.py").string() + "' '" +
                    (keys() / keyfile).string() + "' " + alg + " " + claims;
  if (!kid.empty()) cmd += " --kid " + kid;
  return output_of(cmd);
}

// The authenticator the live server and the unit cases share: key "" (HS256), "es" (ES256),
// "old" (HS256, retired), jti "revoked-1" revoked.
std::shared_ptr<auth::token_authenticator> make_tokens(auth::token_options o = {}) {
  auto t = std::make_shared<auth::token_authenticator>(std::move(o));
  t->add_key("", auth::signing_key::hs256(trimmed(read_file(keys() / "hs.key"))));
  t->add_key("es", auth::signing_key::es256_from_pem(read_file(keys() / "es.pub")));
  t->add_key("old", auth::signing_key::hs256(trimmed(read_file(keys() / "old.key"))));
  t->retire_key("old");
  t->revoke("revoked-1");
  return t;
}

// A parsed upgrade request with `extra` header lines (each ending in CRLF).
struct parsed_request {
  ws::http_request_parser parser;
  explicit parsed_request(const std::string& target, const std::string& extra = "") {
    const std::string text = "GET " + target +
                             " HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: "
                             "Upgrade\r\n" +
                             extra + "\r\n";
    const auto st = parser.feed(std::as_bytes(std::span(text.data(), text.size())));
    REQUIRE(st == ws::http_request_parser::status::complete);
  }
  auth::request request(std::string_view device) const {
    auth::request r;
    r.device_id = device;
    r.path = parser.request().target;
    r.http = &parser.request();
    return r;
  }
};

// A blocking loopback client: sends `text`, returns what arrives until `stop` is seen (or EOF).
struct raw_client {
  int fd = -1;
  explicit raw_client(std::uint16_t port) {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    ::sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd, reinterpret_cast<::sockaddr*>(&a), sizeof a) == 0);
    ::timeval tv{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  raw_client(const raw_client&) = delete;
  raw_client& operator=(const raw_client&) = delete;
  ~raw_client() { ::close(fd); }
  void send(const std::string& text) const {
    REQUIRE(::send(fd, text.data(), text.size(), MSG_NOSIGNAL) ==
            static_cast<ssize_t>(text.size()));
  }
  std::string read_until(std::string_view stop) const {
    std::string got;
    std::array<char, 4096> buf{};
    while (got.find(stop) == std::string::npos) {
      const auto n = ::recv(fd, buf.data(), buf.size(), 0);
      if (n <= 0) break;
      got.append(buf.data(), static_cast<std::size_t>(n));
    }
    return got;
  }
  static std::string upgrade(const std::string& device, const std::string& extra = "") {
    return "GET /ws/" + device +
           " HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
           extra + "\r\n";
  }
};

}  // namespace

TEST_CASE("token_authenticator: tokens minted by PyJWT, every refusal named", "[auth][token]") {
  auto tokens = make_tokens();
  const auto verify = [&](const std::string& token, std::string_view device = "pump-7") {
    return tokens->verify(token, device);
  };
  const auto accepted = verify(mint("hs.key", "HS256", "sub=pump-7 exp=+300"));
  CHECK(accepted.accepted());
  CHECK(accepted.device_id == "pump-7");
  CHECK(accepted.authenticated);
  CHECK(nlohmann::json::parse(accepted.claims)["sub"] == "pump-7");
  CHECK(verify(mint("es.pem", "ES256", "sub=pump-7 exp=+300", "es")).accepted());

  struct bad {
    const char* what;
    std::string token;
    int status;
    const char* reason;
  };
  const bad cases[] = {
      {"expired", mint("hs.key", "HS256", "sub=pump-7 exp=-300"), 401, "expired"},
      {"not yet valid", mint("hs.key", "HS256", "sub=pump-7 exp=+7200 nbf=+3600"), 401,
       "not yet valid"},
      {"bad signature", mint("old.key", "HS256", "sub=pump-7 exp=+300"), 401, "bad signature"},
      {"ES256 signed by another key", mint("es2.pem", "ES256", "sub=pump-7 exp=+300", "es"), 401,
       "bad signature"},
      {"alg none", mint("hs.key", "none", "sub=pump-7 exp=+300"), 401, "algorithm not allowed"},
      {"alg none for the ES key", mint("hs.key", "none", "sub=pump-7 exp=+300", "es"), 401,
       "algorithm not allowed"},
      {"HS256 with the ES public key as secret",
       mint("es.pub", "HS256-with-es-public-key", "sub=pump-7 exp=+300", "es"), 401,
       "algorithm not allowed"},
      {"ES256 for the HS key", mint("es.pem", "ES256", "sub=pump-7 exp=+300"), 401,
       "algorithm not allowed"},
      {"unknown kid", mint("hs.key", "HS256", "sub=pump-7 exp=+300", "k9"), 401, "unknown key"},
      {"retired key", mint("old.key", "HS256", "sub=pump-7 exp=+300", "old"), 401, "key retired"},
      {"revoked jti", mint("hs.key", "HS256", "sub=pump-7 exp=+300 jti=revoked-1"), 401, "revoked"},
      {"wrong subject", mint("hs.key", "HS256", "sub=pump-8 exp=+300"), 403, "wrong subject"},
      {"no subject", mint("hs.key", "HS256", "exp=+300"), 401, "no subject"},
      {"no expiry", mint("hs.key", "HS256", "sub=pump-7"), 401, "no expiry"},
      {"two parts", "eyJhbGciOiJIUzI1NiJ9.e30", 401, "malformed token"},
      {"padding", "eyJhbGciOiJIUzI1NiJ9=.e30.AAAA", 401, "malformed token"},
      {"empty", "", 401, "malformed token"},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    const auto r = verify(c.token);
    CHECK(r.status == c.status);
    CHECK(r.reason == c.reason);
    CHECK(r.device_id.empty());
  }

  SECTION("leeway: a token expired a moment ago still passes within it") {
    CHECK(verify(mint("hs.key", "HS256", "sub=pump-7 exp=-10")).accepted());  // leeway 30 s
    auth::token_options strict;
    strict.leeway = std::chrono::seconds(0);
    CHECK(make_tokens(strict)
              ->verify(mint("hs.key", "HS256", "sub=pump-7 exp=-10"), "pump-7")
              .reason == "expired");
  }
  SECTION("audience") {
    auth::token_options o;
    o.audience = "fleet";
    auto aud = make_tokens(o);
    CHECK(aud->verify(mint("hs.key", "HS256", "sub=a exp=+300 aud=fleet"), "a").accepted());
    CHECK(aud->verify(mint("hs.key", "HS256", "sub=a exp=+300 aud=billing"), "a").reason ==
          "wrong audience");
    CHECK(aud->verify(mint("hs.key", "HS256", "sub=a exp=+300"), "a").reason == "wrong audience");
  }
  SECTION("rotation: a new key signs new tokens; retiring the old one refuses its tokens") {
    const auto old_token = mint("hs.key", "HS256", "sub=pump-7 exp=+300");
    tokens->add_key("k2", auth::signing_key::hs256(trimmed(read_file(keys() / "old.key"))));
    CHECK(verify(mint("old.key", "HS256", "sub=pump-7 exp=+300", "k2")).accepted());
    CHECK(verify(old_token).accepted());
    tokens->retire_key("");
    CHECK(verify(old_token).reason == "key retired");
    tokens->revoke("j-1");
    CHECK(verify(mint("old.key", "HS256", "sub=pump-7 exp=+300 jti=j-1", "k2")).reason ==
          "revoked");
  }
  SECTION("keys refuse misuse at set-up") {
    CHECK_THROWS_AS(auth::signing_key::hs256("short"), std::invalid_argument);
    CHECK_THROWS_AS(auth::signing_key::es256_from_pem("not a key"), std::invalid_argument);
    CHECK_THROWS_AS(auth::signing_key::es256_from_pem(read_file(keys() / "es.pem")),
                    std::invalid_argument);  // a private key where the public one belongs
  }
}

TEST_CASE("token_authenticator: the token from Authorization or from the subprotocol",
          "[auth][token]") {
  auto tokens = make_tokens();
  const auto token = mint("hs.key", "HS256", "sub=pump-7 exp=+300");
  {
    parsed_request p("/ws/pump-7", "Authorization: Bearer " + token + "\r\n");
    const auto r = tokens->check(p.request("pump-7"));
    CHECK(r.accepted());
    CHECK(r.subprotocol.empty());  // nothing was offered, nothing is echoed
  }
  {
    parsed_request p("/ws/pump-7",
                     "Sec-WebSocket-Protocol: devgate.v1, devgate.bearer." + token + "\r\n");
    const auto r = tokens->check(p.request("pump-7"));
    CHECK(r.accepted());
    CHECK(r.subprotocol == "devgate.v1");  // echoed instead of the token
  }
  {
    parsed_request p("/ws/pump-7", "Sec-WebSocket-Protocol: devgate.bearer." + token + "\r\n");
    const auto r = tokens->check(p.request("pump-7"));
    CHECK(r.status == 401);
    CHECK(r.reason.find(token) == std::string::npos);
  }
  {
    parsed_request p("/ws/pump-7?access_token=" + token);  // not a way in: it would reach logs
    CHECK(tokens->check(p.request("pump-7")).reason == "missing token");
  }
}

TEST_CASE("client_certificate_authenticator: names of certificates made by openssl",
          "[auth][certificate]") {
  const fs::path dir = keys();
  const auto make_cert = [&](const std::string& name, const std::string& subject,
                             const std::string& san) {
    const std::string base = "'" + (dir / name).string();
    std::string cmd =
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 "
        "-keyout " +
        base + ".key' -out " + base + ".crt' -subj '" + subject + "'";
    if (!san.empty()) cmd += " -addext 'subjectAltName=" + san + "'";
    output_of(cmd + " 2>&1");
    FILE* f = std::fopen((dir / (name + ".crt")).c_str(), "r");
    REQUIRE(f != nullptr);
    X509* cert = PEM_read_X509(f, nullptr, nullptr, nullptr);
    std::fclose(f);
    REQUIRE(cert != nullptr);
    return std::unique_ptr<X509, decltype(&X509_free)>(cert, X509_free);
  };
  const auth::client_certificate_authenticator a;
  const auto cn = make_cert("cn", "/O=fleet/CN=pump-7", "");
  const auto dns = make_cert("dns", "/CN=ignored", "DNS:pump-8,DNS:second");
  const auto uri = make_cert("uri", "/CN=ignored", "DNS:pump-x,URI:urn:devgate:device:pump-9");
  const auto email = make_cert("email", "/CN=pump-10", "email:ops@example.com");
  const auto other_uri = make_cert("other", "/CN=pump-11", "URI:https://example.com/pump-11");
  CHECK(a.device_id_of(cn.get()) == std::optional<std::string>("pump-7"));
  CHECK(a.device_id_of(dns.get()) == std::optional<std::string>("pump-8"));
  CHECK(a.device_id_of(uri.get()) == std::optional<std::string>("pump-9"));
  CHECK(a.device_id_of(email.get()) == std::optional<std::string>("pump-10"));
  CHECK_FALSE(a.device_id_of(other_uri.get()));  // a name, but none that names a device
  CHECK_FALSE(a.device_id_of(nullptr));

  auth::request r;
  r.device_id = "pump-7";
  CHECK(a.check(r).status == 401);  // no certificate
  r.peer_certificate = cn.get();
  const auto ok = a.check(r);
  CHECK(ok.accepted());
  CHECK(ok.device_id == "pump-7");
  r.peer_certificate = dns.get();
  CHECK(a.check(r).status == 403);  // pump-8's certificate at /ws/pump-7
  r.peer_certificate = other_uri.get();
  CHECK(a.check(r).status == 401);
}

TEST_CASE("origin_allow_list: exact scheme, host and port", "[auth][origin]") {
  CHECK(auth::origin_allow_list::normalize("HTTPS://Fleet.Example.com") ==
        std::optional<std::string>("https://fleet.example.com:443"));
  CHECK(auth::origin_allow_list::normalize("http://[::1]:8080") ==
        std::optional<std::string>("http://[::1]:8080"));
  CHECK_FALSE(auth::origin_allow_list::normalize("null"));
  CHECK_FALSE(auth::origin_allow_list::normalize("http://a.example/path"));
  CHECK_FALSE(auth::origin_allow_list::normalize("http://a.example:99999"));
  CHECK_FALSE(auth::origin_allow_list::normalize("http://user@a.example"));

  auth::origin_allow_list list;
  CHECK(list.empty());
  list.add("http://127.0.0.1:8080");
  list.add("https://fleet.example.com");
  CHECK_THROWS_AS(list.add("fleet.example.com"), std::invalid_argument);
  const auto allows = [&](const std::string& headers) {
    parsed_request p("/ws/a", headers);
    return list.allows(p.request("a"));
  };
  CHECK(allows(""));  // no Origin: not a browser
  CHECK(allows("Origin: http://127.0.0.1:8080\r\n"));
  CHECK(allows("Origin: https://fleet.example.com:443\r\n"));
  CHECK(allows("Origin: https://FLEET.example.com\r\n"));
  CHECK_FALSE(allows("Origin: http://127.0.0.1:8081\r\n"));
  CHECK_FALSE(allows("Origin: https://127.0.0.1:8080\r\n"));
  CHECK_FALSE(allows("Origin: http://fleet.example.com\r\n"));
  CHECK_FALSE(allows("Origin: https://fleet.example.com.evil.example\r\n"));
  CHECK_FALSE(allows("Origin: null\r\n"));
  CHECK_FALSE(allows("Origin: http://127.0.0.1:8080\r\nOrigin: http://evil.example\r\n"));
  list.set_strict(true);
  CHECK_FALSE(allows(""));
}

TEST_CASE("live server: every bad credential refused before the upgrade; impostors and topics",
          "[auth][server][python]") {
  auto tokens = make_tokens();
  auth::origin_allow_list origins;
  origins.add("http://allowed.example:8080");
  ws::server_options o;
  o.address = "127.0.0.1";
  o.threads = 2;
  o.identify = dev::identify_device;
  o.authenticate = auth::gate(tokens, origins);
  ws::server server(o);
  dev::hub_options ho;
  ho.require_authentication = true;
  dev::hub<ws::server> hub(server, {}, ho);
  REQUIRE_FALSE(hub.start());
  const std::string cmd = "/usr/bin/python3 '" + (peers_dir() / "attack.py").string() + "' " +
                          std::to_string(server.local_port()) + " '" + keys().string() + "' ";
  CHECK(std::system(("timeout 300 " + cmd + "refusals").c_str()) == 0);
  CHECK(std::system(("timeout 300 " + cmd + "accepted").c_str()) == 0);
  CHECK(std::system(("timeout 300 " + cmd + "impostor").c_str()) == 0);
  CHECK(std::system(("timeout 300 " + cmd + "topics").c_str()) == 0);
  CHECK(hub.stats().takeovers == 0);
  hub.stop();
}

TEST_CASE("asynchronous authenticator: answers later from another thread, bounded per worker",
          "[auth][server]") {
  // Holds every check until the test answers it, as a remote check would.
  struct deferred {
    std::mutex mutex;
    std::vector<std::pair<std::string, auth::completion>> waiting;
    void authenticate(const auth::request& r, auth::completion done) {
      std::lock_guard lock(mutex);
      waiting.emplace_back(std::string(r.device_id), std::move(done));
    }
    std::size_t size() {
      std::lock_guard lock(mutex);
      return waiting.size();
    }
    // Answers every waiting check from a thread of its own.
    void answer_all(bool accept) {
      std::vector<std::pair<std::string, auth::completion>> now;
      {
        std::lock_guard lock(mutex);
        now.swap(waiting);
      }
      std::thread([now = std::move(now), accept]() mutable {
        for (auto& [id, done] : now) {
          done(accept ? auth::result::accept(id) : auth::result::reject(403, "not today"));
        }
      }).join();
    }
  };
  auto checks = std::make_shared<deferred>();
  ws::server_options o;
  o.address = "127.0.0.1";
  o.threads = 1;
  o.identify = dev::identify_device;
  o.max_pending_authentications = 2;
  o.authenticate = auth::gate(checks);
  std::mutex mutex;
  std::vector<devgate::session_info> opened;
  ws::server server(o);
  devgate::transport_handlers h;
  h.on_open = [&](const devgate::session_info& info) {
    std::lock_guard lock(mutex);
    opened.push_back(info);
  };
  h.on_messages = [](std::span<devgate::inbound_message> m) {
    return devgate::batch_result{m.size(), {}};
  };
  server.set_handlers(std::move(h));
  REQUIRE_FALSE(server.start());

  raw_client a(server.local_port()), b(server.local_port()), c(server.local_port());
  a.send(raw_client::upgrade("a"));
  b.send(raw_client::upgrade("b"));
  REQUIRE(devgate::testing::eventually([&] { return checks->size() == 2; }));
  c.send(raw_client::upgrade("c"));  // a third check on the same worker: over the bound
  CHECK(c.read_until("\r\n\r\n").starts_with("HTTP/1.1 503 "));
  checks->answer_all(true);
  const auto ra = a.read_until("\r\n\r\n");
  CHECK(ra.starts_with("HTTP/1.1 101 "));
  CHECK(b.read_until("\r\n\r\n").starts_with("HTTP/1.1 101 "));
  REQUIRE(devgate::testing::eventually([&] {
    std::lock_guard lock(mutex);
    return opened.size() == 2;
  }));
  {
    std::lock_guard lock(mutex);
    CHECK(opened[0].authenticated);
  }

  // Refused later: the answer's status and reason; a dropped completion answers 500.
  raw_client d(server.local_port()), e(server.local_port());
  d.send(raw_client::upgrade("d"));
  REQUIRE(devgate::testing::eventually([&] { return checks->size() == 1; }));
  checks->answer_all(false);
  const auto rd = d.read_until("not today");
  CHECK(rd.starts_with("HTTP/1.1 403 "));
  e.send(raw_client::upgrade("e"));
  REQUIRE(devgate::testing::eventually([&] { return checks->size() == 1; }));
  {
    std::lock_guard lock(checks->mutex);
    checks->waiting.clear();  // the authenticator forgets it: its completion answers 500
  }
  CHECK(e.read_until("\r\n\r\n").starts_with("HTTP/1.1 500 "));
  server.stop();
}

TEST_CASE("allow_all: accepts unauthenticated and has the server warn at start", "[auth]") {
  const auto check = auth::gate(std::make_shared<auth::allow_all>());
  CHECK(check.start_warning.find("allow_all") != std::string::npos);
  parsed_request p("/ws/a");
  auth::result got;
  check.check(p.request("a"), auth::completion([&](auth::result r) { got = std::move(r); }));
  CHECK(got.accepted());
  CHECK(got.device_id == "a");
  CHECK_FALSE(got.authenticated);
}
