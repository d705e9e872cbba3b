#pragma once
// What the load generators read about a server process and about themselves, shared by
// loadgen.cpp and devload.cpp: the server's CPU time from /proc/<pid>/stat (utime + stime), a
// field of /proc/<pid>/status (VmRSS, VmHWM), and the generator's own CPU time.

#include <sys/resource.h>  // getrusage
#include <unistd.h>        // sysconf

#include <cstdlib>   // std::strtod, std::strtol
#include <cstring>   // std::strlen
#include <fstream>   // /proc files
#include <iterator>  // std::istreambuf_iterator
#include <sstream>   // /proc parsing
#include <string>    // paths, lines

namespace devgate_bench {

/// CPU seconds (user + system) process `pid` has used, from /proc/<pid>/stat; 0 if unreadable.
inline double proc_cpu_seconds(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto paren = all.rfind(')');
  if (paren == std::string::npos) return 0;
  std::istringstream in(all.substr(paren + 2));
  std::string field;
  double utime = 0;
  double stime = 0;
  // After "(comm) " comes field 3 (state); utime and stime are fields 14 and 15.
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) utime = std::strtod(field.c_str(), nullptr);
    if (i == 15) stime = std::strtod(field.c_str(), nullptr);
  }
  return (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

/// The kB figure of line `key` (e.g. "VmRSS:") in /proc/<pid>/status; 0 if absent.
inline long proc_status_kb(int pid, const char* key) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  const std::size_t n = std::strlen(key);
  while (std::getline(f, line)) {
    if (line.compare(0, n, key) == 0) return std::strtol(line.c_str() + n, nullptr, 10);
  }
  return 0;
}

/// CPU seconds (user + system) this process has used.
inline double self_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

}  // namespace devgate_bench
