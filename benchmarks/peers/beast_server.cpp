// beast_server: Boost.Beast (Debian libboost-dev, header-only) speaking the bench protocol of
// benchmarks/README.md, written the way Beast's own examples are (advanced_server /
// websocket-chat-multi): one io_context on one thread, websocket::stream<beast::tcp_stream>
// with the suggested server timeouts, a per-session write queue of shared buffers.
//
// Echoes every text and binary message; the text "broadcast <bytes>" sends one binary payload of
// that size to every other session (one shared buffer, queued per session).
//
//   beast_server [port]     prints "listening on <port>"; stops on SIGINT/SIGTERM

// Boost 1.74's asio/awaitable.hpp uses std::exchange without including <utility> (C++20).
#include <utility>  // std::exchange, std::pair

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>

#include <cstdio>         // std::printf
#include <cstdlib>        // std::strtoul
#include <memory>         // sessions, shared buffers
#include <string>         // messages
#include <unordered_set>  // the session set
#include <vector>         // write queues

namespace beast = boost::beast;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;

namespace {

class session;
std::unordered_set<session*> sessions;

class session : public std::enable_shared_from_this<session> {
 public:
  explicit session(tcp::socket&& socket) : ws_(std::move(socket)) {}
  ~session() { sessions.erase(this); }

  void run() {
    ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
    ws_.auto_fragment(false);  // one frame per message, as the other servers send
    ws_.read_message_max(64u << 20);
    ws_.async_accept(beast::bind_front_handler(&session::on_accept, shared_from_this()));
  }

  void send(std::shared_ptr<const std::string> message, bool text) {
    queue_.emplace_back(std::move(message), text);
    if (queue_.size() > 1) return;  // a write is already in progress
    write_front();
  }

 private:
  void on_accept(beast::error_code ec) {
    if (ec) return;
    sessions.insert(this);
    read();
  }

  void read() {
    ws_.async_read(buffer_, beast::bind_front_handler(&session::on_read, shared_from_this()));
  }

  void on_read(beast::error_code ec, std::size_t /*bytes*/) {
    if (ec) return;
    const bool text = ws_.got_text();
    auto message = std::make_shared<const std::string>(beast::buffers_to_string(buffer_.data()));
    buffer_.consume(buffer_.size());
    if (text && message->rfind("broadcast ", 0) == 0) {
      const auto bytes = std::strtoull(message->c_str() + 10, nullptr, 10);
      const auto payload = std::make_shared<const std::string>(bytes, '\0');
      for (session* s : sessions) {
        if (s != this) s->send(payload, false);
      }
    } else {
      send(std::move(message), text);
    }
    read();
  }

  void write_front() {
    ws_.text(queue_.front().second);
    ws_.async_write(net::buffer(*queue_.front().first),
                    beast::bind_front_handler(&session::on_write, shared_from_this()));
  }

  void on_write(beast::error_code ec, std::size_t /*bytes*/) {
    if (ec) return;
    queue_.erase(queue_.begin());
    if (!queue_.empty()) write_front();
  }

  websocket::stream<beast::tcp_stream> ws_;
  beast::flat_buffer buffer_;
  std::vector<std::pair<std::shared_ptr<const std::string>, bool>> queue_;
};

void accept(tcp::acceptor& acceptor) {
  acceptor.async_accept([&acceptor](beast::error_code ec, tcp::socket socket) {
    if (!ec) std::make_shared<session>(std::move(socket))->run();
    accept(acceptor);
  });
}

}  // namespace

int main(int argc, char** argv) {
  const auto port =
      static_cast<unsigned short>(argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 9102);
  net::io_context ioc(1);
  tcp::acceptor acceptor(ioc);
  const tcp::endpoint endpoint(net::ip::make_address("127.0.0.1"), port);
  acceptor.open(endpoint.protocol());
  acceptor.set_option(net::socket_base::reuse_address(true));
  acceptor.bind(endpoint);
  acceptor.listen(4096);
  accept(acceptor);
  net::signal_set signals(ioc, SIGINT, SIGTERM);
  signals.async_wait([&ioc](beast::error_code, int) { ioc.stop(); });
  std::printf("listening on %u\n", static_cast<unsigned>(port));
  std::fflush(stdout);
  ioc.run();
  return 0;
}
