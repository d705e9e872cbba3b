#!/usr/bin/env python3
"""Smoke test of the TLS pass's parts (benchmarks/run.sh --tls), short enough for the test suite.

Makes a CA, an ECDSA P-256 server certificate for localhost and a second, unrelated CA with the
`openssl` command in a temporary directory, then, each server started on a free loopback port
and stopped here:
  - devgate_loadgen --tls-ca against devgate_ws_bench_server --tls-cert/--tls-key: echo (wss) and
    handshake runs complete with no error;
  - the generator refuses a server it cannot verify: a wrong --tls-name (hostname mismatch) and
    the unrelated CA (unknown issuer) both fail every connection and say why;
  - the OpenSSL accept loop (devgate_peer_openssl_accept) completes handshakes;
  - Node ws over TLS (node_ws_server.js with cert and key) echoes, when node and ws are there;
  - report.py --tls turns the lines into a section placed after the device-path section.

    tls_smoke.py --build <cmake build dir> --source <repository root>
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def sh(cmd, cwd):
    subprocess.run(cmd, shell=True, check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_certs(d):
    key = "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {}"
    for ca in ("ca", "other"):
        sh(key.format(f"{ca}.key"), d)
        sh(f"openssl req -x509 -new -key {ca}.key -subj '/CN=smoke {ca}' -days 2 -out {ca}.pem", d)
    sh(key.format("server.key"), d)
    sh("openssl req -new -key server.key -subj '/CN=localhost' -out server.csr", d)
    with open(os.path.join(d, "ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
       "-extfile ext -out server.pem", d)


class server:
    """A server process that prints "listening on <port>"; stopped on exit."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise SystemExit(f"server did not start: {cmd}: {line!r}")
        self.port = int(line.split()[2])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def loadgen(exe, srv, name, *args):
    out = subprocess.run([exe, "--port", str(srv.port), "--server-pid", str(srv.proc.pid),
                          "--server", name, *args], capture_output=True, text=True, timeout=60)
    line = out.stdout.strip().splitlines()[-1]
    print(f"{name}: {line}")
    return json.loads(line)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True)
    ap.add_argument("--source", required=True)
    a = ap.parse_args()
    b = os.path.join(a.build, "benchmarks")
    gen = os.path.join(b, "loadgen", "devgate_loadgen")
    dg = os.path.join(b, "servers", "devgate_ws_bench_server")
    ossl = os.path.join(b, "peers", "devgate_peer_openssl_accept")
    d = tempfile.mkdtemp(prefix="devgate-tls-smoke-")
    try:
        make_certs(d)
        cert, key = os.path.join(d, "server.pem"), os.path.join(d, "server.key")
        ca, other = os.path.join(d, "ca.pem"), os.path.join(d, "other.pem")
        echo = ["--scenario", "echo", "--connections", "10", "--window", "4", "--seconds", "0.5",
                "--warmup", "0.2"]
        hs = ["--scenario", "handshake", "--concurrency", "8", "--seconds", "0.5", "--warmup", "0.1"]
        rows = []
        with server([dg, "--port", "0", "--threads", "1", "--tls-cert", cert, "--tls-key", key]) as s:
            r = loadgen(gen, s, "devgate_wss", "--tls-ca", ca, *echo)
            check(r.get("proto") == "wss" and r.get("msgs", 0) > 0 and r.get("errors") == 0,
                  "wss echo through devgate")
            rows.append({"case": "echo_c100_w16", "rep": 1, **r})
            r = loadgen(gen, s, "devgate_wss", "--tls-ca", ca, *hs)
            check(r.get("handshakes", 0) > 0 and r.get("errors") == 0, "handshakes with devgate")
            rows.append({"case": "handshake", "rep": 1, **r})
            r = loadgen(gen, s, "devgate_wss", "--tls-ca", ca, "--tls-name", "wrong.example", *echo)
            check("error" in r and "hostname mismatch" in r.get("first_error", ""),
                  "the generator refuses a certificate for another name")
            r = loadgen(gen, s, "devgate_wss", "--tls-ca", other, *echo)
            check("error" in r and "TLS verification" in r.get("first_error", ""),
                  "the generator refuses a certificate from a CA it does not trust")
        with server([dg, "--port", "0", "--threads", "1"]) as s:
            r = loadgen(gen, s, "devgate_ws", *echo)
            check(r.get("proto") == "ws" and r.get("msgs", 0) > 0, "plain ws echo through devgate")
            rows.append({"case": "echo_c100_w16", "rep": 1, **r})
        with server([ossl, "0", cert, key]) as s:
            r = loadgen(gen, s, "openssl_accept", "--tls-ca", ca, *hs)
            check(r.get("handshakes", 0) > 0 and r.get("errors") == 0,
                  "handshakes with the OpenSSL accept loop")
            rows.append({"case": "handshake", "rep": 1, **r})
        ws = os.path.join(a.source, "tests", "peers", "node_modules", "ws")
        if shutil.which("node") and os.path.isdir(ws):
            js = os.path.join(a.source, "benchmarks", "peers", "node_ws_server.js")
            with server(["node", js, "0", cert, key]) as s:
                r = loadgen(gen, s, "node_wss", "--tls-ca", ca, *echo)
                check(r.get("msgs", 0) > 0 and r.get("errors") == 0, "wss echo through Node ws")
                rows.append({"case": "echo_c100_w16", "rep": 1, **r})
        else:
            print("node or tests/peers/node_modules/ws missing: Node ws over TLS not checked")

        # The report: its section goes right after the device-path section, the targets listed.
        results = os.path.join(d, "results.jsonl")
        with open(results, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        meta = {"date": "now", "mode": "smoke", "reps": 1, "seconds": 0.5, "warmup": 0.2,
                "idle": 0, "cpu": "?", "cores": 2, "mem": "?", "kernel": "?", "load_start": "0",
                "server_cpu": "0", "gen_cpu": "1", "compiler": "?", "openssl": "?", "node": "?",
                "ws": "?", "skipped": [], "command": "tls_smoke.py"}
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump(meta, f)
        md = os.path.join(d, "RESULTS.md")
        with open(md, "w") as f:
            f.write("# r\n\n<!-- device-path:begin -->\nd\n<!-- device-path:end -->\n\n## later\n")
        report = os.path.join(a.source, "benchmarks", "loadgen", "report.py")
        subprocess.run([sys.executable, report, "--tls", results, os.path.join(d, "meta.json"), md],
                       check=True)
        text = open(md).read()
        check(text.index("<!-- device-path:end -->") < text.index("<!-- tls:begin -->")
              < text.index("<!-- tls:end -->") < text.index("## later"),
              "the TLS section sits right after the device-path section")
        check("devgate wss / devgate plain ws" in text and "handshakes per server CPU-s: devgate"
              in text, "the targets table")
        print("tls smoke: ok")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
