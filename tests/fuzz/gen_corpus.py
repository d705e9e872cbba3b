#!/usr/bin/env python3
"""Writes the seed corpora for the fuzz targets (tests/fuzz/corpus/{http,frame}/).

Every seed starts with the two control bytes the targets read: byte 0 chooses limits (even =
defaults), byte 1 seeds the piece sizes. Run from anywhere: python3 tests/fuzz/gen_corpus.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = b"\x37\xfa\x21\x3d"


def write(kind, name, body, control=b"\x00\x2a"):
    path = os.path.join(HERE, "corpus", kind)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "wb") as f:
        f.write(control + body)


def client_frame(opcode, payload, fin=True, rsv=0, masked=True, key=KEY, wide=False):
    """RFC 6455 5.2 client frame; wide=True forces the 64-bit length form (non-minimal)."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if wide:
        head = bytes([b0, mask_bit | 127]) + struct.pack(">Q", n)
    elif n <= 125:
        head = bytes([b0, mask_bit | n])
    elif n <= 0xFFFF:
        head = bytes([b0, mask_bit | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, mask_bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


UPGRADE = (b"GET /devices/dev-1 HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")

http = {
    "upgrade": UPGRADE,
    "upgrade_with_frame": UPGRADE + client_frame(1, b"hi"),
    "plain_get": b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n",
    "http10_keepalive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "pipelined": b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c",
    "leading_crlf": b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    "options_star": b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    "absolute_form": b"GET http://h/x?y=1 HTTP/1.1\r\nHost: h\r\n\r\n",
    "content_length": b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: h\n\n",
    "version_2": b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    "bad_version_ws": UPGRADE.replace(b"Version: 13", b"Version: 8"),
}
for name, body in http.items():
    write("http", name, body)
write("http", "tiny_limits", UPGRADE, control=b"\x21\x07")
# Bodies allowed (byte 0 bit 1: 64 bytes server-wide; byte 1 % 80: the route's bound, 42 here).
BODIES = b"\x02\x2a"
write("http", "body_then_pipelined", b"POST /api/firmware HTTP/1.1\r\nHost: h\r\n"
      b"Content-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: h\r\n\r\n", control=BODIES)
write("http", "body_over_route_bound", b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\n"
      + b"b" * 50, control=BODIES)
write("http", "body_over_ceiling", b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 65\r\n\r\n",
      control=BODIES)
write("http", "body_partial", b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\n\r\nabc",
      control=BODIES)

frame = {
    "text_hello": client_frame(1, b"Hello"),
    "binary_126": client_frame(2, bytes(range(126))),
    "binary_64bit_length": client_frame(2, b"\xab" * 10, wide=True),
    "fragmented_with_ping": client_frame(1, b"fra", fin=False) + client_frame(9, b"p")
    + client_frame(0, b"g\xc3", fin=False) + client_frame(0, b"\xa9"),
    "empty_frames": client_frame(2, b"", fin=False) + client_frame(0, b"") + client_frame(1, b""),
    "close_reason": client_frame(8, b"\x03\xe8bye"),
    "close_empty": client_frame(8, b""),
    "pong": client_frame(10, b"pong payload"),
    "utf8_mixed": client_frame(1, "κόσμε €😀 ascii tail....".encode()),
    "utf8_bad": client_frame(1, b"ok\xed\xa0\x80"),
    "unmasked": client_frame(1, b"x", masked=False),
    "rsv1": client_frame(1, b"x", rsv=4),
    "reserved_opcode": client_frame(3, b""),
    "long_ping": client_frame(9, b"P" * 126),
}
for name, body in frame.items():
    write("frame", name, body)
write("frame", "small_limit", client_frame(2, b"z" * 300), control=b"\x41\x05")
