"""Property: every event a client can send is refused at ingress with a 4xx, or stored exactly.

Events are generated from the schema's own bounds (runbell.bus.schema): every integer, time, length
and character rule at its edge and just past it, NUL and astral characters in results and error
messages, the issue's values. Each is POSTed to /v1/events of a gateway that records into PostgreSQL,
and into SQLite: a 4xx has a JSON error body; a 201 must reach the store through the recorder, and
read back equal (the envelope exactly, the run's outcome as its events decide it). Nothing is
dead-lettered or skipped, and a valid event sent afterwards is recorded.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runbell.bus import schema as S
from runbell.bus.schema import Event
from runbell.service.core.outcome import decide
from runbell.service.store.dead_letters import DeadLetters
from tests.conftest import PUBLISH_TOKEN

EXAMPLES = 150  # per backend: a few seconds each
WAIT = 60.0

# -- strategies, from the schema's bounds -----------------------------------------------------------

CONTROL = [chr(c) for c in range(0x20)] + ["\x7f"]
ODD = ["\x00", "a\x00b", "\U0001f600", "\U0010ffff", "\\u0000", '"\\', "\u2028", "é", " "]
Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]  # (within the bounds, past them)


def ints(low: int, high: int) -> Field:
    """The range with its edges; past it, the values next to the edges and those that broke stores."""
    past = [v for v in (low - 1, high + 1, 2**31, 2**63, -(2**63), 2**64) if not low <= v <= high]
    return st.integers(low, high) | st.sampled_from([low, high]), st.sampled_from(past)


def names(max_length: int, min_length: int = 0) -> Field:
    """Ids and names: short ones and ones at the length bound; past it, one longer, or with a control character."""
    plain = st.text(st.characters(codec="utf-8", exclude_characters="".join(CONTROL)), min_size=max(min_length, 1), max_size=12)
    bad = st.sampled_from([max_length + 1] + ([min_length - 1] if min_length else [])).map(lambda n: "n" * n)
    return plain | st.just("n" * max_length), bad | st.tuples(plain, st.sampled_from(CONTROL)).map("".join)


free_text = st.one_of(st.text(st.characters(codec="utf-8"), max_size=30), st.sampled_from(ODD))


def lengths(max_length: int) -> Field:
    """Free text (NUL and astral characters included), up to its length bound; past it, one longer."""
    at = lambda n: "\x00" * (n - 1) + "\U0001f600"  # noqa: E731
    return free_text | st.just(at(max_length)), st.just(at(max_length + 1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | free_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(free_text, inner, max_size=4),
    max_leaves=12,
)
TIMESTAMPS: Field = (
    st.floats(S.TS_MIN, S.TS_MAX) | st.sampled_from([S.TS_MIN, S.TS_MAX]),
    st.sampled_from([S.TS_MIN - 1, S.TS_MAX + 1, 1e20, -1e20, float("nan"), float("inf"), -float("inf")]),
)
TIMES: Field = (
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.timezones() | st.none()).map(
        lambda d: d.isoformat()
    )
    | st.sampled_from(["9999-12-31T23:59:59.999999Z", "0001-01-01", "0001-01-01T00:59:00+00:59"]),
    st.sampled_from(["9999-12-31T23:30:00-01:00", "0001-01-01T00:00:00+01:00", "10000-01-01", "soon", "t" * 65]),
)


def fields(kind: str) -> dict[str, Field]:
    states = [s.value for s in (S.TaskState if kind == "task" else S.RunState)]
    return {
        "dag_id": names(S.ID_MAX, 1),
        "run_id": names(S.ID_MAX, 1),
        "state": (st.sampled_from(states), st.text(max_size=S.STATE_MAX + 2)),
        "ts": TIMESTAMPS,
        "host": names(S.HOST_MAX),
        "task_id": names(S.ID_MAX, 1),
        "map_index": ints(-1, S.INT_MAX),
        "try_number": ints(0, S.INT_MAX),
        "result_value": (json_values, st.nothing()),
        "result_size": ints(0, S.SIZE_MAX),
        "error_type": lengths(S.ERROR_TYPE_MAX),
        "error_message": lengths(S.ERROR_MESSAGE_MAX),
        "run_type": names(S.RUN_TYPE_MAX),
        "logical_date": TIMES,
        "run_after": TIMES,
        "backfill_id": names(S.ID_MAX),
        "msg": lengths(S.MSG_MAX),
        # an input request (state awaiting_input)
        "subject": lengths(S.SUBJECT_MAX),
        "input_body": lengths(S.INPUT_BODY_MAX),
        "option": names(S.OPTION_MAX, 1),
        "options": ints(1, S.OPTIONS_MAX),
        "params": (st.dictionaries(free_text, json_values, max_size=3), st.just({"big": "p" * S.PARAMS_MAX_BYTES})),
        "deadline": TIMES,
    }


INPUT_FIELDS = ("subject", "input_body", "option", "options", "params", "deadline")


def input_request(value: dict[str, Any]) -> dict[str, Any]:
    count = max(0, min(value["options"], S.OPTIONS_MAX + 1))  # past the bound: one too many (or none), not 2**63
    options = [f"{value['option']}{i}"[-S.OPTION_MAX :] if i else value["option"] for i in range(count)]
    return {
        "kind": "choice",
        "subject": value["subject"],
        "body": value["input_body"],
        "options": options,
        "params": value["params"],
        "deadline": value["deadline"],
    }


@st.composite
def event_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """An event within every bound, or (about half of them) with one field past its bound."""
    kind = draw(st.sampled_from(["task", "run"]))
    table = fields(kind)
    spoiled = draw(st.none() | st.sampled_from(sorted(name for name in table if name != "result_value")))
    value = {name: draw(bad if name == spoiled else good) for name, (good, bad) in table.items()}
    optional = lambda name: value[name] if name == spoiled or draw(st.booleans()) else None  # noqa: E731
    body: dict[str, Any] = {
        "kind": kind,
        "id": uuid.uuid4().hex,  # each its own: the bus de-duplicates by id
        "dag_id": value["dag_id"] if spoiled == "dag_id" or draw(st.booleans()) else "fuzz",
        "run_id": value["run_id"] if spoiled == "run_id" or draw(st.booleans()) else uuid.uuid4().hex,  # mostly a run of its own
        "state": value["state"],
        "ts": value["ts"],
        "task_id": value["task_id"] if kind == "task" else optional("task_id"),
        "result_task": draw(st.booleans()),
        "critical": draw(st.booleans()),
        **{
            name: optional(name)
            for name in ("host", "map_index", "try_number", "run_type", "logical_date", "run_after", "backfill_id", "msg")
        },
    }
    if spoiled in ("result_size",) or draw(st.booleans()):
        body["result"] = {"value": value["result_value"], "size": value["result_size"]}
    if spoiled in ("error_type", "error_message") or draw(st.booleans()):
        body["error"] = {"type": value["error_type"], "message": value["error_message"]}
    if spoiled in INPUT_FIELDS or value["state"] == S.TaskState.AWAITING_INPUT.value or not draw(st.integers(0, 20)):
        body["input_request"] = input_request(value)  # and sometimes where it does not belong
    return {key: v for key, v in body.items() if v is not None}


# -- the property -----------------------------------------------------------------------------------

ISSUE_VALUES = [
    {"ts": 1e20},
    {"ts": -1e20},
    {"try_number": 2**63},
    {"map_index": 2**31},
    {"logical_date": "9999-12-31T23:30:00-01:00"},
    {"result": {"value": {"k\x00": "v\x00\U0001f600"}, "size": 1}, "result_task": True},
    {"error": {"type": "E", "message": "\x00" * 2000}, "critical": True, "state": "failed"},
    {  # the largest input request, every field at its bound
        "state": "awaiting_input",
        "input_request": {
            "subject": "\x00" * S.SUBJECT_MAX,
            "body": "\U0001f600" * S.INPUT_BODY_MAX,
            "options": [f"{i:03}" + "o" * (S.OPTION_MAX - 3) for i in range(S.OPTIONS_MAX)],
            "defaults": ["000" + "o" * (S.OPTION_MAX - 3)],
            "params": {"p": "v" * (S.PARAMS_MAX_BYTES - 20)},
            "assigned_users": [{"id": "u" * S.ID_MAX, "name": "n" * S.ID_MAX}] * S.USERS_MAX,
        },
    },
]
BASE = {"kind": "task", "dag_id": "fuzz", "task_id": "t", "state": "success", "ts": 1_700_000_000.0}


def check_ingress(http: httpx.Client, body: dict[str, Any], accepted: list[dict[str, Any]], tally: dict[str, int]) -> None:
    response = http.post("/v1/events", content=json.dumps(body), headers={"Content-Type": "application/json"})
    tally[str(response.status_code)] = tally.get(str(response.status_code), 0) + 1
    if response.status_code == 201:
        accepted.append(body)
        return
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500], body)
    error = response.json()
    assert isinstance(error.get("error"), str) and isinstance(error.get("message"), str), error


def numbers_as_decimals(value: Any) -> Any:
    """JSON numbers compared as numbers: PostgreSQL's jsonb writes 1e300 as its 301 digits."""
    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


