#include "devgate/core/error.hpp"

#include <catch2/catch.hpp>

TEST_CASE("devgate::errc converts to std::error_code with helpful messages", "[core][error]") {
  const std::error_code full = devgate::errc::queue_full;
  REQUIRE(full);
  REQUIRE(full.category().name() == std::string("devgate"));
  REQUIRE(full.message().find("retry later") != std::string::npos);
  REQUIRE(full == devgate::errc::queue_full);
  REQUIRE(full != devgate::errc::closed);
  for (int e = 1; e <= static_cast<int>(devgate::errc::already_running); ++e) {
    REQUIRE(devgate::make_error_code(static_cast<devgate::errc>(e)).message() !=
            "unknown devgate error");
  }
}
