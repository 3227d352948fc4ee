"""An aiosmtpd handler for relayq's interop tests: the upstream relayhost.

Every message it accepts is written to OUTDIR as NNNN.eml (the content
exactly as received: dot-stuffing undone, CRLF kept, without the final
".") and NNNN.json (the envelope), the JSON last and renamed into place,
so a test that sees NNNN.json can read both.

Run (see tests/integration/interop.rs):
    PYTHONPATH=tests/peers python3 -m aiosmtpd -n -u -l 127.0.0.1:PORT \
        -c aiosmtpd_dump.DumpHandler OUTDIR
"""

import itertools
import json
import os
import socket


class DumpHandler:
    def __init__(self, outdir):
        self.outdir = outdir
        self.seq = itertools.count(1)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("DumpHandler needs one argument: OUTDIR")
        # aiosmtpd names itself with socket.getfqdn() on every connection,
        # which may ask DNS; the tests must never resolve a name.
        socket.getfqdn = lambda name="": "aiosmtpd.test"
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        n = next(self.seq)
        base = os.path.join(self.outdir, "%04d" % n)
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        meta = {
            "helo": session.host_name,
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
        }
        with open(base + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 2.0.0 Ok: queued as AIO%d" % n
