// A pool policy without `may_retire`, as a pipeline's Traits::pool_type: the build stops with the
// message worker_pool.hpp documents (see CMakeLists.txt here).
#include "devgate/pipeline/pipeline.hpp"

#include <chrono>   // the idle wait
#include <cstddef>  // std::size_t

namespace {

struct pool_without_may_retire {
  explicit pool_without_may_retire(const devgate::pool_options& /*unused*/) noexcept {}
  [[nodiscard]] std::size_t max_workers() const noexcept { return 2; }
  [[nodiscard]] std::size_t initial_workers() const noexcept { return 1; }
  bool add_worker(const devgate::pool_sample& s) noexcept { return s.alive < 2; }
  [[nodiscard]] devgate::clock::duration idle_wait() const noexcept {
    return std::chrono::milliseconds(100);
  }
#if defined(DEVGATE_COMPILE_FAIL_CONTROL)
  bool may_retire(std::size_t alive) noexcept { return alive > 1; }
#endif
};

struct traits : devgate::pipeline_traits {
  using pool_type = pool_without_may_retire;
};

}  // namespace

void compile_fail_pool_policy() {
  devgate::pipeline<devgate::null_sink, traits> p(devgate::null_sink{});
}
