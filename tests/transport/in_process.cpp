// The in-process transport on its own, then driving a gateway end to end.
#include "devgate/transport/in_process.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>  // waitpid: the attack runs in a child
#include <unistd.h>    // fork, alarm

#include "devgate/pipeline/gateway.hpp"
#include "support.hpp"

namespace {

using namespace std::chrono_literals;
using devgate::testing::numbered;

devgate::shared_bytes text(std::string_view s) { return devgate::shared_bytes::copy_of(s); }

}  // namespace

TEST_CASE("in_process_transport delivers pushes with sequence numbers and device ids",
          "[transport][in_process]") {
  devgate::in_process_transport t;
  std::vector<devgate::inbound_message> got;
  std::vector<std::string> opened;
  std::vector<devgate::close_code> closed;
  devgate::transport_handlers h;
  h.on_open = [&](const devgate::session_info& info) { opened.push_back(info.device_id); };
  h.on_messages = [&](std::span<devgate::inbound_message> batch) -> devgate::batch_result {
    got.push_back(std::move(batch[0]));
    if (got.size() == 2) return {0, devgate::errc::queue_full};
    return {1, {}};
  };
  h.on_close = [&](devgate::session_id, devgate::close_code c) { closed.push_back(c); };
  t.set_handlers(std::move(h));
  auto dev = t.connect("lamp");
  REQUIRE(dev.push("before start") == devgate::errc::closed);
  REQUIRE_FALSE(t.start());
  REQUIRE(t.start() == devgate::errc::already_running);
  REQUIRE_FALSE(dev.push("one"));
  REQUIRE(dev.push("two") == devgate::errc::queue_full);  // the engine's verdict comes back
  REQUIRE(opened == std::vector<std::string>{"lamp"});
  REQUIRE(got.size() == 2);
  REQUIRE(got[0].sequence == 1);
  REQUIRE(got[1].sequence == 2);
  REQUIRE(got[1].device_id.view() == "lamp");
  REQUIRE(got[0].device_id.data() == got[1].device_id.data());  // shared, not copied
  REQUIRE(got[1].payload.view() == "two");
  dev.disconnect();
  REQUIRE(closed == std::vector<devgate::close_code>{devgate::close_code::normal});
  REQUIRE(dev.close_status() == devgate::close_code::normal);
  REQUIRE(dev.push("after") == devgate::errc::closed);
  REQUIRE(t.send(dev.id(), devgate::payload_kind::text, text("x")) ==
          devgate::errc::unknown_session);
  t.stop();
}

TEST_CASE("in_process_transport hands each push to on_messages as a batch of one",
          "[transport][in_process]") {
  devgate::in_process_transport t;
  std::vector<std::size_t> sizes;
  std::vector<std::uint64_t> sequences;
  devgate::transport_handlers h;
  h.on_messages = [&](std::span<devgate::inbound_message> batch) -> devgate::batch_result {
    sizes.push_back(batch.size());
    for (const auto& m : batch) sequences.push_back(m.sequence);
    if (batch[0].payload.view() == "refuse") return {0, devgate::errc::queue_full};
    return {batch.size(), {}};
  };
  t.set_handlers(std::move(h));
  REQUIRE_FALSE(t.start());
  auto dev = t.connect("lamp");
  CHECK_FALSE(dev.push("one"));
  CHECK(dev.push("refuse") == devgate::errc::queue_full);
  CHECK_FALSE(dev.push("three"));
  CHECK(sizes == std::vector<std::size_t>{1, 1, 1});
  CHECK(sequences == std::vector<std::uint64_t>{1, 2, 3});
  t.stop();
}

