#!/usr/bin/env python3
"""The demo's operator API played against by hostile clients (docs/SECURITY.md, "Operator API").

Starts examples/demo_server on a free loopback port with an operator token made for the run
(nothing secret is committed) and checks, with raw sockets so that every byte is the attacker's:
  - the `<img src=/api/firmware/release>` of any web page (a GET with the browser's cookies)
    gets 405 with `Allow: POST` and starts no rollout; HEAD and a GET that even carries the
    right token are refused the same way;
  - POST without a token is 401 (a cross-site form, a token in a cookie or in the query count
    as none), with a wrong token 403;
  - a Content-Length above --max-image-size is answered 413 before any body byte is sent;
  - a chunked upload is refused with 501 (a Content-Length is required);
  - an upload announced and trickled is closed by the request timeout (5 s), and a trickle
    without a token is refused at once, its body never read;
  - a second release while one is being prepared is refused with 409 (at its end, and at its
    header section), and the next one once the first is published is taken;
  - an uploaded image is published with the SHA-256 of the bytes sent;
  - without --operator-token-file the operator API answers 403 and the demo says so at start.

Usage: demo_operator.py --server PATH
"""
import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

T0 = time.monotonic()
failures = []
MIB = 1 << 20
MAX_IMAGE = 32 * MIB


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


