// A program outside devgate that uses its optional Redis part (devgate::redis,
// devgate_redis_dep, devgate-redis.pc): a connection to a port where no server listens fails
// its connect attempts and answers a command with errc::not_connected, on the caller's loop;
// the topic bridge and the shared state store compile as installed.
#include <devgate/redis/connection.hpp>
#include <devgate/redis/state_store.hpp>
#include <devgate/redis/streams_sink.hpp>
#include <devgate/redis/topic_bridge.hpp>
#include <devgate/redis/url.hpp>

#include <asio/io_context.hpp>
#include <chrono>
#include <cstdio>

// The shared store fits the hub's store concepts as installed.
static_assert(devgate::store::durable_state_store<devgate::redis::state_store>);
static_assert(devgate::store::transactional_store<devgate::redis::state_store>);
static_assert(devgate::store::may_be_shared<devgate::redis::state_store>);

int main() {
  const auto url = devgate::redis::parse_url("redis://127.0.0.1:1/2");
  if (!url || url.value.db != 2) return 1;
  asio::io_context io;
  devgate::redis::connection_options options;
  options.server = url.value;
  devgate::redis::connection c(io, options);
  c.start();
  std::error_code answered;
  c.command({"PING"}, [&](std::error_code ec, const redisReply*) { answered = ec; });
  io.run_for(std::chrono::milliseconds(300));
  const bool ok =
      answered == devgate::redis::errc::not_connected && !c.connected() && c.failed_connects() >= 1;
  std::printf("devgate redis client: %s, %llu failed connects (no server on port 1)\n",
              answered.message().c_str(), static_cast<unsigned long long>(c.failed_connects()));
  c.stop();
  io.restart();
  io.run_for(std::chrono::milliseconds(50));
  return ok ? 0 : 1;
}
