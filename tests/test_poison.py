"""One event never stops the recorder (issue 11, section 1), on PostgreSQL and SQLite.

The values that wedged the recorder for good are put on the global stream as a gateway without
bounds let them through: the good events around them are recorded, values the schema refuses are
counted and dead-lettered as entries that are no event (tests/test_bus_dead_letters.py), values the
store cannot hold on its own are dead-lettered, NUL characters are kept exactly, and a later event is
recorded. An outage of the database dead-letters nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError

from runbell.bus import keys
from runbell.bus.schema import Envelope, Event, envelope_json
from runbell.service.core.metrics import Metrics
from runbell.service.store.dead_letters import DeadLetters, is_outage
from runbell.service.store.models import DeadLetterRow, EventRow
from runbell.service.store.recorder import Recorder

DAG = "etl"
WAIT = 30.0  # a bound for what happens at once when it works; never reached then


@pytest.fixture
async def client(redis_url, redis_cleanup):
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    yield client
    await client.aclose()


def event(run_id: str, **fields) -> dict:
    """An event as JSON-ready fields (not validated: the stream is fed what a gateway without bounds accepted)."""
    body = {
        "v": 1,
        "id": f"{run_id}-{fields.get('state', 'success')}-{len(fields)}",
        "dag_id": DAG,
        "run_id": run_id,
        "ts": 1_700_000_000.0,
    }
    if "task_id" in fields or fields.get("kind") == "task":
        body.update(kind="task", task_id="t", state="success")
    else:
        body.update(kind="run", state="running")
    body.update(fields)
    return body


async def put(client, namespace: str, seq: int, body: dict) -> None:
    """What publish.lua does: the run's log entry 0-seq, then the global stream entry."""
    raw = envelope_json(seq, json.dumps(body))
    await client.xadd(keys.run_keys(namespace, body["dag_id"], body["run_id"]).log, {"env": raw}, id=f"0-{seq}")
    await client.xadd(keys.global_stream(namespace), {"env": raw})


async def record_all(rec: Recorder, client, namespace: str) -> None:
    """Step until every entry is acknowledged (bounded: a wedged recorder fails the test)."""

    async def drain() -> None:
        while True:
            await rec.step()
            stream = keys.global_stream(namespace)
            info = await client.xinfo_groups(stream)
            if info and info[0]["pending"] == 0 and info[0]["lag"] == 0:
                return

    await asyncio.wait_for(drain(), WAIT)


async def stored(store, run_id: str) -> list[Envelope]:
    return await store.events(DAG, run_id)


async def dead_letter_count(store) -> int:
    async with store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(DeadLetterRow))).scalar()


# The issue's values, each in a run of its own between good events.
ISSUE_VALUES = {
    "ts_1e20": {"ts": 1e20},
    "ts_minus_1e20": {"ts": -1e20},
    "try_number_2_63": {"task_id": "t", "try_number": 2**63},
    "try_number_2_31": {"task_id": "t", "try_number": 2**31},
    "map_index_2_31": {"task_id": "t", "map_index": 2**31},
    "year_10000": {"logical_date": "9999-12-31T23:30:00-01:00", "run_after": "9999-12-31T23:59:00-05:00"},
    "nul_dag_id": {"dag_id": "etl\x00"},
    "nul_task_id": {"task_id": "t\x00"},
}
NUL_RESULT = {"text": "before\x00after", "k\x00ey": ["\x00", "\U0001f600\x00"]}
NUL_ERROR = "Traceback: value was b'\x00\x00'"


