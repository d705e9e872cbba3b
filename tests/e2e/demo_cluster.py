#!/usr/bin/python3
"""Three demo nodes and one Redis behave as one gateway: one server log, one device state.

Starts its own redis-server (no persistence, a temporary directory) on a free loopback port and
three examples/demo_server nodes with `--redis redis://127.0.0.1:<port> --node-id <a|b|c>`, then,
with clients no one here wrote (Debian's python3-websockets):
  - on each node an observer subscribes to the `server` topic, and a device on each node sends;
    every observer sees every node's dispatched messages, each exactly once;
  - a page on node c subscribed to `stats` shows the cluster's figures (3 nodes, every
    connected device, every dispatched message);
  - a device leaves node b (which dispatches slowly) right after a burst: the receipts of what
    b dispatched after it left reach it on node c through Redis, once each, and b never takes
    it back;
  - a device moves a -> b -> c: b takes it over from a (a closes with 4000), its message count,
    epoch and the receipts kept for it follow it, each delivered once in order;
  - Redis stopped: a node's own observer still sees its node's messages, the others do not
    (Redis pub/sub keeps nothing), /healthz says degraded (200: the node still serves its
    devices) and /metrics has Redis down and the missed events counted; Redis restarted on the
    same port (empty): the nodes reconnect and resubscribe by themselves, devices whose state
    was lost are let go with 1013 and reconnect, the log is shared again and /healthz is ok;
  - a release published on node a (operator API) reaches devices on all three nodes, one that
    connects later included; each verifies the same image, the transfer cap (2, the cluster's)
    holds across the nodes, and every node's /metrics shows the same fleet totals; the release
    is a default campaign that node a runs, counting the other nodes' devices verified;
  - node c killed (SIGKILL) with a device on it: the device resumes on node a;
  - SIGTERM stops every other node with exit code 0.
Usage: demo_cluster.py --server PATH
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
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


TOKEN = "cluster-operator-token-for-this-run"
FIRMWARE_SIZE = 256 * 1024
CAP = 2  # the cluster's transfer cap (--max-transfers)
# The release this test publishes (the nodes' first). The observers and the message senders say
# they run it already, so the rollout skips them (they read no firmware); the FwDevices get it.
RELEASE = "1.1.0"


# Node b dispatches slowly (a simulated downstream call per message), so that a device that
# leaves it right after a burst has receipts numbered after it left (routed to its new node).
DISPATCH_US = {"a": 0, "b": 20000, "c": 0}


def start_node(server, d, name, redis_port):
    state = os.path.join(d, name)
    os.makedirs(state)
    token_file = os.path.join(d, "operator-token")
    with open(token_file, "w") as f:
        f.write(TOKEN)
    argv = [server, "--port", "0", "--address", "127.0.0.1", "--threads", "1",
            "--dispatch-us", str(DISPATCH_US[name]), "--state-dir", state, "--operator-token-file", token_file,
            "--firmware-size", str(FIRMWARE_SIZE), "--max-transfers", str(CAP),
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
            # What the node says from now on (store errors while Redis is away...) is read as it
            # comes, so a full pipe never holds up the node, and echoed to this test's output.
            threading.Thread(target=echo_output, args=(proc.stdout, name), daemon=True).start()
            return proc, int(line.split()[2].rstrip(";"))


def echo_output(stream, name):
    for line in stream:
        sys.stdout.write(f"  [node {name}] {line}")


class Observer:
    """A page's view of the server log: the (device, seq) of every event it receives."""

    def __init__(self, port, name):
        self.port = port
        self.name = name
        self.seen = []
        self.from_log = set()  # taken from /api/log after a reconnect, not (yet) live
        self.history = []  # its sessions' ends and failed reconnects, for a failure's message

    def describe(self):
        return f"observer {self.name}: {self.history[-5:] or 'one session, still open'}"

    def backfill(self):
        """As the demo's page does after it (re)connects: the node's recent log fills what the
        page missed while it was away (each message still once)."""
        _, body = get(self.port, "/api/log")
        for e in json.loads(body):
            m = (e["data"]["device"], e["data"]["seq"])
            if m not in self.seen:
                self.seen.append(m)
                self.from_log.add(m)

    async def run(self, ready):
        retry_until = None  # while reconnecting after 1013: the node may still be coming back
        while True:
            try:
                async with websockets.connect(f"ws://127.0.0.1:{self.port}/ws/{self.name}",
                                              open_timeout=20) as ws:
                    await ws.send(json.dumps({"type": "hello", "protocol": 1,
                                              "firmware_version": RELEASE}))
                    await ws.send(json.dumps({"type": "subscribe", "topic": "server"}))
                    while json.loads(await ws.recv()).get("type") != "subscribed":
                        pass
                    if ready.is_set():  # a reconnect: what was logged meanwhile
                        self.backfill()
                    ready.set()
                    retry_until = None
                    async for raw in ws:
                        msg = json.loads(raw)
                        if msg.get("type") == "event" and msg.get("topic") == "server":
                            m = (msg["data"]["device"], msg["data"]["seq"])
                            if m in self.from_log:  # logged and live both: seen once
                                self.from_log.discard(m)
                            else:
                                self.seen.append(m)
            except websockets.ConnectionClosed as e:
                # 1013: the node let the page go (Redis lost its state); it comes back, as the
                # demo's page does.
                self.history.append(f"closed {e.rcvd.code if e.rcvd else None}")
                if not (e.rcvd and e.rcvd.code == 1013):
                    return
                retry_until = time.monotonic() + 20
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as e:
                # A reconnect refused or not answered in time: tried again for 20 s.
                self.history.append(f"reconnect failed: {e!r}")
                if retry_until is None or time.monotonic() > retry_until:
                    return
                await asyncio.sleep(0.2)
            else:
                self.history.append("ended")
                return

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
        self.closes = []  # close codes the node sent

    async def open(self):
        self.ws = await websockets.connect(f"ws://127.0.0.1:{self.port}/ws/{self.name}",
                                           open_timeout=20)
        await self.ws.send(json.dumps({"type": "hello", "protocol": 1,
                                       "firmware_version": RELEASE}))

    async def send(self):
        """Sends one message, waits for its answer: `sent`, or `not_dispatched` when the node
        could not record it (Redis down: the sink has it all the same, at least once). A session
        the node closed with 1013 (another node owns the device by now, as after Redis lost its
        data) is reopened and the message sent again. Returns its seq in the server log."""
        before = len(self.local.seqs(self.name))
        self.next_id += 1
        for _ in range(5):
            try:
                await self.ws.send(json.dumps({"type": "send", "id": self.next_id,
                                               "data": "reading"}))
                while True:
                    msg = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
                    if msg.get("id") == self.next_id and (
                            msg.get("type") == "sent" or msg.get("code") == "not_dispatched"):
                        break
                break
            except websockets.ConnectionClosed as e:
                self.closes.append(e.rcvd.code if e.rcvd else None)
                await self.open()
        if not await until(lambda: len(self.local.seqs(self.name)) > before):
            raise RuntimeError(f"{self.name}'s own node did not log its message "
                               f"({self.local.describe()})")
        return self.local.seqs(self.name)[before]


