#!/usr/bin/env bash
# Side-by-side benchmarks (issue 7): devgate, the raw-TCP loopback ceiling, Boost.Beast,
# websocketpp and Node ws, same scenarios, same run, same machine. Builds Release, runs every
# scenario for every server (servers alternated on each repetition, a fresh server per run),
# and rewrites the side-by-side section of benchmarks/RESULTS.md. See benchmarks/README.md.
# With --device, the device-path pass instead (issue 18): devgate's hub and demo server against
# mosquitto, NATS and Socket.IO, written to the device-path section of RESULTS.md.
# With --tls, the TLS pass instead (issue 14): wss echo, idle wss memory and TLS handshakes,
# devgate against Node ws over TLS and a plain OpenSSL accept loop, written to the TLS section.
#
#   benchmarks/run.sh           full: 3 repetitions, 5 s per echo run, 19,000 idle connections
#   benchmarks/run.sh --quick   one repetition, 2 s per echo run, 5,000 idle connections
#   benchmarks/run.sh --device [--quick]   the device path: 3 (1) repetitions of 5 (2) s per run
#   benchmarks/run.sh --tls [--quick]      the TLS pass: 3 (1) repetitions of 5 (2) s per run,
#                                          19,000 (5,000) idle wss connections
#
# Environment: BENCH_BUILD (build dir, default build/bench), BENCH_SERVER_CPU (0),
# BENCH_GEN_CPU (1), BENCH_SERVERS (subset, e.g. "devgate raw"; with --device e.g.
# "devgate mosquitto_qos1"), BENCH_REPS, BENCH_IDLE.
# Needs: scripts/install-deps.sh bench (Boost, websocketpp, perf, mosquitto, nats-server) and
# tests/peers/node_modules, benchmarks/peers/node_modules (npm ci); peers that are missing are
# skipped and the report says so.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=full
pass=side-by-side
for arg in "$@"; do
  case $arg in
    --quick) mode=quick ;;
    --device) pass=device ;;
    --tls) pass=tls ;;
    *) echo "usage: $0 [--device | --tls] [--quick]" >&2; exit 2 ;;
  esac
done
build=${BENCH_BUILD:-$root/build/bench}
server_cpu=${BENCH_SERVER_CPU:-0}
gen_cpu=${BENCH_GEN_CPU:-1}
if [ "$mode" = quick ]; then
  reps=${BENCH_REPS:-1}; seconds=2; warmup=0.5; idle=${BENCH_IDLE:-5000}; bc_big=3; bc_small=10
else
  reps=${BENCH_REPS:-3}; seconds=5; warmup=1; idle=${BENCH_IDLE:-19000}; bc_big=5; bc_small=20
fi
# Stops the server started last (TERM, then KILL after 10 s); both passes use it.
stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
[ "$pass" = device ] && . "$root/benchmarks/loadgen/device_pass.sh"  # runs the pass, then exits
[ "$pass" = tls ] && . "$root/benchmarks/loadgen/tls_pass.sh"  # runs the pass, then exits

# ---- build ------------------------------------------------------------------------------------
peers=OFF
if [ -f /usr/include/boost/beast.hpp ] && [ -f /usr/include/websocketpp/server.hpp ]; then peers=ON; fi
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVGATE_BUILD_BENCHMARKS=ON \
  -DDEVGATE_BUILD_TESTS=OFF -DDEVGATE_BUILD_EXAMPLES=OFF -DDEVGATE_BUILD_BENCH_PEERS=$peers >/dev/null
targets=(devgate_loadgen devgate_ws_bench_server devgate_peer_raw_tcp)
[ "$peers" = ON ] && targets+=(devgate_peer_beast devgate_peer_websocketpp)
cmake --build "$build" --target "${targets[@]}" -j2

loadgen=$build/benchmarks/loadgen/devgate_loadgen
servers=(devgate raw)
[ "$peers" = ON ] && servers+=(beast websocketpp)
if command -v node >/dev/null && [ -d "$root/tests/peers/node_modules/ws" ]; then servers+=(node); fi
[ -n "${BENCH_SERVERS:-}" ] && read -r -a servers <<<"$BENCH_SERVERS"
echo "run.sh: $mode pass, servers: ${servers[*]}, repetitions: $reps"

ulimit -n "$(ulimit -Hn)"  # 19,000 idle connections need descriptors in server and generator
out=$build/side-by-side
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"

# ---- servers ----------------------------------------------------------------------------------
port=19100
server_pid=
start_server() {  # name [pipeline]
  port=$((port + 1))
  [ $port -gt 19900 ] && port=19101
  local cmd
  case $1 in
    devgate) cmd=("$build/benchmarks/servers/devgate_ws_bench_server" --port $port --threads 1)
             [ "${2:-}" = pipeline ] && cmd+=(--mode pipeline --workers 1) ;;
    raw) cmd=("$build/benchmarks/peers/devgate_peer_raw_tcp" $port) ;;
    beast) cmd=("$build/benchmarks/peers/devgate_peer_beast" $port) ;;
    websocketpp) cmd=("$build/benchmarks/peers/devgate_peer_websocketpp" $port) ;;
    node) cmd=(node "$root/benchmarks/peers/node_ws_server.js" $port) ;;
  esac
  taskset -c "$server_cpu" "${cmd[@]}" >"$out/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    grep -q "listening on" "$out/server.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "run.sh: $1 did not start: $(cat "$out/server.log")" >&2
  return 1
}

