// A state store without `set_transfer`, given to a device hub: the build stops with the message
// store/state_store.hpp documents (see CMakeLists.txt here).
#include "devgate/device/hub.hpp"

#include <cstdint>       // counters
#include <string>        // device ids
#include <system_error>  // results

#include "devgate/transport/in_process.hpp"

namespace {

namespace store = devgate::store;

struct store_without_set_transfer {
  [[nodiscard]] store::load_result load(const std::string& /*unused*/) const { return {}; }
  std::error_code add_messages_sent(const std::string& /*unused*/, std::uint64_t /*unused*/) {
    return {};
  }
  std::error_code touch(const std::string& /*unused*/, std::int64_t /*unused*/) { return {}; }
  std::error_code set_firmware_version(const std::string& /*unused*/,
                                       const std::string& /*unused*/) {
    return {};
  }
  std::error_code set_last_seq(const std::string& /*unused*/, std::uint64_t /*unused*/) {
    return {};
  }
  std::error_code forget(const std::string& /*unused*/) { return {}; }
#if defined(DEVGATE_COMPILE_FAIL_CONTROL)
  std::error_code set_transfer(const std::string& /*unused*/,
                               const store::transfer_state& /*unused*/) {
    return {};
  }
#endif
};

}  // namespace

void compile_fail_state_store() {
  devgate::in_process_transport t;
  devgate::device::hub<devgate::in_process_transport, devgate::null_sink,
                       store_without_set_transfer>
      h(t);
}
