// raw_tcp_server: the loopback ceiling of the side-by-side benchmarks (benchmarks/README.md).
//
// One thread, epoll (edge-triggered), no WebSocket: a frame is a 4-byte little-endian header
// (bit 31 = control text, bits 0..30 = payload length) followed by the payload. Data frames are
// echoed byte for byte; the control text "broadcast <bytes>" sends one data frame of that size to
// every other connection, from one shared buffer. Each accepted connection is greeted with an
// empty data frame (the generator counts a connection as set up when it arrives, as it counts a
// WebSocket connection when the 101 arrives).
//
//   raw_tcp_server [port]     prints "listening on <port>"; stops on SIGINT/SIGTERM

#include <arpa/inet.h>    // htonl
#include <netinet/in.h>   // sockaddr_in
#include <netinet/tcp.h>  // TCP_NODELAY
#include <sys/epoll.h>    // the event loop
#include <sys/socket.h>   // sockets
#include <sys/uio.h>      // writev
#include <unistd.h>       // close

#include <cerrno>   // EAGAIN
#include <csignal>  // stop signals
#include <cstdint>  // fixed-width integers
#include <cstdio>   // std::printf
#include <cstdlib>  // std::strtoul
#include <cstring>  // std::memcpy
#include <memory>   // shared buffers
#include <string>   // commands
#include <vector>   // connections, queues

namespace {

volatile std::sig_atomic_t stop_requested = 0;

using buffer = std::shared_ptr<const std::vector<char>>;

struct chunk {
  buffer bytes;
  std::size_t offset = 0;
};

// Kept small: an idle connection holds the struct and nothing else (empty vectors).
struct connection {
  int fd = -1;
  std::uint32_t slot = 0;  // index in the registry
  std::vector<char> partial;
  std::vector<chunk> out;  // written from out_head on
  std::size_t out_head = 0;
};

std::vector<connection*> registry;

void drop(int ep, connection* c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, nullptr);
  ::close(c->fd);
  registry[c->slot] = registry.back();
  registry[c->slot]->slot = c->slot;
  registry.pop_back();
  delete c;
}

// Writes as much as the socket takes; false when the connection failed.
bool flush(connection* c) {
  while (c->out_head < c->out.size()) {
    iovec iov[64];
    int n = 0;
    for (std::size_t i = c->out_head; i < c->out.size() && n < 64; ++i, ++n) {
      iov[n].iov_base = const_cast<char*>(c->out[i].bytes->data() + c->out[i].offset);
      iov[n].iov_len = c->out[i].bytes->size() - c->out[i].offset;
    }
    ssize_t w = ::writev(c->fd, iov, n);
    if (w < 0) return errno == EAGAIN;
    while (w > 0) {
      chunk& front = c->out[c->out_head];
      const std::size_t left = front.bytes->size() - front.offset;
      if (static_cast<std::size_t>(w) >= left) {
        w -= static_cast<ssize_t>(left);
        front.bytes.reset();
        ++c->out_head;
      } else {
        front.offset += static_cast<std::size_t>(w);
        w = 0;
      }
    }
  }
  c->out.clear();
  c->out_head = 0;
  return true;
}

void broadcast(std::size_t bytes, const connection* from, int ep) {
  auto frame = std::make_shared<std::vector<char>>(4 + bytes, '\0');
  const auto h = static_cast<std::uint32_t>(bytes);
  std::memcpy(frame->data(), &h, 4);
  const buffer shared = std::move(frame);
  std::vector<connection*> failed;
  for (connection* c : registry) {
    if (c == from) continue;
    c->out.push_back({shared, 0});
    if (!flush(c)) failed.push_back(c);
  }
  for (connection* c : failed) drop(ep, c);
}

// Parses complete frames out of `p`; echoes data frames (one buffer per read), runs commands.
void on_bytes(connection* c, const char* p, std::size_t n, int ep, bool& dropped) {
  std::vector<char> echo;
  std::size_t used = 0;
  while (n - used >= 4) {
    std::uint32_t h = 0;
    std::memcpy(&h, p + used, 4);
    const std::size_t len = h & 0x7fffffffu;
    if (n - used - 4 < len) break;
    if (h & 0x80000000u) {
      const std::string text(p + used + 4, len);
      if (text.rfind("broadcast ", 0) == 0) {
        broadcast(std::strtoull(text.c_str() + 10, nullptr, 10), c, ep);
      }
    } else {
      echo.insert(echo.end(), p + used, p + used + 4 + len);
    }
    used += 4 + len;
  }
  c->partial.assign(p + used, p + n);
  if (!echo.empty()) {
    c->out.push_back({std::make_shared<const std::vector<char>>(std::move(echo)), 0});
    if (!flush(c)) {
      drop(ep, c);
      dropped = true;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto port =
      static_cast<std::uint16_t>(argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 9105);
  std::signal(SIGINT, [](int) { stop_requested = 1; });
  std::signal(SIGTERM, [](int) { stop_requested = 1; });
  std::signal(SIGPIPE, SIG_IGN);

  const int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      listen(listener, 4096) != 0) {
    std::perror("raw_tcp_server: bind/listen");
    return 1;
  }
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  epoll_event lev{};
  lev.events = EPOLLIN;
  lev.data.ptr = nullptr;  // the listener
  epoll_ctl(ep, EPOLL_CTL_ADD, listener, &lev);
  std::printf("listening on %u\n", static_cast<unsigned>(port));
  std::fflush(stdout);

  std::vector<char> rbuf(1u << 16);
  epoll_event events[256];
  while (stop_requested == 0) {
    const int n = epoll_wait(ep, events, 256, 200);
    for (int i = 0; i < n; ++i) {
      auto* c = static_cast<connection*>(events[i].data.ptr);
      if (c == nullptr) {
        for (;;) {
          const int fd = accept4(listener, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (fd < 0) break;
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          const std::uint32_t hello = 0;  // empty data frame: "set up"
          if (::send(fd, &hello, 4, MSG_NOSIGNAL) != 4) {
            ::close(fd);
            continue;
          }
          auto* nc = new connection;
          nc->fd = fd;
          nc->slot = static_cast<std::uint32_t>(registry.size());
          registry.push_back(nc);
          epoll_event ev{};
          ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
          ev.data.ptr = nc;
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
        continue;
      }
      bool dropped = false;
      if (events[i].events & EPOLLOUT) {
        if (!flush(c)) {
          drop(ep, c);
          continue;
        }
      }
      if (events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) {
        for (;;) {
          const ssize_t r = ::read(c->fd, rbuf.data(), rbuf.size());
          if (r == 0 || (r < 0 && errno != EAGAIN)) {
            drop(ep, c);
            dropped = true;
            break;
          }
          if (r < 0) break;
          if (c->partial.empty()) {
            on_bytes(c, rbuf.data(), static_cast<std::size_t>(r), ep, dropped);
          } else {
            std::vector<char> joined = std::move(c->partial);
            joined.insert(joined.end(), rbuf.data(), rbuf.data() + r);
            on_bytes(c, joined.data(), joined.size(), ep, dropped);
          }
          if (dropped) break;
        }
      }
    }
  }
  for (connection* c : std::vector<connection*>(registry)) drop(ep, c);
  ::close(listener);
  ::close(ep);
  return 0;
}
