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
# The operator API (UPDATE DEVICE, POST /api/firmware) needs a bearer token
# (docs/SECURITY.md, "Operator API"): without --operator-token-file, make a random one for
# this run, readable only by this user, and print it for the page's prompt.
args=("$@")
case " $* " in
  *" --operator-token-file "* | *" --operator-token-file="* | *" --help "* | *" -h "*) ;;
  *)
    token_file=$(mktemp "${TMPDIR:-/tmp}/devgate-demo-operator-token.XXXXXX")
    od -An -N18 -tx1 /dev/urandom | tr -d ' \n' >"$token_file"
    echo "operator token (UPDATE DEVICE asks for it): $(cat "$token_file")   file: $token_file"
    args+=(--operator-token-file "$token_file")
    ;;
esac
exec "$build/examples/demo_server/demo_server" "${args[@]}"
