"""Secrets stay out of logs: a served gateway's whole output, after a session of requests carrying
known tokens, holds none of them, while the request lines themselves are there."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import httpx
import pytest
import redis
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from runbell.listeners.config import PublisherConfig
from runbell.service.core.redaction import MASK, Redactor, install_log_redaction, redact, url_label
from runbell.service.http.auth import issue_run_token
from runbell.service.http.server import known_secrets
from runbell.service.settings import Settings
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN, TOKENS, free_port
from tests.test_redis_acl import REDIS_SERVER

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
            logger.warning("posting to %s (%s) failed: %r", httpx.URL(target), target, exc, exc_info=True)
        logger.warning("Authorization: Bearer %s, header %s", "a-configured-secret-value", {"authorization": "Basic dXNlcjpwYXNz"})
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    # A URL object (httpx's request line logs one) is reduced to its label; a URL in text is masked.
    assert "posting to http://127.0.0.1:1 (http://hooks:***@127.0.0.1:1/hook?sig=***&x=1) failed" in output
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


# -- secrets in URLs: webhook targets, Redis and database passwords -------------------------------

SLACK_SECRET = "slackPathSecret0123456789"  # the last segment of a Slack-style webhook URL is its key
DISCORD_SECRET = "discordPathSecret-9876543210abc"
REDIS_PASSWORD = "redis-pass-5f1c2e9a"
DATABASE_PASSWORD = "pg-pass-7d3b9c0e41"


class _Receiver(BaseHTTPRequestHandler):
    """Answers 204 to any POST, whatever its path (the secret part of a Slack-style URL)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()
        type(self).hits += 1

    def log_message(self, *args) -> None:  # the receiver's own lines are not the gateway's
        pass

    hits = 0


@pytest.fixture
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def password_redis(tmp_path):
    """A redis-server of this test's own on a free port that wants a password."""
    port = free_port()
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    try:
        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, "redis-server exited"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()  # by its PID: this test's server only
        process.wait(10)


def until_logged(gateway, text: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while text not in gateway.log.read_text():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{gateway.log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_no_webhook_target_redis_or_database_password_appears_in_the_served_gateways_output(
    served_gateway, receiver, password_redis, postgres_url
):
    """Webhooks to URLs whose path is their key, Redis and PostgreSQL URLs with passwords: the log
    names each target by its safe label (scheme://host:port and the endpoint id), never the URL."""
    database_url = postgres_url.replace("://postgres@", f"://postgres:{DATABASE_PASSWORD}@")  # trust auth: taken, not checked
    assert DATABASE_PASSWORD in database_url
    gateway = served_gateway(
        auth=True,
        RUNBELL_TOKENS=TOKENS,
        RUNBELL_LOG_LEVEL="info",
        RUNBELL_REDIS_URL=password_redis,
        RUNBELL_DATABASE_URL=database_url,
        RUNBELL_WEBHOOKS="true",
        RUNBELL_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        RUNBELL_WEBHOOK_SCHEDULE="0",  # one attempt: the unreachable one is dead-lettered at once
        RUNBELL_WEBHOOK_CONNECT_TIMEOUT="2",
    )
    slack_url = f"http://127.0.0.1:{receiver}/services/T000/B000/{SLACK_SECRET}"
    closed = free_port()
    discord_url = f"http://127.0.0.1:{closed}/api/webhooks/123456/{DISCORD_SECRET}"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=gateway.url, timeout=10, headers=admin) as http:
        slack = http.post("/v1/webhooks", json={"url": slack_url, "kinds": ["run"]})
        discord = http.post("/v1/webhooks", json={"url": discord_url, "kinds": ["run"]})
        assert slack.status_code == discord.status_code == 201, (slack.text, discord.text)
        for refused in (f"http://hooks:{SLACK_SECRET}@127.0.0.1:{receiver}/x", f"http://10.0.0.1/services/T1/B1/{SLACK_SECRET}"):
            assert http.post("/v1/webhooks", json={"url": refused}).status_code == 422
        event = {"kind": "run", "dag_id": "etl", "run_id": "r1", "state": "running"}
        publish = {"Authorization": f"Bearer {PUBLISH_TOKEN}"}
        assert http.post("/v1/events", json=event, headers=publish).status_code == 201
        until_logged(gateway, "dead-lettered")
        deadline = time.monotonic() + 30
        while _Receiver.hits < 1:
            assert time.monotonic() < deadline, "the Slack-style receiver got nothing"
            time.sleep(0.05)
    gateway.stop()
    output = gateway.log.read_text()
    redis_port = password_redis.rsplit(":", 1)[1].split("/")[0]
    for secret in (SLACK_SECRET, DISCORD_SECRET, REDIS_PASSWORD, DATABASE_PASSWORD, "/services/T000", "/api/webhooks/123456"):
        assert secret not in output, f"{secret} is in the log:\n{output[-3000:]}"
    # The lines are there (so this test can fail), each target named by its label.
    assert f"Redis at redis://:***@127.0.0.1:{redis_port}/0" in output, output[-3000:]
    assert "postgresql+asyncpg://postgres:***@127.0.0.1:5432/" in output, output[-3000:]
    assert f"http://127.0.0.1:{receiver}" in output, output[-3000:]  # httpx's request line, its label
    assert f"endpoint {discord.json()['id']} (http://127.0.0.1:{closed})" in output, output[-3000:]


def test_fields_passed_with_extra_are_redacted_as_a_json_formatter_prints_them():
    install_log_redaction()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFields())
    logger = logging.getLogger("runbell.test_redaction.extra")
    logger.addHandler(handler)
    fields = {
        "endpoint_id": "ep_1",
        "last_error": "ConnectError: http://u:pa55word-x@h/x?sig=extra-sig-123",
        "nested": [{"url": f"https://hooks.slack.com/services/T000/B000/{SLACK_SECRET}"}, ("Bearer extra-bearer-token",)],
    }
    try:
        logger.warning("dead-lettered", extra={"webhook": fields, "target": f"https://discord.com/api/webhooks/1/{DISCORD_SECRET}"})
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert '"endpoint_id": "ep_1"' in output and "https://hooks.slack.com/***" in output, output
    for secret in ("pa55word-x", "extra-sig-123", SLACK_SECRET, DISCORD_SECRET, "extra-bearer-token"):
        assert secret not in output, output
    assert fields["last_error"].endswith("extra-sig-123")  # the caller's own object is left as it was


