# The TLS pass of benchmarks/run.sh (run.sh --tls; sourced by run.sh, which has set root, mode,
# build, server_cpu, gen_cpu, reps, seconds, warmup and idle). Issue 14 point 8: wss echo (devgate
# over TLS, devgate plain, Node ws over TLS), idle wss memory, and full TLS handshakes per server
# CPU-second (devgate against a plain OpenSSL accept loop), all with the same ECDSA P-256
# certificate, made here by the `openssl` command. Every run has a fresh server pinned to
# BENCH_SERVER_CPU and the generator (devgate_loadgen --tls-ca) on BENCH_GEN_CPU; systems
# alternate on each repetition; report.py --tls rewrites the TLS section of benchmarks/RESULTS.md.
# See benchmarks/README.md ("The TLS pass").

# ---- build --------------------------------------------------------------------------------------
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVGATE_BUILD_BENCHMARKS=ON \
  -DDEVGATE_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" --target devgate_loadgen devgate_ws_bench_server devgate_peer_openssl_accept -j2

loadgen=$build/benchmarks/loadgen/devgate_loadgen
out=$build/tls
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"

# ---- certificates: a CA and an ECDSA P-256 server certificate for localhost, made per run -------
certs=$out/certs
rm -rf "$certs"
mkdir -p "$certs"
(
  cd "$certs"
  newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  newkey ca.key
  openssl req -x509 -new -key ca.key -subj '/CN=devgate bench CA' -days 2 -out ca.pem 2>/dev/null
  newkey server.key
  openssl req -new -key server.key -subj '/CN=localhost' -out server.csr 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >ext
  openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext \
    -out server.pem 2>/dev/null
)
cert=$certs/server.pem
key=$certs/server.key
ca=$certs/ca.pem

# ---- systems ------------------------------------------------------------------------------------
systems=(devgate_wss devgate_ws node_wss openssl_accept)
skipped=()
if ! command -v node >/dev/null || [ ! -d "$root/tests/peers/node_modules/ws" ]; then
  skipped+=("node_wss: node or tests/peers/node_modules/ws missing (scripts/install-deps.sh test)")
  systems=(devgate_wss devgate_ws openssl_accept)
fi
[ -n "${BENCH_SERVERS:-}" ] && read -r -a systems <<<"$BENCH_SERVERS"
echo "run.sh --tls: $mode pass, systems: ${systems[*]}, repetitions: $reps"
[ ${#skipped[@]} -gt 0 ] && printf 'run.sh --tls: skipped %s\n' "${skipped[@]}"

port=
server_pid=
start_system() {  # system; sets server_pid and port (every server here takes port 0 and says)
  local cmd
  case $1 in
    devgate_wss) cmd=("$build/benchmarks/servers/devgate_ws_bench_server" --port 0 --threads 1
                      --tls-cert "$cert" --tls-key "$key") ;;
    devgate_ws) cmd=("$build/benchmarks/servers/devgate_ws_bench_server" --port 0 --threads 1) ;;
    node_wss) cmd=(node "$root/benchmarks/peers/node_ws_server.js" 0 "$cert" "$key") ;;
    openssl_accept) cmd=("$build/benchmarks/peers/devgate_peer_openssl_accept" 0 "$cert" "$key") ;;
  esac
  taskset -c "$server_cpu" "${cmd[@]}" >"$out/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    port=$(sed -n 's/^listening on \([0-9]*\).*/\1/p' "$out/server.log" 2>/dev/null | head -n 1)
    [ -n "$port" ] && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "run.sh --tls: $1 did not start: $(tail -n 5 "$out/server.log")" >&2
  return 1
}