async def test_the_issue_values_never_stop_the_recorder(client, store, namespace):
    metrics = Metrics()
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100, metrics=metrics)
    seq = 0
    for name, fields in ISSUE_VALUES.items():
        await put(client, namespace, 1, event(f"good-before-{name}"))
        await put(client, namespace, 1, event(f"bad-{name}", **fields))
        await put(client, namespace, 1, event(f"good-after-{name}"))
        seq += 3
    # NUL inside a result and an error message: valid, and kept exactly.
    await put(client, namespace, 1, event("nul", task_id="t", result_task=True, result={"value": NUL_RESULT, "size": 1}))
    await put(
        client, namespace, 1, event("nul-error", task_id="t", state="failed", critical=True, error={"type": "E\x00", "message": NUL_ERROR})
    )

    await record_all(rec, client, namespace)

    for name in ISSUE_VALUES:
        assert [e.seq for e in await stored(store, f"good-before-{name}")] == [1], name
        assert [e.seq for e in await stored(store, f"good-after-{name}")] == [1], name
        assert await stored(store, f"bad-{name}") == [], name
    # Refused by the schema as the recorder reads them: counted, and dead-lettered as no event.
    assert rec.decode_errors == Counter({"schema": len(ISSUE_VALUES)})
    assert [d.reason for d in await DeadLetters(store).list()] == ["schema"] * len(ISSUE_VALUES)
    assert (await stored(store, "nul"))[0].event.result.value == NUL_RESULT
    run = await store.get_run(DAG, "nul")
    assert run.outcome["result"] == NUL_RESULT and run.result_task["task_id"] == "t"
    failed = await store.get_run(DAG, "nul-error")
    assert failed.outcome["failure"]["error"] == {"type": "E\x00", "message": NUL_ERROR}
    assert failed.first_failure["error"]["message"] == NUL_ERROR

    await put(client, namespace, 1, event("later"))
    await record_all(rec, client, namespace)
    assert [e.seq for e in await stored(store, "later")] == [1]


async def test_a_seq_no_store_holds_is_dead_lettered_and_the_batch_recorded(client, store, namespace):
    """seq 2**63 fits no integer column of either store: the envelope schema refuses it as it is read
    (it once reached the store, which refused it), and it is dead-lettered mid-batch as no event."""
    metrics = Metrics()
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100, metrics=metrics)
    for i in range(10):
        await put(client, namespace, 1, event(f"r{i}"))
        if i == 4:
            raw = envelope_json(2**63, json.dumps(event("poison")))
            await client.xadd(keys.global_stream(namespace), {"env": raw})
    await record_all(rec, client, namespace)
    for i in range(10):
        assert [e.seq for e in await stored(store, f"r{i}")] == [1]
    letters = await DeadLetters(store).list()
    assert [(d.reason, d.dag_id, d.run_id, d.attempts) for d in letters] == [("schema", None, None, 1)]
    assert letters[0].stream_id is not None and json.loads(letters[0].raw)["seq"] == 2**63
    assert letters[0].error
    assert metrics.registry.get_sample_value("runbell_recorder_dead_letters_total") == 1
    await put(client, namespace, 1, event("later"))
    await record_all(rec, client, namespace)
    assert [e.seq for e in await stored(store, "later")] == [1]


def failing_for(store, bad_id: str, error: Exception):
    """store.record that refuses any batch holding event bad_id, as a row the database refuses would."""
    real = store.record

    async def record(envelopes):
        if any(e.event.id == bad_id for e in envelopes):
            raise error
        return await real(envelopes)

    return record


DATA_ERROR = DBAPIError("INSERT INTO events ...", {}, ValueError("value out of int32 range"))


