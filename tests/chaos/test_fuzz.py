"""Chaos, fuzzing: the HTTP API from its own OpenAPI document (schemathesis), and event decoding
(hypothesis).

The API: every operation of the generated contract (service/http/openapi.json), with valid input,
with invalid input, and with valid input whose parameters and headers are replaced by Unicode-heavy
text (digits of other scripts, superscripts, '/', '%', quotes, CR, LF, NUL, emoji), against a
gateway with everything configured (stand-ins for Airflow's REST API and metadata database), with
an admin token, so that no 5xx is by design. Every check schemathesis has is run on every answer
(no 5xx, status code, content type, headers and body as the contract says, invalid input refused,
valid input accepted, ...); none may hang (each request has a timeout; long-poll timeouts are kept
short and event streams are read for a bounded time), and every error is a JSON body with an error
code and a message. A run is waited on meanwhile and must still get its outcome.

Decoding: whatever bytes come off the bus, decode_envelope and decode_asset_envelope either give an
envelope the gateway can encode again everywhere it shows one, or raise BadEvent with a documented
reason; nothing else.

Examples are bounded and derandomized, so the run is the same every time.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import CHECKS, load_all_checks, negative_data_rejection, positive_data_acceptance
from schemathesis.generation import GenerationMode
from sqlalchemy import create_engine

from runbell.bus.schema import (
    AssetEnvelope,
    BadEvent,
    Envelope,
    decode_asset_envelope,
    decode_envelope,
)
from runbell.service.core.outcome import decide
from runbell.service.http.backfills import _airflow
from runbell.service.http.openapi import DOCUMENT
from runbell.service.http.run_routes import event_data, outcome_body
from tests.chaos.test_bad_input import nested, publish, result, run, task
from tests.conftest import ADMIN_TOKEN
from tests.test_gateway import events_path, read_sse, result_path, until

# -- event decoding -------------------------------------------------------------------------------

REASONS = {"json", "shape", "version", "schema", "depth"}
DECODE_EXAMPLES = 400
DECODE_SETTINGS = settings(
    max_examples=DECODE_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
EVENT_FIELDS = [
    "v",
    "id",
    "kind",
    "dag_id",
    "run_id",
    "state",
    "ts",
    "source",
    "host",
    "task_id",
    "map_index",
    "try_number",
    "result_task",
    "critical",
    "result",
    "error",
    "run_type",
    "logical_date",
    "msg",
    "asset",
    "extra",
    "extra_size",
    "aliases",
    "source_map_index",
]
VALID_EVENTS = [
    {"v": 1, "id": "e1", "kind": "run", "dag_id": "d", "run_id": "r", "state": "success", "ts": 1.0},
    {
        "v": 1,
        "id": "e2",
        "kind": "task",
        "dag_id": "d",
        "run_id": "r",
        "state": "success",
        "task_id": "t",
        "result_task": True,
        "result": {"value": {"n": 1}, "size": 7},
        "ts": 1.0,
    },
    {
        "v": 1,
        "id": "e3",
        "kind": "task",
        "dag_id": "d",
        "run_id": "r",
        "state": "failed",
        "task_id": "t",
        "critical": True,
        "error": {"type": "E", "message": "m"},
        "ts": 1.0,
    },
    {"v": 1, "id": "a1", "kind": "asset", "asset": {"name": "s3://b/k"}, "extra": {"rows": 1}, "ts": 1.0},
]


@st.composite
def mutated_envelopes(draw) -> bytes:
    """A valid envelope with some of its fields replaced by arbitrary JSON, and seq likewise."""
    event = dict(draw(st.sampled_from(VALID_EVENTS)))
    event.update(draw(st.dictionaries(st.sampled_from(EVENT_FIELDS), json_values, max_size=3)))
    for name in draw(st.lists(st.sampled_from(EVENT_FIELDS), max_size=2)):
        event.pop(name, None)
    seq = draw(st.one_of(st.integers(min_value=-2, max_value=2**70), json_values))
    return json.dumps({"seq": seq, "event": event}).encode()


@st.composite
def deep_envelopes(draw) -> bytes:
    """A valid envelope whose free-form value (result, extra) is nested 1 to 3000 levels deep."""
    depth = draw(st.integers(min_value=1, max_value=3000))
    body = "[" * depth + "]" * depth
    if draw(st.booleans()):
        return (
            '{"seq":1,"event":{"v":1,"kind":"task","dag_id":"d","run_id":"r","state":"success","task_id":"t",'
            '"result_task":true,"result":{"value":' + body + "}}}"
        ).encode()
    return b'{"seq":1,"event":{"v":1,"kind":"asset","asset":{"name":"a"},"extra":{"x":' + body.encode() + b"}}}"


bus_messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    mutated_envelopes(),
    deep_envelopes(),
)


def served_as_the_gateway_would(envelope: Envelope | AssetEnvelope) -> None:
    """Encode the envelope everywhere the gateway shows or stores one; raises if any of them fails."""
    envelope.event.to_json()  # the store, the webhook payloads
    if isinstance(envelope, Envelope):
        event_data(envelope)  # an SSE event
        json.dumps(outcome_body(decide([envelope])))  # a 200 of /result, an SSE outcome


@dataclass
class DecodeTally:
    examples: int = 0
    accepted: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def check_decoding(raw: bytes, tally: DecodeTally) -> None:
    for decode in (decode_envelope, decode_asset_envelope):
        tally.examples += 1
        try:
            envelope = decode(raw)
        except BadEvent as exc:
            assert exc.reason in REASONS, exc.reason
            tally.reasons[exc.reason] = tally.reasons.get(exc.reason, 0) + 1
            continue
        served_as_the_gateway_would(envelope)
        tally.accepted += 1


def test_decoding_fuzzed_gives_an_envelope_or_a_documented_bad_event(chaos_summary):
    tally = DecodeTally()
    started = time.monotonic()

    @DECODE_SETTINGS
    @given(raw=bus_messages)
    @example(raw=b"[" * 100_000)
    @example(
        raw=b'{"seq":1,"event":{"v":1,"kind":"run","dag_id":"d","run_id":"r","state":"success","msg":"' + b"x" * (4 * 1024 * 1024) + b'"}}'
    )
    @example(raw=json.dumps({"seq": 1, "event": {**VALID_EVENTS[1], "result": {"value": nested(255)}}}).encode())
    @example(raw=json.dumps({"seq": 1, "event": {**VALID_EVENTS[1], "result": {"value": nested(256)}}}).encode())
    @example(raw=b'{"seq":' + b"9" * 5000 + b',"event":{"v":1}}')
    @example(raw=b"\xef\xbb\xbf{}")
    @example(raw=b'{"seq":1,"event":{"v":1.0,"kind":"run","dag_id":"d","run_id":"r","state":"success","ts":NaN}}')
    def decoding(raw: bytes) -> None:
        check_decoding(raw, tally)

    decoding()
    assert tally.accepted and set(tally.reasons) == REASONS  # the fuzz reached every outcome
    chaos_summary(
        recover_seconds=None,
        extra={
            "decoded": tally.examples,
            "accepted": tally.accepted,
            "elapsed_s": round(time.monotonic() - started, 2),
            **{f"bad_{k}": v for k, v in sorted(tally.reasons.items())},
        },
    )


# -- the HTTP API ---------------------------------------------------------------------------------

POSITIVE_EXAMPLES = 15
NEGATIVE_EXAMPLES = 10
UNICODE_EXAMPLES = 15
UNICODE = "unicode"  # the third pass: valid cases whose parameters are Unicode-heavy text
REQUEST_TIMEOUT = 10.0  # a request not answered by then hung
STREAM_SECONDS = 0.6  # how long an event stream is read (it may never end by itself)
LONG_POLL_SECONDS = 0.2  # the longest long-poll the fuzzer may ask for
STREAMS = {"/v1/dags/{dag_id}/runs/{run_id}/events", "/v1/assets/{name}/events", "/v1/backfills/{backfill_id}/events"}
load_all_checks()

# Text no client should send, and some that clients do: digits that str.isdigit() or int() take
# (superscripts, Arabic-Indic, fullwidth), '/', '%', header and URL delimiters, control characters.
NASTY = ["²", "١٢", "５", "1_0", "a/b", "%2F", "%", "é", "🎉", '"', ",", ";", "<>", "\r\n", "\x00", "\t", " ", "9999-12-31T23:59:59-01:00"]
unicode_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(codec="utf-8", categories=("Nd", "No", "Nl", "Lo", "So", "Zs", "Cc", "Cf", "Mn", "Po")), max_size=12),
)
# Header values HTTP can carry: Latin-1 without controls. DEL (0x7f) is none (RFC 9110's field-vchar):
# uvicorn's parser answers 400 "Invalid HTTP request received." before the app sees the request.
latin1_text = st.one_of(
    st.sampled_from(["\xb2", "\xb9\xb2", "\xe9", "1\xa0"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=12),
)


def json_error_body(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx and 5xx is a JSON object with an error code and a message."""
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} without a JSON body: {response.content[:200]!r}") from None
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body


