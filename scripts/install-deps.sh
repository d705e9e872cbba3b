#!/usr/bin/env bash
# Installs what devgate needs from Debian 12 packages (and the pinned npm test peers), only what
# is missing; does nothing when everything is present. Run as root (apt-get).
#   scripts/install-deps.sh build   compilers, build tools and the libraries devgate uses
#   scripts/install-deps.sh test    build + sanitizer runtimes, fuzzing, test peers (default)
#   scripts/install-deps.sh bench   test + the benchmark peers (Boost.Beast, websocketpp, mosquitto,
#                                   nats-server, the pinned npm socket.io) and perf
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-test}
build_packages=(g++ cmake ninja-build meson pkg-config ccache git python3
                libasio-dev libconcurrentqueue-dev libssl-dev nlohmann-json3-dev libcli11-dev
                libsqlite3-dev libhiredis-dev)
test_packages=(catch2 libbenchmark-dev clang libclang-rt-14-dev clang-format
               python3-websockets python3-jwt python3-cryptography openssl chromium fonts-liberation
               redis-server redis-tools)
case "$mode" in
  build) wanted=("${build_packages[@]}") ;;
  test) wanted=("${build_packages[@]}" "${test_packages[@]}") ;;
  bench) wanted=("${build_packages[@]}" "${test_packages[@]}" libboost-dev libwebsocketpp-dev linux-perf
                mosquitto nats-server) ;;
  *) echo "usage: $0 [build|test|bench]" >&2; exit 2 ;;
esac

missing=()
for package in "${wanted[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
# Node.js and npm run the pinned `ws` test peer; any Node >= 18 will do (Debian's or another).
if [ "$mode" != build ] && ! { command -v node && command -v npm; } >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# npm test peers, pinned by tests/peers/package-lock.json; reinstalled only when the lock changes.
if [ "$mode" != build ] && [ -f tests/peers/package-lock.json ]; then
  stamp=tests/peers/node_modules/.devgate-lock
  if ! cmp -s tests/peers/package-lock.json "$stamp" 2>/dev/null; then
    echo "install-deps: npm ci in tests/peers"
    npm ci --prefix tests/peers --no-audit --no-fund --loglevel=error
    cp tests/peers/package-lock.json "$stamp"
  fi
fi

# npm benchmark peers (socket.io), pinned by benchmarks/peers/package-lock.json; bench mode only.
if [ "$mode" = bench ] && [ -f benchmarks/peers/package-lock.json ]; then
  stamp=benchmarks/peers/node_modules/.devgate-lock
  if ! cmp -s benchmarks/peers/package-lock.json "$stamp" 2>/dev/null; then
    echo "install-deps: npm ci in benchmarks/peers"
    npm ci --prefix benchmarks/peers --no-audit --no-fund --loglevel=error
    cp benchmarks/peers/package-lock.json "$stamp"
  fi
fi