async def until(pred, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


async def hello(port, name, last_seq=0):
    """Opens a session for device `name` on the node at `port`; returns it and its welcome."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/{name}", open_timeout=20)
    await ws.send(json.dumps({"type": "hello", "protocol": 1, "last_seq": last_seq,
                              "firmware_version": RELEASE}))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if msg.get("type") == "welcome":
            return ws, msg


async def one_fleet(ports, observers):
    """A device's state, its kept deliveries and its session follow it from node to node."""
    # On a: three messages, each answered `sent` once in Redis; each dispatch also sends the
    # device a sequenced receipt (`deliver`, kind "dispatched"), which the device never reads.
    ws_a, welcome = await hello(ports["a"], "mover")
    epoch = welcome.get("epoch", "")
    check(len(epoch) == 16, f"the welcome carries the cluster's epoch ({epoch!r})")
    for i in (1, 2, 3):
        await ws_a.send(json.dumps({"type": "send", "id": i, "data": f"m{i}"}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws_a.recv(), 20))
            if msg.get("type") == "sent" and msg.get("id") == i:
                break
    # The device opens a session on b while still connected to a: b takes it over, a closes
    # its session with 4000.
    ws_b, welcome = await hello(ports["b"], "mover")
    closed = None
    try:
        while True:
            await asyncio.wait_for(ws_a.recv(), 20)
    except websockets.ConnectionClosed as e:
        closed = e.rcvd.code if e.rcvd else None
    except asyncio.TimeoutError:
        pass
    check(closed == 4000, f"node a closed the device's old session with 4000 ({closed})")
    state = welcome.get("state", {})
    check(state.get("messages_sent") == 3,
          f"node b's welcome has the 3 messages sent on node a ({state.get('messages_sent')})")
    check(welcome.get("epoch") == epoch, "the epoch is the same on node b")
    check(welcome.get("replay") == 3, f"node b replays the 3 receipts kept ({welcome.get('replay')})")
    got = []
    while len(got) < 3:
        msg = json.loads(await asyncio.wait_for(ws_b.recv(), 20))
        if msg.get("type") == "deliver":
            got.append((msg["seq"], msg["data"].get("kind"), msg["data"].get("message")))
    check(got == [(1, "dispatched", 1), (2, "dispatched", 2), (3, "dispatched", 3)],
          f"node b delivered the receipts kept by node a, once each, in order ({got})")
    for seq, _, _ in got:
        await ws_b.send(json.dumps({"type": "ack", "seq": seq}))
    # Message 4 on b: its `sent`, and its receipt (seq 4: numbering continues), in either order.
    await ws_b.send(json.dumps({"type": "send", "id": 4, "data": "m4"}))
    sent, receipt = False, None
    while not (sent and receipt):
        msg = json.loads(await asyncio.wait_for(ws_b.recv(), 20))
        sent = sent or (msg.get("type") == "sent" and msg.get("id") == 4)
        if msg.get("type") == "deliver":
            receipt = msg
    check(receipt["seq"] == 4, f"numbering continued on node b ({receipt['seq']})")
    await ws_b.send(json.dumps({"type": "ack", "seq": 4}))
    await asyncio.sleep(0.2)
    await ws_b.close()
    ws_c, welcome = await hello(ports["c"], "mover", last_seq=4)
    state = welcome.get("state", {})
    check(state.get("messages_sent") == 4 and welcome.get("replay") == 0 and
          welcome.get("last_seq") == 4,
          f"node c's welcome: 4 sent, nothing to replay, last_seq 4 ({welcome})")
    await ws_c.close()
    _, metrics = get(ports["b"], "/metrics")
    takeovers = re.search(r"^devgate_cluster_takeovers_total (\d+)$", metrics, re.M)
    check(takeovers is not None and int(takeovers.group(1)) >= 1,
          "node b's /metrics counts its takeover")
    return epoch


async def fleet_stats(ports, observers, devices):
    """A page on any node shows the cluster's figures: summed over the three nodes."""
    ws, _ = await hello(ports["c"], "stats-page")
    await ws.send(json.dumps({"type": "subscribe", "topic": "stats"}))
    # 3 observers, 3 devices and this page; every message the nodes dispatched (each node's
    # observer saw each of its own node's).
    want = (3, 7, sum(len(set(observers[n].seqs(d.name))) for n, d in devices.items()))
    got = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and got != want:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("type") == "event" and msg.get("topic") == "stats":
            d = msg["data"]
            got = (d.get("nodes"), d.get("connected"), d.get("dispatched"))
    check(got == want, f"a page on node c shows the cluster's nodes, connected devices and "
                       f"dispatched messages {want} ({got})")
    await ws.close()


async def routed_receipts(ports, observers):
    """A device leaves node b right after a burst: b dispatches the rest after it left, and
    their receipts reach the device on node c through Redis; b never takes it back."""
    ws_b, _ = await hello(ports["b"], "router")
    for i in range(1, 31):
        await ws_b.send(json.dumps({"type": "send", "id": i, "data": f"r{i}"}))
    await asyncio.sleep(0.05)  # b has read them (it dispatches one per 20 ms)
    ws_c, welcome = await hello(ports["c"], "router")
    try:
        while True:
            await asyncio.wait_for(ws_b.recv(), 5)
    except (websockets.ConnectionClosed, asyncio.TimeoutError):
        pass
    # Every message b dispatched: its log has each once.
    logged = lambda: sorted(q for (dev, q) in observers["b"].seen if dev == "router")
    before = None
    while before != logged():
        before = logged()
        await asyncio.sleep(0.5)
    _, metrics = get(ports["b"], "/metrics")
    routed = re.search(r"^devgate_cluster_routed_out_total (\d+)$", metrics, re.M)
    routed = int(routed.group(1)) if routed else 0
    check(routed > 0, f"node b routed receipts to node c ({routed})")
    # Node c delivers the routed ones and replays those b kept before the device left (b's
    # receipts numbered in the moment between c's claim and b hearing of it are refused by the
    # fence: counted on b, not delivered).
    receipts, closed = {}, None
    try:
        while True:
            wait = 2 if len(receipts) >= routed else 10
            msg = json.loads(await asyncio.wait_for(ws_c.recv(), wait))
            if msg.get("type") == "deliver" and msg["data"].get("kind") == "dispatched":
                check(msg["data"]["message"] not in receipts,
                      f"receipt of message {msg['data']['message']} once")
                receipts[msg["data"]["message"]] = msg["seq"]
                await ws_c.send(json.dumps({"type": "ack", "seq": msg["seq"]}))
    except websockets.ConnectionClosed as e:
        closed = e.rcvd.code if e.rcvd else None
    except asyncio.TimeoutError:
        pass
    check(closed is None, f"node c kept the device while node b dispatched its burst ({closed})")
    seqs = sorted(receipts.values())
    check(routed <= len(receipts) <= len(before) and set(receipts) <= set(before) and
          seqs == list(range(1, len(seqs) + 1)),
          f"node c delivered every routed receipt and those b kept, each once, numbered "
          f"1..{len(seqs)} ({len(receipts)} of {len(before)} dispatched, {routed} routed)")
    await ws_c.close()


async def scenario(ports, redis, nodes):
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

    await fleet_stats(ports, observers, devices)
    epoch_before = await one_fleet(ports, observers)
    await routed_receipts(ports, observers)
    await fleet_rollout(ports)

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
    # Redis came back empty: the nodes' next writes for their devices bounced (no owner), so
    # they let those devices go with 1013; the devices reconnected, and a welcome now carries a
    # new epoch (the history is gone, and the device can tell).
    closes = [c for d in devices.values() for c in d.closes]
    check(1013 in closes, f"the devices whose state Redis lost were let go with 1013 ({closes})")
    ws, welcome = await hello(ports["c"], "mover", last_seq=4)
    check(len(welcome.get("epoch", "")) == 16 and welcome.get("epoch") != epoch_before,
          f"the epoch changed with Redis's data ({epoch_before} -> {welcome.get('epoch')})")
    await ws.close()
    status, body = get(ports["a"], "/healthz")
    check(status == 200 and body == "ok\n", f"/healthz is ok again ({body.strip()})")
    _, metrics = get(ports["a"], "/metrics")
    check("devgate_cluster_redis_up 1" in metrics, "/metrics says Redis is up")

    await node_killed(ports, nodes)

    for n, d in devices.items():
        if n in ports:
            await d.ws.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class FwDevice:
    """A device that downloads firmware as docs/PROTOCOL.md says: acknowledges each chunk, then
    reports the SHA-256 of the whole image."""

    def __init__(self, port, name):
        self.port, self.name = port, name
        self.image = bytearray()
        self.sha = None
        self.status = None
        self.receiving = False

    async def run(self, live):
        async with websockets.connect(f"ws://127.0.0.1:{self.port}/ws/{self.name}",
                                      open_timeout=20, max_size=None) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": 1, "last_seq": 0,
                                      "firmware_version": "1.0.0"}))
            rollout, got = 0, 0
            async for msg in ws:
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m.get("type") == "firmware":
                        rollout, got = m["rollout"], m["offset"]
                        self.image = self.image[:got].ljust(m["size"], b"\0")
                        self.receiving = True
                        live.add(self.name)
                    elif m.get("type") == "fw_status":
                        self.status = m.get("status")
                        self.receiving = False
                        live.discard(self.name)
                        return
                    continue
                kind, hlen = msg[0], msg[1]
                r, off, n = (int.from_bytes(msg[i:i + 4], "big") for i in (4, 8, 12))
                if kind != 1 or r != rollout or off != got:
                    continue
                self.image[off:off + n] = msg[hlen:hlen + n]
                got += n
                await ws.send(json.dumps({"type": "fw_ack", "rollout": rollout, "offset": got}))
                if got == len(self.image):
                    self.sha = hashlib.sha256(self.image).hexdigest()
                    live.discard(self.name)  # done on its side; the slot frees at the result
                    await ws.send(json.dumps({"type": "fw_result", "rollout": rollout,
                                              "ok": True, "sha256": self.sha}))


