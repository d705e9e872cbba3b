#!/usr/bin/env bash
# The Redis Streams sink beside redis-benchmark's pipelined XADD, against one redis-server
# pinned to CPU 0 (the clients on CPU 1), no persistence. Prints both rates and their ratio,
# then the cost of a topic publish across nodes (devgate_redis_topics_driver) and topic fan-out
# over three nodes against one (devgate_redis_fanout_driver).
#   benchmarks/redis/run_redis.sh <build-dir> [messages] [workers]
set -euo pipefail
build=${1:?usage: run_redis.sh <build-dir> [messages] [workers]}
messages=${2:-200000}
workers=${3:-16}
bench="$build/benchmarks/redis/devgate_redis_sink_driver"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --logfile "$dir/redis.log" &
server=$!
trap 'kill $server; wait $server 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do redis-cli -p "$port" PING >/dev/null 2>&1 && break; sleep 0.05; done
payload=$(head -c 64 /dev/zero | tr '\0' x)
peer=$(taskset -c 1 redis-benchmark -p "$port" -P 16 -c 50 -n "$messages" -q \
  XADD bench:peer '*' device device-1 seq 1 kind text payload "$payload" | tr '\r' '\n' |
  grep -o '[0-9.]* requests per second' | tail -1 | cut -d' ' -f1)
echo "redis-benchmark -P 16 -c 50 XADD: $peer XADD/s"
line=$(taskset -c 1 "$bench" --url "redis://127.0.0.1:$port" --messages "$messages" --workers "$workers")
echo "$line"
ours=$(echo "$line" | grep -o '[0-9]* XADD/s' | cut -d' ' -f1)
python3 -c "print(f'ratio devgate/redis-benchmark: {$ours / $peer:.2f}')"
taskset -c 1 "$build/benchmarks/redis/devgate_redis_topics_driver" --url "redis://127.0.0.1:$port" \
  --messages "$messages"
# Fan-out: 1,000 devices on one node, then over three nodes (the driver on CPU 1 alone, so the
# ratio compares the work, not the cluster's extra threads).
taskset -c 1 "$build/benchmarks/redis/devgate_redis_fanout_driver" --url "redis://127.0.0.1:$port" \
  --devices 1000 --nodes 3 --messages 5000
