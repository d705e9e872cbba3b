#pragma once

#include <openssl/asn1.h>     // ASN1_STRING
#include <openssl/crypto.h>   // OPENSSL_free
#include <openssl/obj_mac.h>  // NID_subject_alt_name, NID_commonName
#include <openssl/x509.h>     // X509
#include <openssl/x509v3.h>   // GENERAL_NAMES

#include <optional>     // the device id of a certificate
#include <string>       // ids, prefixes
#include <string_view>  // names in the certificate
#include <utility>      // std::move

#include "devgate/auth/authenticator.hpp"

namespace devgate::auth {

/// Settings of `client_certificate_authenticator`: where in the certificate the device id is.
struct certificate_options {
  /// A subjectAltName URI that starts with this names the device by the rest
  /// (e.g. "urn:devgate:device:pump-7"). Empty: URIs are not looked at.
  std::string uri_prefix = "urn:devgate:device:";
  /// Otherwise the first subjectAltName dNSName is the device id.
  bool dns_name = true;
  /// Otherwise, for a certificate with no dNSName or URI names at all, the subject's
  /// commonName (RFC 6125 6.4.4: a CN is looked at only without such names).
  bool common_name = true;
};

/// Authenticates devices by the client certificate of a mutual-TLS session: the certificate's
/// device id (see certificate_options) must be the device id of the path. The TLS layer has
/// verified the certificate against its CA before; this only reads names from it. Refusals: 401
/// without a certificate or without a usable name, 403 for a certificate of another device.
class client_certificate_authenticator {
 public:
  /// An authenticator reading names as `options` says.
  explicit client_certificate_authenticator(certificate_options options = {})
      : options_(std::move(options)) {}

  /// The device id `cert` names, or nullopt when it has no usable name.
  [[nodiscard]] std::optional<std::string> device_id_of(X509* cert) const {
    if (cert == nullptr) return std::nullopt;
    bool has_names = false;
    std::optional<std::string> from_uri, from_dns;
    if (auto* names = static_cast<GENERAL_NAMES*>(
            X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr))) {
      for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
        const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
        if (name->type == GEN_URI) {
          has_names = true;
          const auto text = view(name->d.uniformResourceIdentifier);
          if (!from_uri && !options_.uri_prefix.empty() && text &&
              text->starts_with(options_.uri_prefix)) {
            from_uri = std::string(text->substr(options_.uri_prefix.size()));
          }
        } else if (name->type == GEN_DNS) {
          has_names = true;
          const auto text = view(name->d.dNSName);
          if (!from_dns && text) from_dns = std::string(*text);
        }
      }
      GENERAL_NAMES_free(names);
    }
    if (from_uri && !from_uri->empty()) return from_uri;
    if (options_.dns_name && from_dns && !from_dns->empty()) return from_dns;
    if (has_names || !options_.common_name) return std::nullopt;
    return common_name(cert);
  }

  /// Judges `r` now (see the class comment).
  [[nodiscard]] result check(const request& r) const {
    if (r.peer_certificate == nullptr) return result::reject(401, "no client certificate");
    const auto id = device_id_of(r.peer_certificate);
    if (!id) return result::reject(401, "certificate names no device");
    if (*id != r.device_id) return result::reject(403, "certificate is for another device");
    return result::accept(*id);
  }

  /// The authenticator concept: answers at once.
  void authenticate(const request& r, completion done) const { done(check(r)); }

 private:
  // An IA5String's text, refused when it holds a NUL (a name that reads differently in C).
  static std::optional<std::string_view> view(const ASN1_STRING* s) {
    if (s == nullptr) return std::nullopt;
    const std::string_view text(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                                static_cast<std::size_t>(ASN1_STRING_length(s)));
    if (text.find('\0') != std::string_view::npos) return std::nullopt;
    return text;
  }
  static std::optional<std::string> common_name(X509* cert) {
    const X509_NAME* subject = X509_get_subject_name(cert);
    if (subject == nullptr) return std::nullopt;
    const int at = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (at < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, at) >= 0) {
      return std::nullopt;  // none, or several: ambiguous
    }
    const ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, at));
    unsigned char* utf8 = nullptr;
    const int len = ASN1_STRING_to_UTF8(&utf8, data);
    if (len <= 0) return std::nullopt;
    std::string out(reinterpret_cast<const char*>(utf8), static_cast<std::size_t>(len));
    OPENSSL_free(utf8);
    if (out.empty() || out.find('\0') != std::string::npos) return std::nullopt;
    return out;
  }

  certificate_options options_;
};

}  // namespace devgate::auth
