#pragma once

#include <sqlite3.h>

#include <cstddef>       // blob sizes
#include <cstdint>       // integer columns
#include <span>          // blobs
#include <string>        // error messages
#include <string_view>   // text columns, SQL
#include <system_error>  // set-up failures throw std::system_error

#include "devgate/store/sqlite_error.hpp"

namespace devgate::store::detail {

/// An open SQLite connection, closed on destruction.
class sqlite_connection {
 public:
  /// Opens (or creates) the database file at `path`. Throws `std::system_error` naming the
  /// path and SQLite's message when it cannot.
  explicit sqlite_connection(const std::string& path) {
    const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    const int rc = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
    if (rc != SQLITE_OK) {
      const std::string why = db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
      sqlite3_close_v2(db_);
      db_ = nullptr;
      throw std::system_error(make_sqlite_error(rc),
                              "sqlite_state_store: cannot open " + path + " (" + why + ")");
    }
    sqlite3_extended_result_codes(db_, 1);
  }
  sqlite_connection(const sqlite_connection&) = delete;
  sqlite_connection& operator=(const sqlite_connection&) = delete;
  ~sqlite_connection() { sqlite3_close_v2(db_); }

  /// The handle.
  [[nodiscard]] sqlite3* get() const noexcept { return db_; }
  /// Runs `sql` (one or more statements, no results kept); SQLite's result code.
  int exec(const char* sql) noexcept { return sqlite3_exec(db_, sql, nullptr, nullptr, nullptr); }
  /// SQLite's message for the connection's last error.
  [[nodiscard]] std::string last_message() const { return sqlite3_errmsg(db_); }

 private:
  sqlite3* db_ = nullptr;
};

/// A statement prepared once and reused for every call (`sqlite_use` binds, steps and resets
/// it).
class sqlite_statement {
 public:
  /// Prepares `sql` on `db`. Throws `std::system_error` with SQLite's message when it cannot
  /// (a set-up error: the schema does not match).
  sqlite_statement(sqlite3* db, std::string_view sql) {
    const int rc = sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()),
                                      SQLITE_PREPARE_PERSISTENT, &stmt_, nullptr);
    if (rc != SQLITE_OK) {
      throw std::system_error(make_sqlite_error(rc), "cannot prepare \"" + std::string(sql) +
                                                         "\" (" + sqlite3_errmsg(db) + ")");
    }
  }
  sqlite_statement(const sqlite_statement&) = delete;
  sqlite_statement& operator=(const sqlite_statement&) = delete;
  ~sqlite_statement() { sqlite3_finalize(stmt_); }

  /// The handle.
  [[nodiscard]] sqlite3_stmt* get() const noexcept { return stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;
};

/// One use of a prepared statement: binds parameters (1-based), steps, reads columns
/// (0-based), and on destruction resets it and clears its bindings, so text bound without a
/// copy (`SQLITE_STATIC`) never outlives the call that bound it. The first binding error is
/// kept and returned by `step()`.
class sqlite_use {
 public:
  /// Uses `s` until destruction.
  explicit sqlite_use(sqlite_statement& s) noexcept : stmt_(s.get()) {}
  sqlite_use(const sqlite_use&) = delete;
  sqlite_use& operator=(const sqlite_use&) = delete;
  ~sqlite_use() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  /// Binds an integer (unsigned values keep their bits).
  sqlite_use& bind(int i, std::int64_t v) noexcept { return keep(sqlite3_bind_int64(stmt_, i, v)); }
  /// Binds text, not copied: it must outlive this use.
  sqlite_use& bind_text(int i, std::string_view v) noexcept {
    return keep(sqlite3_bind_text64(stmt_, i, v.data(), v.size(), SQLITE_STATIC, SQLITE_UTF8));
  }
  /// Binds a blob, not copied: it must outlive this use.
  sqlite_use& bind_blob(int i, const void* data, std::size_t size) noexcept {
    // A zero-length blob still binds as a blob, not NULL.
    return keep(size == 0 ? sqlite3_bind_zeroblob(stmt_, i, 0)
                          : sqlite3_bind_blob64(stmt_, i, data, size, SQLITE_STATIC));
  }
  /// Binds NULL.
  sqlite_use& bind_null(int i) noexcept { return keep(sqlite3_bind_null(stmt_, i)); }

  /// Runs the statement to its next row: `SQLITE_ROW`, `SQLITE_DONE` or an error code (the
  /// first binding error, if any).
  int step() noexcept { return bind_error_ != SQLITE_OK ? bind_error_ : sqlite3_step(stmt_); }

  /// Integer column `i` of the current row.
  [[nodiscard]] std::int64_t integer(int i) const noexcept {
    return sqlite3_column_int64(stmt_, i);
  }
  /// True when column `i` of the current row is NULL.
  [[nodiscard]] bool is_null(int i) const noexcept {
    return sqlite3_column_type(stmt_, i) == SQLITE_NULL;
  }
  /// Text column `i` of the current row (valid until the next step or the end of this use).
  [[nodiscard]] std::string_view text(int i) const noexcept {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, i));
    return p == nullptr
               ? std::string_view{}
               : std::string_view(p, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, i)));
  }
  /// Blob column `i` of the current row (valid until the next step or the end of this use).
  [[nodiscard]] std::span<const std::byte> blob(int i) const noexcept {
    const auto* p = static_cast<const std::byte*>(sqlite3_column_blob(stmt_, i));
    return p == nullptr ? std::span<const std::byte>{}
                        : std::span(p, static_cast<std::size_t>(sqlite3_column_bytes(stmt_, i)));
  }

 private:
  sqlite_use& keep(int rc) noexcept {
    if (bind_error_ == SQLITE_OK) bind_error_ = rc;
    return *this;
  }
  sqlite3_stmt* stmt_;
  int bind_error_ = SQLITE_OK;
};

}  // namespace devgate::store::detail
