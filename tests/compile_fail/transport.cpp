// A transport without `buffered_bytes`, given to a gateway: the build stops with the message
// transport.hpp documents (see CMakeLists.txt here).
#include "devgate/pipeline/gateway.hpp"

#include <cstddef>       // std::size_t
#include <span>          // broadcast recipients
#include <string_view>   // close reasons
#include <system_error>  // results
#include <utility>       // std::move

namespace {

struct transport_without_buffered_bytes {
  void set_handlers(devgate::transport_handlers h) { handlers_ = std::move(h); }
  std::error_code start() { return {}; }
  void stop() {}
  std::error_code send(devgate::session_id /*unused*/, devgate::payload_kind /*unused*/,
                       devgate::shared_bytes /*unused*/) {
    return devgate::errc::unknown_session;
  }
  std::size_t broadcast(std::span<const devgate::session_id> /*unused*/,
                        devgate::payload_kind /*unused*/, devgate::shared_bytes /*unused*/) {
    return 0;
  }
  void close(devgate::session_id /*unused*/, devgate::close_code /*unused*/,
             std::string_view /*unused*/) {}
#if defined(DEVGATE_COMPILE_FAIL_CONTROL)
  [[nodiscard]] std::size_t buffered_bytes(devgate::session_id /*unused*/) const { return 0; }
#endif

 private:
  devgate::transport_handlers handlers_;
};

}  // namespace

void compile_fail_transport() {
  transport_without_buffered_bytes t;
  devgate::gateway<transport_without_buffered_bytes, devgate::null_sink> g(t, devgate::null_sink{});
}
