// A queue policy whose container lacks `pop_bulk`, as a pipeline's Traits::queue_type: the build
// stops with the message queue.hpp documents (see CMakeLists.txt here).
#include "devgate/pipeline/pipeline.hpp"

#include <cstddef>  // std::size_t
#include <deque>    // the container's storage
#include <utility>  // std::move

namespace {

struct queue_without_pop_bulk {
  template <class T>
  class queue {
   public:
    struct producer_token {
      explicit producer_token(queue& /*unused*/) noexcept {}
    };
    bool push(T&& item) {
      items_.push_back(std::move(item));
      return true;
    }
    bool push(producer_token& /*unused*/, T&& item) { return push(std::move(item)); }
#if defined(DEVGATE_COMPILE_FAIL_CONTROL)
    std::size_t pop_bulk(T* out, std::size_t max) {
      std::size_t n = 0;
      for (; n < max && !items_.empty(); ++n) {
        out[n] = std::move(items_.front());
        items_.pop_front();
      }
      return n;
    }
#endif

   private:
    std::deque<T> items_;
  };
};

struct traits : devgate::pipeline_traits {
  using queue_type = queue_without_pop_bulk;
};

}  // namespace

void compile_fail_queue_policy() {
  devgate::pipeline<devgate::null_sink, traits> p(devgate::null_sink{});
}
