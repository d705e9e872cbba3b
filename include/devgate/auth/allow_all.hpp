#pragma once

#include <string>       // the device id
#include <string_view>  // the warning
#include <utility>      // std::move

#include "devgate/auth/authenticator.hpp"

namespace devgate::auth {

/// For development only: accepts every upgrade as the device its path names, unauthenticated
/// (`result::authenticated` false). A server given it logs `start_warning` when it starts.
struct allow_all {
  /// What the server logs at start with this authenticator.
  static constexpr std::string_view start_warning =
      "devgate: WARNING: authentication is allow_all: any client may connect as any device "
      "(development only)";

  /// The authenticator concept: accepts at once.
  void authenticate(const request& r, completion done) const {
    result out = result::accept(std::string(r.device_id));
    out.authenticated = false;
    done(std::move(out));
  }
};

}  // namespace devgate::auth
