#!/usr/bin/env python3
"""Rollout campaigns through the demo's operator API (docs/ROLLOUTS.md), with devices played by
a client no one here wrote (Debian's python3-websockets) speaking docs/PROTOCOL.md:

  - the campaign routes need the bearer token (401 without, 403 wrong); bad bodies, fields,
    filters and actions are refused with a JSON error naming the field;
  - 40 devices (20 in region eu, 20 in us); a campaign for region eu in two waves of 50%, a
    success threshold of 90% and an error threshold of 20% once 5 are done; 4 devices of wave
    2 fail verification -> the campaign pauses with the reason, the failures are listed
    (filtered, paged); the us devices never receive a byte;
  - the devices are fixed and the campaign resumed -> it completes, every eu device verified;
  - /metrics carries the campaign's figures; a page subscribed to `stats` sees the campaign;
  - a second campaign at 30 a minute is cancelled: its state and the 409 of a resume after it;
  - an image staged with POST /api/firmware?stage=1 rolls out as a campaign by its SHA-256.

Usage: demo_campaigns.py --server PATH
"""
import argparse
import asyncio
import hashlib
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import websockets  # Debian python3-websockets

T0 = time.monotonic()
failures = []
TOKEN = "campaign-test-" + os.urandom(8).hex()


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def check(ok, what):
    log(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, method, path, body=None, token=TOKEN, raw=None):
    """One request; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


class Device:
    """A device: hello with attributes, firmware chunks acknowledged, the result reported."""

    def __init__(self, port, name, region):
        self.port, self.name, self.region = port, name, region
        self.fail = False       # report a failed verification
        self.bytes = 0          # firmware bytes received, every transfer
        self.verified = []      # versions the server confirmed
        self.told = []          # fw_status reasons of failures
        self.fw = None
        self.task = None

    async def run(self):
        async with websockets.connect(f"ws://127.0.0.1:{self.port}/ws/{self.name}",
                                      open_timeout=20, max_size=None) as ws:
            await ws.send(json.dumps({"type": "hello", "protocol": 1, "last_seq": 0,
                                      "firmware_version": "1.0.0",
                                      "attributes": {"region": self.region}}))
            async for msg in ws:
                if isinstance(msg, bytes):
                    await self.chunk(ws, msg)
                    continue
                j = json.loads(msg)
                t = j.get("type")
                if t == "firmware":
                    if not self.fw or self.fw["rollout"] != j["rollout"]:
                        self.fw = {"rollout": j["rollout"], "buf": bytearray(j["size"])}
                    self.fw.update(sha=j["sha256"], have=j["offset"], size=j["size"])
                elif t == "fw_status":
                    if j["status"] == "verified":
                        self.verified.append(j["rollout"])
                    else:
                        self.told.append(j.get("reason", ""))

    async def chunk(self, ws, data):
        _, hlen, _, _, rollout, offset, length = struct.unpack(">BBBBIII", data[:16])
        fw = self.fw
        if not fw or fw["rollout"] != rollout or offset != fw["have"]:
            return
        fw["buf"][offset:offset + length] = data[hlen:hlen + length]
        fw["have"] += length
        self.bytes += length
        await ws.send(json.dumps({"type": "fw_ack", "rollout": rollout, "offset": fw["have"]}))
        if fw["have"] == fw["size"]:
            digest = hashlib.sha256(bytes(fw["buf"])).hexdigest()
            if self.fail:
                await ws.send(json.dumps({"type": "fw_result", "rollout": rollout, "ok": False,
                                          "reason": "verification failed on the device"}))
            else:
                await ws.send(json.dumps({"type": "fw_result", "rollout": rollout, "ok": True,
                                          "sha256": digest}))


async def wait_for(what, fn, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        await asyncio.sleep(0.1)
    check(False, f"{what} (timed out after {timeout} s)")
    return None


async def scenario(port):
    loop = asyncio.get_running_loop()

    def call(*a, **k):
        return loop.run_in_executor(None, lambda: api(port, *a, **k))

    # The routes need the token; bad input is refused naming the field.
    st, _ = await call("GET", "/api/campaigns", token=None)
    check(st == 401, f"GET /api/campaigns without a token: 401 (got {st})")
    st, _ = await call("GET", "/api/campaigns", token="wrong")
    check(st == 403, f"with a wrong token: 403 (got {st})")
    for body, want in [
        ({"waves": [{"percent": 60}, {"percent": 60}]}, "waves: percentages add up to more than 100"),
        ({"success_threshold": 101}, "success_threshold: must be between 0 and 100"),
        ({"colour": "red"}, "colour: unknown field"),
        ({"firmware": "mine"}, "firmware: must be"),
        ({"rate": {"per_minute": -1}}, "rate.per_minute: must be between 0 and 1000000"),
    ]:
        st, j = await call("POST", "/api/campaigns", body)
        check(st == 400 and isinstance(j, dict) and j.get("error", "").startswith(want),
              f"POST {json.dumps(body)}: 400 {want!r} (got {st} {j})")
    st, j = await call("POST", "/api/campaigns", raw=b"{not json")
    check(st == 400 and j.get("error") == "body: must be a JSON object", f"bad JSON: 400 ({j})")
    st, j = await call("PUT", "/api/campaigns")
    check(st == 405, f"PUT: 405 (got {st})")
    st, j = await call("GET", "/api/campaigns/99")
    check(st == 404, f"an unknown campaign: 404 (got {st})")

    # A fleet: 20 devices in eu, 20 in us.
    devices = [Device(port, f"dev{i:02d}", "eu" if i % 2 == 0 else "us") for i in range(40)]
    for d in devices:
        d.task = asyncio.create_task(d.run())
    eu = [d for d in devices if d.region == "eu"]
    us = [d for d in devices if d.region == "us"]
    await asyncio.sleep(1.0)
    # Wave 2 is the second half of the eu devices by id: dev20, dev22...; 4 of them fail.
    for d in eu[10:14]:
        d.fail = True
    spec = {"name": "eu staged", "target": {"attributes": {"region": "eu"}},
            "waves": [{"percent": 50}, {"percent": 50}], "success_threshold": 90,
            "error_threshold": {"percent": 20, "min_executed": 5}}
    st, j = await call("POST", "/api/campaigns", spec)
    check(st == 202 and "campaign" in j, f"campaign created: 202 ({j})")
    cid = j["campaign"]

    async def state_of(c):
        s, body = await call("GET", f"/api/campaigns/{c}")
        return body if s == 200 else {}

    got = {}

    async def poll(c, want):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got.update(await state_of(c))
            if got.get("state") in want:
                return True
            await asyncio.sleep(0.2)
        return False

    check(await poll(cid, {"paused"}), f"the campaign pauses when wave 2 goes bad ({got})")
    check(got.get("reason", "").startswith("wave 2:"), f"with the reason: {got.get('reason')}")
    check(got["waves"][0]["counts"]["verified"] == 10, "wave 1: 10 verified")
    check(all(d.bytes == 0 for d in us), "the us devices received no byte")
    st, page = await call("GET", f"/api/campaigns/{cid}/devices?status=failed&limit=2")
    check(st == 200 and page["total"] >= 1 and len(page["devices"]) == min(2, page["total"]),
          f"the failures listed, paged ({page})")
    check(page["devices"][0]["reason"] == "verification failed on the device",
          "each with its reason")
    check(page["devices"][0]["history"][-1]["status"] == "failed", "and its history")
    st, j = await call("GET", f"/api/campaigns/{cid}/devices?status=lost")
    check(st == 400 and j["error"].startswith("status: one of"), f"a bad filter: 400 ({j})")
    st, j = await call("GET", f"/api/campaigns/{cid}/devices?limit=0")
    check(st == 400 and j["error"].startswith("limit:"), f"a bad limit: 400 ({j})")
    st, j = await call("POST", f"/api/campaigns/{cid}/pause")
    check(st == 409 and "is paused" in j["error"], f"pausing a paused campaign: 409 ({j})")
    st, j = await call("POST", f"/api/campaigns/{cid}/explode")
    check(st == 404, f"an unknown action: 404 ({j})")
    st, j = await call("POST", f"/api/campaigns/{cid}/resume", {"retry_failed": "yes"})
    check(st == 400 and j["error"] == "retry_failed: true or false", f"a bad field: 400 ({j})")

    # Fixed and resumed: it completes.
    for d in eu:
        d.fail = False
    st, j = await call("POST", f"/api/campaigns/{cid}/resume")
    check(st == 200 and j["state"] == "running", f"resumed ({st} {j.get('state')})")
    check(await poll(cid, {"completed"}), f"the campaign completes ({got.get('state')})")
    check(got["counts"]["verified"] == 20, f"20 eu devices verified ({got['counts']})")
    await wait_for("every eu device told it verified", lambda: all(d.verified for d in eu))
    check(all(not d.verified for d in us), "no us device updated")

    # Its figures in /metrics and in the stats a page sees.
    st, text = await call("GET", "/metrics", token=None)
    line = f'devgate_campaign_devices{{campaign="{cid}",status="verified"}} 20'
    check(st == 200 and line in text, f"/metrics has {line}")
    check(f'devgate_campaign_state{{campaign="{cid}",state="completed"}} 1' in text,
          "and the campaign's state")
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/page-stats", open_timeout=20) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1, "last_seq": 0}))
        await ws.send(json.dumps({"type": "subscribe", "topic": "stats"}))
        seen = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen is None:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m.get("type") == "event" and m.get("topic") == "stats":
                seen = json.loads(m["data"]) if isinstance(m["data"], str) else m["data"]
        check(seen is not None and seen.get("campaign", {}).get("id") == cid and
              seen["campaign"]["state"] == "completed",
              f"a page's stats carry the campaign ({(seen or {}).get('campaign', {}).get('state')})")

    # A slow campaign, cancelled.
    st, j = await call("POST", "/api/campaigns", {"rate": {"per_minute": 30}})
    cid2 = j["campaign"]
    check(await poll(cid2, {"running"}), "a campaign at 30 a minute runs")
    await asyncio.sleep(1.0)
    st, j = await call("POST", f"/api/campaigns/{cid2}/cancel", {"reason": "wrong image"})
    check(st == 200 and j["state"] == "cancelled" and j["reason"] == "wrong image",
          f"cancelled ({st} {j.get('state')} {j.get('reason')})")
    check(j["counts"]["cancelled"] + j["counts"]["verified"] + j["counts"]["skipped"] == 41,
          f"every device cancelled or done ({j['counts']})")
    st, j = await call("POST", f"/api/campaigns/{cid2}/resume")
    check(st == 409, f"resuming a cancelled campaign: 409 ({j})")
    st, j = await call("GET", "/api/campaigns")
    check(st == 200 and [c["id"] for c in j["campaigns"]][:2] == [cid2, cid],
          "the list, newest first")

    # A staged image, rolled out by a campaign to three devices.
    image = os.urandom(5000)
    st, j = await call("POST", "/api/firmware?stage=1", raw=image)
    check(st == 200 and j.get("staged"), f"an image staged ({st} {j})")
    st, j = await call("POST", "/api/campaigns",
                       {"firmware": "staged", "target": {"ids": ["dev01", "dev03", "dev05"]}})
    cid3 = j["campaign"]
    check(await poll(cid3, {"completed"}), f"the staged image's campaign completes ({got})")
    check(got["counts"]["verified"] == 3, "3 verified")
    check(hashlib.sha256(bytes(devices[1].fw["buf"])).hexdigest() ==
          hashlib.sha256(image).hexdigest(), "with the bytes uploaded")
    for d in devices:
        d.task.cancel()
    await asyncio.gather(*(d.task for d in devices), return_exceptions=True)
    st, j = await call("GET", "/api/campaigns")
    return j["campaigns"]


def start(server, port, state, token_file):
    """Starts the demo on `state`; returns the process and the lines it printed."""
    proc = subprocess.Popen(
        [server, "--port", str(port), "--listen", "127.0.0.1", "--threads", "2",
         "--firmware-size", "20000", "--state-dir", state, "--operator-token-file",
         token_file], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            print("".join(lines))
            sys.exit("demo_server exited before listening")
        lines.append(line)
        if "listening on" in line:
            break
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def stop(proc):
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as state:
        token_file = os.path.join(state, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        port = free_port()
        proc, lines = start(args.server, port, state, token_file)
        try:
            before = asyncio.run(asyncio.wait_for(scenario(port), 240))
        finally:
            stop(proc)
        # The campaigns are kept in the state directory: a restarted server lists them as they
        # ended, with their counts per wave and their devices' histories.
        if not failures:
            proc, lines = start(args.server, port, state, token_file)
            try:
                st, j = api(port, "GET", "/api/campaigns")
                after = j["campaigns"] if st == 200 else []

                def brief(cs):
                    return [(c["id"], c["state"], c["reason"], c["counts"],
                             [w["counts"] for w in c["waves"]]) for c in cs]
                check(brief(after) == brief(before),
                      f"after a restart the campaigns are listed as they ended ({len(after)})")
                first = before[-1]
                st, j = api(port, "GET", f"/api/campaigns/{first['id']}/devices?status=verified")
                check(st == 200 and j["total"] == first["counts"]["verified"] and
                      j["devices"] and all(len(d["history"]) >= 3 for d in j["devices"]),
                      f"with their devices' histories ({st} {j if st != 200 else j['total']})")
            finally:
                stop(proc)
        if failures:
            print("".join(lines[-60:]))
            print(f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures))
            sys.exit(1)
        log("all checks passed")


if __name__ == "__main__":
    main()