TEST_CASE("in_process_transport honours back-pressure options", "[transport][in_process]") {
  devgate::backpressure_options bp;
  bp.max_buffered_bytes = 10;
  SECTION("close with 1008 or 1013") {
    bp.on_overflow = GENERATE(devgate::overflow_action::close_policy_violation,
                              devgate::overflow_action::close_try_again_later);
    devgate::in_process_transport t(bp);
    REQUIRE_FALSE(t.start());
    auto dev = t.connect("slow");
    REQUIRE_FALSE(t.send(dev.id(), devgate::payload_kind::text, text("123456")));
    REQUIRE(t.buffered_bytes(dev.id()) == 6);
    REQUIRE(t.send(dev.id(), devgate::payload_kind::text, text("123456")) ==
            devgate::errc::backpressure);
    REQUIRE(dev.close_status() ==
            (bp.on_overflow == devgate::overflow_action::close_policy_violation
                 ? devgate::close_code::policy_violation
                 : devgate::close_code::try_again_later));
    REQUIRE(t.session_count() == 0);
    t.stop();
  }
  SECTION("drop oldest") {
    bp.on_overflow = devgate::overflow_action::drop_oldest;
    devgate::in_process_transport t(bp);
    REQUIRE_FALSE(t.start());
    auto dev = t.connect("slow");
    REQUIRE_FALSE(t.send(dev.id(), devgate::payload_kind::text, text("aaaa")));
    REQUIRE_FALSE(t.send(dev.id(), devgate::payload_kind::text, text("bbbb")));
    REQUIRE_FALSE(t.send(dev.id(), devgate::payload_kind::binary, text("cccc")));
    REQUIRE(t.buffered_bytes(dev.id()) == 8);
    REQUIRE(dev.dropped() == 1);
    auto inbox = dev.take_inbox();
    REQUIRE(inbox.size() == 2);
    REQUIRE(inbox[0].payload.view() == "bbbb");
    REQUIRE(inbox[1].kind == devgate::payload_kind::binary);
    REQUIRE(t.buffered_bytes(dev.id()) == 0);
    REQUIRE(t.send(dev.id(), devgate::payload_kind::text, text("way too long")) ==
            devgate::errc::backpressure);
    t.stop();
    REQUIRE(dev.close_status() == devgate::close_code::going_away);
  }
}

TEST_CASE("broadcast shares one buffer among sessions, from many threads",
          "[transport][in_process]") {
  devgate::in_process_transport t;
  REQUIRE_FALSE(t.start());
  auto a = t.connect("a");
  auto b = t.connect("b");
  const devgate::session_id ids[] = {a.id(), b.id(), 999};
  const auto payload = text("firmware v2");
  std::vector<std::thread> threads;
  std::atomic<std::size_t> total{0};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      for (int k = 0; k < 100; ++k) total += t.broadcast(ids, devgate::payload_kind::text, payload);
    });
  }
  for (auto& th : threads) th.join();
  REQUIRE(total == 800);
  const auto inbox = a.take_inbox();
  REQUIRE(inbox.size() == 400);
  REQUIRE(inbox[0].payload.data() == payload.data());
  t.stop();
}

TEST_CASE("gateway: in-process devices through the pipeline, replies, stop semantics",
          "[pipeline][gateway]") {
  devgate::in_process_transport t;
  std::mutex mutex;
  std::vector<std::string> seen;
  devgate::pipeline_options o;
  o.capacity = 1000;
  devgate::gateway gw(
      t, devgate::callback_sink([&](const devgate::message& m, devgate::dispatch_context& ctx) {
        {
          std::lock_guard lock(mutex);
          seen.push_back(std::string(m.device_id.view()) + ":" + std::string(m.payload.view()));
        }
        return ctx.reply(m, devgate::shared_bytes::copy_of(numbered("ack ", m.sequence)));
      }),
      o);
  REQUIRE_FALSE(gw.start());
  auto fridge = t.connect("fridge");
  auto lamp = t.connect("lamp");
  for (int i = 0; i < 50; ++i) {
    REQUIRE_FALSE(fridge.push(numbered("f", i)));
    REQUIRE_FALSE(lamp.push(numbered("l", i)));
  }
  gw.stop();  // drains all 100 through the sink, whose replies reach the inboxes, then closes
  REQUIRE(seen.size() == 100);
  const auto inbox = fridge.take_inbox();
  REQUIRE(inbox.size() == 50);
  for (std::size_t i = 0; i < inbox.size(); ++i) {
    REQUIRE(inbox[i].payload.view() == numbered("ack ", i + 1));  // in order
  }
  REQUIRE(fridge.close_status() == devgate::close_code::going_away);
  const auto m = gw.metrics();
  REQUIRE(m.enqueued == 100);
  REQUIRE(m.dispatched == 100);
}

