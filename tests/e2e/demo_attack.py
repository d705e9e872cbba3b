#!/usr/bin/python3
"""The demo server attacked as a hostile client would, while a well-behaved device is served.

Starts examples/demo_server on a free loopback port, connects one well-behaved device (Debian's
python3-websockets, a client no one here wrote) that sends a numbered `send` every 20 ms and
checks each `sent` arrives, in order and in time, and then runs the attacks one after another:

  pipeline   one keep-alive client pipelines GET requests and never reads a response;
             the server's RSS may grow by at most 16 MiB.
  devices    distinct device ids connect, say hello and leave, one after another, with
             --max-devices bounding the records held: the records held stay at the bound and
             memory grows by no more than the JSON-file store's entry per device.
  fragments  a message of endless 1-byte fragments is refused (1008/1009) early.
  slowreader a device subscribed to the `server` log that never reads: the server closes it or
             stops writing to it, its memory bounded.

Exits 0 when every attack was contained and the good device was served throughout.
Usage: demo_attack.py --server PATH [--attacks a,b,...] [--pipeline-requests N] [--devices N]
"""

import argparse
import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import websockets  # Debian python3-websockets

MIB = 1024 * 1024


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", flush=True)


T0 = time.monotonic()
failures = []


def check(ok, what):
    log(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loop_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metrics(port):
    """The /metrics page as {name: value} (labels kept in the name)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


# ---- raw WebSocket client pieces (for hostile byte sequences) -----------------------------

def upgrade_request(path):
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def frame(opcode, payload, fin=True):
    """A masked client frame (the mask is zero: XOR with it leaves the payload as it is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


async def read_frame(reader):
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


# ---- the well-behaved device --------------------------------------------------------------

class GoodDevice:
    """Sends a numbered `send` every 20 ms; every `sent` must come back in order within 5 s."""

    def __init__(self, port):
        self.port = port
        self.sent = 0
        self.answered = 0
        self.worst_ms = 0.0
        self.problems = []
        self.stop = False
        self.pending = {}

    async def run(self):
        try:
            async with websockets.connect(f"ws://127.0.0.1:{self.port}/ws/good-device",
                                          max_size=None, ping_interval=None) as ws:
                await ws.send(json.dumps({"type": "hello", "protocol": 1}))
                welcome = json.loads(await ws.recv())
                if welcome.get("type") != "welcome":
                    self.problems.append(f"no welcome: {welcome}")
                    return
                reader = asyncio.ensure_future(self.read(ws))
                while not self.stop and not self.problems:
                    self.sent += 1
                    self.pending[self.sent] = time.monotonic()
                    await ws.send(json.dumps({"type": "send", "id": self.sent, "data": "ping"}))
                    oldest = min(self.pending.values(), default=None)
                    if oldest is not None and time.monotonic() - oldest > 5:
                        self.problems.append(f"no `sent` for 5 s ({len(self.pending)} waiting)")
                    await asyncio.sleep(0.02)
                deadline = time.monotonic() + 10
                while self.pending and time.monotonic() < deadline and not self.problems:
                    await asyncio.sleep(0.05)
                reader.cancel()
        except Exception as e:  # noqa: BLE001 (any failure of the good device is a finding)
            self.problems.append(f"good device failed: {e!r}")

    async def read(self, ws):
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            if msg.get("type") != "sent":
                continue
            if msg["id"] != self.answered + 1:
                self.problems.append(f"`sent` {msg['id']} after {self.answered}")
            self.answered = msg["id"]
            started = self.pending.pop(msg["id"], None)
            if started is not None:
                self.worst_ms = max(self.worst_ms, (time.monotonic() - started) * 1000)


# ---- the attacks ----------------------------------------------------------------------------

def attack_pipeline(port, pid, requests):
    """Pipelines `requests` GETs on one keep-alive connection, never reading."""
    before = rss_bytes(pid)
    request = b"GET /marco HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    batch = request * 1000
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    written = 0
    stalled_since = None
    total = len(request) * requests
    view = memoryview(batch)
    offset = 0
    while written < total:
        try:
            n = s.send(view[offset:min(len(batch), offset + total - written)])
            written += n
            offset = (offset + n) % len(batch)
            stalled_since = None
        except BlockingIOError:
            # The server stopped reading (what it should do once its answers fill the limit).
            now = time.monotonic()
            stalled_since = stalled_since or now
            if now - stalled_since > 3:
                break
            time.sleep(0.01)
    time.sleep(1)
    grown = rss_bytes(pid) - before
    log(f"pipeline: wrote {written // len(request)} of {requests} requests without reading; "
        f"server RSS grew {grown / MIB:.1f} MiB")
    check(grown < 16 * MIB, f"pipelined GETs: server RSS growth {grown / MIB:.1f} MiB < 16 MiB")
    s.close()


async def one_device(port, name):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_request(f"/ws/{name}"))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"{name}: {head[:40]!r}")
        writer.write(frame(1, json.dumps({"type": "hello", "protocol": 1}).encode()))
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 1 and b'"welcome"' in payload:
                break
        writer.write(frame(8, struct.pack("!H", 1000)))
        await writer.drain()
    finally:
        writer.close()


