"""Independent OAuth2 peers for relayq's tests, written against PyJWT and
cryptography (nobody here wrote them).

Usage:
  oauth2_peer.py keygen DIR
      Makes an RSA key for a fake Google service account: DIR/sa-key.pem
      (PKCS#8, what Google's JSON key files hold) and DIR/sa-pub.pem.
  oauth2_peer.py verify PUBKEY AUDIENCE < JWT
      Verifies a service account assertion (RFC 7523) as Google does:
      RS256 signature, audience, and the claims iss, sub, scope, aud, iat,
      exp present, with exp - iat at most one hour. Prints the header and
      claims as JSON and exits 0, or prints "INVALID: reason" and exits 1.
"""

import json
import os
import sys

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def keygen(directory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    with open(os.path.join(directory, "sa-key.pem"), "wb") as f:
        f.write(private)
    with open(os.path.join(directory, "sa-pub.pem"), "wb") as f:
        f.write(public)


def verify(pubkey_file, audience):
    token = sys.stdin.read().strip()
    with open(pubkey_file, "rb") as f:
        public = f.read()
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(
            token,
            public,
            algorithms=["RS256"],
            audience=audience,
            options={"require": ["iss", "sub", "scope", "aud", "iat", "exp"]},
            leeway=60,
        )
    except jwt.PyJWTError as e:
        print(f"INVALID: {type(e).__name__}: {e}")
        return 1
    if header.get("typ") != "JWT":
        print(f"INVALID: header typ {header.get('typ')!r}")
        return 1
    if not 0 < claims["exp"] - claims["iat"] <= 3600:
        print(f"INVALID: lifetime {claims['exp'] - claims['iat']}s")
        return 1
    print(json.dumps({"header": header, "claims": claims}))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "keygen":
        keygen(sys.argv[2])
        sys.exit(0)
    if sys.argv[1] == "verify":
        sys.exit(verify(sys.argv[2], sys.argv[3]))
    sys.exit(f"unknown command {sys.argv[1]!r}")
