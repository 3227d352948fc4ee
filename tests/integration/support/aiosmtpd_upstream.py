"""An independent upstream for relayq's tests: aiosmtpd with STARTTLS
required and AUTH required for one user.

Usage: aiosmtpd_upstream.py CERT KEY USER PASSWORD OUTDIR [TOKENS]

With TOKENS (a file of bearer tokens, one a line, read at each login),
AUTH XOAUTH2 is offered too, as Gmail does it: "user=U^Aauth=Bearer T^A^A";
a token not in the file gets a 334 challenge with a JSON error, and after
the client's empty answer 535.

Listens on 127.0.0.1 on a free port and prints "READY <port>" when it
accepts connections. For each message it writes OUTDIR/<n>.json (envelope,
TLS and AUTH state) and then OUTDIR/<n>.eml (the content exactly as
received, dot-stuffing undone). Exits when stdin closes.
"""

import base64
import json
import logging
import os
import socket
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

cert, key, user, password, outdir = sys.argv[1:6]
tokens_file = sys.argv[6] if len(sys.argv) > 6 else None


class Handler:
    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        base = os.path.join(outdir, str(self.count))
        meta = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "tls": session.ssl is not None,
            "authenticated": bool(session.authenticated),
            "login": getattr(session.auth_data, "login", None),
            "mechanism": getattr(session.auth_data, "mechanism", None),
        }
        with open(base + ".json", "w") as f:
            json.dump(meta, f)
        # Written last and renamed into place: the .eml appearing means
        # everything for this message is on disk.
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        os.rename(base + ".eml.tmp", base + ".eml")
        return "250 2.0.0 Ok: queued by aiosmtpd"


class XOAuth2Handler(Handler):
    """Handler that also speaks AUTH XOAUTH2 against the tokens file."""

    async def auth_XOAUTH2(self, server, args):
        if len(args) > 1:
            blob = base64.b64decode(args[1])
        else:
            blob = await server.challenge_auth("", encode_to_b64=False)
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=False)
        fields = dict(
            f.split("=", 1) for f in blob.decode(errors="replace").split("\x01") if "=" in f
        )
        login = fields.get("user", "")
        bearer = fields.get("auth", "")
        token = bearer[len("Bearer "):] if bearer.startswith("Bearer ") else None
        with open(tokens_file) as f:
            valid = {line.strip() for line in f if line.strip()}
        if login == user and token in valid:
            return AuthResult(success=True, auth_data=Login(login, "XOAUTH2"))
        error = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
        await server.challenge_auth(error)
        return AuthResult(success=False, handled=False)


class Login:
    """What the handler may know about a login: never the password."""

    def __init__(self, login, mechanism):
        self.login = login
        self.mechanism = mechanism


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == user.encode()
        and auth_data.password == password.encode()
    )
    login = auth_data.login.decode(errors="replace") if ok else None
    return AuthResult(success=ok, handled=False, auth_data=Login(login, mechanism))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# aiosmtpd itself touches its deprecated Session.login_data and warns on
# every login; only real errors should reach the test's stderr.
logging.getLogger("mail.log").setLevel(logging.ERROR)

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
port = free_port()
controller = Controller(
    XOAuth2Handler() if tokens_file else Handler(),
    hostname="127.0.0.1",
    port=port,
    # A fixed name: the default would ask DNS for our FQDN.
    server_hostname="aiosmtpd.test",
    tls_context=context,
    require_starttls=True,
    auth_required=True,
    auth_require_tls=True,
    authenticator=authenticator,
    decode_data=False,
)
controller.start()
print(f"READY {port}", flush=True)
sys.stdin.read()
controller.stop()