async def attack_devices(port, pid, count, max_devices):
    """`count` distinct ids connect, hello and leave, 16 at a time."""
    marks = {}
    next_id = 0
    mark_at = {2 * max_devices, count // 2, count}

    async def lane():
        nonlocal next_id
        while next_id < count:
            next_id += 1
            n = next_id
            await one_device(port, f"attack-{n}")
            if n in mark_at:
                marks[n] = rss_bytes(pid)

    await asyncio.gather(*(lane() for _ in range(16)))
    await asyncio.sleep(1)
    m = metrics(port)
    held = m.get("devgate_devices_held", m.get("devices_held"))
    first, last = marks.get(2 * max_devices, 0), rss_bytes(pid)
    log(f"devices: {count} ids, RSS after {2 * max_devices}: {first / MIB:.1f} MiB, "
        f"after {count}: {last / MIB:.1f} MiB, records held: {held}")
    check(held is not None and held <= max_devices,
          f"device records held {held} <= --max-devices {max_devices}")
    # Flat past max_devices: the hub is bounded (tests/device/hub.cpp measures it with a store
    # that keeps nothing) and the demo's SQLite store keeps devices on disk, in memory only its
    # page cache (at most about 2 MiB). Measured: 2.4 MiB from 2,000 to 100,000 devices, 26
    # bytes per device; the JSON-file store it replaced kept every device in memory (about 220
    # bytes each), and before the hub was bounded it grew by about 3,000 bytes per device.
    per_device = (last - first) / max(1, count - 2 * max_devices)
    check(per_device < 64,
          f"RSS growth from {2 * max_devices} to {count} devices "
          f"{(last - first) / MIB:.1f} MiB, {per_device:.0f} bytes per device < 64 "
          f"(flat: SQLite's page cache, no per-device entry)")


async def attack_fragments(port):
    """One message of endless 1-byte continuation frames."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/ws/fragment-bomb"))
    await reader.readuntil(b"\r\n\r\n")
    writer.write(frame(1, json.dumps({"type": "hello", "protocol": 1}).encode()))
    await read_frame(reader)  # welcome
    writer.write(frame(1, b"x", fin=False))
    code = None
    sent = 0
    try:
        async def reader_task():
            while True:
                opcode, payload = await read_frame(reader)
                if opcode == 8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        task = asyncio.ensure_future(reader_task())
        while not task.done() and sent < 1_000_000:
            writer.write(frame(0, b"x", fin=False) * 1000)
            sent += 1000
            await writer.drain()
            await asyncio.sleep(0)
        code = await asyncio.wait_for(task, 10)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    writer.close()
    log(f"fragments: closed with {code} after {sent} fragments")
    check(code in (1008, 1009) and sent < 1_000_000,
          f"endless fragments refused early (close {code} after {sent} fragments)")


async def attack_slow_reader(port, pid, good):
    """Subscribes to the server log and never reads while the good device keeps it busy."""
    before = rss_bytes(pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(upgrade_request("/ws/slow-reader"))
    await reader.readuntil(b"\r\n\r\n")
    writer.write(frame(1, json.dumps({"type": "hello", "protocol": 1}).encode()))
    writer.write(frame(1, json.dumps({"type": "subscribe", "topic": "server"}).encode()))
    await writer.drain()
    # The good device sends 50 messages a second; add a burst of sends from the reader itself.
    for i in range(3000):
        writer.write(frame(1, json.dumps({"type": "send", "data": "x" * 200}).encode()))
        if i % 500 == 0:
            try:
                await asyncio.wait_for(writer.drain(), 2)
            except (asyncio.TimeoutError, ConnectionError):
                break
    await asyncio.sleep(3)
    grown = rss_bytes(pid) - before
    writer.close()
    log(f"slowreader: server RSS grew {grown / MIB:.1f} MiB")
    check(grown < 32 * MIB, f"a subscriber that never reads: RSS growth {grown / MIB:.1f} MiB")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--attacks", default="pipeline,devices,fragments,slowreader")
    ap.add_argument("--pipeline-requests", type=int, default=400_000)
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--max-devices", type=int, default=1000)
    args = ap.parse_args()
    attacks = args.attacks.split(",")

    port = free_port()
    argv = [args.server, "--port", str(port), "--address", "127.0.0.1", "--threads", "2"]
    if args.max_devices:
        argv += ["--max-devices", str(args.max_devices)]
    state = tempfile.TemporaryDirectory(prefix="devgate-attack-")
    argv += ["--state-dir", state.name]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:
        line = server.stdout.readline()
        if not line:
            print("demo_server exited before listening", file=sys.stderr)
            return 1
        if "listening on" in line:
            break
    server_log = []
    # Keep reading the server's output: a full pipe would block the server's writes.
    drain = loop_thread(lambda: server_log.extend(server.stdout))
    log(f"demo_server pid {server.pid} on port {port}, RSS {rss_bytes(server.pid) / MIB:.1f} MiB")

    good = GoodDevice(port)
    good_task = asyncio.ensure_future(good.run())
    await asyncio.sleep(0.5)
    loop = asyncio.get_running_loop()
    for name in attacks:
        log(f"attack: {name}")
        if name == "pipeline":
            await loop.run_in_executor(None, attack_pipeline, port, server.pid,
                                       args.pipeline_requests)
        elif name == "devices":
            await attack_devices(port, server.pid, args.devices, args.max_devices)
        elif name == "fragments":
            await attack_fragments(port)
        elif name == "slowreader":
            await attack_slow_reader(port, server.pid, good)
        else:
            print(f"unknown attack {name}", file=sys.stderr)
            return 2
        check(server.poll() is None, f"demo_server still running after {name}")
        if server.poll() is not None:
            break
    good.stop = True
    await good_task
    check(not good.problems and good.answered == good.sent and good.sent > 0,
          f"good device served throughout: {good.answered}/{good.sent} `sent`, "
          f"worst {good.worst_ms:.0f} ms {good.problems[:3]}")
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            check(False, "demo_server stops within 30 s of SIGTERM")
        drain.join()
        print("".join(server_log[-5:]), end="")
        check(server.returncode == 0, f"demo_server exit code {server.returncode}")
    print("attacks: " + ("all contained" if not failures else f"{len(failures)} failed: {failures}"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