TEST_CASE("gateway: a full pipeline answers the device with queue_full, a stopped one with closed",
          "[pipeline][gateway]") {
  devgate::in_process_transport t;
  std::atomic<bool> release{false};
  devgate::pipeline_options o;
  o.capacity = 2;
  o.demand.max_batch = 1;
  o.pool.max_workers = 1;
  devgate::gateway gw(
      t, devgate::callback_sink([&](const devgate::message&, devgate::dispatch_context&) {
        while (!release.load()) std::this_thread::sleep_for(100us);
      }),
      o);
  REQUIRE_FALSE(gw.start());
  auto dev = t.connect("d");
  // The worker holds at most one message; the queue holds two; somewhere by the fourth push the
  // pipeline is full (capacity counts messages being dispatched too).
  std::error_code last;
  for (int i = 0; i < 4 && !last; ++i) last = dev.push("m");
  REQUIRE(last == devgate::errc::queue_full);
  REQUIRE(gw.metrics().rejected == 1);
  release = true;
  auto left = gw.stop(devgate::clock::now() + 10s);
  REQUIRE(left.empty());
  REQUIRE(dev.push("late") == devgate::errc::closed);
}

TEST_CASE("attack: throwing session hooks and intake are contained by the transport",
          "[transport][in_process][faults]") {
  // In a child: on the code before, on_open's exception escaped connect, and the gateway's
  // destructor, stopping the transport, met on_close's exception and reached std::terminate.
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(20);
    bool ok = false;
    try {
      devgate::in_process_transport t;
      devgate::session_hooks hooks;
      hooks.on_open = [](const devgate::session_info& info) {
        if (info.device_id == "bad-open") throw std::runtime_error("registry down");
      };
      hooks.on_close = [](devgate::session_id, devgate::close_code) {
        throw std::runtime_error("store down");
      };
      std::atomic<int> taken{0};
      auto intake = [&](std::span<devgate::inbound_message> batch) -> devgate::batch_result {
        if (batch[0].payload.view() == "poison") throw std::runtime_error("parser bug");
        taken += static_cast<int>(batch.size());
        return {batch.size(), {}};
      };
      devgate::gateway gw(t, devgate::null_sink{});
      if (gw.start(intake, hooks)) std::_Exit(1);
      auto bad_open = t.connect("bad-open");  // its session closes with 1011
      auto lamp = t.connect("lamp");
      auto fan = t.connect("fan");
      const bool fine = !lamp.push("on") && lamp.push("poison") == devgate::errc::closed &&
                        lamp.close_status() == devgate::close_code::internal_error &&
                        bad_open.close_status() == devgate::close_code::internal_error &&
                        bad_open.push("x") == devgate::errc::closed && !fan.push("on") &&
                        taken == 2;
      fan.disconnect();  // on_close throws: the session is closed all the same
      ok = fine && fan.close_status() == devgate::close_code::normal && t.session_count() == 0;
      gw.stop();
    } catch (...) {
      std::_Exit(2);  // an exception reached the host's call
    }
    std::_Exit(ok ? 0 : 1);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  INFO("signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ", exit "
                 << (WIFEXITED(status) ? WEXITSTATUS(status) : -1)
                 << " (2: an exception escaped, 1: not contained as expected)");
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
}
