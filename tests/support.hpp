#pragma once
// Helpers shared by devgate's tests (every test folder has tests/ on its include path:
// `#include "support.hpp"`).

#include <chrono>       // bounds
#include <cstdint>      // numbers in names
#include <string>       // names
#include <string_view>  // prefixes
#include <thread>       // sleeping between polls

namespace devgate::testing {

/// Polls `done` every millisecond until it holds or `limit` passes, and returns its last
/// answer. The limit only bounds a failure: a passing test waits just as long as `done` takes.
template <class Pred>
bool eventually(Pred done, std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) return done();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

/// `prefix` followed by `n` in decimal: numbered("d", 7) is "d7". It appends rather than writing
/// `"d" + std::to_string(n)`, where GCC 12 at -O3 reports a false -Wrestrict inside
/// std::string's insert at the front.
inline std::string numbered(std::string_view prefix, std::uint64_t n) {
  std::string s(prefix);
  s += std::to_string(n);
  return s;
}

}  // namespace devgate::testing
