// echo_server: the WebSocket transport alone, echoing every text and binary message back on any
// path. The conformance target for devgate's tests and for anyone checking the implementation
// with their own client.
//
//   echo_server [--port N] [--address A] [--threads N] [--max-message BYTES]
//               [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]
//
// With --tls-cert/--tls-key it serves wss (TLS 1.2+, the PEM chain and key given; with
// --tls-client-ca, clients must present a certificate signed by one of those CAs) and reloads
// the certificate files on SIGHUP.
// Prints "listening on <port>" once ready (useful with --port 0), stops on SIGINT/SIGTERM.

#include <csignal>     // SIGHUP
#include <cstdio>      // std::printf
#include <cstdlib>     // std::strtoull
#include <cstring>     // std::strcmp
#include <functional>  // the SIGHUP loop
#include <optional>    // the SIGHUP set, with TLS only
#include <span>        // read batches
#include <string>      // arguments
#include <thread>      // the SIGHUP thread

#include "devgate/core/stop_signals.hpp"
#include "devgate/websocket/server.hpp"

int main(int argc, char** argv) {
  devgate::websocket::server_options options;
  options.port = 9001;
  // What its conformance use needs and no more: the peers' largest message is 16 MiB, and its
  // echo (with the next one queued behind it) fits the outbound limit; fragments as the
  // default allows (1024 a message).
  options.reader.max_message_size = 16u << 20;
  options.backpressure.max_buffered_bytes = 32u << 20;
  devgate::websocket::tls_options tls;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--port") == 0 && has_value) {
      options.port = static_cast<std::uint16_t>(std::strtoul(argv[++i], nullptr, 10));
    } else if (std::strcmp(argv[i], "--address") == 0 && has_value) {
      options.address = argv[++i];
    } else if (std::strcmp(argv[i], "--threads") == 0 && has_value) {
      options.threads = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 10));
    } else if (std::strcmp(argv[i], "--max-message") == 0 && has_value) {
      options.reader.max_message_size = std::strtoull(argv[++i], nullptr, 10);
    } else if (std::strcmp(argv[i], "--tls-cert") == 0 && has_value) {
      tls.certificate_chain_file = argv[++i];
    } else if (std::strcmp(argv[i], "--tls-key") == 0 && has_value) {
      tls.private_key_file = argv[++i];
    } else if (std::strcmp(argv[i], "--tls-client-ca") == 0 && has_value) {
      tls.client_ca_file = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--port N (default 9001, 0 = any)] [--address A] [--threads N] "
                   "[--max-message BYTES] [--tls-cert FILE --tls-key FILE [--tls-client-ca "
                   "FILE]]\n",
                   argv[0]);
      return 2;
    }
  }
  if (tls.certificate_chain_file.empty() != tls.private_key_file.empty()) {
    std::fprintf(stderr, "echo_server: --tls-cert and --tls-key go together\n");
    return 2;
  }
  if (!tls.certificate_chain_file.empty()) options.tls = tls;

  devgate::stop_signals stop;  // caught from here on; main() waits for them below

  devgate::websocket::server server(options);
  devgate::transport_handlers handlers;
  // Every message of a read batch is echoed; a reply that cannot be queued is not a refusal of
  // the message (the server applies its back-pressure policy to the session).
  handlers.on_messages = [&server](std::span<devgate::inbound_message> batch) {
    for (auto& m : batch) (void)server.send(m.session, m.kind, std::move(m.payload));
    return devgate::batch_result{batch.size(), {}};
  };
  server.set_handlers(std::move(handlers));
  if (const std::error_code ec = server.start()) {
    std::fprintf(stderr, "echo_server: cannot listen on %s:%u: %s\n", options.address.c_str(),
                 static_cast<unsigned>(options.port), ec.message().c_str());
    return 1;
  }
  std::printf("listening on %u%s\n", static_cast<unsigned>(server.local_port()),
              options.tls ? " (wss)" : "");
  std::fflush(stdout);

  // SIGHUP reloads the certificate files (after a renewal), on a thread of its own.
  asio::io_context hup_context{1};
  std::optional<asio::signal_set> hup;
  std::function<void()> wait_hup = [&] {
    hup->async_wait([&](const std::error_code& ec, int) {
      if (ec) return;
      const std::error_code reloaded = server.reload_tls();
      std::fprintf(stderr, "echo_server: SIGHUP: %s\n",
                   reloaded ? reloaded.message().c_str() : "TLS certificate reloaded");
      wait_hup();
    });
  };
  std::thread hup_thread;
  if (options.tls) {
    hup.emplace(hup_context, SIGHUP);
    wait_hup();
    hup_thread = std::thread([&] { hup_context.run(); });
  }
  stop.wait();
  hup_context.stop();
  if (hup_thread.joinable()) hup_thread.join();
  server.stop();
  return 0;
}
