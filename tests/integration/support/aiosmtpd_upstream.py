"""An independent upstream for relayq's tests: aiosmtpd with STARTTLS
required and AUTH required for one user.

Usage: aiosmtpd_upstream.py CERT KEY USER PASSWORD OUTDIR

Listens on 127.0.0.1 on a free port and prints "READY <port>" when it
accepts connections. For each message it writes OUTDIR/<n>.json (envelope,
TLS and AUTH state) and then OUTDIR/<n>.eml (the content exactly as
received, dot-stuffing undone). Exits when stdin closes.
"""

import json
import logging
import os
import socket
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

cert, key, user, password, outdir = sys.argv[1:6]


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
    Handler(),
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
