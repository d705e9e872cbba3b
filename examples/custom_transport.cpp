// A third transport in a page: each line of an input stream is one device message
// ("device-id payload"), and what the engine sends back is printed. It satisfies
// devgate::transport, so a gateway drives it like the WebSocket or in-process transports.
//   printf 'fridge temp=4\nlamp on\n' | custom_transport      (no input: a built-in demo script)
#include <cstdio>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>

#include "devgate/devgate.hpp"

class line_transport {
 public:
  explicit line_transport(std::istream& in) : in_(in) {}

  void set_handlers(devgate::transport_handlers h) { handlers_ = std::move(h); }
  std::error_code start() { return {}; }
  void stop() {
    for (auto& [device, id] : sessions_) {
      if (handlers_.on_close) handlers_.on_close(id, devgate::close_code::going_away);
    }
  }
  std::error_code send(devgate::session_id s, devgate::payload_kind, devgate::shared_bytes b) {
    std::lock_guard lock(out_mutex_);  // send may be called from any worker thread
    std::printf("-> session %llu: %.*s\n", static_cast<unsigned long long>(s),
                static_cast<int>(b.size()), b.view().data());
    return {};
  }
  std::size_t broadcast(std::span<const devgate::session_id> many, devgate::payload_kind k,
                        devgate::shared_bytes b) {
    for (auto s : many) (void)send(s, k, b);
    return many.size();
  }
  void close(devgate::session_id, devgate::close_code, std::string_view) {}
  std::size_t buffered_bytes(devgate::session_id) const { return 0; }  // written at once

  /// Reads lines until end of input, delivering each as a message from its device.
  void run() {
    std::string line;
    while (std::getline(in_, line)) {
      std::istringstream fields(line);
      std::string device;
      std::string payload;
      fields >> device;
      std::getline(fields >> std::ws, payload);
      if (device.empty()) continue;
      auto [it, fresh] = sessions_.try_emplace(device, sessions_.size() + 1);
      if (fresh && handlers_.on_open) handlers_.on_open({it->second, device, false, {}});
      devgate::inbound_message m;
      m.session = it->second;
      m.device_id = devgate::shared_bytes::copy_of(device);  // a real transport shares one
      m.sequence = ++sequences_[device];
      m.payload = devgate::shared_bytes::copy_of(payload);
      m.received = devgate::clock::now();
      if (auto ec = deliver(m)) {
        std::printf("!! %s: %s\n", device.c_str(), ec.message().c_str());
      }
    }
  }

 private:
  // Each line is read on its own: a batch of one for an engine that takes batches.
  std::error_code deliver(devgate::inbound_message& m) {
    if (!handlers_.on_messages) return {};
    const devgate::batch_result r = handlers_.on_messages(std::span(&m, 1));
    return r.accepted == 1 ? std::error_code{} : r.error;
  }

  std::istream& in_;
  devgate::transport_handlers handlers_;
  std::map<std::string, devgate::session_id> sessions_;
  std::map<std::string, std::uint64_t> sequences_;
  std::mutex out_mutex_;
};
static_assert(devgate::transport<line_transport>);

int main(int argc, char**) {
  std::istringstream script("fridge temp=4\nlamp on\nfridge temp=5\nlamp off\nfridge door=open\n");
  line_transport transport(argc > 1 ? std::cin : script);  // any argument: read stdin
  devgate::gateway gateway(
      transport, devgate::callback_sink([](const devgate::message& m,
                                           devgate::dispatch_context& ctx) -> std::error_code {
        return ctx.reply(
            m, devgate::shared_bytes::copy_of("ack #" + std::to_string(m.sequence) + " " +
                                              std::string(m.device_id.view()) + " (worker " +
                                              std::to_string(ctx.worker_id) + ")"));
      }));
  if (auto ec = gateway.start()) return 1;
  transport.run();
  gateway.stop();
  const auto m = gateway.metrics();
  std::printf("dispatched %llu of %llu\n", static_cast<unsigned long long>(m.dispatched),
              static_cast<unsigned long long>(m.enqueued));
  return m.dispatched == m.enqueued ? 0 : 1;
}
