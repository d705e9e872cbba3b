"""Opens N idle WebSocket connections to a server and holds them until killed, for measuring the
server's memory per idle connection (see /work/notes/results-server.md for the procedure).

    /usr/bin/python3 idle_clients.py <port> <count> [<ca-file>]

With a CA file the connections speak TLS (wss), trusting that CA.

Prints "ready <count>" once every handshake got its 101.
"""
import resource
import selectors
import socket
import ssl
import sys
import time

port, count = int(sys.argv[1]), int(sys.argv[2])
tls = ssl.create_default_context(cafile=sys.argv[3]) if len(sys.argv) > 3 else None
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 100), hard))

REQUEST = (b"GET /idle HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")
sockets = []
for i in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    if tls:
        s = tls.wrap_socket(s, server_hostname="localhost")  # the handshake, blocking
    s.sendall(REQUEST)
    sockets.append(s)
    if i % 500 == 499:  # let the accept backlog drain
        time.sleep(0.05)
sel = selectors.DefaultSelector()
pending = {}
for s in sockets:
    pending[s] = b""
    sel.register(s, selectors.EVENT_READ)
while pending:
    for key, _ in sel.select(timeout=30):
        s = key.fileobj
        data = s.recv(4096)
        if not data:
            sys.exit(f"connection closed during handshake")
        pending[s] += data
        if b"\r\n\r\n" in pending[s]:
            if not pending[s].startswith(b"HTTP/1.1 101"):
                sys.exit("handshake refused")
            sel.unregister(s)
            del pending[s]
print(f"ready {count}", flush=True)
while True:
    time.sleep(3600)
