#pragma once
// How the load generators open a client connection, shared by loadgen.cpp and devload.cpp:
// non-blocking, TCP_NODELAY, from its own loopback source address 127.0.0.X (X = 1..254 by
// slot, IP_BIND_ADDRESS_NO_PORT: the port is picked at connect() for the full 4-tuple, so
// 19,000 connections to one port never run out of ephemeral ports), registered edge-triggered
// in an epoll set with the slot as its data.

#include <arpa/inet.h>    // htonl, inet_pton
#include <netinet/in.h>   // sockaddr_in, IP_BIND_ADDRESS_NO_PORT
#include <netinet/tcp.h>  // TCP_NODELAY
#include <sys/epoll.h>    // epoll_ctl
#include <sys/socket.h>   // socket, bind, connect
#include <unistd.h>       // close

#include <cerrno>   // EINPROGRESS
#include <cstdint>  // ports, slots
#include <string>   // the host

namespace devgate_bench {

/// A connection being opened: its descriptor, or -1 and the call that failed with `error`.
struct opened {
  int fd = -1;              ///< The socket, connecting (or -1).
  const char* failed = "";  ///< "socket", "bind" or "connect" when fd is -1.
  int error = 0;            ///< That call's errno.
};

/// Starts connecting slot `slot` to `host:port` and registers it in epoll set `ep`.
inline opened open_loopback(unsigned slot, const std::string& host, std::uint16_t port, int ep) {
  opened o;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return {-1, "socket", errno};
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
  sockaddr_in src{};
  src.sin_family = AF_INET;
  src.sin_addr.s_addr = htonl((127u << 24) | (1u + slot % 254u));
  sockaddr_in dst{};
  dst.sin_family = AF_INET;
  dst.sin_port = htons(port);
  ::inet_pton(AF_INET, host.c_str(), &dst.sin_addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) {
    o = {-1, "bind", errno};
  } else if (::connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst) != 0 &&
             errno != EINPROGRESS) {
    o = {-1, "connect", errno};
  } else {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u32 = slot;
    ::epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return {fd, "", 0};
  }
  ::close(fd);
  return o;
}

}  // namespace devgate_bench
