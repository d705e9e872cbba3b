// A demand policy without `record`, as a pipeline's Traits::demand_type: the build stops with the
// message demand.hpp documents (see CMakeLists.txt here).
#include "devgate/pipeline/pipeline.hpp"

#include <cstddef>  // std::size_t

namespace {

struct demand_without_record {
  explicit demand_without_record(const devgate::demand_options& /*unused*/) noexcept {}
  [[nodiscard]] std::size_t demand() const noexcept { return 8; }
  [[nodiscard]] std::size_t max_demand() const noexcept { return 8; }
#if defined(DEVGATE_COMPILE_FAIL_CONTROL)
  void record(const devgate::batch_feedback& /*unused*/) noexcept {}
#endif
};

struct traits : devgate::pipeline_traits {
  using demand_type = demand_without_record;
};

}  // namespace

void compile_fail_demand_policy() {
  devgate::pipeline<devgate::null_sink, traits> p(devgate::null_sink{});
}
