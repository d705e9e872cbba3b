// websocketpp_server: websocketpp 0.8 (Debian libwebsocketpp-dev) on Boost.Asio, speaking the
// bench protocol of benchmarks/README.md, written as its echo_server / broadcast_server examples
// are: one thread, config::asio (no TLS), logging off.
//
// Echoes every text and binary message; the text "broadcast <bytes>" sends one binary payload of
// that size to every other connection with server::send(hdl, payload, opcode), which is the
// library's broadcast example (it builds one outgoing message per recipient).
//
//   websocketpp_server [port]     prints "listening on <port>"; stops on SIGINT/SIGTERM

#include <websocketpp/config/asio_no_tls.hpp>
#include <websocketpp/server.hpp>

#include <csignal>  // stop signals
#include <cstdio>   // std::printf
#include <cstdlib>  // std::strtoul
#include <memory>   // std::owner_less
#include <set>      // connections
#include <string>   // payloads

using server = websocketpp::server<websocketpp::config::asio>;

int main(int argc, char** argv) {
  const auto port =
      static_cast<std::uint16_t>(argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 9103);
  server s;
  std::set<websocketpp::connection_hdl, std::owner_less<websocketpp::connection_hdl>> connections;
  s.clear_access_channels(websocketpp::log::alevel::all);
  s.clear_error_channels(websocketpp::log::elevel::all);
  s.init_asio();
  s.set_reuse_addr(true);
  s.set_listen_backlog(4096);
  s.set_max_message_size(64u << 20);
  s.set_open_handler([&](websocketpp::connection_hdl h) { connections.insert(h); });
  s.set_close_handler([&](websocketpp::connection_hdl h) { connections.erase(h); });
  s.set_fail_handler([&](websocketpp::connection_hdl h) { connections.erase(h); });
  s.set_message_handler([&](websocketpp::connection_hdl h, server::message_ptr msg) {
    const std::string& payload = msg->get_payload();
    if (msg->get_opcode() == websocketpp::frame::opcode::text &&
        payload.rfind("broadcast ", 0) == 0) {
      const std::string data(std::strtoull(payload.c_str() + 10, nullptr, 10), '\0');
      for (const auto& c : connections) {
        if (c.owner_before(h) || h.owner_before(c)) {
          websocketpp::lib::error_code ec;
          s.send(c, data, websocketpp::frame::opcode::binary, ec);
        }
      }
      return;
    }
    websocketpp::lib::error_code ec;
    s.send(h, payload, msg->get_opcode(), ec);
  });
  s.listen(websocketpp::lib::asio::ip::tcp::endpoint(
      websocketpp::lib::asio::ip::address::from_string("127.0.0.1"), port));
  s.start_accept();
  boost::asio::signal_set signals(s.get_io_service(), SIGINT, SIGTERM);
  signals.async_wait([&s](const boost::system::error_code&, int) { s.stop(); });
  std::printf("listening on %u\n", static_cast<unsigned>(port));
  std::fflush(stdout);
  s.run();
  return 0;
}
