#pragma once
// The clock of the ingest scenario's latency stamps, shared by the load generator (which writes
// the stamp into each message) and the bench server (whose sink reads it): both must use the
// same clock, and CLOCK_MONOTONIC is the same in every process on the machine.

#include <cstdint>  // std::uint64_t
#include <ctime>    // clock_gettime

namespace devgate_bench {

/// CLOCK_MONOTONIC in nanoseconds.
inline std::uint64_t now_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

}  // namespace devgate_bench