# run_case <case> <rep> <system> <loadgen args...>: a failed run is recorded and tried once more.
run_case() {
  local case=$1 rep=$2 name=$3
  shift 3
  local attempt line tls=(--tls-ca "$ca")
  [ "$name" = devgate_ws ] && tls=()
  for attempt in 1 2; do
    if ! start_system "$name"; then
      line="{\"server\":\"$name\",\"error\":\"server did not start\"}"
    else
      line=$(taskset -c "$gen_cpu" timeout 300 "$loadgen" --port "$port" --server "$name" \
               --server-pid "$server_pid" "${tls[@]}" "$@" | tail -n 1) || true
      [ -z "$line" ] && line="{\"server\":\"$name\",\"error\":\"loadgen failed or timed out\"}"
    fi
    stop_server
    line="{\"case\":\"$case\",\"rep\":$rep,\"attempt\":$attempt,${line#\{}"
    echo "$line" >>"$results"
    echo "  $line"
    [[ $line == *'"error"'* ]] || return 0
  done
}

# Which systems run which case: the echo compares devgate over TLS with devgate plain and Node
# over TLS; idle memory is devgate's (plain beside it, to show what TLS adds); the handshake
# compares devgate with the OpenSSL loop.
cases=(echo_c100_w16 idle handshake)
systems_of_case() {
  case $1 in
    echo_c100_w16) echo "devgate_wss devgate_ws node_wss" ;;
    idle) echo "devgate_wss devgate_ws" ;;
    handshake) echo "devgate_wss openssl_accept" ;;
  esac
}
args_of_case() {
  case $1 in
    echo_c100_w16) echo "--scenario echo --connections 100 --window 16 --size 64 --seconds $seconds --warmup $warmup" ;;
    idle) echo "--scenario idle --idle $idle --idle-step 1000" ;;
    handshake) echo "--scenario handshake --concurrency 64 --seconds $seconds --warmup $warmup" ;;
  esac
}

ulimit -n "$(ulimit -Hn)"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq "$reps"); do
  for case in "${cases[@]}"; do
    echo "run.sh --tls: repetition $rep, $case"
    read -r -a cargs <<<"$(args_of_case "$case")"
    members=()
    for s in $(systems_of_case "$case"); do
      [[ " ${systems[*]} " == *" $s "* ]] && members+=("$s")
    done
    n=${#members[@]}
    [ "$n" -eq 0 ] && continue
    # Alternate: each repetition starts with the next system, so none always runs first.
    for k in $(seq 0 $((n - 1))); do
      run_case "$case" "$rep" "${members[$(((k + rep - 1) % n))]}" "${cargs[@]}"
    done
  done
done

# ---- report -------------------------------------------------------------------------------------
ws_version=$(node -p "require('$root/tests/peers/node_modules/ws/package.json').version" 2>/dev/null || echo none)
skipped_json=$(printf '%s\n' "${skipped[@]+"${skipped[@]}"}" | python3 -c 'import json,sys; print(json.dumps([l for l in sys.stdin.read().splitlines() if l]))')
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
  "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -1") or platform.processor(),
  "cores": os.cpu_count(), "mem": sh("free -g | awk '/Mem:/{print \$2\" GiB RAM\"}'"),
  "kernel": platform.release(), "load_start": "$load_start",
  "load_end": sh("cut -d' ' -f1-3 /proc/loadavg"),
  "server_cpu": "$server_cpu", "gen_cpu": "$gen_cpu",
  "compiler": sh("${CXX:-c++} --version | head -1"),
  "openssl": sh("openssl version"),
  "node": sh("node --version") or "none", "ws": "$ws_version",
  "skipped": $skipped_json,
  "command": ("BENCH_REPS=$reps " if "${BENCH_REPS:-}" else "") + "benchmarks/run.sh --tls"
             + (" --quick" if "$mode" == "quick" else ""),
}
json.dump(meta, open(sys.argv[1], "w"))
EOF
python3 "$root/benchmarks/loadgen/report.py" --tls "$results" "$out/meta.json" "$root/benchmarks/RESULTS.md"
echo "run.sh --tls: results in $results; benchmarks/RESULTS.md updated (TLS section)"
exit 0
