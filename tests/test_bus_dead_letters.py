"""Malformed entries on the global stream are dead-lettered, not only skipped (issue 11), on
PostgreSQL and SQLite, with a real Redis.

Entries that are no event (not JSON, not an envelope, a seq no store column holds, larger than any
publisher may send, no 'env' field) are put among good ones: every good one is recorded, each bad one
is dead-lettered once with its reason, stream id and bytes (NUL and invalid UTF-8 included), the
metric counts them, and the recorder goes on. A re-drive of an entry that is still no event leaves it,
with a 409 over HTTP and a clear message from `runbell dead-letters`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from runbell.bus import keys
from runbell.bus.schema import ENVELOPE_OVERHEAD, INT_MAX, BadEvent, decode_envelope, envelope_json
from runbell.listeners.config import EVENT_MAX_BYTES_RANGE
from runbell.service.client.cli import main as cli
from runbell.service.client.exits import EXIT_FAILED, EXIT_SUCCESS
from runbell.service.core.metrics import Metrics
from runbell.service.store.dead_letters import RAW_PREFIX_MAX, DeadLetters, StillMalformed
from runbell.service.store.recorder import Recorder
from tests.conftest import ADMIN_TOKEN
from tests.test_dead_letters_http import wait_for
from tests.test_poison import DAG, client, event, put, record_all, stored  # noqa: F401  (client: a fixture)

CEILING = EVENT_MAX_BYTES_RANGE[1]  # the readers' ceiling: the largest event any publisher may send


def malformed() -> dict[str, tuple[dict[bytes, bytes], str]]:
    """Entries that are no event, by name: (stream fields, the reason they are refused for)."""
    return {
        "not_json": ({b"env": b"not json \x00\xff\xfe{"}, "json"),
        "not_an_envelope": ({b"env": b'{"hello": "wor\\u0000ld"}'}, "shape"),
        "seq_2_31": ({b"env": envelope_json(2**31, json.dumps(event("seq-2-31"))).encode()}, "schema"),
        "seq_0": ({b"env": envelope_json(0, json.dumps(event("seq-0"))).encode()}, "schema"),
        "too_large": ({b"env": b"{" + b"x" * (CEILING + ENVELOPE_OVERHEAD)}, "size"),
        "no_env_field": ({b"other": b"\x00"}, "field"),
        "too_deep_to_encode": (
            {b"env": envelope_json(1, json.dumps(event("deep", msg=None, result={"value": nested(400)}))).encode()},
            "depth",
        ),
    }


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("seq, accepted", [(1, True), (INT_MAX, True), (2**31, False), (2**63, False), (0, False), (-1, False)])
def test_seq_is_bounded_by_the_envelope_schema(seq, accepted):
    raw = envelope_json(seq, json.dumps(event("r")))
    if accepted:
        assert decode_envelope(raw).seq == seq
    else:
        with pytest.raises(BadEvent) as refused:
            decode_envelope(raw)
        assert refused.value.reason == "schema"


async def test_malformed_entries_are_dead_lettered_once_and_the_recorder_goes_on(client, store, namespace, monkeypatch):  # noqa: F811
    metrics = Metrics()
    rec = Recorder(client, store, namespace, "replica-1", block_ms=100, metrics=metrics, max_event_bytes=CEILING)
    stream = keys.global_stream(namespace)
    bad = malformed()
    stream_ids: dict[str, str] = {}
    for i, (name, (fields, _)) in enumerate(bad.items()):
        await put(client, namespace, 1, event(f"good-{i}"))
        stream_ids[name] = (await client.xadd(stream, fields)).decode()
    await put(client, namespace, 1, event("good-last"))

    # The first acknowledgement fails: every entry is delivered again, and still dead-lettered once.
    real_xack = client.xack
    failed_acks = []

    async def xack_fails_once(*args):
        if not failed_acks:
            failed_acks.append(args)
            raise RedisConnectionError("connection lost before the ack")
        return await real_xack(*args)

    monkeypatch.setattr(client, "xack", xack_fails_once)
    with pytest.raises(RedisConnectionError):
        await rec.step()
    await record_all(rec, client, namespace)

    for i in range(len(bad)):
        assert [e.seq for e in await stored(store, f"good-{i}")] == [1]
    assert [e.seq for e in await stored(store, "good-last")] == [1]
    dead = DeadLetters(store)
    letters = await dead.list()
    by_stream = {letter.stream_id: letter for letter in letters}
    assert sorted(by_stream) == sorted(stream_ids.values()) and len(letters) == len(bad)  # each once
    for name, (fields, reason) in bad.items():
        letter = by_stream[stream_ids[name]]
        assert (letter.reason, letter.attempts, letter.dag_id, letter.run_id, letter.event_id) == (reason, 2, None, None, None), name
        assert letter.error.startswith(f"BadEvent: {reason}: "), (name, letter.error)
        raw = fields.get(b"env")
        if name == "too_large":
            assert (letter.raw, letter.raw_size) == (raw[:RAW_PREFIX_MAX], len(raw))
        elif name == "no_env_field":
            assert letter.raw_size == len(letter.raw) and b"other" in letter.raw
        else:
            assert (letter.raw, letter.raw_size) == (raw, len(raw)), name  # exactly: NUL and invalid UTF-8 too
    assert metrics.registry.get_sample_value("runbell_recorder_dead_letters_total") == len(bad)
    assert rec.decode_errors == Counter({reason: 2 for reason in ("json", "shape", "size", "field", "depth")} | {"schema": 4})

    # Re-driven while still no event: it stays, with one more attempt.
    letter = by_stream[stream_ids["seq_2_31"]]
    with pytest.raises(StillMalformed) as still:
        await dead.redrive(letter)
    assert still.value.letter.attempts == 3 and still.value.letter.reason == "schema"
    assert (await dead.get(letter.id)).attempts == 3

    await put(client, namespace, 1, event("later"))
    await record_all(rec, client, namespace)
    assert [e.seq for e in await stored(store, "later")] == [1]
    assert await dead.count() == len(bad)


async def test_malformed_dead_letters_over_http_and_the_cli(gateway_factory, database_url, capsys):
    gateway = await gateway_factory(database_url=database_url, webhooks=False)
    store = gateway.app.state.store
    redis = aioredis.Redis.from_url(gateway.redis_url)
    bad = malformed()
    stream = keys.global_stream(gateway.namespace)
    stream_ids = {}
    try:
        for i, (name, (fields, _)) in enumerate(bad.items()):
            await redis.xadd(stream, {"env": envelope_json(1, json.dumps(event(f"good-{i}")))})
            stream_ids[name] = (await redis.xadd(stream, fields)).decode()
    finally:
        await redis.aclose()

    async with gateway.client(ADMIN_TOKEN) as http:

        async def all_letters():
            page = (await http.get("/v1/dead-letters")).json()
            return page["dead_letters"] if len(page["dead_letters"]) == len(bad) else None

        letters = {d["stream_id"]: d for d in await wait_for(all_letters)}
        for i in range(len(bad)):
            assert (await store.last_position(DAG, f"good-{i}")).seq == 1
        for name, (fields, reason) in bad.items():
            shown = letters[stream_ids[name]]
            assert (shown["reason"], shown["dag_id"], shown["run_id"], shown["event_id"], shown["seq"]) == (reason, None, None, None, None)
            assert shown["error"].startswith(f"BadEvent: {reason}: ")
            kept = base64.b64decode(shown["raw_base64"])
            if name in ("not_json", "not_an_envelope", "seq_2_31"):
                assert kept == fields[b"env"] and shown["raw_size"] == len(kept) and shown["raw_truncated"] is False
        too_large = letters[stream_ids["too_large"]]
        assert too_large["raw_truncated"] is True and too_large["raw_size"] == CEILING + ENVELOPE_OVERHEAD + 1
        assert len(base64.b64decode(too_large["raw_base64"])) == RAW_PREFIX_MAX
        assert letters[stream_ids["not_an_envelope"]]["envelope"] == {"hello": "wor\x00ld"}  # what it holds, parsed
        assert letters[stream_ids["not_json"]]["envelope"] == "not json \x00\ufffd\ufffd{"  # as text, when it is not JSON
        assert letters[stream_ids["too_deep_to_encode"]]["envelope"].startswith('{"seq":1,')  # as text, when too deep to answer
        metrics = (await http.get("/metrics")).text
        assert f"runbell_recorder_dead_letters_total {float(len(bad))}" in metrics

        seq_letter = letters[stream_ids["seq_2_31"]]
        response = await http.post(f"/v1/dead-letters/{seq_letter['id']}/redrive")
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "still_malformed" and "schema" in response.json()["message"]
        assert response.json()["accepted"]
        again = (await http.get("/v1/dead-letters")).json()["dead_letters"]
        assert [d["attempts"] for d in again if d["id"] == seq_letter["id"]] == [2]  # still there, tried once more

    admin = ["--url", gateway.url, "--token", ADMIN_TOKEN]
    capsys.readouterr()
    assert await asyncio.to_thread(cli, ["dead-letters", "list", *admin]) == EXIT_SUCCESS
    listed = json.loads(capsys.readouterr().out)["dead_letters"]
    assert sorted(d["stream_id"] for d in listed) == sorted(stream_ids.values())
    assert await asyncio.to_thread(cli, ["dead-letters", "redrive", str(seq_letter["id"]), *admin]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "still not an event" in err and "schema" in err, err
    assert await asyncio.to_thread(cli, ["dead-letters", "redrive", "--all", *admin]) == EXIT_FAILED
    totals = json.loads(capsys.readouterr().out)
    assert (totals["recorded"], totals["failed"], totals["remaining"]) == (0, len(bad), len(bad))


def test_dead_letters_from_before_0007_read_as_events_the_store_refused(database_url):
    """Migration 0007 on a database with a dead letter: it reads as before, reason "store"."""
    from alembic import command
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from runbell.service.store.store import Store, alembic_config, normalize_database_url

    engine = create_async_engine(normalize_database_url(database_url))
    command.upgrade(alembic_config(engine=engine), "0006")
    payload = envelope_json(1, json.dumps(event("old", id="e1")))

    async def insert() -> None:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO dead_letters (event_id, stream_id, dag_id, run_id, payload, error, attempts, dead_lettered_at, last_attempt_at)"
                    " VALUES ('e1', '1-0', :dag, 'old', :payload, 'E: refused', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
                {"dag": DAG, "payload": payload},
            )
        await engine.dispose()

    asyncio.run(insert())
    command.upgrade(alembic_config(engine=engine), "head")

    async def letters():
        store = Store(database_url)
        await store.start()
        try:
            return await DeadLetters(store).list()
        finally:
            await store.close()

    [letter] = asyncio.run(letters())
    assert (letter.reason, letter.event_id, letter.dag_id, letter.run_id, letter.seq, letter.raw) == ("store", "e1", DAG, "old", 1, None)
    asyncio.run(engine.dispose())


async def test_a_page_of_dead_letters_is_bounded_in_bytes(store):
    """Letters kept whole up to the readers' ceiling: a page stops before the bytes it holds pass
    PAGE_BYTES_MAX (one letter at least), and says there is more."""
    from runbell.service.store.dead_letters import PAGE_BYTES_MAX, RAW_KEPT_MAX, Rejected

    dead = DeadLetters(store)
    per_page = PAGE_BYTES_MAX // RAW_KEPT_MAX
    entries = [Rejected(f"{i}-0", b"[" * RAW_KEPT_MAX, BadEvent("depth", "deep")) for i in range(1, per_page + 3)]
    await dead.reject(entries)
    seen, after, more = [], 0, True
    while more:
        letters, more = await dead.page(after=after, limit=50)
        assert 1 <= len(letters) <= per_page and sum(len(d.raw) for d in letters) <= PAGE_BYTES_MAX
        seen += [d.stream_id for d in letters]
        after = letters[-1].id
    assert seen == [e.stream_id for e in entries]
    assert await dead.page(after=after, limit=50) == ([], False)
    small = [Rejected(f"{i}-1", b"x", BadEvent("json", "x")) for i in range(3)]
    await dead.reject(small)
    letters, more = await dead.page(after=after, limit=3)
    assert [d.stream_id for d in letters] == [e.stream_id for e in small] and more is False


async def test_an_entry_that_reads_as_an_event_now_is_recorded_by_a_redrive(store):
    """An entry dead-lettered as no event that the schema reads now (e.g. a version a newer gateway
    knows): a re-drive records it, exactly as it was sent, and removes the dead letter."""
    from runbell.service.store.dead_letters import Rejected

    dead = DeadLetters(store)
    raw = envelope_json(1, json.dumps(event("now-valid", msg="a\x00b"))).encode()
    await dead.reject([Rejected("5-0", raw, BadEvent("version", "unknown event version 2"))])
    [letter] = await dead.list()
    assert await dead.redrive(letter) is None
    assert await dead.list() == []
    [envelope] = await stored(store, "now-valid")
    assert envelope.event.msg == "a\x00b"
