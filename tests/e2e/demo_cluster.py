#!/usr/bin/python3
"""Three demo nodes and one Redis: every node's server log reaches the pages of every node.

Starts its own redis-server (no persistence, a temporary directory) on a free loopback port and
three examples/demo_server nodes with `--redis redis://127.0.0.1:<port> --node-id <a|b|c>`, then,
with clients no one here wrote (Debian's python3-websockets):
  - on each node an observer subscribes to the `server` topic, and a device on each node sends;
    every observer sees every node's dispatched messages, each exactly once;
  - Redis stopped: a node's own observer still sees its node's messages, the others do not
    (Redis pub/sub keeps nothing), /healthz says degraded (200: the node still serves its
    devices) and /metrics has Redis down and the missed events counted; Redis restarted on the
    same port: the nodes reconnect and resubscribe by themselves, the log is shared again and
    /healthz is ok;
  - SIGTERM stops every node with exit code 0.
Usage: demo_cluster.py --server PATH
"""

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets  # Debian python3-websockets

failures = []
NODES = ("a", "b", "c")


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Redis:
    def __init__(self, d):
        self.d = d
        self.port = free_port()
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.d, "--logfile", f"{self.d}/redis.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not accepts(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read().decode()


def start_node(server, d, name, redis_port):
    state = os.path.join(d, name)
    os.makedirs(state)
    argv = [server, "--port", "0", "--address", "127.0.0.1", "--threads", "1",
            "--dispatch-us", "0", "--state-dir", state,
            "--redis", f"redis://127.0.0.1:{redis_port}", "--node-id", name]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    banner = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node {name} exited before listening:\n" + "".join(banner))
        banner.append(line)
        if line.startswith("listening on "):
            check(any(f"node   {name} of the cluster" in b for b in banner),
                  f"node {name}'s banner names its cluster")
            return proc, int(line.split()[2].rstrip(";"))


class Observer:
    """A page's view of the server log: the (device, seq) of every event it receives."""

    def __init__(self, port, name):
        self.port = port
        self.name = name
        self.seen = []

    async def run(self, ready):
        async with websockets.connect(f"ws://127.0.0.1:{self.port}/ws/{self.name}",
                                      open_timeout=20) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": 1}))
            await ws.send(json.dumps({"type": "subscribe", "topic": "server"}))
            ready.set()
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "event" and msg.get("topic") == "server":
                    self.seen.append((msg["data"]["device"], msg["data"]["seq"]))

    def count(self, device, seq):
        return self.seen.count((device, seq))

    def seqs(self, device):
        return [q for (dev, q) in self.seen if dev == device]


class Device:
    """A device on one node; `local` is the observer on the same node (it sees every message
    the node dispatches, so it tells the server log's number of each message sent)."""

    def __init__(self, port, name, local):
        self.port = port
        self.name = name
        self.local = local
        self.ws = None
        self.next_id = 0

    async def open(self):
        self.ws = await websockets.connect(f"ws://127.0.0.1:{self.port}/ws/{self.name}",
                                           open_timeout=20)
        await self.ws.send(json.dumps({"type": "hello", "protocol": 1}))

    async def send(self):
        """Sends one message, waits for its `sent`; returns its seq in the server log."""
        before = len(self.local.seqs(self.name))
        self.next_id += 1
        await self.ws.send(json.dumps({"type": "send", "id": self.next_id, "data": "reading"}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if msg.get("type") == "sent" and msg.get("id") == self.next_id:
                break
        if not await until(lambda: len(self.local.seqs(self.name)) > before):
            raise RuntimeError(f"{self.name}'s own node did not log its message")
        return self.local.seqs(self.name)[before]


async def until(pred, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def scenario(ports, redis):
    observers = {n: Observer(ports[n], f"watch-{n}") for n in NODES}
    tasks = []
    for o in observers.values():
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(o.run(ready)))
        await asyncio.wait_for(ready.wait(), 20)
    devices = {n: Device(ports[n], f"dev-{n}", observers[n]) for n in NODES}
    for d in devices.values():
        await d.open()

    # Each node learns within a refresh (100 ms) that the others subscribe: probe until every
    # observer has seen a message from every node, then count exactly.
    async def shared():
        for n, d in devices.items():
            seq = await d.send()
            if not await until(lambda: all(o.count(d.name, seq) for o in observers.values()), 2):
                return False
        return True
    ok = False
    for _ in range(20):
        if await shared():
            ok = True
            break
    check(ok, "the server log is shared by the three nodes")

    sent = []
    for _ in range(5):
        for d in devices.values():
            sent.append((d.name, await d.send()))
    everyone = await until(lambda: all(all(o.count(*m) == 1 for m in sent)
                                       for o in observers.values()))
    check(everyone, "every observer saw each of the 15 messages of the three nodes exactly once")
    await asyncio.sleep(0.3)
    dupes = [(o.name, m) for o in observers.values() for m in sent if o.count(*m) != 1]
    check(not dupes, f"no message seen twice ({dupes[:3]})")

    # Redis away: each node still serves its own pages; the others miss what Redis would carry.
    redis.stop()
    await asyncio.sleep(0.5)
    during = (devices["a"].name, await devices["a"].send())
    check(await until(lambda: observers["a"].count(*during) == 1),
          "with Redis down, node a's own observer still sees node a's messages")
    await asyncio.sleep(0.5)
    check(observers["b"].count(*during) == 0 and observers["c"].count(*during) == 0,
          "with Redis down, the other nodes do not (pub/sub keeps nothing)")
    status, body = get(ports["a"], "/healthz")
    check(status == 200 and body.startswith("degraded"), f"/healthz says degraded ({body.strip()})")
    _, metrics = get(ports["a"], "/metrics")
    check("devgate_cluster_redis_up 0" in metrics, "/metrics says Redis is down")
    missed = re.search(r"^devgate_cluster_publish_failed_total (\d+)$", metrics, re.M)
    check(missed is not None and int(missed.group(1)) > 0,
          "/metrics counts the server log events the other nodes missed")

    # Redis back on the same port: the nodes reconnect, resubscribe, and share again.
    redis.start()
    ok = False
    for _ in range(40):
        if await shared():
            ok = True
            break
        await asyncio.sleep(0.25)
    check(ok, "after Redis restarted, the server log is shared again")
    status, body = get(ports["a"], "/healthz")
    check(status == 200 and body == "ok\n", f"/healthz is ok again ({body.strip()})")
    _, metrics = get(ports["a"], "/metrics")
    check("devgate_cluster_redis_up 1" in metrics, "/metrics says Redis is up")

    for d in devices.values():
        await d.ws.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="devgate-demo-cluster-") as d:
        redis = Redis(d)
        redis.start()
        nodes = {}
        try:
            ports = {}
            for n in NODES:
                nodes[n], ports[n] = start_node(args.server, d, n, redis.port)
            asyncio.run(scenario(ports, redis))
        finally:
            for n, proc in nodes.items():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                check(proc.returncode == 0, f"node {n} exit code {proc.returncode}")
            redis.stop()
    print("demo cluster: " + ("ok" if not failures else f"{len(failures)} failed: {failures}"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
