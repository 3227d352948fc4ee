"""Decodes a message with Python's email package (a MIME parser nobody
here wrote) and prints its leaf parts as JSON: content type, transfer
encoding, charset and the decoded payload (base64 of the bytes)."""
import base64
import email
import email.policy
import json
import sys

raw = sys.stdin.buffer.read()
msg = email.message_from_bytes(raw, policy=email.policy.compat32)
parts = []
for part in msg.walk():
    if part.is_multipart() or part.get_content_maintype() == "message":
        continue
    payload = part.get_payload(decode=True) or b""
    parts.append({
        "type": part.get_content_type(),
        "cte": (part.get("Content-Transfer-Encoding") or "").strip().lower(),
        "charset": part.get_content_charset(),
        "payload": base64.b64encode(payload).decode(),
        "defects": [type(d).__name__ for d in part.defects],
    })
print(json.dumps({
    "parts": parts,
    "defects": [type(d).__name__ for d in msg.defects],
    "headers": [[k, str(v)] for k, v in msg.items()],
}))
