// A program outside devgate that uses it the way an embedder does: one include.
#include <devgate/devgate.hpp>

#include <cstdio>
#include <string_view>

int main() {
  const auto payload = devgate::shared_bytes::copy_of(std::string_view("abc"));
  const auto digest = devgate::detail::sha256(payload.bytes());
  const auto hex = devgate::detail::hex_encode(digest);
  const std::error_code closed = devgate::errc::closed;
  std::printf("devgate %.*s sha256(abc)=%s error=%s\n",
              static_cast<int>(devgate::version_string.size()), devgate::version_string.data(),
              hex.c_str(), closed.message().c_str());
  return hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" ? 0 : 1;
}
