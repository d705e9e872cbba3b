#!/bin/bash
# Measures the server memory per idle WebSocket connection (see /work/notes/results-server.md).
# Usage: idle_memory.sh <echo_server binary> <n1> <n2> [<cert.pem> <key.pem> <ca.pem>]
# With the three PEM files the connections are wss (echo_server --tls-cert/--tls-key).
# VmRSS of a fresh echo_server holding n1, then (fresh again) n2 idle WebSocket connections;
# the slope excludes fixed costs (threads, per-thread buffers, pools).
BIN=$1; N1=$2; N2=$3
SERVER_TLS=""; PEER_TLS=""
if [ -n "${4:-}" ]; then SERVER_TLS="--tls-cert $4 --tls-key $5"; PEER_TLS="$6"; fi
PEER=$(dirname "$0")/idle_clients.py
one() {
  OUT=$(mktemp); IDLE=$(mktemp)
  bash -c "ulimit -n 20000; exec $BIN --port 0 --threads 2 $SERVER_TLS" > $OUT 2>&1 & SPID=$!
  sleep 0.5; PORT=$(awk '{print $3}' $OUT)
  /usr/bin/python3 $PEER $PORT $1 $PEER_TLS > $IDLE & CP=$!
  for i in $(seq 240); do grep -q ready $IDLE && break; sleep 0.5; done; sleep 1
  awk '/VmRSS/{print $2}' /proc/$SPID/status
  kill $CP; wait $CP 2>/dev/null; kill $SPID; wait $SPID 2>/dev/null; rm -f $OUT $IDLE
}
R1=$(one $N1); R2=$(one $N2)
echo "VmRSS with $N1 idle: $R1 kB; with $N2 idle: $R2 kB; slope: $(( (R2-R1)*1024/(N2-N1) )) bytes/connection"
