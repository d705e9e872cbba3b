// openssl_accept_server: the TLS handshake ceiling of the TLS pass (benchmarks/README.md). A
// plain OpenSSL accept loop: one thread, epoll, edge-triggered, non-blocking sockets, each
// accepted connection driven through SSL_accept on its descriptor (SSL_set_fd); once the
// handshake completes it echoes whatever it reads and closes at the client's end of stream.
// Nothing else: no HTTP, no WebSocket, no timers, so handshakes per CPU-second measure OpenSSL
// with this certificate and little more.
//
// Its context differs from OpenSSL's defaults only where devgate's differs in what a handshake
// costs: TLS 1.2 minimum and one session ticket per handshake (devgate sends one).
//
//   devgate_peer_openssl_accept <port> <cert.pem> <key.pem>
//                                  prints "listening on <port>"; stops on SIGINT/SIGTERM

#include <arpa/inet.h>    // htonl
#include <netinet/in.h>   // sockaddr_in
#include <netinet/tcp.h>  // TCP_NODELAY
#include <openssl/err.h>  // ERR_clear_error
#include <openssl/ssl.h>  // the TLS server
#include <sys/epoll.h>    // the event loop
#include <sys/socket.h>   // sockets
#include <unistd.h>       // close

#include <csignal>  // SIGTERM
#include <cstdint>  // std::uint16_t
#include <cstdio>   // std::printf
#include <cstdlib>  // std::strtoul
#include <vector>   // connections by descriptor

namespace {

volatile std::sig_atomic_t stop = 0;

struct connection {
  SSL* ssl = nullptr;
  bool established = false;  // the handshake has completed
};

void close_conn(std::vector<connection>& conns, int fd) {
  SSL_free(conns[static_cast<std::size_t>(fd)].ssl);
  conns[static_cast<std::size_t>(fd)] = connection{};
  ::close(fd);
}

// Drives one connection as far as its socket allows; false when it is to be closed.
bool drive(connection& c) {
  ERR_clear_error();
  if (!c.established) {
    const int r = SSL_accept(c.ssl);
    if (r != 1) {
      const int e = SSL_get_error(c.ssl, r);
      return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
    }
    c.established = true;
  }
  char buf[16384];
  for (;;) {
    const int n = SSL_read(c.ssl, buf, sizeof buf);
    if (n <= 0) {
      const int e = SSL_get_error(c.ssl, n);
      return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;
    }
    if (SSL_write(c.ssl, buf, n) <= 0) return false;  // an echo that does not fit: drop it
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <port> <cert.pem> <key.pem>\n", argv[0]);
    return 2;
  }
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_num_tickets(ctx, 1);
  if (SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(ctx) != 1) {
    std::fprintf(stderr, "openssl_accept_server: cannot load %s / %s\n", argv[2], argv[3]);
    return 1;
  }
  std::signal(SIGPIPE, SIG_IGN);
  std::signal(SIGTERM, [](int) { stop = 1; });
  std::signal(SIGINT, [](int) { stop = 1; });

  const int lfd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(std::strtoul(argv[1], nullptr, 10)));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(lfd, 4096) != 0) {
    std::perror("openssl_accept_server: bind/listen");
    return 1;
  }
  socklen_t len = sizeof addr;
  ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  epoll_event lev{};
  lev.events = EPOLLIN;
  lev.data.fd = lfd;
  ::epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
  std::printf("listening on %u\n", static_cast<unsigned>(ntohs(addr.sin_port)));
  std::fflush(stdout);

  std::vector<connection> conns(1024);
  epoll_event events[256];
  while (stop == 0) {
    const int n = epoll_wait(ep, events, 256, 200);
    for (int i = 0; i < n; ++i) {
      const int fd = events[i].data.fd;
      if (fd == lfd) {
        for (;;) {
          const int c = ::accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (c < 0) break;
          ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          if (static_cast<std::size_t>(c) >= conns.size())
            conns.resize(2 * static_cast<std::size_t>(c));
          connection& conn = conns[static_cast<std::size_t>(c)];
          conn.ssl = SSL_new(ctx);
          SSL_set_fd(conn.ssl, c);
          SSL_set_accept_state(conn.ssl);
          epoll_event ev{};
          ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
          ev.data.fd = c;
          ::epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
          if (!drive(conn)) close_conn(conns, c);
        }
        continue;
      }
      if (!drive(conns[static_cast<std::size_t>(fd)])) close_conn(conns, fd);
    }
  }
  SSL_CTX_free(ctx);
  return 0;
}