# run_case <case> <rep> <server> <server mode> <loadgen args...>
# A failed run (server did not start, generator error or timeout) is recorded as failed and tried
# once more; the report lists failed runs and uses only the successful ones.
run_case() {
  local case=$1 rep=$2 name=$3 smode=$4
  shift 4
  local proto=ws
  [ "$name" = raw ] && proto=raw
  local attempt line
  for attempt in 1 2; do
    if ! start_server "$name" "$smode"; then
      line="{\"server\":\"$name\",\"error\":\"server did not start\"}"
    else
      line=$(taskset -c "$gen_cpu" timeout 300 "$loadgen" --port $port --proto $proto --server "$name" \
               --server-pid "$server_pid" "$@" | tail -n 1) || true
      [ -z "$line" ] && line="{\"server\":\"$name\",\"error\":\"loadgen failed or timed out\"}"
    fi
    stop_server
    line="{\"case\":\"$case\",\"rep\":$rep,\"attempt\":$attempt,${line#\{}"
    echo "$line" >>"$results"
    echo "  $line"
    [[ $line == *'"error"'* ]] || return 0
  done
}

# ---- scenarios --------------------------------------------------------------------------------
cases=(echo_c100_w16 echo_c1000_w1 broadcast_1mib broadcast_64b idle ingest_c100_w16 ingest_c1000_w1)
args_of() {
  case $1 in
    echo_c100_w16) echo "--scenario echo --connections 100 --window 16 --size 64 --seconds $seconds --warmup $warmup" ;;
    echo_c1000_w1) echo "--scenario echo --connections 1000 --window 1 --size 64 --seconds $seconds --warmup $warmup" ;;
    broadcast_1mib) echo "--scenario broadcast --connections 1000 --size 1048576 --reps $bc_big" ;;
    broadcast_64b) echo "--scenario broadcast --connections 1000 --size 64 --reps $bc_small" ;;
    idle) echo "--scenario idle --idle $idle --idle-step 1000" ;;
    ingest_c100_w16) echo "--scenario ingest --connections 100 --window 16 --size 64 --seconds $seconds --warmup $warmup" ;;
    ingest_c1000_w1) echo "--scenario ingest --connections 1000 --window 1 --size 64 --seconds $seconds --warmup $warmup" ;;
  esac
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
n=${#servers[@]}
for rep in $(seq "$reps"); do
  # Alternate: each repetition starts with the next server, so no server always runs first.
  order=()
  for k in $(seq 0 $((n - 1))); do order+=("${servers[$(((k + rep - 1) % n))]}"); done
  for case in "${cases[@]}"; do
    echo "run.sh: repetition $rep, $case"
    read -r -a args <<<"$(args_of "$case")"
    if [[ $case == ingest_* ]]; then
      # The full pipeline exists only in devgate (the peers are transports).
      [[ " ${servers[*]} " == *" devgate "* ]] && run_case "$case" "$rep" devgate pipeline "${args[@]}"
      continue
    fi
    for name in "${order[@]}"; do run_case "$case" "$rep" "$name" "" "${args[@]}"; done
  done
done

# ---- report -----------------------------------------------------------------------------------
ws_version=$(node -p "require('$root/tests/peers/node_modules/ws/package.json').version" 2>/dev/null || echo none)
python3 - "$out/meta.json" <<EOF
import json, os, platform, subprocess, sys
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"
meta = {
  "date": sh("date -u '+%Y-%m-%d %H:%M UTC'"), "mode": "$mode", "reps": $reps,
  "seconds": $seconds, "warmup": $warmup, "idle": $idle,
  "bc_big_reps": $bc_big, "bc_small_reps": $bc_small,
  "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -1") or platform.processor(),
  "cores": os.cpu_count(), "mem": sh("free -g | awk '/Mem:/{print \$2\" GiB RAM\"}'"),
  "kernel": platform.release(), "load_start": "$load_start",
  "load_end": sh("cut -d' ' -f1-3 /proc/loadavg"),
  "server_cpu": "$server_cpu", "gen_cpu": "$gen_cpu",
  "compiler": sh("${CXX:-c++} --version | head -1"),
  "boost": sh("dpkg-query -W -f='\${Version}' libboost-dev 2>/dev/null") or "none",
  "websocketpp": sh("dpkg-query -W -f='\${Version}' libwebsocketpp-dev 2>/dev/null") or "none",
  "node": sh("node --version") or "none", "ws": "$ws_version",
  "command": ("BENCH_REPS=$reps " if "${BENCH_REPS:-}" else "") + "benchmarks/run.sh"
             + (" --quick" if "$mode" == "quick" else ""),
}
json.dump(meta, open(sys.argv[1], "w"))
EOF
python3 "$root/benchmarks/loadgen/report.py" "$results" "$out/meta.json" "$root/benchmarks/RESULTS.md"
echo "run.sh: results in $results; benchmarks/RESULTS.md updated (side-by-side section)"
