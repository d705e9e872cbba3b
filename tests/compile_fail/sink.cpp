// A sink whose `consume` returns nothing instead of a std::error_code, given to a pipeline: the
// build stops with the message sink.hpp documents (see CMakeLists.txt here).
#include "devgate/pipeline/pipeline.hpp"

#include <system_error>  // the control's result

namespace {

struct sink_without_result {
#if defined(DEVGATE_COMPILE_FAIL_CONTROL)
  std::error_code consume(const devgate::message& /*unused*/,
                          devgate::dispatch_context& /*unused*/) noexcept {
    return {};
  }
#else
  void consume(const devgate::message& /*unused*/, devgate::dispatch_context& /*unused*/) noexcept {
  }
#endif
};

}  // namespace

void compile_fail_sink() { devgate::pipeline<sink_without_result> p(sink_without_result{}); }