async def test_one_row_failing_mid_batch_is_isolated_counted_and_re_driven(client, store, namespace, monkeypatch):
    metrics = Metrics()
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100, metrics=metrics)
    for i in range(25):
        await put(client, namespace, 1, event(f"r{i}", id=f"e{i}"))
    monkeypatch.setattr(store, "record", failing_for(store, "e13", DATA_ERROR))
    await record_all(rec, client, namespace)

    assert sum([len(await stored(store, f"r{i}")) for i in range(25)]) == 24
    assert await stored(store, "r13") == []
    dead = DeadLetters(store)
    [letter] = await dead.list()
    assert (letter.event_id, letter.run_id, letter.seq) == ("e13", "r13", 1)
    assert "value out of int32 range" in letter.error
    assert metrics.registry.get_sample_value("runbell_recorder_dead_letters_total") == 1

    await put(client, namespace, 2, event("r0", id="later", state="success"))
    await record_all(rec, client, namespace)
    assert [e.seq for e in await stored(store, "r0")] == [1, 2]

    # Re-driven while the store still refuses it: it stays, with the new error and one more attempt.
    again = await dead.redrive(letter)
    assert again is not None and again.attempts == 2 and (await dead.list())[0].attempts == 2
    # Re-driven once the store takes it: recorded, and gone from the table.
    monkeypatch.undo()
    assert await dead.redrive(again) is None
    assert [e.event.id for e in await stored(store, "r13")] == ["e13"]
    assert await dead.list() == []


async def test_a_database_outage_dead_letters_nothing(client, store, namespace, monkeypatch):
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100)
    for i in range(6):
        await put(client, namespace, 1, event(f"r{i}"))
    real_record, real_ping = store.record, store.ping

    async def down(*args, **kwargs):
        raise OperationalError("INSERT", {}, ConnectionRefusedError("database down"))

    monkeypatch.setattr(store, "record", down)
    with pytest.raises(OperationalError):
        await rec.step()

    # An error that looks like data while the database does not answer: still an outage.
    async def refused(envelopes):
        raise DATA_ERROR

    async def unreachable():
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(store, "record", refused)
    monkeypatch.setattr(store, "ping", unreachable)
    with pytest.raises(ConnectionRefusedError):
        await rec.step()
    monkeypatch.setattr(store, "record", real_record)
    monkeypatch.setattr(store, "ping", real_ping)
    assert await dead_letter_count(store) == 0
    info = await client.xpending(keys.global_stream(namespace), keys.recorder_group())
    assert info["pending"] == 6  # nothing acknowledged

    await record_all(rec, client, namespace)  # the database is back: everything recorded
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(EventRow))).scalar() == 6
    assert await dead_letter_count(store) == 0


@pytest.mark.parametrize(
    "error, outage",
    [
        (ConnectionRefusedError("down"), True),
        (TimeoutError(), True),
        (OperationalError("x", {}, Exception("database is locked")), True),
        (DBAPIError("x", {}, type("E", (Exception,), {"sqlstate": "53100"})("disk full")), True),
        (DBAPIError("x", {}, type("E", (Exception,), {"sqlstate": "25006"})("read-only transaction")), True),
        (DBAPIError("x", {}, type("E", (Exception,), {"sqlstate": "57P01"})("admin shutdown")), True),
        (DBAPIError("x", {}, type("E", (Exception,), {"sqlstate": "22021"})("invalid byte sequence 0x00")), False),
        (DBAPIError("x", {}, type("E", (Exception,), {"sqlstate": "22P05"})("unsupported Unicode escape")), False),
        (DBAPIError("x", {}, type("E", (Exception,), {"sqlstate": "54000"})("index row too large")), False),
        (OverflowError("Python int too large to convert to SQLite INTEGER"), False),
        (ValueError("1e+20 seconds since the epoch is outside ..."), False),
    ],
)
def test_outage_or_poison(error, outage):
    assert is_outage(error) is outage


async def test_ids_and_values_as_event_models_still_store(store):
    """The store itself, without the recorder: an event at every bound is kept (no dead letter needed)."""
    edge = Event(
        kind="task",
        dag_id="d" * 250,
        run_id="r" * 250,
        task_id="t" * 250,
        state="failed",
        try_number=2**31 - 1,
        map_index=2**31 - 1,
        ts=253402300799.0,
        host="h" * 255,
        error={"type": "T" * 250, "message": "\x00" * 2000},
        critical=True,
    )
    first = Event(
        kind="run", dag_id="d" * 250, run_id="r" * 250, state="running", ts=-62135596800.0, run_type="x" * 64, backfill_id="b" * 250
    )
    await store.record([Envelope(seq=1, event=first), Envelope(seq=2, event=edge)])
    assert [e.event for e in await store.events("d" * 250, "r" * 250)] == [first, edge]
    run = await store.get_run("d" * 250, "r" * 250)
    assert run.outcome["failure"]["error"]["message"] == "\x00" * 2000


