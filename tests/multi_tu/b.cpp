// Second translation unit: linking it with a.cpp fails if any header defines a non-inline
// function or variable (multiple definition).
#include "devgate/devgate.hpp"
#ifdef DEVGATE_MULTI_TU_SQLITE
#include "devgate/store/sqlite_state_store.hpp"  // the optional SQLite part, when built
#endif
#ifdef DEVGATE_MULTI_TU_REDIS
#include "devgate/redis/streams_sink.hpp"  // the optional Redis part, when built
#include "devgate/redis/topic_bridge.hpp"
#include "devgate/redis/url.hpp"
#endif

int devgate_multi_tu_a();

int main() {
  const auto bytes = devgate::shared_bytes::copy_of(std::string_view("b"));
  return devgate_multi_tu_a() + static_cast<int>(bytes.size()) == 2 ? 0 : 1;
}
