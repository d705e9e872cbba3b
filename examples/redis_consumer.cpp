// A consumer of the Redis stream that devgate::redis::streams_sink writes: it joins a consumer
// group, first claims (XAUTOCLAIM) the entries a dead consumer of the group left pending past
// --min-idle-ms, then reads new entries (XREADGROUP), and acknowledges (XACK) each entry once it
// has handled it. An entry read but never acknowledged (the consumer died) stays pending, and
// the next consumer's XAUTOCLAIM takes it over: at-least-once, nothing lost.
//
//   redis_consumer <redis://host:port[/db]> <stream> <group> <consumer>
//                  [--min-idle-ms N] [--exit-when-idle-ms M]
//
// Built only with the optional Redis part (devgate::redis). It uses connection::call, which
// waits for each reply, so the loop runs on its own thread.
#include <asio/executor_work_guard.hpp>
#include <asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <thread>

#include "devgate/redis/connection.hpp"
#include "devgate/redis/url.hpp"

namespace {

using devgate::redis::reply;
using devgate::redis::reply_type;

struct counts {
  unsigned long claimed = 0;
  unsigned long read = 0;
  unsigned long acked = 0;
};

// Handles one entry ([id, [field, value, ...]]) and acknowledges it.
bool handle(devgate::redis::connection& c, std::string_view stream, std::string_view group,
            const reply& entry, const char* how, counts& n) {
  if (entry.type != reply_type::array || entry.elements.size() != 2) return true;  // deleted
  const std::string& id = entry.elements[0].str;
  std::string device;
  std::string payload;
  const auto& fields = entry.elements[1].elements;
  for (std::size_t i = 0; i + 1 < fields.size(); i += 2) {
    if (fields[i].str == "device") device = fields[i + 1].str;
    if (fields[i].str == "payload") payload = fields[i + 1].str;
  }
  std::printf("%s %s device=%s payload=%s\n", how, id.c_str(), device.c_str(), payload.c_str());
  const auto ack = c.call({"XACK", stream, group, id});
  if (ack.ec) {
    std::fprintf(stderr, "redis_consumer: XACK %s: %s %s\n", id.c_str(), ack.ec.message().c_str(),
                 ack.value.str.c_str());
    return false;
  }
  n.acked += static_cast<unsigned long>(ack.value.integer);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr,
                 "usage: redis_consumer <redis://host:port[/db]> <stream> <group> <consumer> "
                 "[--min-idle-ms N] [--exit-when-idle-ms M]\n");
    return 2;
  }
  const auto url = devgate::redis::parse_url(argv[1]);
  if (!url) {
    std::fprintf(stderr, "redis_consumer: %s\n", url.error.c_str());
    return 2;
  }
  const std::string stream = argv[2];
  const std::string group = argv[3];
  const std::string consumer = argv[4];
  std::string min_idle = "30000";  // pending this long: its consumer is taken for dead
  long exit_when_idle_ms = -1;     // -1: run until killed
  for (int i = 5; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (flag == "--min-idle-ms") {
      min_idle = argv[i + 1];
    } else if (flag == "--exit-when-idle-ms") {
      exit_when_idle_ms = std::strtol(argv[i + 1], nullptr, 10);
    } else {
      std::fprintf(stderr, "redis_consumer: unknown flag %s\n", argv[i]);
      return 2;
    }
  }

  asio::io_context io;
  auto guard = asio::make_work_guard(io);
  std::thread loop([&] { io.run(); });
  devgate::redis::connection_options options;
  options.server = url.value;
  devgate::redis::connection c(io, options);
  c.start();
  int status = 0;
  counts n;
  if (!c.wait_connected(std::chrono::seconds(5))) {
    std::fprintf(stderr, "redis_consumer: cannot connect to %s: %s\n", argv[1],
                 c.last_error().c_str());
    status = 1;
  } else {
    // The group starts at the stream's beginning; it may exist already (BUSYGROUP).
    const auto created = c.call({"XGROUP", "CREATE", stream, group, "0", "MKSTREAM"});
    if (created.ec && created.value.str.rfind("BUSYGROUP", 0) != 0) {
      std::fprintf(stderr, "redis_consumer: XGROUP CREATE: %s\n", created.value.str.c_str());
      status = 1;
    }
    auto idle_since = std::chrono::steady_clock::now();
    while (status == 0) {
      bool any = false;
      // Take over what dead consumers left pending (XAUTOCLAIM pages with its cursor).
      std::string cursor = "0-0";
      do {
        const auto claimed =
            c.call({"XAUTOCLAIM", stream, group, consumer, min_idle, cursor, "COUNT", "100"});
        if (claimed.ec || claimed.value.elements.size() < 2) {
          std::fprintf(stderr, "redis_consumer: XAUTOCLAIM: %s %s\n", claimed.ec.message().c_str(),
                       claimed.value.str.c_str());
          status = 1;
          break;
        }
        cursor = claimed.value.elements[0].str;
        for (const auto& entry : claimed.value.elements[1].elements) {
          ++n.claimed;
          any = true;
          if (!handle(c, stream, group, entry, "claimed", n)) status = 1;
        }
      } while (status == 0 && cursor != "0-0");
      if (status != 0) break;
      // New entries for this group ('>'), waiting up to 200 ms for some.
      const auto got = c.call({"XREADGROUP", "GROUP", group, consumer, "COUNT", "100", "BLOCK",
                               "200", "STREAMS", stream, ">"});
      if (got.ec) {
        std::fprintf(stderr, "redis_consumer: XREADGROUP: %s %s\n", got.ec.message().c_str(),
                     got.value.str.c_str());
        status = 1;
        break;
      }
      for (const auto& per_stream : got.value.elements) {  // [[stream, [entries]]]
        if (per_stream.elements.size() != 2) continue;
        for (const auto& entry : per_stream.elements[1].elements) {
          ++n.read;
          any = true;
          if (!handle(c, stream, group, entry, "read", n)) status = 1;
        }
      }
      const auto now = std::chrono::steady_clock::now();
      if (any) idle_since = now;
      if (exit_when_idle_ms >= 0 &&
          now - idle_since >= std::chrono::milliseconds(exit_when_idle_ms)) {
        break;
      }
    }
  }
  std::printf("redis_consumer: claimed %lu, read %lu, acked %lu\n", n.claimed, n.read, n.acked);
  c.stop();
  guard.reset();
  loop.join();
  return status;
}
