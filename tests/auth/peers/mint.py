#!/usr/bin/env python3
"""Mints JSON Web Tokens with PyJWT (Debian's python3-jwt), independently of devgate's code.

  mint.py KEYFILE ALG [claim=value]... [--kid KID] [--header-alg ALG]

KEYFILE holds the HS256 secret (its bytes) or the ES256 private key (PEM). Claims: sub=pump-7,
exp=+60 (seconds from now; -60 in the past), nbf=+60, jti=abc, aud=fleet. ALG "none" makes an
unsigned token (PyJWT's own "none" algorithm). `--header-alg` writes another alg into the header
than the one signing (HS/ES confusion). Prints the token.
"""
import base64
import json
import sys
import time

import jwt


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> int:
    args = sys.argv[1:]
    keyfile, alg = args[0], args[1]
    kid = None
    claims = {}
    i = 2
    while i < len(args):
        a = args[i]
        if a == "--kid":
            kid = args[i + 1]
            i += 2
            continue
        name, value = a.split("=", 1)
        if name in ("exp", "nbf", "iat") and value[:1] in "+-":
            claims[name] = int(time.time()) + int(value)
        else:
            claims[name] = value
        i += 1
    headers = {"kid": kid} if kid is not None else None
    with open(keyfile, "rb") as f:
        key = f.read()
    if alg.startswith("HS"):
        key = key.strip()  # a secret file's surrounding whitespace is not part of the secret
    if alg == "none":
        token = jwt.encode(claims, None, algorithm="none", headers=headers)
    elif alg == "HS256-with-es-public-key":
        # The classic confusion: an HS256 token whose secret is the server's ES256 public key.
        token = _hs256_raw(claims, key, kid)
    else:
        token = jwt.encode(claims, key, algorithm=alg, headers=headers)
    print(token)
    return 0


def _hs256_raw(claims, secret, kid):
    # PyJWT refuses a PEM public key as an HMAC secret (it guards against this very attack),
    # so the attacker's token is signed with the standard library's HMAC.
    import hashlib
    import hmac
    header = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    sig = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(sig)


if __name__ == "__main__":
    sys.exit(main())
