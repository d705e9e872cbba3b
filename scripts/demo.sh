#!/usr/bin/env bash
# Builds and runs the devgate demo server (the README's first command). Arguments are passed to
# the server; try --help. Until examples/demo_server exists this runs examples/echo_server.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/install-deps.sh build
build=${DEVGATE_BUILD_DIR:-$root/build}/demo
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DDEVGATE_BUILD_TESTS=OFF -DDEVGATE_BUILD_BENCHMARKS=OFF -DDEVGATE_BUILD_EXAMPLES=ON >/dev/null
program=demo_server
[ -d examples/demo_server ] || [ -f examples/demo_server.cpp ] || program=echo_server
cmake --build "$build" --target "$program"
exec "$(find "$build/examples" -name "$program" -type f -executable | head -n 1)" "$@"
