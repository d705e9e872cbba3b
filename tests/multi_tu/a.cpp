// First of two translation units that include everything; see b.cpp.
#include "devgate/devgate.hpp"
#ifdef DEVGATE_MULTI_TU_SQLITE
#include "devgate/store/sqlite_state_store.hpp"  // the optional SQLite part, when built
#endif

int devgate_multi_tu_a() {
  const auto bytes = devgate::shared_bytes::copy_of(std::string_view("a"));
  return static_cast<int>(bytes.size());
}
