#!/usr/bin/env python3
"""Plays hostile clients against a devgate server with token authentication (started by
tests/auth/auth.cpp, or any server configured the same way) and checks every refusal.

  attack.py PORT KEYDIR SCENARIO...

KEYDIR holds hs.key (the HS256 secret of key id ""), old.key (the secret of the retired key id
"old"), es.pem / es.pub (the ES256 key pair of key id "es"). The server revokes jti "revoked-1"
and allows Origin http://allowed.example:8080. Tokens are minted here with PyJWT, never by
devgate. Scenarios:
  refusals   every bad credential is answered before the upgrade with its status and reason,
             and no answer echoes the token
  accepted   valid HS256 and ES256 tokens, by header and by subprotocol (echoed), upgrade
  impostor   a connected device stays connected while impostors without a valid token try its id
  topics     a device may subscribe to fleet, not to server or stats
Exits 0 when every check passes; prints each failure.
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import websockets

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = int(sys.argv[1])
KEYS = sys.argv[2]
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, flush=True)


def mint(keyfile, alg, *claims, kid=None):
    cmd = [sys.executable, os.path.join(HERE, "mint.py"), os.path.join(KEYS, keyfile), alg]
    cmd += list(claims)
    if kid is not None:
        cmd += ["--kid", kid]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def upgrade_raw(device, headers):
    """Sends an upgrade request; returns (status, headers text, body)."""
    lines = [f"GET /ws/{device} HTTP/1.1", f"Host: 127.0.0.1:{PORT}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        if status == 101:
            return status, head.decode(), ""
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            body += chunk
        return status, head.decode(), body.decode()


def refusals():
    now_ok = ("exp=+300",)
    cases = [
        # (what, device, headers, status, reason)
        ("no token", "pump-7", {}, 401, "missing token"),
        ("expired", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-7", "exp=-300")}, 401, "expired"),
        ("not yet valid", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-7", "exp=+7200", "nbf=+3600")}, 401, "not yet valid"),
        ("bad signature", "pump-7", {"Authorization": "Bearer " + mint("old.key", "HS256", "sub=pump-7", *now_ok)}, 401, "bad signature"),
        ("alg none", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "none", "sub=pump-7", *now_ok)}, 401, "algorithm not allowed"),
        ("HS256 signed with the ES public key", "pump-7", {"Authorization": "Bearer " + mint("es.pub", "HS256-with-es-public-key", "sub=pump-7", *now_ok, kid="es")}, 401, "algorithm not allowed"),
        ("ES256 token for the HS key", "pump-7", {"Authorization": "Bearer " + mint("es.pem", "ES256", "sub=pump-7", *now_ok)}, 401, "algorithm not allowed"),
        ("unknown kid", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-7", *now_ok, kid="nope")}, 401, "unknown key"),
        ("retired key", "pump-7", {"Authorization": "Bearer " + mint("old.key", "HS256", "sub=pump-7", *now_ok, kid="old")}, 401, "key retired"),
        ("revoked jti", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-7", "jti=revoked-1", *now_ok)}, 401, "revoked"),
        ("sub not the path's id", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-8", *now_ok)}, 403, "wrong subject"),
        ("garbage", "pump-7", {"Authorization": "Bearer not.a.token"}, 401, "malformed token"),
        ("wrong Origin", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-7", *now_ok), "Origin": "http://evil.example"}, 403, "origin not allowed"),
        ("allowed host, other port", "pump-7", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-7", *now_ok), "Origin": "http://allowed.example:8081"}, 403, "origin not allowed"),
        ("subprotocol token, bad signature", "pump-7", {"Sec-WebSocket-Protocol": "devgate.v1, devgate.bearer." + mint("old.key", "HS256", "sub=pump-7", *now_ok)}, 401, "bad signature"),
    ]
    for what, device, headers, status, reason in cases:
        got, head, body = upgrade_raw(device, headers)
        check(got == status, f"{what}: status {got}, expected {status}")
        check(body.strip() == reason, f"{what}: reason {body!r}, expected {reason!r}")
        for v in headers.values():
            token = v.split(" ")[-1].split("devgate.bearer.")[-1]
            if len(token) > 20:
                check(token not in head and token not in body, f"{what}: the answer echoes the token")
        if status == 401:
            check("WWW-Authenticate: Bearer" in head, f"{what}: 401 without WWW-Authenticate")


async def accepted():
    hs = mint("hs.key", "HS256", "sub=dev-hs", "exp=+300")
    async with websockets.connect(f"ws://127.0.0.1:{PORT}/ws/dev-hs",
                                  extra_headers={"Authorization": "Bearer " + hs}) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        welcome = json.loads(await ws.recv())
        check(welcome.get("type") == "welcome" and welcome.get("device") == "dev-hs", f"HS256: {welcome}")
    es = mint("es.pem", "ES256", "sub=dev-es", "exp=+300", kid="es")
    async with websockets.connect(f"ws://127.0.0.1:{PORT}/ws/dev-es",
                                  extra_headers={"Authorization": "Bearer " + es}) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        check(json.loads(await ws.recv()).get("type") == "welcome", "ES256 welcome")
    # The browser way: the token as a subprotocol beside devgate.v1, which the 101 echoes.
    br = mint("hs.key", "HS256", "sub=dev-page", "exp=+300")
    async with websockets.connect(f"ws://127.0.0.1:{PORT}/ws/dev-page",
                                  subprotocols=["devgate.v1", "devgate.bearer." + br],
                                  origin="http://allowed.example:8080") as ws:
        check(ws.subprotocol == "devgate.v1", f"subprotocol echoed: {ws.subprotocol!r}")
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        check(json.loads(await ws.recv()).get("type") == "welcome", "subprotocol welcome")


async def impostor():
    token = mint("hs.key", "HS256", "sub=pump-9", "exp=+300")
    async with websockets.connect(f"ws://127.0.0.1:{PORT}/ws/pump-9",
                                  extra_headers={"Authorization": "Bearer " + token}) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        check(json.loads(await ws.recv()).get("type") == "welcome", "device welcome")
        tries = [
            ("no token", {}),
            ("another device's token", {"Authorization": "Bearer " + mint("hs.key", "HS256", "sub=pump-8", "exp=+300")}),
            ("forged token", {"Authorization": "Bearer " + mint("old.key", "HS256", "sub=pump-9", "exp=+300")}),
        ]
        for what, headers in tries:
            try:
                async with websockets.connect(f"ws://127.0.0.1:{PORT}/ws/pump-9",
                                              extra_headers=headers, open_timeout=5) as imp:
                    check(False, f"impostor with {what} was upgraded")
                    await imp.close()
            except websockets.exceptions.InvalidStatusCode as e:
                check(e.status_code in (401, 403), f"impostor with {what}: status {e.status_code}")
        # The device is still the live session: it is not closed (4000) and is answered.
        try:
            await ws.send(json.dumps({"type": "send", "id": 1, "data": "still here"}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            check(reply.get("type") == "sent", f"device answered after the impostors: {reply}")
        except websockets.exceptions.ConnectionClosed as e:
            check(False, f"the device was closed by an impostor: {e.code} {e.reason}")


async def topics():
    token = mint("hs.key", "HS256", "sub=curious", "exp=+300")
    async with websockets.connect(f"ws://127.0.0.1:{PORT}/ws/curious",
                                  extra_headers={"Authorization": "Bearer " + token}) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        await ws.recv()
        for topic in ("server", "stats"):
            await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            check(reply.get("type") == "error" and reply.get("code") == "topic_not_allowed",
                  f"subscribe {topic}: {reply}")
        await ws.send(json.dumps({"type": "subscribe", "topic": "fleet"}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        check(reply.get("type") == "subscribed", f"subscribe fleet: {reply}")


def main():
    for scenario in sys.argv[3:]:
        if scenario == "refusals":
            refusals()
        else:
            asyncio.run({"accepted": accepted, "impostor": impostor, "topics": topics}[scenario]())
    print("failures:", len(failures), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
