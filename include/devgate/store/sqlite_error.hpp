#pragma once

#include <sqlite3.h>

#include <string>        // messages
#include <system_error>  // std::error_category

namespace devgate::store {

namespace detail {

/// The category behind SQLite's result codes: the value is SQLite's extended result code.
class sqlite_category_impl final : public std::error_category {
 public:
  [[nodiscard]] const char* name() const noexcept override { return "sqlite"; }
  [[nodiscard]] std::string message(int value) const override {
    return std::string("sqlite: ") + sqlite3_errstr(value);
  }
};

}  // namespace detail

/// The error category of `sqlite_state_store`'s errors: the value is SQLite's extended result
/// code (`SQLITE_BUSY`, `SQLITE_IOERR_FSYNC`, ...), the message SQLite's text for it.
inline const std::error_category& sqlite_category() noexcept {
  static const detail::sqlite_category_impl instance;
  return instance;
}

/// The `std::error_code` of SQLite result code `rc` (empty for `SQLITE_OK`, `SQLITE_ROW` and
/// `SQLITE_DONE`, which are not errors).
inline std::error_code make_sqlite_error(int rc) noexcept {
  if (rc == SQLITE_OK || rc == SQLITE_ROW || rc == SQLITE_DONE) return {};
  return {rc, sqlite_category()};
}

}  // namespace devgate::store
