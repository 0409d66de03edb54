"""Webhook signing, checked against the Standard Webhooks reference library (`standardwebhooks`)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from runbell.service.webhooks.signing import new_secret, sign, signature_header

BODY = json.dumps(
    {"kind": "outcome", "seq": 7, "terminal": False, "outcome": {"status": "success", "result": "é"}}, ensure_ascii=False
).encode()


def headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def test_the_specifications_published_test_vector():
    signature = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_new_secret_is_whsec_and_32_random_bytes():
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[len("whsec_") :], validate=True)) == 32
    assert secret != new_secret()


def test_the_reference_library_verifies_a_signed_message():
    secret, now = new_secret(), int(time.time())
    header = signature_header([secret], "msg_1", now, BODY)
    assert header.startswith("v1,") and " " not in header
    assert Webhook(secret).verify(BODY, headers("msg_1", now, header)) == json.loads(BODY)


def test_during_a_rotation_every_secret_verifies():
    new, old = new_secret(), new_secret()
    now = int(time.time())
    header = signature_header([new, old], "msg_2", now, BODY)
    assert len(header.split(" ")) == 2
    for secret in (new, old):
        Webhook(secret).verify(BODY, headers("msg_2", now, header))
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers("msg_2", now, header))


@pytest.mark.parametrize("tamper", ["body", "id", "timestamp", "signature"])
def test_tampering_fails_verification(tamper):
    secret, now = new_secret(), int(time.time())
    body, msg_id, timestamp = BODY, "msg_3", now
    signature = signature_header([secret], msg_id, timestamp, body)
    if tamper == "body":
        body = body.replace(b'"seq": 7', b'"seq": 8')
    elif tamper == "id":
        msg_id = "msg_4"
    elif tamper == "timestamp":
        timestamp = now - 1
    else:
        raw = bytearray(base64.b64decode(signature[3:]))
        raw[0] ^= 1
        signature = "v1," + base64.b64encode(bytes(raw)).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, headers(msg_id, timestamp, signature))


def test_a_stale_timestamp_is_refused_by_the_receiver():
    secret, then = new_secret(), int(time.time()) - 3600
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, headers("msg_5", then, signature_header([secret], "msg_5", then, BODY)))


@pytest.mark.parametrize("secret", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_", "whsec_not base64!"])
def test_a_malformed_secret_is_refused(secret):
    with pytest.raises(ValueError):
        sign(secret, "msg", 1, b"{}")


def test_a_header_needs_a_secret():
    with pytest.raises(ValueError):
        signature_header([], "msg", 1, b"{}")
