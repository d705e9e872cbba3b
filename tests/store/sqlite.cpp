// The SQLite state store: every field survives closing and reopening the database, group commit
// is one transaction, the device bound, schema versions, and files it must refuse.
#include "devgate/store/sqlite_state_store.hpp"

#include <pwd.h>       // the unprivileged user a root test drops to
#include <sqlite3.h>   // raw connections that tamper with a database
#include <sys/stat.h>  // chmod
#include <sys/wait.h>  // waitpid
#include <unistd.h>    // fork, _exit
#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "support.hpp"

namespace store = devgate::store;
namespace fs = std::filesystem;
using devgate::testing::numbered;

namespace {

/// A fresh directory under the system's temporary directory, removed with what it holds.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::string pattern = (fs::temp_directory_path() / "devgate-sqlite-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path = pattern;
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  [[nodiscard]] std::string db() const { return (path / "devgate.db").string(); }
};

store::sqlite_options options_for(const temp_dir& dir) {
  store::sqlite_options o;
  o.path = dir.db();
  return o;
}

/// Runs `sql` on the database with a connection of its own.
void raw_exec(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, nullptr);
  sqlite3_close(db);
  REQUIRE(rc == SQLITE_OK);
}

/// The `what()` of the exception the store's construction throws (empty if it does not throw).
std::string open_error(const store::sqlite_options& o) {
  try {
    store::sqlite_state_store s(o);
  } catch (const std::system_error& e) {
    REQUIRE(e.code().category() == store::sqlite_category());
    return e.what();
  }
  return {};
}

devgate::store::dispatch_record record(std::optional<std::uint64_t> id, std::uint64_t number,
                                       std::string_view payload) {
  devgate::store::dispatch_record r;
  r.id = id;
  r.number = number;
  r.payload = devgate::shared_bytes::copy_of(payload);
  return r;
}

}  // namespace

TEST_CASE("sqlite: an unknown device loads as a default state", "[store][sqlite]") {
  temp_dir dir;
  store::sqlite_state_store s(options_for(dir));
  const auto [st, ec] = s.load("fridge");
  REQUIRE_FALSE(ec);
  REQUIRE(st.messages_sent == 0);
  REQUIRE(st.replay.empty());
  REQUIRE(st.dispatched.empty());
  REQUIRE(s.size() == 0);
  REQUIRE(s.path() == dir.db());
  REQUIRE(fs::exists(dir.db()));
}