def post_release(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/firmware/release", data=b"",
                                 method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read().decode())


def get_json(port, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode())


def rollout_metrics(port):
    _, text = get(port, "/metrics")
    out = {}
    for key in ("rollout", "rollout_verified", "rollout_pending", "rollout_transferring"):
        m = re.search(rf"^devgate_firmware_{key} (\d+)$", text, re.M)
        out[key] = int(m.group(1)) if m else None
    return out


async def fleet_rollout(ports):
    """A release published on node a reaches devices on every node, under the cluster's cap."""
    devices = [FwDevice(ports[n], f"fw-{n}{i}") for n in NODES for i in range(3)]
    live, most = set(), [0]
    tasks = [asyncio.create_task(d.run(live)) for d in devices]

    async def watch():
        while True:
            most[0] = max(most[0], len(live))
            await asyncio.sleep(0.002)
    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.5)  # every device said hello
    status, body = post_release(ports["a"])
    check(status == 202, f"node a took the release ({status} {body})")
    await asyncio.sleep(0.2)
    late = FwDevice(ports["c"], "fw-late")  # connects after the publish, to another node
    devices.append(late)
    tasks.append(asyncio.create_task(late.run(live)))
    done, pending = await asyncio.wait(tasks, timeout=60)
    for t in pending:
        t.cancel()
    watcher.cancel()
    for t in done:
        if t.exception():
            check(False, f"a firmware device failed: {t.exception()!r}")
    statuses = {d.name: d.status for d in devices}
    check(all(s == "verified" for s in statuses.values()),
          f"the release published on node a was verified by devices on all three nodes "
          f"({statuses})")
    shas = {d.sha for d in devices}
    check(len(shas) == 1, f"every node sent the same image ({len(shas)} different)")
    check(most[0] <= CAP, f"at most {CAP} transfers at once over the three nodes ({most[0]})")
    check(body.get("version") == RELEASE, f"the release is {RELEASE} ({body})")
    # Every node shows the fleet's totals (devices on any node, and the offline ones the nodes
    # know, counted once): the same figures, the FwDevices verified.
    def totals():
        return [rollout_metrics(ports[n]) for n in NODES]
    same = await until(lambda: all(t == totals()[0] for t in totals()) and
                       totals()[0]["rollout_verified"] == len(devices) and
                       totals()[0]["rollout_transferring"] == 0, 10)
    check(same and totals()[0]["rollout"], f"every node's /metrics shows the same fleet totals "
                                           f"({totals()}; {len(devices)} verified)")
    # The release is a default campaign run by node a over every node's devices: its counts
    # come from the other nodes' reports (the late device on node c joined at its hello).
    campaigns = {n: get_json(ports[n], "/api/campaigns")["campaigns"] for n in NODES}
    newest = campaigns["a"][0] if campaigns["a"] else {}
    check(newest.get("name") == "release 1" and newest.get("counts", {}).get("verified") ==
          len(devices), f"node a's campaign 'release 1' counts the {len(devices)} devices of the "
          f"three nodes verified ({newest})")
    check(campaigns["b"] == [] and campaigns["c"] == [],
          f"nodes b and c run no campaign of their own ({campaigns['b']}, {campaigns['c']})")


