#pragma once
// What the Redis tests share: a redis-server of the test's own on a free loopback port, a loop
// thread, and connection options for tests (short reconnect waits).

#include <fcntl.h>     // O_RDONLY for the server's stdio
#include <signal.h>    // kill
#include <spawn.h>     // posix_spawnp for redis-server
#include <stdlib.h>    // mkdtemp
#include <sys/wait.h>  // waitpid
#include <unistd.h>    // environ

#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <asio/ip/tcp.hpp>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "devgate/redis/connection.hpp"
#include "devgate/redis/url.hpp"
#include "support.hpp"

extern char** environ;

namespace devgate::testing {

using namespace std::chrono_literals;

// A free loopback port: bound by the kernel's choice, then released for the server to take.
inline std::uint16_t free_port() {
  asio::io_context io;
  asio::ip::tcp::acceptor a(io, asio::ip::tcp::endpoint(asio::ip::address_v4::loopback(), 0));
  return a.local_endpoint().port();
}

inline bool accepts(std::uint16_t port) {
  asio::io_context io;
  asio::ip::tcp::socket s(io);
  std::error_code ec;
  s.connect(asio::ip::tcp::endpoint(asio::ip::address_v4::loopback(), port), ec);
  return !ec;
}

// A redis-server of the test's own: no persistence, a temporary directory, stopped at the end.
class redis_server {
 public:
  explicit redis_server(std::vector<std::string> extra = {}) : extra_(std::move(extra)) {
    dir_ = (std::filesystem::temp_directory_path() / "devgate-redis-XXXXXX").string();
    REQUIRE(::mkdtemp(dir_.data()) != nullptr);
    port_ = free_port();
    start();
  }
  ~redis_server() {
    stop();
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  redis_server(const redis_server&) = delete;
  redis_server& operator=(const redis_server&) = delete;

  void start() {
    std::vector<std::string> args = {
        "redis-server", "--port",    std::to_string(port_), "--bind", "127.0.0.1",
        "--save",       "",          "--appendonly",        "no",     "--dir",
        dir_,           "--logfile", dir_ + "/redis.log"};
    args.insert(args.end(), extra_.begin(), extra_.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // Its output goes to /dev/null: a test that dies must not leave a server holding the pipe
    // the test runner reads.
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
    const int rc = ::posix_spawnp(&pid_, "redis-server", &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    INFO("redis-server must be installed (scripts/install-deps.sh installs redis-server)");
    REQUIRE(rc == 0);
    REQUIRE(eventually([&] { return accepts(port_); }, 10s));
  }
  void stop() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);  // a stalled server must be able to take its SIGTERM
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  void stall() { ::kill(pid_, SIGSTOP); }
  // Deletes the dump a SAVE left, so that the next start is empty (a restart that lost data).
  void remove_data() {
    std::error_code ignored;
    std::filesystem::remove(dir_ + "/dump.rdb", ignored);
  }
  void resume() { ::kill(pid_, SIGCONT); }

  [[nodiscard]] std::uint16_t port() const { return port_; }
  [[nodiscard]] std::string url() const { return "redis://127.0.0.1:" + std::to_string(port_); }

 private:
  std::vector<std::string> extra_;
  std::string dir_;
  std::uint16_t port_ = 0;
  pid_t pid_ = -1;
};

// An io_context run by a thread of its own, as a gateway's network thread would run it.
struct loop {
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> guard = asio::make_work_guard(io);
  std::thread thread{[this] { io.run(); }};
  // Waits until the loop ran everything posted before (e.g. a store's stop, which still uses
  // its connections).
  void sync() {
    std::promise<void> done;
    asio::post(io, [&done] { done.set_value(); });
    done.get_future().wait();
  }
  ~loop() {
    guard.reset();
    thread.join();
  }
};

inline devgate::redis::connection_options options_for(const std::string& url) {
  const auto parsed = devgate::redis::parse_url(url);
  REQUIRE(parsed);
  devgate::redis::connection_options o;
  o.server = parsed.value;
  o.reconnect_initial = 20ms;
  o.reconnect_max = 200ms;
  return o;
}

// The integer reply of `argv` (the test fails on an error).
inline long long integer_of(devgate::redis::connection& c,
                            std::initializer_list<std::string_view> argv) {
  const auto r = c.call(argv);
  INFO(r.ec.message() << " " << r.value.str);
  REQUIRE_FALSE(r.ec);
  return r.value.integer;
}

}  // namespace devgate::testing