TEST_CASE("sqlite: every field survives closing and reopening the database", "[store][sqlite]") {
  temp_dir dir;
  store::transfer_state t;
  t.rollout = 7;
  t.version = "2.0.0";
  t.status = store::transfer_status::failed;
  t.offset = 123'456'789'012ull;
  t.reason = "sha256 mismatch";
  {
    store::sqlite_state_store s(options_for(dir));
    REQUIRE_FALSE(s.add_messages_sent("fridge", 3));
    REQUIRE_FALSE(s.add_messages_sent("fridge", 4));
    REQUIRE_FALSE(s.touch("fridge", 1'700'000'000'123));
    REQUIRE_FALSE(s.set_firmware_version("fridge", "1.2.0"));
    REQUIRE_FALSE(s.set_transfer("fridge", t));
    REQUIRE_FALSE(s.set_last_seq("fridge", 0xFFFF'FFFF'FFFF'FFF0ull));  // the top bit survives
    REQUIRE_FALSE(s.append_replay("fridge", 41, R"({"kind":"deliver","seq":41})"));
    REQUIRE_FALSE(s.append_replay("fridge", 42, R"({"kind":"deliver","seq":42})"));
    REQUIRE_FALSE(s.record_dispatched("fridge", record(9, 1, "a")));
    REQUIRE_FALSE(s.touch("kettle", 5));
  }
  store::sqlite_state_store s(options_for(dir));
  const auto [st, ec] = s.load("fridge");
  REQUIRE_FALSE(ec);
  REQUIRE(st.messages_sent == 8);  // 3 + 4 + one dispatched
  REQUIRE(st.last_seen_ms == 1'700'000'000'123);
  REQUIRE(st.firmware_version == "1.2.0");
  REQUIRE(st.last_seq == 0xFFFF'FFFF'FFFF'FFF0ull);
  REQUIRE(st.transfer.rollout == 7);
  REQUIRE(st.transfer.version == "2.0.0");
  REQUIRE(st.transfer.status == store::transfer_status::failed);
  REQUIRE(st.transfer.offset == 123'456'789'012ull);
  REQUIRE(st.transfer.reason == "sha256 mismatch");
  REQUIRE(st.replay.size() == 2);
  REQUIRE(st.replay[0].seq == 41);
  REQUIRE(st.replay[1].frame == R"({"kind":"deliver","seq":42})");
  REQUIRE(st.dispatched.contains(9));
  REQUIRE_FALSE(st.dispatched.contains(8));
  REQUIRE(s.load("kettle").state.last_seen_ms == 5);
  REQUIRE(s.size() == 2);
}

TEST_CASE("sqlite: replay entries load in seq order and forget_replay drops seq and below",
          "[store][sqlite]") {
  temp_dir dir;
  store::sqlite_state_store s(options_for(dir));
  // Appended out of order (10 is larger than 9 as a number, not as text).
  for (const std::uint64_t seq : {3u, 10u, 1u, 9u, 2u}) {
    REQUIRE_FALSE(s.append_replay("fridge", seq, numbered("frame ", seq)));
  }
  REQUIRE_FALSE(s.append_replay("kettle", 1, "kettle's"));
  auto replay = s.load("fridge").state.replay;
  REQUIRE(replay.size() == 5);
  const std::vector<std::uint64_t> order{1, 2, 3, 9, 10};
  for (std::size_t i = 0; i < order.size(); ++i) {
    REQUIRE(replay[i].seq == order[i]);
    REQUIRE(replay[i].frame == numbered("frame ", order[i]));
  }
  REQUIRE_FALSE(s.forget_replay("fridge", 3));
  replay = s.load("fridge").state.replay;
  REQUIRE(replay.size() == 2);
  REQUIRE(replay[0].seq == 9);
  REQUIRE(replay[1].seq == 10);
  // Replay rows are the device's own: the other device keeps its entry.
  REQUIRE(s.load("kettle").state.replay.size() == 1);
  // Appending a seq already kept replaces its frame (a write applied twice is harmless).
  REQUIRE_FALSE(s.append_replay("fridge", 10, "again"));
  REQUIRE(s.load("fridge").state.replay.back().frame == "again");
}

TEST_CASE("sqlite: record_dispatched counts each message and keeps the window, in a batch too",
          "[store][sqlite]") {
  temp_dir dir;
  store::dispatch_window expected;
  {
    store::sqlite_state_store s(options_for(dir));
    REQUIRE_FALSE(s.add_messages_sent("fridge", 2));
    REQUIRE_FALSE(s.record_dispatched("fridge", record(5, 1, "x")));  // outside a batch
    expected.insert(5);
    REQUIRE_FALSE(s.begin_batch());
    for (std::uint64_t id = 6; id < 2000; id += 3) {  // slides past the window's span
      REQUIRE_FALSE(s.record_dispatched("fridge", record(id, id, "x")));
      expected.insert(id);
    }
    REQUIRE_FALSE(s.record_dispatched("fridge", record(std::nullopt, 9999, "no id")));
    REQUIRE_FALSE(s.record_dispatched("kettle", record(1, 1, "y")));
    // Inside the batch, load sees the batch's writes.
    REQUIRE(s.load("fridge").state.dispatched == expected);
    REQUIRE(s.load("fridge").state.messages_sent == 2 + 1 + 665 + 1);
    // Written after that load: the row is updated again at commit, counting only these.
    for (std::uint64_t id : {2001u, 2004u}) {
      REQUIRE_FALSE(s.record_dispatched("fridge", record(id, id, "x")));
      expected.insert(id);
    }
    REQUIRE_FALSE(s.commit_batch());
    REQUIRE_FALSE(s.record_dispatched("fridge", record(1990, 2, "x")));  // after the batch
    expected.insert(1990);
  }
  store::sqlite_state_store s(options_for(dir));
  const auto st = s.load("fridge").state;
  // 2 added + 1 before + 665 in the batch + 1 without id + 2 after the load + 1 after.
  REQUIRE(st.messages_sent == 2 + 1 + 665 + 1 + 2 + 1);
  REQUIRE(st.dispatched == expected);
  REQUIRE(st.dispatched.contains(1998));
  REQUIRE_FALSE(st.dispatched.contains(5));  // slid out
  REQUIRE(s.load("kettle").state.dispatched.contains(1));
  REQUIRE(s.message_log_size() == 0);  // the log is off by default
}

TEST_CASE("sqlite: the message log keeps what reached the sink, in order, and survives forget",
          "[store][sqlite]") {
  temp_dir dir;
  auto o = options_for(dir);
  o.message_log = true;
  {
    store::sqlite_state_store s(o);
    REQUIRE_FALSE(s.begin_batch());
    for (std::uint64_t n = 1; n <= 50; ++n) {
      auto r = record(100 + n, n, numbered("payload ", n));
      if (n == 7) r.id.reset();
      if (n == 8) r.kind = devgate::payload_kind::binary;
      REQUIRE_FALSE(s.record_dispatched("fridge", r));
      if (n % 10 == 0) REQUIRE_FALSE(s.record_dispatched("kettle", record(n, n, "k")));
    }
    REQUIRE_FALSE(s.commit_batch());
  }
  store::sqlite_state_store s(o);
  REQUIRE(s.message_log_size() == 55);
  const auto log = s.message_log("fridge");
  REQUIRE(log.size() == 50);
  for (std::uint64_t n = 1; n <= 50; ++n) {
    const auto& m = log[n - 1];
    REQUIRE(m.number == n);
    REQUIRE(m.payload == numbered("payload ", n));
    if (n == 7) {
      REQUIRE_FALSE(m.id.has_value());
    } else {
      REQUIRE(m.id == 100 + n);
    }
    REQUIRE(m.kind == (n == 8 ? devgate::payload_kind::binary : devgate::payload_kind::text));
  }
  REQUIRE(s.message_log("kettle").size() == 5);
  REQUIRE(s.load("fridge").state.messages_sent == 50);
  REQUIRE_FALSE(s.forget("fridge"));
  REQUIRE(s.message_log("fridge").size() == 50);  // the sink's record stays
}

TEST_CASE("sqlite: a batch is one transaction: another connection sees it only once committed",
          "[store][sqlite]") {
  temp_dir dir;
  store::sqlite_state_store writer(options_for(dir));
  store::sqlite_state_store reader(options_for(dir));
  REQUIRE_FALSE(writer.touch("fridge", 1));  // outside a batch: committed at once
  REQUIRE(reader.load("fridge").state.last_seen_ms == 1);

  REQUIRE_FALSE(writer.begin_batch());
  REQUIRE(writer.begin_batch() == std::errc::operation_in_progress);  // no nesting
  REQUIRE_FALSE(writer.touch("fridge", 2));
  REQUIRE_FALSE(writer.add_messages_sent("kettle", 5));
  REQUIRE_FALSE(writer.append_replay("kettle", 1, "frame"));
  REQUIRE(writer.load("kettle").state.messages_sent == 5);  // its own writes, yes
  // The other connection still reads the last commit.
  REQUIRE(reader.load("fridge").state.last_seen_ms == 1);
  REQUIRE(reader.load("kettle").state.messages_sent == 0);
  REQUIRE(reader.load("kettle").state.replay.empty());
  REQUIRE(reader.size() == 1);
  REQUIRE_FALSE(writer.commit_batch());
  REQUIRE(reader.load("fridge").state.last_seen_ms == 2);
  REQUIRE(reader.load("kettle").state.messages_sent == 5);
  REQUIRE(reader.load("kettle").state.replay.size() == 1);
  REQUIRE_FALSE(writer.commit_batch());  // nothing open: nothing to do
}

TEST_CASE("sqlite: a write that cannot get the lock fails as a value with SQLite's code",
          "[store][sqlite]") {
  temp_dir dir;
  auto o = options_for(dir);
  o.busy_timeout = std::chrono::milliseconds(50);
  store::sqlite_state_store holder(o);
  store::sqlite_state_store other(o);
  REQUIRE_FALSE(holder.begin_batch());
  REQUIRE_FALSE(holder.touch("fridge", 1));
  const auto ec = other.touch("kettle", 2);
  REQUIRE(ec);
  REQUIRE(ec.category() == store::sqlite_category());
  REQUIRE((ec.value() & 0xff) == SQLITE_BUSY);
  REQUIRE(ec.message().find("locked") != std::string::npos);
  REQUIRE(other.begin_batch());  // BUSY too; the writes after it commit on their own
  REQUIRE_FALSE(holder.commit_batch());
  REQUIRE_FALSE(other.touch("kettle", 2));
  REQUIRE_FALSE(other.commit_batch());
  REQUIRE(holder.load("kettle").state.last_seen_ms == 2);
}

TEST_CASE("sqlite: a write that fails in a batch returns its error; the rest of the batch commits",
          "[store][sqlite]") {
  temp_dir dir;
  auto o = options_for(dir);
  o.message_log = true;
  { store::sqlite_state_store s(o); }
  // Triggers that refuse one device's rows, as a failing disk or constraint would.
  raw_exec(dir.db(),
           "CREATE TRIGGER refuse_replay BEFORE INSERT ON replay WHEN NEW.device = 'poison' "
           "BEGIN SELECT RAISE(ABORT, 'refused'); END;"
           "CREATE TRIGGER refuse_log BEFORE INSERT ON messages WHEN NEW.device = 'poison' "
           "BEGIN SELECT RAISE(ABORT, 'refused'); END;");
  store::sqlite_state_store s(o);
  store::sqlite_state_store reader(o);
  REQUIRE_FALSE(s.begin_batch());
  REQUIRE_FALSE(s.touch("before", 1));
  const auto ec = s.append_replay("poison", 1, "frame");
  REQUIRE(ec);
  REQUIRE(ec.category() == store::sqlite_category());
  REQUIRE((ec.value() & 0xff) == SQLITE_CONSTRAINT);
  // record_dispatched is all or nothing: the log row is refused, so the count is not kept.
  REQUIRE(s.record_dispatched("poison", record(1, 1, "m")));
  REQUIRE_FALSE(s.touch("after", 2));
  REQUIRE(reader.size() == 0);  // still one open transaction
  REQUIRE_FALSE(s.commit_batch());
  REQUIRE(reader.load("before").state.last_seen_ms == 1);
  REQUIRE(reader.load("after").state.last_seen_ms == 2);
  const auto poison = reader.load("poison").state;
  REQUIRE(poison.messages_sent == 0);
  REQUIRE(poison.dispatched.empty());
  REQUIRE(poison.replay.empty());
  REQUIRE(reader.size() == 2);
  REQUIRE(reader.message_log_size() == 0);
}

TEST_CASE("sqlite: the rollout and its image survive a reopen; a new one replaces it",
          "[store][sqlite]") {
  temp_dir dir;
  store::rollout_record r;
  r.rollout = 3;
  r.version = "1.4.0";
  r.image.resize((1u << 20) + 17);
  for (std::size_t i = 0; i < r.image.size(); ++i) {
    r.image[i] = static_cast<std::byte>((i * 131u) ^ (i >> 9));
  }
  {
    store::sqlite_state_store s(options_for(dir));
    const auto none = s.load_rollout();
    REQUIRE_FALSE(none.error);
    REQUIRE_FALSE(none.rollout.has_value());
    REQUIRE_FALSE(s.save_rollout(r));
  }
  {
    store::sqlite_state_store s(options_for(dir));
    const auto got = s.load_rollout();
    REQUIRE_FALSE(got.error);
    REQUIRE(got.rollout.has_value());
    REQUIRE(got.rollout->rollout == 3);
    REQUIRE(got.rollout->version == "1.4.0");
    REQUIRE(got.rollout->image == r.image);
    store::rollout_record next;
    next.rollout = 4;
    next.version = "1.5.0";
    next.image.assign(100, std::byte{0x5a});
    REQUIRE_FALSE(s.save_rollout(next));
  }
  store::sqlite_state_store s(options_for(dir));
  const auto got = s.load_rollout();
  REQUIRE(got.rollout->rollout == 4);
  REQUIRE(got.rollout->image.size() == 100);
}

TEST_CASE("sqlite: past max_devices the least recently seen devices go, with their replay rows",
          "[store][sqlite]") {
  temp_dir dir;
  auto o = options_for(dir);
  o.max_devices = 10;
  store::sqlite_state_store s(o);
  // Outside a batch: each write commits and the bound follows it.
  for (int i = 0; i < 10; ++i) {
    REQUIRE_FALSE(s.touch(numbered("d", static_cast<std::uint64_t>(i)), 1000 + i));
    REQUIRE_FALSE(s.append_replay(numbered("d", static_cast<std::uint64_t>(i)), 1, "f"));
  }
  REQUIRE(s.size() == 10);
  REQUIRE_FALSE(s.touch("d0", 5000));  // d0 seen again: d1 is now the oldest
  REQUIRE_FALSE(s.touch("d10", 2000));
  REQUIRE(s.size() == 10);
  REQUIRE(s.evicted() == 1);
  REQUIRE(s.load("d1").state.last_seen_ms == 0);
  REQUIRE(s.load("d1").state.replay.empty());  // its replay rows went with it
  REQUIRE(s.load("d0").state.replay.size() == 1);
  // In a batch, the bound applies once it commits.
  REQUIRE_FALSE(s.begin_batch());
  for (int i = 100; i < 105; ++i) {
    REQUIRE_FALSE(s.touch(numbered("d", static_cast<std::uint64_t>(i)), 3000 + i));
  }
  REQUIRE(s.size() == 15);
  REQUIRE_FALSE(s.commit_batch());
  REQUIRE(s.size() == 10);
  REQUIRE(s.evicted() == 6);
  for (int i = 2; i <= 6; ++i) {
    REQUIRE(s.load(numbered("d", static_cast<std::uint64_t>(i))).state.last_seen_ms == 0);
  }
  REQUIRE(s.load("d7").state.last_seen_ms == 1007);
  REQUIRE(s.load("d0").state.last_seen_ms == 5000);
  // Reopened with a tighter bound: the next commit brings the table down to it.
  o.max_devices = 5;
  store::sqlite_state_store tighter(o);
  REQUIRE(tighter.size() == 10);
  REQUIRE_FALSE(tighter.touch("d0", 6000));
  REQUIRE(tighter.size() == 5);
  REQUIRE(tighter.evicted() == 5);
  REQUIRE(tighter.load("d0").state.last_seen_ms == 6000);
  REQUIRE(tighter.load("d104").state.last_seen_ms == 3104);
}

TEST_CASE("sqlite: forget removes the device and its replay entries; others stay",
          "[store][sqlite]") {
  temp_dir dir;
  store::sqlite_state_store s(options_for(dir));
  REQUIRE_FALSE(s.begin_batch());
  REQUIRE_FALSE(s.record_dispatched("fridge", record(1, 1, "a")));
  REQUIRE_FALSE(s.append_replay("fridge", 1, "f"));
  REQUIRE_FALSE(s.touch("kettle", 9));
  REQUIRE_FALSE(s.forget("fridge"));  // in the batch, the window cached for it goes too
  REQUIRE_FALSE(s.record_dispatched("fridge", record(2, 2, "b")));
  REQUIRE_FALSE(s.commit_batch());
  auto st = s.load("fridge").state;
  REQUIRE(st.messages_sent == 1);
  REQUIRE(st.dispatched.contains(2));
  REQUIRE_FALSE(st.dispatched.contains(1));
  REQUIRE(st.replay.empty());
  REQUIRE_FALSE(s.forget("fridge"));
  REQUIRE(s.load("fridge").state.messages_sent == 0);
  REQUIRE(s.size() == 1);
  REQUIRE_FALSE(s.forget("never-seen"));
}

TEST_CASE("sqlite: a database of a newer schema version is refused, an older one migrated",
          "[store][sqlite]") {
  temp_dir dir;
  { store::sqlite_state_store s(options_for(dir)); }
  raw_exec(dir.db(), "PRAGMA user_version = 99");
  const auto what = open_error(options_for(dir));
  INFO(what);
  REQUIRE(what.find(dir.db()) != std::string::npos);
  REQUIRE(what.find("schema version 99") != std::string::npos);
  REQUIRE(what.find("newer devgate") != std::string::npos);
  // A database the current version wrote opens, and keeps its version.
  raw_exec(dir.db(), "PRAGMA user_version = 2");
  { store::sqlite_state_store s(options_for(dir)); }
  REQUIRE(store::sqlite_state_store::schema_version == 2);
}

TEST_CASE("sqlite: a version 1 database is migrated: its devices stay, campaigns can be kept",
          "[store][sqlite]") {
  temp_dir dir;
  raw_exec(dir.db(), store::detail::sqlite_migrations[0]);
  raw_exec(dir.db(),
           "INSERT INTO devices(id, messages_sent) VALUES('old', 7); PRAGMA user_version = 1");
  store::sqlite_state_store s(options_for(dir));
  CHECK(s.load("old").state.messages_sent == 7);
  store::campaign_record c;
  c.id = 1;
  c.rollout = 2;
  c.version = "2.0";
  c.state = "{}";
  c.image.assign(10, std::byte{1});
  REQUIRE_FALSE(s.save_campaign(c, {{"old", 0, "{}"}}));
  CHECK(s.load_campaigns().campaigns.size() == 1);
}

TEST_CASE(
    "sqlite: campaigns survive a reopen with their devices; changed rows replace theirs; "
    "an ended one drops its image; only the newest are kept",
    "[store][sqlite]") {
  temp_dir dir;
  auto o = options_for(dir);
  o.max_campaigns = 3;
  store::campaign_record c;
  c.id = 5;
  c.rollout = 9;
  c.version = "2.0";
  c.state = R"({"state":"running"})";
  c.image.resize(200'000);
  for (std::size_t i = 0; i < c.image.size(); ++i) c.image[i] = static_cast<std::byte>(i * 7);
  std::vector<store::campaign_device_record> devices;
  for (std::uint32_t i = 0; i < 100; ++i) {
    devices.push_back({std::string("d") + std::to_string(i), i, R"({"status":0})"});
  }
  {
    store::sqlite_state_store s(o);
    REQUIRE(s.load_campaigns().campaigns.empty());
    REQUIRE_FALSE(s.save_campaign(c, devices));
    // A later save: the state and two changed devices, no image (the kept one stays).
    auto later = c;
    later.image.clear();
    later.state = R"({"state":"paused"})";
    REQUIRE_FALSE(s.save_campaign(later, {{"d3", 3, R"({"status":3})"}, {"d99", 99, "{}"}}));
  }
  {
    store::sqlite_state_store s(o);
    const auto got = s.load_campaigns();
    REQUIRE_FALSE(got.error);
    REQUIRE(got.campaigns.size() == 1);
    const auto& k = got.campaigns[0];
    CHECK(k.campaign.id == 5);
    CHECK(k.campaign.rollout == 9);
    CHECK(k.campaign.version == "2.0");
    CHECK(k.campaign.state == R"({"state":"paused"})");
    CHECK(k.campaign.image == c.image);
    CHECK_FALSE(k.campaign.ended);
    REQUIRE(k.devices.size() == 100);
    for (std::uint32_t i = 0; i < 100; ++i) {
      CHECK(k.devices[i].position == i);
      CHECK(k.devices[i].device == std::string("d") + std::to_string(i));
    }
    CHECK(k.devices[3].state == R"({"status":3})");
    CHECK(k.devices[99].state == "{}");
    CHECK(k.devices[4].state == R"({"status":0})");
    // It ends: the image goes, the campaign and its devices stay.
    auto ended = c;
    ended.image.clear();
    ended.ended = true;
    ended.state = R"({"state":"completed"})";
    REQUIRE_FALSE(s.save_campaign(ended, {}));
    const auto after = s.load_campaigns();
    REQUIRE(after.campaigns.size() == 1);
    CHECK(after.campaigns[0].campaign.ended);
    CHECK(after.campaigns[0].campaign.image.empty());
    CHECK(after.campaigns[0].devices.size() == 100);
    // Three newer campaigns: the oldest goes with its devices.
    for (std::uint64_t id = 6; id <= 8; ++id) {
      auto n = c;
      n.id = id;
      REQUIRE_FALSE(s.save_campaign(n, {{"x", 0, "{}"}}));
    }
    const auto kept = s.load_campaigns();
    REQUIRE(kept.campaigns.size() == 3);
    CHECK(kept.campaigns[0].campaign.id == 6);
    CHECK(kept.campaigns[2].campaign.id == 8);
  }
  // No device row of the dropped campaign is left behind.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(dir.db().c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "SELECT count(*) FROM campaign_devices WHERE campaign = 5", -1,
                             &st, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(st) == SQLITE_ROW);
  CHECK(sqlite3_column_int(st, 0) == 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
}

TEST_CASE("sqlite: a file that is not a database is refused with SQLite's reason",
          "[store][sqlite]") {
  temp_dir dir;
  {
    std::ofstream out(dir.db(), std::ios::binary);
    for (int i = 0; i < 4096; ++i) out.put(static_cast<char>((i * 7919) & 0xff));
  }
  const auto what = open_error(options_for(dir));
  INFO(what);
  REQUIRE(what.find(dir.db()) != std::string::npos);
  REQUIRE(what.find("not a database") != std::string::npos);
}

TEST_CASE("sqlite: a directory that cannot be written is refused", "[store][sqlite]") {
  temp_dir dir;
  const auto locked = dir.path / "read-only";
  fs::create_directory(locked);
  store::sqlite_options o;
  o.path = (locked / "devgate.db").string();
  // Root writes anywhere: run as root, the attempt is made by a child that drops to `nobody`.
  REQUIRE(chmod(dir.path.c_str(), 0755) == 0);
  REQUIRE(chmod(locked.c_str(), 0555) == 0);
  if (geteuid() != 0) {
    const auto what = open_error(o);
    INFO(what);
    REQUIRE(what.find(o.path) != std::string::npos);
    return;
  }
  const passwd* nobody = getpwnam("nobody");
  REQUIRE(nobody != nullptr);
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    if (setgid(nobody->pw_gid) != 0 || setuid(nobody->pw_uid) != 0) _exit(3);
    try {
      store::sqlite_state_store s(o);
    } catch (const std::system_error& e) {
      const std::string what = e.what();
      _exit(what.find(o.path) != std::string::npos &&
                    what.find("unable to open") != std::string::npos
                ? 0
                : 2);
    }
    _exit(1);  // it opened: wrong
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);  // 1: opened, 2: unclear message, 3: could not drop root
  REQUIRE_FALSE(fs::exists(o.path));
}

TEST_CASE("sqlite: a batch committed with synchronous FULL survives a process that never closes",
          "[store][sqlite]") {
  temp_dir dir;
  auto o = options_for(dir);
  o.durability = store::sqlite_synchronous::full;
  o.message_log = true;
  const pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // No destructor runs: the connection is never closed, the WAL never checkpointed.
    auto* s = new store::sqlite_state_store(o);
    bool ok = !s->begin_batch();
    for (std::uint64_t n = 1; n <= 200 && ok; ++n) {
      ok = !s->record_dispatched(numbered("d", n % 7), record(n, n, numbered("m", n))) &&
           !s->append_replay(numbered("d", n % 7), n, numbered("frame ", n));
    }
    ok = ok && !s->commit_batch();
    ok = ok && !s->begin_batch() && !s->touch("uncommitted", 1);  // left open: must vanish
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  store::sqlite_state_store s(o);
  REQUIRE(s.message_log_size() == 200);
  std::uint64_t sent = 0;
  std::size_t replayed = 0;
  for (std::uint64_t d = 0; d < 7; ++d) {
    const auto st = s.load(numbered("d", d)).state;
    sent += st.messages_sent;
    replayed += st.replay.size();
    for (const auto& e : st.replay) REQUIRE(e.seq % 7 == d);
  }
  REQUIRE(sent == 200);
  REQUIRE(replayed == 200);
  REQUIRE(s.load("uncommitted").state.last_seen_ms == 0);
  REQUIRE(s.size() == 7);
}
