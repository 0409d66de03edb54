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
from runbell.service.store.dead_letters import RAW_MAX_BYTES, DeadLetters, StillMalformed
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
            assert (letter.raw, letter.raw_size) == (raw[:RAW_MAX_BYTES], len(raw))
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
        assert len(base64.b64decode(too_large["raw_base64"])) == RAW_MAX_BYTES
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
    """Letters kept whole up to the readers' ceiling (the largest raw cap): a page stops before the bytes it holds pass
    PAGE_BYTES_MAX (one letter at least), and says there is more."""
    from runbell.service.store.dead_letters import PAGE_BYTES_MAX, RAW_KEPT_MAX, Rejected

    dead = DeadLetters(store, raw_max_bytes=RAW_KEPT_MAX)
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


# -- bounds: what one dead letter keeps, how many the table holds --------------------------------


def refused_letter(run_id: str, event_id: str):
    """A letter of a valid event (the store will be made to refuse it)."""
    from runbell.service.store.dead_letters import Letter

    payload = envelope_json(1, json.dumps(event(run_id, id=event_id)))
    return Letter(decode_envelope(payload), payload, f"{event_id}-stream")


def no_event(stream_id: str, reason: str = "json"):
    from runbell.service.store.dead_letters import Rejected

    return Rejected(stream_id, b"not json " + stream_id.encode(), BadEvent(reason, "refused"))


async def test_a_malformed_entry_over_the_raw_cap_keeps_its_first_bytes_and_its_size(store):
    from runbell.service.store.dead_letters import Rejected

    dead = DeadLetters(store, raw_max_bytes=4096)
    await dead.reject([Rejected("1-0", b"x" * 5000, BadEvent("json", "x")), Rejected("2-0", b"y" * 4096, BadEvent("json", "y"))])
    big, whole = await dead.list()
    assert (big.raw, big.raw_size, big.raw_truncated) == (b"x" * 4096, 5000, True)
    assert (whole.raw, whole.raw_size, whole.raw_truncated) == (b"y" * 4096, 4096, False)
    with pytest.raises(StillMalformed, match="first 4096 bytes"):
        await dead.redrive(big)


async def test_the_table_is_capped_evicting_the_oldest_malformed_entries_first(store, monkeypatch, caplog):
    """At the cap, the oldest entries that are no event go first; events the store refused only once
    none is left. Each eviction counted by kind, logged once per kind."""
    from tests.test_poison import DATA_ERROR

    async def refuse_all(envelopes):
        raise DATA_ERROR

    monkeypatch.setattr(store, "record", refuse_all)
    metrics = Metrics()
    dead = DeadLetters(store, metrics, max_rows=4)

    async def kept() -> list[str]:
        return [d.stream_id for d in await dead.list()]

    with caplog.at_level("DEBUG", "runbell.dead_letters"):
        await dead.reject([no_event("1-0")])
        await dead.record([refused_letter("r1", "e1")])
        await dead.reject([no_event("2-0"), no_event("3-0")])
        assert await kept() == ["1-0", "e1-stream", "2-0", "3-0"]
        await dead.record([refused_letter("r2", "e2")])
        assert await kept() == ["e1-stream", "2-0", "3-0", "e2-stream"]
        await dead.reject([no_event("4-0"), no_event("5-0")])
        assert await kept() == ["e1-stream", "e2-stream", "4-0", "5-0"]
        await dead.record([refused_letter("r3", "e3"), refused_letter("r4", "e4")])
        assert await kept() == ["e1-stream", "e2-stream", "e3-stream", "e4-stream"]
        await dead.record([refused_letter("r5", "e5")])  # only events left: the oldest goes
        assert await kept() == ["e2-stream", "e3-stream", "e4-stream", "e5-stream"]
        await dead.reject([no_event("6-0")])  # the newest, yet the one malformed entry: it goes
        assert await kept() == ["e2-stream", "e3-stream", "e4-stream", "e5-stream"]

    evicted = "runbell_recorder_dead_letters_evicted_total"
    assert metrics.registry.get_sample_value(evicted, {"kind": "malformed"}) == 6
    assert metrics.registry.get_sample_value(evicted, {"kind": "event"}) == 1
    assert metrics.registry.get_sample_value("runbell_recorder_dead_letters_total") == 11
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "evict" in r.getMessage()]
    assert len(warnings) == 2 and any("no event" in w for w in warnings) and any("refused" in w for w in warnings), warnings
    assert await dead.count() == 4


async def test_recorders_sharing_a_store_keep_the_table_at_its_cap(database_url):
    """Two gateways' recorders dead-letter at once: no error, and the table ends at its cap (a moment
    over it by the concurrent inserts at most, then back)."""
    from runbell.service.store.store import Store

    stores = [Store(database_url), Store(database_url)]
    for each in stores:
        await each.start()
    try:
        deads = [DeadLetters(each, max_rows=10) for each in stores]

        async def flood(dead: DeadLetters, name: str) -> None:
            for i in range(30):
                await dead.reject([no_event(f"{i + 1}-{name}")])

        await asyncio.gather(flood(deads[0], "1"), flood(deads[1], "2"))
        assert 10 <= await deads[0].count() <= 12
        await deads[0].reject([no_event("99-0")])
        assert await deads[0].count() == 10
        assert "99-0" in [d.stream_id for d in await deads[0].list()]
    finally:
        for each in stores:
            await each.close()


async def test_malformed_entries_are_logged_once_per_reason_and_counted(store, caplog):
    """An attacker's flood, re-delivered too, is one warning per reason, not one per entry."""
    metrics = Metrics()
    dead = DeadLetters(store, metrics)
    entries = [no_event(f"{i}-0") for i in range(1, 6)] + [no_event("9-0", "shape")]
    with caplog.at_level("DEBUG", "runbell.dead_letters"):
        await dead.reject(entries)
        await dead.reject(entries)  # re-delivered: the same dead letters, tried once more
    warnings = [r.getMessage() for r in caplog.records if r.name == "runbell.dead_letters" and r.levelname == "WARNING"]
    assert len(warnings) == 2 and "(json" in warnings[0] and "(shape" in warnings[1], warnings
    assert metrics.registry.get_sample_value("runbell_recorder_dead_letters_total") == 6
    assert [d.attempts for d in await dead.list()] == [2] * 6


async def test_the_gateways_recorder_keeps_the_configured_bounds(gateway_factory):
    """RUNBELL_DEAD_LETTER_RAW_MAX_BYTES and RUNBELL_DEAD_LETTERS_MAX reach the recorder of a served gateway."""
    gateway = await gateway_factory(webhooks=False, dead_letter_raw_max_bytes=1024, dead_letters_max=100)
    redis = aioredis.Redis.from_url(gateway.redis_url)
    try:
        for i in range(101):
            await redis.xadd(keys.global_stream(gateway.namespace), {"env": b"z" * 3000 + str(i).encode()})
    finally:
        await redis.aclose()
    async with gateway.client(ADMIN_TOKEN) as http:

        async def all_evicted():
            metrics = (await http.get("/metrics")).text
            return 'runbell_recorder_dead_letters_evicted_total{kind="malformed"} 1.0' in metrics

        await wait_for(all_evicted)
        letters = (await http.get("/v1/dead-letters", params={"limit": 200})).json()["dead_letters"]
    assert len(letters) == 100 and letters[-1]["raw_size"] == 3003
    assert len(base64.b64decode(letters[-1]["raw_base64"])) == 1024 and letters[-1]["raw_truncated"] is True
