"""Webhook signatures, exactly as the Standard Webhooks specification says (standardwebhooks.com).

A secret is `whsec_` + base64 of random bytes; the HMAC key is those bytes. A message is signed as
`v1,` + base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")). During a rotation
the `webhook-signature` header carries one such signature per secret, separated by spaces, so a
receiver holding either secret verifies it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from secrets import token_bytes

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
VERSION = "v1"


def new_secret() -> str:
    """A fresh signing secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: the base64-decoded part after `whsec_`."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a signing secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("a signing secret is base64 after its prefix") from None
    if not key:
        raise ValueError("a signing secret may not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256>` of `{msg_id}.{timestamp}.{body}` under the secret's key."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_header(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one v1 signature per secret, space-separated."""
    if not secrets:
        raise ValueError("a message needs at least one signing secret")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)
