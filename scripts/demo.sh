#!/usr/bin/env bash
# Builds and runs the devgate demo server (the README's first command): open
# http://localhost:4000/marco. Arguments are passed to the server; try --help.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh build
build=${DEVGATE_BUILD_DIR:-$root/build}/demo
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DDEVGATE_BUILD_TESTS=OFF -DDEVGATE_BUILD_BENCHMARKS=OFF -DDEVGATE_BUILD_EXAMPLES=ON >/dev/null
cmake --build "$build" --target demo_server
exec "$build/examples/demo_server/demo_server" "$@"
