#pragma once

#include <asio.hpp>

#include <csignal>       // SIGINT, SIGTERM
#include <system_error>  // the wait's result

namespace devgate {

/// Catches SIGINT and SIGTERM from construction on, so that a gateway's main() can start its
/// servers and then wait for Ctrl-C or a service manager's stop before shutting down gracefully.
/// A signal that arrives before `wait()` is kept for it (asio::signal_set queues it), and it may
/// arrive on any thread. Construct it before starting the threads that must not be killed.
class stop_signals {
 public:
  /// Starts catching SIGINT and SIGTERM.
  stop_signals() : set_(ctx_, SIGINT, SIGTERM) {}
  stop_signals(const stop_signals&) = delete;
  stop_signals& operator=(const stop_signals&) = delete;

  /// Blocks until one of them has arrived (or had arrived) and returns its number.
  int wait() {
    int got = 0;
    set_.async_wait([&got](const std::error_code& ec, int signal) {
      if (!ec) got = signal;
    });
    ctx_.restart();
    ctx_.run();
    return got;
  }

 private:
  asio::io_context ctx_{1};
  asio::signal_set set_;
};

}  // namespace devgate
