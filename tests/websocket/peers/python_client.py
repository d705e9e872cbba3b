"""A scripted WebSocket client on Debian's python3-websockets, driven by
tests/websocket/server.cpp against devgate's server running an echo handler.

    /usr/bin/python3 python_client.py <ws-or-wss-url> <scenario> [args...]

For wss URLs it trusts the CA file DEVGATE_TLS_CA and presents the client certificate
DEVGATE_TLS_CLIENT_CERT / DEVGATE_TLS_CLIENT_KEY when they are set (mutual TLS).

Exit code 0 means the scenario passed; anything else is a failure with a message on stderr.
"""
import asyncio
import json
import os
import ssl
import sys

import websockets

URL, SCENARIO, *ARGS = sys.argv[1:]


def fail(msg):
    print(f"python peer ({SCENARIO}): {msg}", file=sys.stderr, flush=True)
    os._exit(1)


def tls_context():
    """For wss URLs: trust DEVGATE_TLS_CA, and present DEVGATE_TLS_CLIENT_CERT/_KEY if set."""
    if not URL.startswith("wss:"):
        return None
    ctx = ssl.create_default_context(cafile=os.environ.get("DEVGATE_TLS_CA"))
    if os.environ.get("DEVGATE_TLS_CLIENT_CERT"):
        ctx.load_cert_chain(os.environ["DEVGATE_TLS_CLIENT_CERT"],
                            os.environ["DEVGATE_TLS_CLIENT_KEY"])
    return ctx


def connect(url=None):
    return websockets.connect(url or URL, max_size=None, compression=None, ping_interval=None,
                              open_timeout=30, close_timeout=30, ssl=tls_context())


async def tls_refused():
    """The server must refuse this client during the TLS handshake (no usable certificate)."""
    try:
        async with connect() as ws:
            await ws.send("must not be echoed")
            await ws.recv()
    except (ssl.SSLError, OSError, websockets.exceptions.WebSocketException, EOFError):
        return
    fail("the server accepted a client it must refuse")


def text_of(size):
    unit = "devgate-\u00e9\u4e2d\U0001F600".encode()
    data = (unit * (size // len(unit) + 1))[:size]
    while data:
        try:
            return data.decode()
        except UnicodeDecodeError:
            data = data[:-1]
    return ""


async def messages():
    async with connect() as ws:
        for size in [0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, 16 << 20]:
            payload = os.urandom(size)
            await ws.send(payload)
            got = await ws.recv()
            if not isinstance(got, bytes) or got != payload:
                fail(f"binary echo of {size} bytes differs")
            text = text_of(size)
            await ws.send(text)
            got = await ws.recv()
            if not isinstance(got, str) or got != text:
                fail(f"text echo of ~{size} bytes differs")
        await ws.close(1000, "done")
        if ws.close_code != 1000:
            fail(f"close code {ws.close_code}")


async def fragmented():
    async with connect() as ws:
        # websockets sends an iterable as one fragmented message, one frame per item.
        parts = ["start-", "\U0001F600-mid", "dle-\u00e9", "-end"]
        await ws.send(parts)
        got = await ws.recv()
        if got != "".join(parts):
            fail("fragmented text echo differs")
        chunks = [os.urandom(50000) for _ in range(7)]
        await ws.send(chunks)
        got = await ws.recv()
        if got != b"".join(chunks):
            fail("fragmented binary echo differs")


async def ping():
    async with connect() as ws:
        waiter = await ws.ping(b"py-ping")
        await asyncio.wait_for(waiter, 20)
        await ws.send("still-here")
        if await ws.recv() != "still-here":
            fail("echo after ping differs")


async def close_client():
    for code, reason in [(1000, "bye"), (1001, ""), (4001, "app-specific")]:
        async with connect() as ws:
            await ws.close(code, reason)
            if ws.close_code != code:
                fail(f"client close {code}: server answered {ws.close_code}")


async def close_server():
    async with connect() as ws:
        await ws.send("!close 4002 server-says-bye")
        try:
            await asyncio.wait_for(ws.recv(), 20)
            fail("expected the server to close")
        except websockets.ConnectionClosed as e:
            if e.code != 4002 or e.reason != "server-says-bye":
                fail(f"server close: got {e.code} {e.reason!r}")
    # A reason longer than a close frame holds (123 bytes) whose byte 123 falls inside a
    # character: the server sends its first 122 bytes, never a cut character (which this client
    # must refuse, RFC 6455 8.1).
    long_reason = "ab" + "\u00e9" * 80
    async with connect() as ws:
        await ws.send("!close 4003 " + long_reason)
        try:
            await asyncio.wait_for(ws.recv(), 20)
            fail("expected the server to close")
        except websockets.ConnectionClosed as e:
            if e.code != 4003 or e.reason != long_reason[:62]:
                fail(f"server close with a long reason: got {e.code} {e.reason!r}")


async def error_reply():
    async with connect() as ws:
        await ws.send("!reject")
        reply = json.loads(await ws.recv())
        if reply.get("type") != "error" or reply.get("code") != "queue_full":
            fail(f"unexpected error reply {reply}")


async def await_close():
    expected = int(ARGS[0]) if ARGS else 1001
    async with connect() as ws:
        try:
            await asyncio.wait_for(ws.recv(), 60)
            fail("expected a close, got a message")
        except websockets.ConnectionClosed as e:
            if e.code != expected:
                fail(f"expected close {expected}, got {e.code}")


async def concurrent():
    clients = int(ARGS[0]) if ARGS else 200
    per_client = int(ARGS[1]) if len(ARGS) > 1 else 10

    async def one(i):
        async with connect(f"{URL}/py{i}") as ws:
            for k in range(per_client):
                msg = f"client {i} message {k} " + "y" * ((i * 11 + k) % 200)
                await ws.send(msg)
                if await ws.recv() != msg:
                    fail(f"client {i} got a different echo")

    await asyncio.gather(*(one(i) for i in range(clients)))


SCENARIOS = {
    "messages": messages, "fragmented": fragmented, "ping": ping,
    "close-client": close_client, "close-server": close_server, "error-reply": error_reply,
    "await-close": await_close, "concurrent": concurrent, "tls-refused": tls_refused,
}

if SCENARIO not in SCENARIOS:
    fail(f"unknown scenario {SCENARIO}")
try:
    asyncio.run(asyncio.wait_for(SCENARIOS[SCENARIO](), 240))
except Exception as e:  # noqa: BLE001 - any failure is a test failure with its message
    fail(repr(e))
sys.exit(0)