def shortened(value: Any) -> Any:
    """A long-poll wait the fuzzer drew, kept short: a number of seconds within range becomes at most
    LONG_POLL_SECONDS; anything else (out of range, not a number) is left to be refused."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return value
    return min(seconds, LONG_POLL_SECONDS) if 0 <= seconds <= 60 else value


def tame(case: schemathesis.Case) -> None:
    """Keep every call bounded without taking the fuzz out of it. Last-Event-ID is sent as the header
    or as ?last_event_id=, not both: the header wins by design (an EventSource reconnecting sends both),
    so a bad query value beside a good header is not refused."""
    if case.headers and "Last-Event-ID" in case.headers and case.query and "last_event_id" in case.query:
        del case.headers["Last-Event-ID"]
    if case.query:
        for name in ("timeout", "wait"):
            if name in case.query:
                case.query[name] = shortened(case.query[name])
    if case.headers and "Prefer" in case.headers and isinstance(case.headers["Prefer"], str):
        case.headers["Prefer"] = re.sub(r"wait\s*=\s*[^,;\s]*", f"wait={LONG_POLL_SECONDS}", case.headers["Prefer"])


@dataclass
class FuzzTally:
    calls: int = 0
    by_status: dict[tuple[str, int], int] = field(default_factory=dict)  # (positive|negative|unicode, status) -> calls
    failures: list[str] = field(default_factory=list)
    no_invalid_input: list[str] = field(default_factory=list)


def unicode_heavy(case: schemathesis.Case, data: st.DataObject) -> None:
    """Replace some of the case's path and query parameters and headers with Unicode-heavy text
    (headers with latin-1 text, all a header can carry)."""
    for name in list(case.path_parameters or {}):
        if data.draw(st.booleans()):
            # Encoded here: schemathesis leaves some characters ('?' after a combining mark) unencoded.
            case.path_parameters[name] = quote(data.draw(unicode_text.filter(bool)), safe="")  # type: ignore[index]
    for params, text in ((case.query, unicode_text), (case.headers, latin1_text)):
        for name in list(params or {}):
            if name.lower() != "authorization" and data.draw(st.booleans()):
                params[name] = data.draw(text)  # type: ignore[index]
    for name in ("limit", "offset", "after", "last_event_id", "timeout"):  # integer parameters, known or not to the route
        if data.draw(st.integers(0, 3)) == 0:
            case.query = {**(case.query or {}), name: data.draw(unicode_text)}


# Valid input the contract cannot tell from invalid: these refusals are by design, not a bad contract.
BEYOND_THE_CONTRACT = {
    "bad_cursor": "a cursor is opaque and signed: no string the contract can describe is one",
    "target_refused": "a webhook's host must resolve, to a public address",
    "bad_event": "an event's state must be one of its kind's (a model validator; the schema says either)",
    "reserved_header": "a callback's header names are HTTP tokens, but not the delivery's own, nor one twice in another case",
}


def accepted_unless_beyond_the_contract(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """schemathesis' positive_data_acceptance, but for the refusals of BEYOND_THE_CONTRACT."""
    if 400 <= response.status_code < 500:
        try:
            code = json.loads(response.content).get("error")
        except (ValueError, AttributeError):
            code = None
        if code in BEYOND_THE_CONTRACT:
            return None
    return positive_data_acceptance(ctx, response, case)


