"""Python's smtplib as a client of relayq, for the interop tests.

Usage: python3 smtplib_client.py PORT OUTFILE

Sends three messages and writes OUTFILE: a JSON list with, for each, the
case name, the envelope, and "sent" (base64): the message bytes as smtplib
put them on the wire, dot-stuffing undone, which is what an upstream must
receive after relayq's added headers.
"""

import base64
from copy import copy as clone
import email.generator
import io
import json
import smtplib
import sys
from email.message import EmailMessage


def flatten_like_send_message(msg, international):
    # What SMTP.send_message does before sendmail() (Python 3.6 to 3.13):
    # Bcc removed, CRLF line ends, utf8 headers when the envelope needs
    # SMTPUTF8. smtplib then only dot-stuffs, which the server undoes.
    copy = clone(msg)
    del copy["Bcc"]
    del copy["Resent-Bcc"]
    out = io.BytesIO()
    if international:
        g = email.generator.BytesGenerator(out, policy=msg.policy.clone(utf8=True))
    else:
        g = email.generator.BytesGenerator(out)
    g.flatten(copy, linesep="\r\n")
    return out.getvalue()


def main():
    port = int(sys.argv[1])
    outfile = sys.argv[2]
    cases = []
    with smtplib.SMTP("127.0.0.1", port, local_hostname="smtplib.test", timeout=20) as s:
        # 1. sendmail() with a str: bare LF line ends and dot lines, which
        # smtplib turns into CRLF and dot-stuffs.
        text = (
            "From: app@example.com\n"
            "To: bob@example.net\n"
            "Subject: smtplib plain\n"
            "X-Case: plain\n"
            "\n"
            "first line\n"
            ".\n"
            "..two dots\n"
            ".leading dot\n"
            "last line\n"
        )
        refused = s.sendmail("app@example.com", ["bob@example.net"], text)
        assert not refused, refused
        cases.append({
            "case": "plain",
            "mail_from": "app@example.com",
            "rcpts": ["bob@example.net"],
            "sent": base64.b64encode(text.replace("\n", "\r\n").encode()).decode(),
        })

        # 2. send_message() of an EmailMessage: UTF-8 subject and body, a
        # body line starting with a dot, Cc and Bcc recipients.
        msg = EmailMessage()
        msg["From"] = "Jörg Example <app@example.com>"
        msg["To"] = "carol@example.net"
        msg["Cc"] = "dave@example.org"
        msg["Bcc"] = "hidden@example.org"
        msg["Subject"] = "Grüße aus Köln ☕"
        msg["X-Case"] = "utf8-body"
        msg.set_content(
            "Hallo Carol,\n"
            ".this line starts with a dot\n"
            "Grüße, naïve café, 日本語\n"
        )
        refused = s.send_message(msg)
        assert not refused, refused
        cases.append({
            "case": "utf8-body",
            "mail_from": "app@example.com",
            "rcpts": ["carol@example.net", "hidden@example.org", "dave@example.org"],
            "sent": base64.b64encode(flatten_like_send_message(msg, False)).decode(),
        })

        # 3. send_message() with UTF-8 addresses: SMTPUTF8 and 8BITMIME.
        msg = EmailMessage()
        msg["From"] = "jörg@bücher.example"
        msg["To"] = "用户@例子.测试"
        msg["Subject"] = "international"
        msg["X-Case"] = "smtputf8"
        msg.set_content("Ünïcödé everywhere\n.dot line\n")
        refused = s.send_message(msg)
        assert not refused, refused
        cases.append({
            "case": "smtputf8",
            "mail_from": "jörg@bücher.example",
            "rcpts": ["用户@例子.测试"],
            "sent": base64.b64encode(flatten_like_send_message(msg, True)).decode(),
        })
    with open(outfile, "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
