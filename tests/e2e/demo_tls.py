#!/usr/bin/python3
"""The demo server over TLS: `--tls-cert/--tls-key` serve https and wss on one port.

Makes a CA and a server certificate for 127.0.0.1/localhost (ECDSA P-256) with the `openssl`
command in a temporary directory, starts examples/demo_server with them on a free loopback port,
then checks, with clients no one here wrote (Python's ssl and urllib, Debian's python3-websockets):
  - GET https://localhost:<port>/marco serves the page (and http:// on that port gets no answer);
  - a device at wss://localhost:<port>/ws/<id> says hello, gets its welcome, and its `send` is
    answered with `sent`;
  - after the certificate files are replaced and the server gets SIGHUP, a new connection sees
    the new certificate;
  - SIGTERM stops the server with exit code 0.
Usage: demo_tls.py --server PATH
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets  # Debian python3-websockets

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_certificates(d):
    key = "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {}"
    sh(key.format(f"{d}/ca.key"))
    sh(f"openssl req -x509 -new -key {d}/ca.key -subj '/CN=demo test CA' -days 2 -out {d}/ca.pem")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("one", "two"):
        sh(key.format(f"{d}/{name}.key"))
        sh(f"openssl req -new -key {d}/{name}.key -subj '/CN=demo server {name}' -out {d}/{name}.csr")
        sh(f"openssl x509 -req -in {d}/{name}.csr -CA {d}/ca.pem -CAkey {d}/ca.key "
           f"-CAcreateserial -days 2 -extfile {d}/ext -out {d}/{name}.pem")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_common_name(port, ctx):
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(x[0] for x in tls.getpeercert()["subject"])
            return subject.get("commonName")


async def device(port, ctx):
    url = f"wss://localhost:{port}/ws/tls-device"
    async with websockets.connect(url, ssl=ctx, open_timeout=20) as ws:
        await ws.send(json.dumps({"type": "hello", "protocol": 1}))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 20))
        check(welcome.get("type") == "welcome", f"wss device welcomed ({welcome.get('type')})")
        await ws.send(json.dumps({"type": "send", "id": 1, "data": "over tls"}))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if msg.get("type") == "sent" and msg.get("id") == 1:
                check(True, "wss device's send answered with sent")
                return
        check(False, "wss device's send answered with sent")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="devgate-demo-tls-") as d:
        make_certificates(d)
        sh(f"cp {d}/one.pem {d}/cert.pem && cp {d}/one.key {d}/key.pem")
        port = free_port()
        argv = [args.server, "--port", str(port), "--address", "127.0.0.1", "--threads", "2",
                "--state-dir", d,
                "--tls-cert", f"{d}/cert.pem", "--tls-key", f"{d}/key.pem"]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        banner = []
        while True:
            line = server.stdout.readline()
            if not line:
                print("demo_server exited before listening:\n" + "".join(banner), file=sys.stderr)
                return 1
            banner.append(line)
            if "listening on" in line:
                break
        check(any("https://localhost" in b for b in banner), "banner shows https URLs")
        ctx = ssl.create_default_context(cafile=f"{d}/ca.pem")

        with urllib.request.urlopen(f"https://localhost:{port}/marco", context=ctx,
                                    timeout=20) as r:
            body = r.read()
            check(r.status == 200 and b"<html" in body.lower(), "https page served")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/marco", timeout=5)
            check(False, "plain http on the TLS port is refused")
        except Exception:  # noqa: BLE001 - any failure is the expected refusal
            check(True, "plain http on the TLS port is refused")

        asyncio.run(device(port, ctx))

        check(server_common_name(port, ctx) == "demo server one", "first certificate served")
        sh(f"cp {d}/two.pem {d}/cert.pem && cp {d}/two.key {d}/key.pem")
        server.send_signal(signal.SIGHUP)
        seen = None
        for _ in range(100):
            seen = server_common_name(port, ctx)
            if seen == "demo server two":
                break
            time.sleep(0.1)
        check(seen == "demo server two", f"after SIGHUP the new certificate is served ({seen})")

        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        check(server.returncode == 0, f"demo_server exit code {server.returncode}")
    print("demo over TLS: " + ("ok" if not failures else f"{len(failures)} failed: {failures}"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