async def node_killed(ports, nodes):
    """Node c is killed (SIGKILL) with a device on it: the device reconnects to node a and
    resumes there with its count and the receipts kept for it."""
    ws, _ = await hello(ports["c"], "survivor")
    for i in (1, 2):
        await ws.send(json.dumps({"type": "send", "id": i, "data": f"s{i}"}))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if msg.get("type") == "sent" and msg.get("id") == i:
                break
    nodes["c"].kill()
    nodes["c"].wait()
    del ports["c"]
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 20)
    except (websockets.ConnectionClosed, asyncio.TimeoutError):
        pass
    ws, welcome = await hello(ports["a"], "survivor")
    state = welcome.get("state", {})
    check(state.get("messages_sent") == 2 and welcome.get("replay") == 2,
          f"after node c was killed, node a resumed its device: 2 sent, 2 receipts replayed "
          f"({state.get('messages_sent')}, {welcome.get('replay')})")
    await ws.close()


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
            asyncio.run(scenario(ports, redis, nodes))
        finally:
            for n, proc in nodes.items():
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                check(proc.returncode in ((0,) if n != "c" else (0, -9)),
                      f"node {n} exit code {proc.returncode}")
            redis.stop()
    print("demo cluster: " + ("ok" if not failures else f"{len(failures)} failed: {failures}"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