async def test_every_event_is_refused_with_a_4xx_or_stored_exactly(gateway_factory, database_url):
    gateway = await gateway_factory(database_url=database_url, webhooks=False)
    store = gateway.app.state.store
    accepted: list[dict[str, Any]] = []
    tally: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=event_bodies())
    def property_(body: dict[str, Any]) -> None:
        check_ingress(http, body, accepted, tally)

    for values in ISSUE_VALUES:
        property_ = example(body={**BASE, "id": uuid.uuid4().hex, "run_id": uuid.uuid4().hex, **values})(property_)
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"}, timeout=30) as http:
        await asyncio.to_thread(property_)
        assert tally.get("201") and len(tally) > 1, tally  # both outcomes reached
        after = {**BASE, "id": uuid.uuid4().hex, "run_id": "sent-afterwards"}
        await asyncio.to_thread(check_ingress, http, after, accepted, tally)
        assert accepted[-1] is after

    expected = {body["id"]: Event.model_validate_json(json.dumps(body)) for body in accepted}
    runs = {(event.dag_id, event.run_id) for event in expected.values()}

    async def all_recorded() -> dict[str, Any]:
        stored = {}
        for dag_id, run_id in runs:
            stored.update({envelope.event.id: envelope for envelope in await store.events(dag_id, run_id)})
        return stored

    async with asyncio.timeout(WAIT):
        while len(stored := await all_recorded()) < len(expected):
            await asyncio.sleep(0.1)
    assert {event_id: envelope.event for event_id, envelope in stored.items()} == expected  # lossless
    for dag_id, run_id in runs:
        history = await store.events(dag_id, run_id)
        outcome = decide(history, dag_id, run_id).model_dump(mode="json")
        record = await store.get_run(dag_id, run_id)
        assert numbers_as_decimals(record.outcome) == numbers_as_decimals(outcome), (dag_id, run_id)
    assert await DeadLetters(store).count() == 0
    assert gateway.app.state.metrics.registry.get_sample_value("runbell_recorder_skipped_total", {"reason": "schema"}) is None
    print(f"event bounds fuzz ({database_url.split(':')[0]}): {sum(tally.values())} events, by status {tally}, runs {len(runs)}")
