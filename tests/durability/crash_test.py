#!/usr/bin/env python3
"""The crash test of issue 15, as a user would run it.

A gateway (devgate_crash_server: hub + SQLite store + ack policy on_dispatch) serves 1,000 C++
device clients (devgate_crash_fleet) that send numbered messages with ids, receive sequenced
`deliver`s and download a firmware rollout. The server is killed with SIGKILL at random moments,
at least five times, and restarted on the same state directory each time; the devices reconnect
and resend what was not answered. Then the fleet finishes (every send answered, firmware
verified, deliveries drained) and the test checks, against the SQLite database and the fleet's
report:
  - every message a device was told was received (`sent`) is in the sink's log exactly once;
  - each device's stored messages_sent equals the messages it was acknowledged;
  - each device received every `deliver` the server assigned, in order, with no gap and no
    duplicate, and nothing is left unacknowledged in the store;
  - by their data: every deliver whose commit the server reported (its journal) reached its
    device, and no device received the same data twice (under one number or another);
  - the rollout resumed where devices had acknowledged (no device had to restart a transfer
    from byte 0 for lack of bytes, every device verified the right image).
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request

DEVICES = 1000
IMAGE_SIZE = 256 * 1024
CHUNK = 4 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary, port, state_dir, log, ack, journal):
    p = subprocess.Popen([binary, "--port", str(port), "--state-dir", state_dir,
                          "--devices", str(DEVICES), "--image-size", str(IMAGE_SIZE),
                          "--ack", ack, "--journal", journal],
                         stdout=subprocess.PIPE, stderr=log, text=True)
    line = p.stdout.readline()
    if not line.startswith("listening on"):
        p.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return p


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def expected_sha():
    return hashlib.sha256(bytes(((i * 131 + 7) & 0xFF) for i in range(IMAGE_SIZE))).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--fleet", required=True)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    # on_accept: the server answers before the sink and the store have the message; the test
    # must then fail (that it does shows what it catches).
    ap.add_argument("--ack", default="on_dispatch", choices=["on_dispatch", "on_accept"])
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"seed {args.seed}", flush=True)

    work = tempfile.mkdtemp(prefix="devgate-crash-")
    state_dir = os.path.join(work, "state")
    report_path = os.path.join(work, "report.json")
    server_log = open(os.path.join(work, "server.log"), "w")
    journal = os.path.join(work, "journal.log")
    port = free_port()
    server = start_server(args.server, port, state_dir, server_log, args.ack, journal)
    fleet = subprocess.Popen([args.fleet, "--port", str(port), "--devices", str(DEVICES),
                              "--report", report_path], stdin=subprocess.PIPE, text=True)
    failures = []
    try:
        time.sleep(2.0)
        for k in range(args.kills):
            time.sleep(rng.uniform(0.5, 2.5))
            before = get(port, "/status")
            server.send_signal(signal.SIGKILL)
            server.wait()
            print(f"kill {k + 1}: -9 with {before.get('connected')} devices connected, "
                  f"{before.get('dispatched')} dispatched, {before.get('verified')} verified, "
                  f"{before.get('transferring')} transferring",
                  flush=True)
            time.sleep(rng.uniform(0.05, 0.5))
            server = start_server(args.server, port, state_dir, server_log, args.ack, journal)
        time.sleep(2.0)
        get(port, "/quiesce")
        fleet.stdin.write("finish\n")
        fleet.stdin.flush()
        if fleet.wait(timeout=300) != 0:
            failures.append(f"the fleet did not settle (exit {fleet.returncode})")
        status = get(port, "/status")
        print(f"after the last restart: {status}", flush=True)
        if status.get("store_errors"):
            failures.append(f"store errors: {status['store_errors']}")
    finally:
        if fleet.poll() is None:
            fleet.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            failures.append("the server did not stop on SIGTERM")

    report = json.load(open(report_path))
    # The server's journal: tokens assigned per (run, device, seq), and per (run, device) the
    # highest seq whose commit was reported.
    assigned = {}
    stored_through = {}
    with open(journal) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 5 and parts[0] == "A":
                assigned.setdefault((parts[1], parts[2]), []).append((int(parts[3]), parts[4]))
            elif len(parts) == 4 and parts[0] == "S":
                key = (parts[1], parts[2])
                stored_through[key] = max(stored_through.get(key, 0), int(parts[3]))
    committed = {}  # device -> tokens whose commit was reported
    for (run, name), pairs in assigned.items():
        through = stored_through.get((run, name), 0)
        committed.setdefault(name, []).extend(tok for seq, tok in pairs if seq <= through)
    db = sqlite3.connect(os.path.join(state_dir, "devgate.db"))
    sha = expected_sha()
    chunks_per_image = (IMAGE_SIZE + CHUNK - 1) // CHUNK
    total_sent = total_chunks = total_delivers = total_committed = 0
    for name, d in sorted(report.items()):
        sent = d["sent"]
        total_sent += sent
        if d["unacknowledged"] or d["unacknowledged_dropped"]:
            failures.append(f"{name}: {d['unacknowledged']} sends unanswered, "
                            f"{d['unacknowledged_dropped']} let go")
        # Every acknowledged message in the sink's log exactly once (all were acknowledged).
        ids = [row[0] for row in db.execute(
            "SELECT id FROM messages WHERE device = ? ORDER BY id", (name,))]
        if ids != list(range(1, sent + 1)):
            dup = len(ids) - len(set(ids))
            missing = sorted(set(range(1, sent + 1)) - set(ids))[:5]
            failures.append(f"{name}: sink log has {len(ids)} rows for {sent} sends "
                            f"({dup} duplicates, missing {missing}...)")
        row = db.execute("SELECT messages_sent, last_seq FROM devices WHERE id = ?",
                         (name,)).fetchone()
        if row is None or row[0] != sent:
            failures.append(f"{name}: stored messages_sent {row and row[0]} != {sent} acknowledged")
        # Deliveries: 1..L in order, each once, none left kept.
        seqs = d["delivers"]
        total_delivers += len(seqs)
        if seqs != list(range(1, len(seqs) + 1)):
            failures.append(f"{name}: delivers out of order or with gaps: {seqs[:20]}...")
        tokens = d["tokens"]
        if len(tokens) != len(set(tokens)):
            failures.append(f"{name}: {len(tokens) - len(set(tokens))} delivers received twice "
                            "(the same data under another number)")
        lost = set(committed.get(name, [])) - set(tokens)
        total_committed += len(committed.get(name, []))
        if lost:
            failures.append(f"{name}: {len(lost)} committed delivers never received: "
                            f"{sorted(lost)[:5]}")
        kept = db.execute("SELECT COUNT(*) FROM replay WHERE device = ?", (name,)).fetchone()[0]
        if kept:
            failures.append(f"{name}: {kept} delivers still unacknowledged in the store")
        if row is not None and row[1] != len(seqs):
            failures.append(f"{name}: stored last_seq {row[1]} != {len(seqs)} delivers received")
        # Firmware: verified the right image, never restarted from 0 for lack of bytes.
        total_chunks += d["chunks"]
        if d["verified"] < 1 or d["failed"] or d["sha256"] != sha:
            failures.append(f"{name}: firmware verified {d['verified']} failed {d['failed']} "
                            f"sha {d['sha256'][:12]}")
        if d["firmware_restarts"]:
            failures.append(f"{name}: {d['firmware_restarts']} transfers restarted from 0")
    if total_committed == 0:
        failures.append("the server's journal reports no committed deliver: nothing was checked")
    # Resumed, not restarted: each kill re-sends at most a window of chunks per transfer.
    if total_chunks > DEVICES * chunks_per_image * 2:
        failures.append(f"{total_chunks} chunks for {DEVICES} devices of {chunks_per_image}: "
                        "transfers restarted instead of resuming")
    print(f"{len(report)} devices, {total_sent} messages acknowledged, {total_delivers} delivers "
          f"({total_committed} reported committed), "
          f"{total_chunks} chunks ({DEVICES * chunks_per_image} without kills), "
          f"{args.kills} kills", flush=True)
    for f in failures[:40]:
        print("FAIL", f)
    if failures:
        print(f"{len(failures)} failures; state kept in {work}")
        return 1
    shutil.rmtree(work)
    print("crash test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
