#pragma once

#include <memory>   // the shared authenticator
#include <string>   // the device id
#include <utility>  // std::move

#include "devgate/auth/authenticator.hpp"
#include "devgate/auth/origin.hpp"

namespace devgate::auth {

/// The check a server runs before every upgrade (`websocket::server_options::authenticate`):
/// the Origin allow-list first (403 "origin not allowed"), then `authenticator`, shared by every
/// network thread. An authenticator with a `start_warning` (allow_all) passes it on for the
/// server to log at start.
template <authenticator A>
[[nodiscard]] upgrade_check gate(std::shared_ptr<A> authenticator, origin_allow_list origins = {}) {
  upgrade_check out;
  if constexpr (requires { A::start_warning; }) out.start_warning = std::string(A::start_warning);
  out.check = [a = std::move(authenticator), o = std::move(origins)](const request& r,
                                                                     completion done) {
    if (!o.allows(r)) {
      done(result::reject(403, "origin not allowed"));
      return;
    }
    a->authenticate(r, std::move(done));
  };
  return out;
}

/// An Origin allow-list alone: upgrades from allowed origins (or without Origin, unless strict)
/// are accepted unauthenticated, the others get 403.
[[nodiscard]] inline upgrade_check gate(origin_allow_list origins) {
  upgrade_check out;
  out.check = [o = std::move(origins)](const request& r, completion done) {
    if (!o.allows(r)) {
      done(result::reject(403, "origin not allowed"));
      return;
    }
    result ok = result::accept(std::string(r.device_id));
    ok.authenticated = false;
    done(std::move(ok));
  };
  return out;
}

}  // namespace devgate::auth
