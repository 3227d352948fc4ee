"""Python's smtplib logging in to relayq, for the AUTH attack tests.

Usage: python3 auth_client.py PORT PLAN

PLAN is JSON: a list of sessions, all started at once (one thread each):
  {"source": "127.0.0.5", "user": "alice", "passwords": ["wrong", ...]}
Each session connects from `source`, says EHLO, STARTTLS (the certificate
is not checked: it is the test's own), EHLO again, then tries AUTH PLAIN
once per password, one attempt per AUTH command (smtplib's login() would
try other mechanisms after a failure). Prints one JSON object per session:
  {"source": ..., "greeting": 220, "replies": [[code, "text"], ...],
   "closed": true|false, "elapsed": [seconds per attempt]}
A session ends early when the server answers 421 or closes the connection.
"""

import json
import smtplib
import ssl
import sys
import threading
import time


def session(port, plan, out):
    result = {"source": plan["source"], "greeting": None, "replies": [], "closed": False, "elapsed": []}
    out.append(result)
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(plan["source"], 0),
                         local_hostname="auth.test")
        result["greeting"] = 220
        s.ehlo()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s.starttls(context=ctx)
        s.ehlo()
        for password in plan["passwords"]:
            s.user, s.password = plan["user"], password
            started = time.monotonic()
            try:
                code, text = s.auth("PLAIN", s.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                code, text = e.smtp_code, e.smtp_error
            except smtplib.SMTPServerDisconnected:
                result["closed"] = True
                break
            result["elapsed"].append(time.monotonic() - started)
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            result["replies"].append([code, text])
            if code == 421:
                result["closed"] = True
                break
        if not result["closed"]:
            try:
                s.quit()
            except smtplib.SMTPServerDisconnected:
                result["closed"] = True
    except smtplib.SMTPServerDisconnected:
        result["closed"] = True
    except smtplib.SMTPConnectError as e:
        result["greeting"] = e.smtp_code
        result["closed"] = True


def main():
    port = int(sys.argv[1])
    plans = json.loads(sys.argv[2])
    results = []
    threads = [threading.Thread(target=session, args=(port, p, results)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