class JsonFields(logging.Formatter):
    """What a JSON log formatter does: every attribute a record was given beyond the standard ones."""

    STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        extra = {key: value for key, value in vars(record).items() if key not in self.STANDARD}
        return json.dumps({"message": record.getMessage(), **extra}, default=str)


def test_urls_with_their_secret_in_the_path_or_the_userinfo_are_masked():
    assert redact(f"POST https://hooks.slack.com/services/T000/B000/{SLACK_SECRET} failed") == "POST https://hooks.slack.com/*** failed"
    assert redact(f"to https://discord.com/api/webhooks/1234/{DISCORD_SECRET}?wait=true") == "to https://discord.com/***"
    assert redact("https://ghp_tokenAsUser123@github.com/x.git") == f"https://{MASK}@github.com/x.git"
    assert redact("postgresql://runbell:s3cret-pw@db:5432/runbell") == f"postgresql://runbell:{MASK}@db:5432/runbell"
    assert redact("mail me at ops@example.com about https://example.com/a/b") == "mail me at ops@example.com about https://example.com/a/b"


def test_a_targets_label_is_its_scheme_host_and_port():
    assert url_label(f"https://hooks.slack.com/services/T000/B000/{SLACK_SECRET}") == "https://hooks.slack.com"
    assert url_label("http://u:p@[::1]:8080/x?token=1") == "http://[::1]:8080"
    assert url_label("not a url") == "(a URL)"


async def test_a_database_error_never_carries_the_statements_parameters(store):
    """SQLAlchemy puts a failed statement's parameters in its message: a webhook's URL and secret
    among them, in every log line and traceback that names the error."""
    target = f"https://hooks.slack.com/services/T000/B000/{SLACK_SECRET}"
    with pytest.raises(SQLAlchemyError) as raised:
        async with store.engine.connect() as conn:
            await conn.execute(text("SELECT :url FROM no_such_table"), {"url": target})
    assert "no_such_table" in str(raised.value)
    assert SLACK_SECRET not in str(raised.value), str(raised.value)


def test_the_redis_and_database_passwords_are_masked_wherever_they_appear():
    """A driver may print a password outside a URL (a DSN's password=...); a config's repr never has it."""
    redis_url = f"redis://:{quote(REDIS_PASSWORD + '@x', safe='')}@127.0.0.1:6379/0"
    settings = Settings(no_auth=True, redis_url=redis_url, database_url=f"postgresql://runbell:{DATABASE_PASSWORD}@db/runbell")
    redactor = Redactor(known_secrets(settings))
    assert redactor(f"dsn host=db password={DATABASE_PASSWORD} auth {REDIS_PASSWORD}@x") == f"dsn host=db password={MASK} auth {MASK}"
    assert REDIS_PASSWORD not in repr(PublisherConfig(redis_url=redis_url))
