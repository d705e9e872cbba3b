// A program outside devgate that uses its optional SQLite part (devgate::sqlite,
// devgate_sqlite_dep, devgate-sqlite.pc): a store in a temporary directory, written, reopened.
#include <devgate/store/sqlite_state_store.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

int main() {
  std::string dir = (std::filesystem::temp_directory_path() / "devgate-consumer-XXXXXX").string();
  if (mkdtemp(dir.data()) == nullptr) return 1;
  devgate::store::sqlite_options o;
  o.path = dir + "/devgate.db";
  std::uint64_t sent = 0;
  {
    devgate::store::sqlite_state_store s(o);
    if (s.begin_batch() || s.add_messages_sent("fridge", 3) || s.commit_batch()) return 1;
  }
  {
    devgate::store::sqlite_state_store s(o);
    sent = s.load("fridge").state.messages_sent;
  }
  std::filesystem::remove_all(dir);
  std::printf("devgate sqlite store: schema %d, messages_sent %llu\n",
              devgate::store::sqlite_state_store::schema_version,
              static_cast<unsigned long long>(sent));
  return sent == 3 ? 0 : 1;
}