# Every check schemathesis has (not_a_server_error among them); valid input must be accepted
# unless it is valid only to the contract's eyes.
ALL_CHECKS = [check for check in CHECKS.get_all() if check is not positive_data_acceptance] + [accepted_unless_beyond_the_contract]
# Unicode-heavy input may or may not be valid any more: whether it is accepted or refused is not checked.
UNICODE_CHECKS = [check for check in ALL_CHECKS if check not in (accepted_unless_beyond_the_contract, negative_data_rejection)]


def fuzz(base_url: str, tally: FuzzTally) -> int:
    """Every operation of the contract: valid input, invalid input and Unicode-heavy input. Returns how
    many operations (the document is read from the file; GET /openapi.json is one of them)."""
    schema = schemathesis.openapi.from_path(DOCUMENT)
    schema.config.update(base_url=base_url)
    schema.config.max_stream_events = 1
    # The token is sent by the test (an admin's); unknown query parameters are ignored by design.
    schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    passes = (
        (GenerationMode.POSITIVE, POSITIVE_EXAMPLES, False),
        (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, False),
        (GenerationMode.POSITIVE, UNICODE_EXAMPLES, True),
    )
    for operation in operations:
        timeout = STREAM_SECONDS if operation.path in STREAMS else REQUEST_TIMEOUT
        for mode, examples, unicode in passes:
            label = UNICODE if unicode else mode.value

            @settings(
                max_examples=examples,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
            def call(case: schemathesis.Case, data: st.DataObject) -> None:
                if unicode:
                    unicode_heavy(case, data)
                tame(case)
                response = case.call(headers=auth, timeout=timeout)
                tally.calls += 1
                key = (label, response.status_code)
                tally.by_status[key] = tally.by_status.get(key, 0) + 1
                checks = UNICODE_CHECKS if unicode else ALL_CHECKS  # Unicode-heavy input may not be valid: any 4xx will do
                case.validate_response(response, checks=checks, additional_checks=[json_error_body], headers=auth)

            try:
                call()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label
                tally.no_invalid_input.append(operation.label)  # nothing in it can be made invalid (GET /healthz)
            except (Exception, BaseExceptionGroup) as exc:  # noqa: F821 (Python 3.11+, as the tests run)  # every operation is fuzzed; all failures reported together
                tally.failures.append(f"{operation.label} ({label}): {type(exc).__name__}: {str(exc)[:1500]}")
    return len(operations)


async def wait_for_outcome(http, run_id: str) -> dict:
    """Long-poll as a client does: ask again at each 202 until the outcome comes."""
    while True:
        response = await http.get(result_path(run_id, "chaos"), params={"timeout": 5})
        if response.status_code != 202:
            assert response.status_code == 200, response.text
            return response.json()


async def test_http_api_fuzzed_from_its_openapi_document(
    database_url, gateway_factory, stand_in_airflow, tmp_path, monkeypatch, chaos_summary
):  # on SQLite and on PostgreSQL, whose text keeps no NUL
    monkeypatch.setenv("RUNBELL_SPOOL_DIR", str(tmp_path / "spool"))  # the gateway's publisher, if Redis is slow
    airflow_db = tmp_path / "airflow.db"
    engine = create_engine(f"sqlite:///{airflow_db}")
    _airflow.create_all(engine)
    engine.dispose()
    gateway = await gateway_factory(
        database_url=database_url,
        airflow_url=stand_in_airflow.url,
        airflow_token="stand-in",
        airflow_database_url=f"sqlite:///{airflow_db}",
        webhooks=False,
        heartbeat_seconds=0.2,
        long_poll_default=LONG_POLL_SECONDS,  # a call without a timeout is short too
        reconcile_after=3600,  # the run waited on all along is not one the stand-in Airflow knows
        token_secret="fuzz-token-secret-of-at-least-32-bytes",
    )
    await until(gateway.app.state.hub.connected.is_set)
    tally = FuzzTally()
    async with gateway.client() as http:
        # Callers wait on a real run all along (a long-poll asking again at each 202, and an SSE
        # client); both must get its outcome once the fuzz is over.
        waiter = asyncio.create_task(wait_for_outcome(http, "fuzzed-alongside"))
        stream = asyncio.create_task(read_sse(http, events_path("fuzzed-alongside", "chaos")))
        await until(lambda: gateway.app.state.hub.count >= 2)
        started = time.monotonic()
        try:
            operations = await asyncio.to_thread(fuzz, gateway.url, tally)
            elapsed = time.monotonic() - started
            assert not tally.failures, "\n\n".join(tally.failures)
            assert not waiter.done() and not stream.done()
            await publish(gateway, run("fuzzed-alongside", "running"))
            await publish(gateway, task("fuzzed-alongside", "answer", "success", result_task=True, result=result("ok")))
            await publish(gateway, run("fuzzed-alongside", "success"))
            answered = await asyncio.wait_for(waiter, 20)
            _, _, events = await asyncio.wait_for(stream, 20)
            ready = await http.get("/readyz")
        finally:
            waiter.cancel()
            stream.cancel()
    assert answered["status"] == "success" and answered["result"] == "ok"
    assert [(e.event, e.id.rpartition("-")[2]) for e in events] == [
        ("run", "1"),
        ("task", "2"),
        ("outcome", "2"),
        ("run", "3"),
        ("end", "3"),
    ]
    assert ready.status_code == 200, ready.text
    assert all(status < 500 for _, status in tally.by_status)
    chaos_summary(
        runs=1,
        outcomes_delivered=2,
        extra={
            "operations": operations,
            "calls": tally.calls,
            "fuzz_s": round(elapsed, 1),
            **{f"{mode}_{status}": n for (mode, status), n in sorted(tally.by_status.items())},
        },
    )
