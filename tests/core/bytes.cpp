#include "devgate/core/bytes.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <thread>
#include <vector>

TEST_CASE("shared_bytes copies once and shares thereafter", "[core][bytes]") {
  std::string source = "hello, fleet";
  const auto a = devgate::shared_bytes::copy_of(std::string_view(source));
  source[0] = 'J';  // the buffer is a copy: later changes to the source do not show
  REQUIRE(a.view() == "hello, fleet");
  REQUIRE(a.use_count() == 1);

  const auto b = a;  // NOLINT(performance-unnecessary-copy-initialization): sharing is the point
  REQUIRE(b.data() == a.data());
  REQUIRE(a.use_count() == 2);
}

TEST_CASE("shared_bytes slices keep the whole buffer alive", "[core][bytes]") {
  devgate::shared_bytes slice;
  {
    const auto whole = devgate::shared_bytes::copy_of(std::string_view("0123456789"));
    slice = whole.slice(3, 4);
    REQUIRE(slice.data() == whole.data() + 3);
  }
  REQUIRE(slice.view() == "3456");
  REQUIRE(slice.slice(2, 100).view() == "56");  // clamped to the end
  REQUIRE(slice.slice(4, 1).empty());           // past the end: empty
}

TEST_CASE("shared_bytes::build fills a buffer once", "[core][bytes]") {
  const auto built = devgate::shared_bytes::build(3, [](std::span<std::byte> out) {
    out[0] = std::byte{'a'};
    out[1] = std::byte{'b'};
    out[2] = std::byte{'c'};
  });
  REQUIRE(built.view() == "abc");
  REQUIRE(devgate::shared_bytes::build(0, [](std::span<std::byte>) {}).empty());
  REQUIRE(devgate::shared_bytes{}.data() == nullptr);
}

TEST_CASE("a moved-from shared_bytes is empty", "[core][bytes]") {
  auto a = devgate::shared_bytes::copy_of(std::string_view("payload"));
  auto b = std::move(a);
  REQUIRE(b.view() == "payload");
  REQUIRE(a.empty());  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  REQUIRE(a.data() == nullptr);
  REQUIRE(a.use_count() == 0);

  devgate::shared_bytes c;
  c = std::move(b);
  REQUIRE(c.view() == "payload");
  REQUIRE(b.empty());  // NOLINT(bugprone-use-after-move)
}

TEST_CASE("small buffers come from the freeing thread's cache, bounded, across threads",
          "[core][bytes]") {
  using devgate::shared_bytes;
  const std::string text(40, 'q');
  const std::byte* first = nullptr;
  {
    auto a = shared_bytes::copy_of(text);
    first = a.data();
  }
  auto b = shared_bytes::copy_of(text);  // the block `a` gave back
  CHECK(b.view() == text);
  if (devgate::detail::small_block_cache_enabled) CHECK(b.data() == first);

  // Made on this thread, freed on another (as a pipeline worker does), many more than a list
  // keeps: every one is intact until freed, and the other thread's lists go when it ends.
  std::vector<shared_bytes> made;
  for (int i = 0; i < 2000; ++i) made.push_back(shared_bytes::copy_of(std::to_string(i) + text));
  bool intact = true;  // Catch2 v2 assertions are not thread-safe: checked after join
  std::thread consumer([&] {
    for (int i = 0; i < 2000; ++i) {
      intact = intact && made[static_cast<std::size_t>(i)].view() == std::to_string(i) + text;
    }
    made.clear();
    for (int i = 0; i < 100; ++i) {
      auto c = shared_bytes::copy_of(text);  // from the blocks this thread just freed
      intact = intact && c.view() == text;
    }
  });
  consumer.join();
  CHECK(intact);
  auto d = shared_bytes::copy_of(std::string(300, 'x'));  // over the largest block: plain new
  CHECK(d.size() == 300);
}