class Demo:
    """A demo_server process and its output."""

    def __init__(self, server, argv, state_dir):
        self.port = free_port()
        argv = [server, "--port", str(self.port), "--listen", "127.0.0.1", "--threads", "2",
                "--firmware-size", "65536", "--max-image-size", str(MAX_IMAGE),
                "--state-dir", state_dir] + argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("demo_server exited before listening:\n" + "".join(self.lines))
            self.lines.append(line)
            if "listening on" in line:
                break
        # Keep reading: a full pipe would block the server's writes.
        self.drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                      daemon=True)
        self.drain.start()

    def output(self):
        return "".join(self.lines)

    def published(self):
        """(version, sha256) of every `firmware ... published` line so far."""
        return re.findall(r"firmware (\S+) published \(rollout \d+, \d+ bytes, sha256 ([0-9a-f]+)\)",
                          self.output())

    def resumed(self):
        """(version, sha256) of every `firmware ... resumed` line (a restart on a kept rollout)."""
        return re.findall(r"firmware (\S+) resumed \(rollout \d+, \d+ bytes, sha256 ([0-9a-f]+)\)",
                          self.output())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.drain.join(timeout=5)
        return self.proc.returncode


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s, head_only=False):
    """(status, headers text, body) of one response; status 0 when the connection ended first.
    `head_only`: the answer to a HEAD (a Content-Length, no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, data.decode(errors="replace"), b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head = head.decode()
    m = re.search(r"(?im)^content-length: *(\d+)", head)
    want = int(m.group(1)) if m and not head_only else 0
    while len(body) < want:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(" ", 2)[1]), head, body


def closed_by_server(s, within):
    """Whether the server ends the connection within `within` seconds (input is discarded)."""
    s.settimeout(within)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def request(port, method, path, headers=(), body=b""):
    with connect(port) as s:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        head += "".join(h + "\r\n" for h in headers)
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        s.sendall(head.encode() + b"\r\n" + body)
        return read_response(s, head_only=method == "HEAD")


def rollout(port):
    """The current rollout id from /metrics (0: none)."""
    _, _, body = request(port, "GET", "/metrics")
    m = re.search(rb"(?m)^devgate_firmware_rollout (\d+)", body)
    return int(m.group(1)) if m else -1


def wait_for(what, fn, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    log(f"timed out waiting for {what}")
    return False


def attacks(demo, token):
    port = demo.port
    bearer = f"Authorization: Bearer {token}"
    browser = ["Accept: image/avif,image/webp,*/*", "Referer: http://evil.example/",
               "Sec-Fetch-Dest: image", "Sec-Fetch-Site: cross-site",
               f"Cookie: operator={token}"]

    # A stray GET: what <img src=http://127.0.0.1:4000/api/firmware/release> on any page sends.
    status, head, _ = request(port, "GET", "/api/firmware/release", browser)
    check(status == 405 and re.search(r"(?im)^allow: POST\r?$", head) is not None,
          f"<img src=/api/firmware/release>: GET answered {status} with Allow: POST")
    status, _, _ = request(port, "GET", "/api/firmware/release", [bearer])
    check(status == 405, f"a GET with the right token is still refused: {status}")
    status, _, _ = request(port, "HEAD", "/api/firmware/release")
    check(status == 405, f"HEAD /api/firmware/release: {status}")
    status, _, _ = request(port, "GET", "/api/firmware")
    check(status == 405, f"GET /api/firmware: {status}")
    time.sleep(0.5)  # a release would be published by now
    check(rollout(port) == 0 and not demo.published(),
          "no rollout started by any GET (firmware_rollout 0, nothing published)")

    # Without the token, or with a wrong one.
    status, head, _ = request(port, "POST", "/api/firmware/release")
    check(status == 401 and "WWW-Authenticate: Bearer" in head,
          f"POST without a token: {status} with WWW-Authenticate: Bearer")
    status, _, _ = request(
        port, "POST", "/api/firmware/release",
        ["Origin: http://evil.example", "Content-Type: application/x-www-form-urlencoded",
         f"Cookie: operator={token}"], b"go=1")
    check(status == 401, f"a cross-site form POST carrying the token in a cookie: {status}")
    status, _, _ = request(port, "POST", f"/api/firmware/release?token={token}")
    check(status == 401, f"the token in the query: {status}")
    status, _, _ = request(port, "POST", "/api/firmware/release", ["Authorization: Bearer " + token + "x"])
    check(status == 403, f"POST with a wrong token: {status}")
    status, _, _ = request(port, "POST", "/api/firmware/release", ["Authorization: Basic " + token])
    check(status == 401, f"another scheme than Bearer: {status}")
    check(rollout(port) == 0 and not demo.published(), "no rollout started without the token")

    # Content-Length above --max-image-size: 413 with no body byte sent.
    with connect(port) as s:
        s.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                  f"Content-Length: {MAX_IMAGE + 1}\r\n\r\n".encode())
        status, _, _ = read_response(s)
        check(status == 413, f"Content-Length {MAX_IMAGE + 1} (max {MAX_IMAGE}): {status} before the body")
        check(closed_by_server(s, 10), "the connection closes after the 413")
    with connect(port) as s:
        s.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                  f"Content-Length: 104857600000\r\n\r\n".encode())
        status, _, _ = read_response(s)
        check(status == 413, f"Content-Length 100 GB: {status}")

    # Chunked: refused, a Content-Length is required.
    with connect(port) as s:
        s.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n4\r\nfwfw\r\n0\r\n\r\n".encode())
        status, _, _ = read_response(s)
        check(status == 501, f"a chunked upload: {status}")

    # Trickled uploads: without a token refused at once; with one closed by the request timeout.
    with connect(port) as s:
        s.sendall(b"POST /api/firmware HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\nfw")
        status, _, _ = read_response(s)
        check(status == 401, f"a trickle without a token: {status} before its body")
    with connect(port) as s:
        t0 = time.monotonic()
        s.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                  f"Content-Length: {MAX_IMAGE}\r\n\r\n".encode())
        closed = False
        try:
            for _ in range(100):  # 16 bytes every 100 ms: 10 s if the server never stops it
                s.sendall(b"0123456789abcdef")
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        closed = closed or closed_by_server(s, 10)
        took = time.monotonic() - t0
        check(closed and 4.5 <= took <= 8.5,
              f"a trickled {MAX_IMAGE // MIB} MiB upload closed by the request timeout after {took:.1f} s")
    check(rollout(port) == 0 and not demo.published(), "no rollout started by any refused upload")

    # A real upload, and a second release while it is being prepared.
    image = os.urandom(24 * MIB)
    late = os.urandom(1024)
    with connect(port) as a, connect(port) as b:
        # b's upload waits one byte short of its end while a's goes through.
        b.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                  f"Content-Length: {len(late)}\r\n\r\n".encode() + late[:-1])
        a.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                  f"Content-Length: {len(image)}\r\n\r\n".encode() + image)
        status, _, body = read_response(a)
        check(status == 202, f"POST /api/firmware with {len(image) // MIB} MiB: {status} {body!r}")
        b.sendall(late[-1:])  # a's image is being hashed and published now
        status_b, _, _ = read_response(b)
        with connect(port) as c:
            c.sendall(f"POST /api/firmware HTTP/1.1\r\nHost: x\r\n{bearer}\r\n"
                      f"Content-Length: {len(late)}\r\n\r\n".encode())
            status_c, _, _ = read_response(c)
        published = demo.published()
        check(status_b == 409 or published,
              f"a second release while the first is prepared: {status_b} (published: {published})")
        check(status_c == 409 or published,
              f"a third, refused at its header section: {status_c} (published: {published})")
    check(wait_for("the upload's rollout", lambda: len(demo.published()) == 1),
          "the uploaded image is published once")
    want = hashlib.sha256(image).hexdigest()
    got = demo.published()[0][1] if demo.published() else ""
    check(got == want, f"published with the SHA-256 of the bytes sent ({got[:16]}...)")
    check(rollout(port) == 1, "firmware_rollout 1")
    # Once published, the next release is taken.
    status, _, body = request(port, "POST", "/api/firmware/release", [bearer])
    check(status == 202 and b'"release":2' in body, f"the next release once published: {status} {body!r}")
    check(wait_for("the second rollout", lambda: len(demo.published()) == 2), "release 2 published")
    status, _, body = request(port, "POST", "/api/firmware", [bearer])
    check(status == 400, f"an upload without a body: {status}")
    # The last release is an upload: a restart resumes those bytes, not a synthetic image.
    kept = os.urandom(MIB)
    status, _, body = request(port, "POST", "/api/firmware", [bearer], kept)
    check(status == 202 and b'"release":3' in body, f"an upload as release 3: {status} {body!r}")
    check(wait_for("the third rollout", lambda: len(demo.published()) == 3), "release 3 published")
    return hashlib.sha256(kept).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="devgate-operator-token-")
    token = os.urandom(18).hex()
    token_file = os.path.join(tmp.name, "token")
    with open(token_file, "w") as f:
        f.write(f"  {token}\n")  # surrounding whitespace is trimmed
    os.chmod(token_file, 0o600)

    state = tempfile.TemporaryDirectory(prefix="devgate-operator-")
    demo = Demo(args.server, ["--operator-token-file", token_file], state.name)
    log(f"demo_server on port {demo.port} with an operator token")
    check("operator API on" in demo.output(), "the demo says the operator API is on")
    try:
        kept = attacks(demo, token)
    finally:
        code = demo.stop()
        check(code == 0, f"demo_server exit code {code}")

    again = Demo(args.server, ["--operator-token-file", token_file], state.name)
    check(wait_for("the resumed release", lambda: len(again.resumed()) == 1),
          "restarted: the last release is resumed from the state store")
    check(again.resumed()[:1] == [("1.3.0", kept)],
          f"restarted: the uploaded image of 1.3.0 is resumed, same SHA-256 ({again.resumed()})")
    check(again.stop() == 0, "restarted demo_server exits 0")

    closed = Demo(args.server, [], state.name)
    log(f"demo_server on port {closed.port} without --operator-token-file")
    check("operator API off" in closed.output(), "the demo says the operator API is off at start")
    status, _, body = request(closed.port, "POST", "/api/firmware/release", [f"Authorization: Bearer {token}"])
    check(status == 403 and b"--operator-token-file" in body,
          f"without --operator-token-file: {status} {body.strip()!r}")
    check(closed.stop() == 0, "demo_server (operator API off) exits 0")

    print("operator API: " + ("all refused as documented" if not failures
                              else f"{len(failures)} failed: {failures}"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
