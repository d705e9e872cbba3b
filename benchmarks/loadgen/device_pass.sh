# The device-path pass of benchmarks/run.sh (run.sh --device; sourced by run.sh, which has set
# root, mode, build, server_cpu, gen_cpu, reps, seconds and warmup). Issue 18: a device sends a
# small message and gets its acknowledgement, through devgate's hub, mosquitto, NATS and
# Socket.IO. Every system runs on a fresh server pinned to BENCH_SERVER_CPU, the generator
# (devgate_devload) on BENCH_GEN_CPU; systems alternate on each repetition; report.py --device
# rewrites the device-path section of benchmarks/RESULTS.md. See benchmarks/README.md.

# ---- build --------------------------------------------------------------------------------------
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDEVGATE_BUILD_BENCHMARKS=ON \
  -DDEVGATE_BUILD_TESTS=OFF -DDEVGATE_BUILD_EXAMPLES=ON >/dev/null
cmake --build "$build" --target devgate_devload devgate_device_bench_server demo_server -j2

devload=$build/benchmarks/loadgen/devgate_devload
out=$build/device-path
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"

# ---- systems ------------------------------------------------------------------------------------
# Each system: how its server starts and which devload scenario drives it.
systems=(devgate devgate_dispatch devgate_sqlite devgate_sub10 devgate_sub10b demo mosquitto_qos1 mosquitto_qos0 nats nats_reqreply socketio)
skipped=()
have_mosquitto=1; command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || have_mosquitto=0
have_nats=1; command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || have_nats=0
have_socketio=1
{ command -v node >/dev/null && [ -d "$root/benchmarks/peers/node_modules/socket.io" ]; } || have_socketio=0
PATH=$PATH:/usr/sbin
available=()
for s in "${systems[@]}"; do
  case $s in
    mosquitto_*) [ $have_mosquitto = 1 ] || { skipped+=("$s: mosquitto not installed"); continue; } ;;
    nats*) [ $have_nats = 1 ] || { skipped+=("$s: nats-server not installed"); continue; } ;;
    socketio) [ $have_socketio = 1 ] || { skipped+=("$s: node or benchmarks/peers/node_modules/socket.io missing (npm ci --prefix benchmarks/peers)"); continue; } ;;
  esac
  available+=("$s")
done
systems=("${available[@]}")
[ -n "${BENCH_SERVERS:-}" ] && read -r -a systems <<<"$BENCH_SERVERS"
echo "run.sh --device: $mode pass, systems: ${systems[*]}, repetitions: $reps"
[ ${#skipped[@]} -gt 0 ] && printf 'run.sh --device: skipped %s\n' "${skipped[@]}"

port=19300
server_pid=
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_port() {
  for _ in $(seq 200); do
    port=$((port + 1))
    [ $port -gt 19899 ] && port=19301
    port_free $port && return 0
  done
  return 1
}
start_system() {  # system; sets server_pid, port
  next_port
  local cmd
  case $1 in
    devgate|devgate_sub10|devgate_sub10b) cmd=("$build/benchmarks/servers/devgate_device_bench_server" --port $port --threads 1 --workers 1) ;;
    devgate_dispatch) cmd=("$build/benchmarks/servers/devgate_device_bench_server" --port $port --threads 1 --workers 1
               --ack on_dispatch) ;;
    devgate_sqlite) rm -rf "$out/sqlite-state"
          cmd=("$build/benchmarks/servers/devgate_device_bench_server" --port $port --threads 1 --workers 1
               --store sqlite --sync normal --ack on_dispatch --state-dir "$out/sqlite-state") ;;
    demo) rm -rf "$out/demo-state"
          cmd=("$build/examples/demo_server/demo_server" --address 127.0.0.1 --port $port --dispatch-us 0
               --state-dir "$out/demo-state") ;;
    mosquitto_*) printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\n' \
                   $port >"$out/mosquitto.conf"
                 cmd=(mosquitto -c "$out/mosquitto.conf") ;;
    nats*) cmd=(nats-server -a 127.0.0.1 -p $port) ;;
    socketio) cmd=(node "$root/benchmarks/peers/socketio_server.js" $port) ;;
  esac
  taskset -c "$server_cpu" "${cmd[@]}" >"$out/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    kill -0 "$server_pid" 2>/dev/null || break
    port_free $port || return 0
    sleep 0.1
  done
  echo "run.sh: $1 did not start: $(tail -n 5 "$out/server.log")" >&2
  return 1
}
args_of_system() {
  case $1 in
    devgate|devgate_dispatch|devgate_sqlite) echo "--scenario v1" ;;
    devgate_sub10) echo "--scenario v1 --subscribers 10" ;;
    devgate_sub10b) echo "--scenario v1 --subscribers 10 --batch 1" ;;
    demo) echo "--scenario v1 --count-path /metrics" ;;
    mosquitto_qos1) echo "--scenario mqtt --qos 1" ;;
    mosquitto_qos0) echo "--scenario mqtt --qos 0" ;;
    nats) echo "--scenario nats --ack 0" ;;
    nats_reqreply) echo "--scenario nats --ack 1" ;;
    socketio) echo "--scenario socketio" ;;
  esac
}

