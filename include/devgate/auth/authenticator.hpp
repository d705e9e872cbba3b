#pragma once

#include <openssl/types.h>  // X509 (the TLS peer certificate)

#include <concepts>     // std::same_as
#include <functional>   // the completion's callback, the server's hook
#include <string>       // device id, claims, reasons
#include <string_view>  // request parts
#include <utility>      // std::exchange, std::move

#include "devgate/websocket/http.hpp"

namespace devgate::auth {

/// What an authenticator sees of an upgrade request, after the server checked the handshake and
/// `server_options::identify` named the device. Every view (and the certificate) is valid only
/// during the `authenticate` call: an authenticator that answers later copies what it needs.
struct request {
  std::string_view device_id;                ///< The device id `identify` read from the path.
  std::string_view path;                     ///< The request target before any '?'.
  std::string_view query;                    ///< The target after '?' ("" without one).
  const websocket::http_request* http = {};  ///< The whole request: method, target, headers.
  std::string_view peer_address;             ///< The peer as "address:port" ("" if unknown).
  /// The verified client certificate of a TLS session (mutual TLS), or null: plain TCP, or a
  /// TLS client that sent none. Borrowed: never freed by the authenticator.
  X509* peer_certificate = nullptr;

  /// Value of the first header named `name` (case-insensitive), or "" if absent.
  [[nodiscard]] std::string_view header(std::string_view name) const noexcept {
    return http ? http->header(name) : std::string_view{};
  }
};

/// An authenticator's answer: accepted as a device (status 0), or refused with an HTTP status and
/// a reason that goes back in the response body. A reason names what is wrong (expired, bad
/// signature, unknown key, wrong subject...) and never repeats the credential.
struct result {
  int status = 0;             ///< 0: accepted; otherwise 401, 403, 500 or 503.
  std::string device_id;      ///< The device the session is for (accepted only).
  std::string claims;         ///< What the credential said, as JSON text ("" when none).
  std::string reason;         ///< Why it was refused (refused only).
  std::string subprotocol;    ///< Sec-WebSocket-Protocol value the 101 echoes ("" for none).
  bool authenticated = true;  ///< False when accepted without a credential (allow_all, Origin).

  /// True when the upgrade goes ahead.
  [[nodiscard]] bool accepted() const noexcept { return status == 0; }
  /// Accepted as `device_id`, with the credential's `claims` (JSON text).
  [[nodiscard]] static result accept(std::string device_id, std::string claims = {}) {
    result r;
    r.device_id = std::move(device_id);
    r.claims = std::move(claims);
    return r;
  }
  /// Refused with `status` (401: no or bad credential; 403: valid but not allowed) and `reason`.
  [[nodiscard]] static result reject(int status, std::string reason) {
    result r;
    r.status = status;
    r.reason = std::move(reason);
    return r;
  }
};

/// The way an authenticator answers: call it once, on any thread, now or later (a remote check
/// answers when its reply arrives and never blocks the network thread that asked). One that is
/// destroyed without being called answers 500, so a request is never left waiting for it.
class completion {
 public:
  /// No one to answer (calling it does nothing).
  completion() = default;
  /// Answers through `deliver`.
  explicit completion(std::function<void(result)> deliver) : deliver_(std::move(deliver)) {}
  completion(const completion&) = delete;
  completion& operator=(const completion&) = delete;
  /// Takes over `other`'s duty to answer.
  completion(completion&& other) noexcept : deliver_(std::exchange(other.deliver_, nullptr)) {}
  /// Answers 500 for a pending duty, then takes over `other`'s.
  completion& operator=(completion&& other) noexcept {
    if (this != &other) {
      abandon();
      deliver_ = std::exchange(other.deliver_, nullptr);
    }
    return *this;
  }
  ~completion() { abandon(); }

  /// Delivers the answer (only the first call counts).
  void operator()(result r) {
    if (auto d = std::exchange(deliver_, nullptr)) d(std::move(r));
  }

 private:
  void abandon() noexcept {
    try {
      (*this)(result::reject(500, "authentication gave no answer"));
    } catch (...) {  // an allocation failure here leaves the request to its handshake timeout
    }
  }

  std::function<void(result)> deliver_;
};

/// An authenticator: `a.authenticate(request, completion)` judges one upgrade request and answers
/// through the completion (at once, or later from any thread). It is called on network threads,
/// concurrently, so it is thread-safe and never blocks. Models: token_authenticator (JWT),
/// client_certificate_authenticator, allow_all.
template <class A>
concept authenticator = requires(A& a, const request& r, completion done) {
  a.authenticate(r, std::move(done));
};

/// What `websocket::server_options::authenticate` holds: the check run before every upgrade
/// (auth/gate.hpp makes one from an authenticator and an Origin allow-list), and a warning the
/// server logs when it starts (allow_all's).
struct upgrade_check {
  /// Judges one upgrade request; empty: every upgrade is accepted unauthenticated.
  std::function<void(const request&, completion)> check;
  /// Logged to stderr by `server::start()` when not empty.
  std::string start_warning;

  /// True when a check is set.
  explicit operator bool() const noexcept { return static_cast<bool>(check); }
};

}  // namespace devgate::auth
