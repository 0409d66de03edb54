"""Secrets stay out of logs: a served gateway's whole output, after a session of requests carrying
known tokens, holds none of them, while the request lines themselves are there."""

from __future__ import annotations

import io
import logging

import httpx

from runbell.service.core.redaction import MASK, install_log_redaction, redact
from runbell.service.http.auth import issue_run_token
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN, TOKENS

TOKEN_SECRET = "served-test-secret-of-at-least-32-bytes!"  # the served_gateway fixture's
UNKNOWN_TOKEN = "not-a-configured-token-1234"  # refused (401), yet a secret of whoever sent it


def test_no_token_of_a_session_appears_in_the_served_gateways_output(served_gateway):
    gateway = served_gateway(auth=True, RUNBELL_TOKENS=TOKENS, RUNBELL_LOG_LEVEL="info")
    run_token, _ = issue_run_token(TOKEN_SECRET, "etl", "r1", 600)
    url = gateway.url
    with httpx.Client(base_url=url, timeout=10) as http:
        publish = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
        for state in ("running", "success"):
            event = {"kind": "run", "dag_id": "etl", "run_id": "r1", "state": state}
            assert http.post("/v1/events", json=event, headers=publish).status_code == 201
        assert http.get("/v1/runs", headers={"Authorization": f"Bearer {READ_TOKEN}"}).status_code == 200
        # The EventSource way: the token in the query. The run has ended: the stream replays and closes.
        sse = http.get("/v1/dags/etl/runs/r1/events", params={"access_token": run_token})
        assert sse.status_code == 200 and "event: end" in sse.text
        result = http.get("/v1/dags/etl/runs/r1/result", params={"timeout": 0, "access_token": run_token})
        assert result.status_code == 200
        assert http.get("/", params={"token": ADMIN_TOKEN}).status_code == 200  # the dashboard
        refused = http.get("/v1/dags/etl/runs/r1/result", params={"access_token": UNKNOWN_TOKEN, "timeout": 0})
        assert refused.status_code == 401
        bad = http.get("/v1/dags/etl/runs/r1/result", params={"access_token": READ_TOKEN, "timeout": "nope"})
        assert bad.status_code == 400
    gateway.stop()
    output = gateway.log.read_text()
    # The request lines are logged (so this test can fail), with every token masked.
    assert '"GET /v1/dags/etl/runs/r1/events?access_token=***' in output, output[-3000:]
    assert '"GET /?token=*** HTTP/1.1" 200' in output, output[-3000:]
    assert '"GET /v1/dags/etl/runs/r1/result?access_token=***&timeout=0 HTTP/1.1" 401' in output, output[-3000:]
    assert '"GET /v1/dags/etl/runs/r1/result?access_token=***&timeout=nope HTTP/1.1" 400' in output, output[-3000:]
    for secret in (READ_TOKEN, PUBLISH_TOKEN, ADMIN_TOKEN, UNKNOWN_TOKEN, run_token, TOKEN_SECRET):
        assert secret not in output, f"{secret[:12]}... is in the log"


def test_a_traceback_and_the_arguments_of_a_log_line_are_redacted():
    """httpx puts the URL, query string and all, into its exceptions: a webhook target's key too."""
    install_log_redaction(["a-configured-secret-value"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("runbell.test_redaction")
    logger.addHandler(handler)
    target = "http://hooks:pa55word@127.0.0.1:1/hook?sig=receiver-key-123&x=1"
    try:
        try:
            httpx.post(target, timeout=2)
        except httpx.TransportError as exc:
            logger.warning("posting to %s failed: %r", httpx.URL(target), exc, exc_info=True)
        logger.warning("Authorization: Bearer %s, header %s", "a-configured-secret-value", {"authorization": "Basic dXNlcjpwYXNz"})
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "posting to http://hooks:***@127.0.0.1:1/hook?sig=***&x=1 failed" in output
    assert "Traceback" in output and "ConnectError" in output
    for secret in ("receiver-key-123", "pa55word", "a-configured-secret-value", "dXNlcjpwYXNz"):
        assert secret not in output


def test_what_is_masked_and_what_is_kept():
    assert redact("GET /v1/runs?dag_id=etl&access_token=abc.def&limit=5") == f"GET /v1/runs?dag_id=etl&access_token={MASK}&limit=5"
    assert (
        redact("/x?api_key=k1&client_secret=s&password=p&code=c") == f"/x?api_key={MASK}&client_secret={MASK}&password={MASK}&code={MASK}"
    )
    assert redact("redis://:hunter2@redis:6379/0") == f"redis://:{MASK}@redis:6379/0"
    assert redact("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == f"whsec_{MASK}"
    assert redact("run etl/r1 decided: success (seq 7)") == "run etl/r1 decided: success (seq 7)"


def test_a_format_string_keeps_its_placeholders_and_its_arguments_are_masked():
    install_log_redaction()
    record = logging.getLogger("runbell.test_redaction").makeRecord(
        "runbell.test_redaction", logging.INFO, __file__, 1, "GET %s?token=%s", ("/x", "Bearer abc.def"), None
    )
    assert record.getMessage() == "GET /x?token=Bearer ***"