# run_case <case> <rep> <system> <devload args...>: a failed run is recorded and tried once more.
run_case() {
  local case=$1 rep=$2 name=$3
  shift 3
  local attempt line
  read -r -a sargs <<<"$(args_of_system "$name")"
  for attempt in 1 2; do
    if ! start_system "$name"; then
      line="{\"server\":\"$name\",\"error\":\"server did not start\"}"
    else
      line=$(taskset -c "$gen_cpu" timeout 300 "$devload" --port $port --server "$name" \
               --server-pid "$server_pid" "${sargs[@]}" "$@" | tail -n 1) || true
      [ -z "$line" ] && line="{\"server\":\"$name\",\"error\":\"devload failed or timed out\"}"
    fi
    stop_server
    line="{\"case\":\"$case\",\"rep\":$rep,\"attempt\":$attempt,${line#\{}"
    echo "$line" >>"$results"
    echo "  $line"
    [[ $line == *'"error"'* ]] || return 0
  done
}

cases=(device_c100_w16 device_c1000_w1)
args_of_case() {
  case $1 in
    device_c100_w16) echo "--connections 100 --window 16 --size 64 --seconds $seconds --warmup $warmup" ;;
    device_c1000_w1) echo "--connections 1000 --window 1 --size 64 --seconds $seconds --warmup $warmup" ;;
  esac
}

ulimit -n "$(ulimit -Hn)"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
n=${#systems[@]}
for rep in $(seq "$reps"); do
  order=()
  for k in $(seq 0 $((n - 1))); do order+=("${systems[$(((k + rep - 1) % n))]}"); done
  for case in "${cases[@]}"; do
    echo "run.sh --device: repetition $rep, $case"
    read -r -a cargs <<<"$(args_of_case "$case")"
    for name in "${order[@]}"; do run_case "$case" "$rep" "$name" "${cargs[@]}"; done
  done
done

# ---- report -------------------------------------------------------------------------------------
socketio_version=$(node -p "require('$root/benchmarks/peers/node_modules/socket.io/package.json').version" 2>/dev/null || echo none)
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
  "seconds": $seconds, "warmup": $warmup,
  "cpu": sh("lscpu | sed -n 's/^Model name: *//p' | head -1") or platform.processor(),
  "cores": os.cpu_count(), "mem": sh("free -g | awk '/Mem:/{print \$2\" GiB RAM\"}'"),
  "kernel": platform.release(), "load_start": "$load_start",
  "load_end": sh("cut -d' ' -f1-3 /proc/loadavg"),
  "server_cpu": "$server_cpu", "gen_cpu": "$gen_cpu",
  "compiler": sh("${CXX:-c++} --version | head -1"),
  "mosquitto": sh("dpkg-query -W -f='\${Version}' mosquitto 2>/dev/null") or "none",
  "nats": sh("PATH=\$PATH:/usr/sbin nats-server --version 2>/dev/null") or "none",
  "node": sh("node --version") or "none", "socketio": "$socketio_version",
  "skipped": $skipped_json,
  "command": ("BENCH_REPS=$reps " if "${BENCH_REPS:-}" else "") + "benchmarks/run.sh --device"
             + (" --quick" if "$mode" == "quick" else ""),
}
json.dump(meta, open(sys.argv[1], "w"))
EOF
python3 "$root/benchmarks/loadgen/report.py" --device "$results" "$out/meta.json" "$root/benchmarks/RESULTS.md"
echo "run.sh --device: results in $results; benchmarks/RESULTS.md updated (device-path section)"
exit 0