async def test_nul_reaches_webhook_payloads_exactly(store):
    """The outbox writes its messages in the recording transaction: a NUL in the result and the error
    is in the payloads as it was sent."""
    from runbell.service.webhooks.outbox import WebhookOutbox, WebhookStore

    store.outbox = WebhookOutbox()
    webhooks = WebhookStore(store)
    endpoint = await webhooks.create_endpoint(url="https://example.com/hook", kinds=["outcome", "task"])
    value = {"k\x00": "a\x00b\U0001f600"}
    answered = Event(
        kind="task", dag_id=DAG, run_id="ok", task_id="t", state="success", result_task=True, result={"value": value, "size": 1}
    )
    failed = Event(kind="task", dag_id=DAG, run_id="ko", task_id="t", state="failed", critical=True, error={"type": "E", "message": "\x00"})
    await store.record([Envelope(seq=1, event=answered), Envelope(seq=1, event=failed)])
    payloads = {(m.run_id, m.kind): json.loads(m.payload) for m in await webhooks.messages(endpoint.id)}
    assert payloads[("ok", "outcome")]["data"]["result"] == value
    assert payloads[("ok", "task")]["data"]["result"]["value"] == value
    assert payloads[("ko", "outcome")]["data"]["failure"]["error"]["message"] == "\x00"


async def test_a_fault_that_passes_is_no_poison(client, store, namespace, monkeypatch):
    """An error that goes away on a second try (an invalidated prepared statement, a conflict) is
    not the entry's: it is recorded, not dead-lettered."""
    for i in range(8):
        await put(client, namespace, 1, event(f"r{i}", id=f"e{i}"))
    real, failures = store.record, []

    async def once(envelopes):
        if any(e.event.id == "e5" for e in envelopes) and len(failures) < 4:  # the batch, halves, e5 alone
            failures.append(len(envelopes))
            raise DATA_ERROR
        return await real(envelopes)

    monkeypatch.setattr(store, "record", once)
    await record_all(Recorder(client, store, namespace, "replica-1", block_ms=100), client, namespace)
    assert failures == [8, 4, 2, 1]  # then e5 alone again: recorded
    assert sum([len(await stored(store, f"r{i}")) for i in range(8)]) == 8
    assert await dead_letter_count(store) == 0


async def test_a_row_stored_under_looser_bounds_never_freezes_its_run(store):
    """A row recorded before the schema bounded msg (or by a gateway of an older version) is read as it
    was stored: the run's new events are recorded and decide it, and its history stays readable."""
    from sqlalchemy import update

    first = Envelope(seq=1, event=Event(kind="run", dag_id=DAG, run_id="old", state="running", msg="m"))
    assert await store.record([first])
    old = json.loads(first.model_dump_json())
    old["event"]["msg"] = "x" * 3000  # over today's bound: what an older gateway accepted
    async with store.engine.begin() as conn:
        await conn.execute(update(EventRow).where(EventRow.run_id == "old").values(envelope=json.dumps(old)))
    with pytest.raises(ValueError):
        Envelope.model_validate(old)  # today's schema refuses it
    end = Envelope(seq=2, event=Event(kind="run", dag_id=DAG, run_id="old", state="success"))
    assert await store.record([end]) == [end]
    run = await store.get_run(DAG, "old")
    assert run is not None and run.state == "success"
    history = await store.events(DAG, "old")
    assert [e.seq for e in history] == [1, 2] and history[0].event.msg == "x" * 3000
