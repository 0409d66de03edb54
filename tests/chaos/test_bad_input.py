"""Chaos, bad input: what the bus may carry besides the hook's events, and what the gateway makes of it.

Junk, misrouted and oversized messages are SPUBLISHed raw, under the routes of runs and assets, on the shard channels the hub
listens on, and XADDed to the global stream the recorder reads; real envelopes are re-published
(duplicates, replays) and delivered out of sequence order; events flood in for runs nobody waits
on. Meanwhile long-poll waiters and SSE clients wait on real runs. Each scenario asserts that every
caller got the right outcome, that every SSE client saw each of its run's events exactly once and in
sequence order, that the gateway still answers /readyz and new requests, and that the drop
counters of /metrics grew by exactly what was injected. Each records one chaos summary line.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from runbell.bus import keys
from runbell.bus.schema import (
    AssetEvent,
    AssetInfo,
    ErrorInfo,
    Event,
    EventKind,
    Result,
    envelope_json,
    parse_position,
)
from runbell.listeners.config import EVENT_MAX_BYTES_RANGE, PublisherConfig
from runbell.listeners.publisher import PUBLISH_LUA, Publisher
from runbell.service.store.dead_letters import DeadLetters
from tests.conftest import PUBLISH_TOKEN
from tests.test_gateway import events_path, read_sse, result_path, until

DAG = "chaos"
WAIT = 20.0  # upper bound of any wait that should end at once; never reached when things work
MIB = 1024 * 1024
ASSET = "s3://lake/chaos/orders"


# -- the runs callers wait on -----------------------------------------------------------------------


def task(run_id: str, task_id: str, state: str, **kw: Any) -> Event:
    return Event(kind=EventKind.TASK, dag_id=DAG, run_id=run_id, state=state, task_id=task_id, try_number=1, **kw)


def run(run_id: str, state: str, **kw: Any) -> Event:
    return Event(kind=EventKind.RUN, dag_id=DAG, run_id=run_id, state=state, **kw)


def result(value: Any) -> Result:
    return Result(value=value, size=len(json.dumps(value)))


# What each kind of run publishes, and what its callers must be told (fields of the outcome).
SCRIPTS = {
    "result": (
        lambda r: [
            run(r, "running"),
            task(r, "answer", "running", result_task=True),
            task(r, "answer", "success", result_task=True, result=result({"run": r})),
            task(r, "cleanup", "success"),
            run(r, "success"),
        ],
        lambda r: {"status": "success", "decided_by": "result_task", "decided_seq": 3, "result": {"run": r}},
    ),
    "critical": (
        lambda r: [
            run(r, "running"),
            task(r, "extract", "running", critical=True),
            task(r, "extract", "failed", critical=True, error=ErrorInfo(type="KeyError", message="'id'")),
            run(r, "failed"),
        ],
        lambda r: {
            "status": "failed",
            "decided_by": "critical_task",
            "decided_seq": 3,
            "failure": {"task_id": "extract", "map_index": -1, "try_number": 1, "error": {"type": "KeyError", "message": "'id'"}},
        },
    ),
    "run": (
        lambda r: [run(r, "running"), task(r, "a", "success"), run(r, "success")],
        lambda r: {"status": "success", "decided_by": "run", "decided_seq": 3, "result": None},
    ),
    "never_flips": (  # decided by the result task; a later critical failure and a failed run change nothing
        lambda r: [
            run(r, "running"),
            task(r, "answer", "success", result_task=True, result=result(1)),
            task(r, "load", "failed", critical=True, error=ErrorInfo(type="OSError", message="disk")),
            run(r, "failed"),
        ],
        lambda r: {"status": "success", "decided_by": "result_task", "decided_seq": 2, "result": 1},
    ),
}


@dataclass
class Watched:
    """One real run with a long-poll waiter and an SSE client on it."""

    run_id: str
    kind: str
    events: list[Event]
    waiter: asyncio.Task | None = None
    stream: asyncio.Task | None = None
    done_at: dict[str, float] = field(default_factory=dict)  # caller -> monotonic time it had its answer

    @property
    def expected(self) -> dict[str, Any]:
        return SCRIPTS[self.kind][1](self.run_id)


def watched_runs(prefix: str, kinds: list[str]) -> list[Watched]:
    return [Watched(f"{prefix}-{i}-{kind}", kind, SCRIPTS[kind][0](f"{prefix}-{i}-{kind}")) for i, kind in enumerate(kinds)]


async def timed(coro, done_at: dict[str, float], name: str):
    value = await coro
    done_at[name] = time.monotonic()
    return value


def attach(http, runs: list[Watched]) -> None:
    """A long-poll waiter and an SSE client on each run."""
    for w in runs:
        waiter = http.get(result_path(w.run_id, DAG), params={"timeout": WAIT})
        w.waiter = asyncio.create_task(timed(waiter, w.done_at, "waiter"))
        w.stream = asyncio.create_task(timed(read_sse(http, events_path(w.run_id, DAG)), w.done_at, "sse"))


async def attached(gateway, http, runs: list[Watched], others: int = 0) -> None:
    """attach(), then wait until every caller is registered in the hub, before anything is published."""
    attach(http, runs)
    await until(lambda: gateway.app.state.hub.count >= 2 * len(runs) + others)


def release(runs: list[Watched], *others: asyncio.Task | None) -> None:
    """After a failure: stop the callers still waiting, and take the errors of those that ended."""
    for t in [task for w in runs for task in (w.waiter, w.stream)] + list(others):
        if t is None:
            continue
        if not t.done():
            t.cancel()
        elif not t.cancelled():
            t.exception()


@dataclass
class Tally:
    outcomes_delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    last_answer: float = 0.0


async def settle(runs: list[Watched]) -> Tally:
    """Wait for every caller (bounded) and check what each got: the right outcome; every event once, in order."""
    tally = Tally()
    async with asyncio.timeout(WAIT + 10):
        for w in runs:
            response = await w.waiter
            assert response.status_code == 200, (w.run_id, response.status_code, response.text[:300])
            body = response.json()
            assert {k: body.get(k) for k in w.expected} == w.expected, (w.run_id, body)
            tally.outcomes_delivered += 1
            status, _, events = await w.stream
            assert status == 200
            seqs = [parse_position(e.id).seq for e in events if e.event in ("task", "run")]
            wanted = list(range(1, len(w.events) + 1))
            tally.lost += len(set(wanted) - set(seqs))
            tally.duplicated += len(seqs) - len(set(seqs))
            assert seqs == wanted, (w.run_id, seqs)  # each event once, in sequence order
            for seq, event in zip(seqs, (e for e in events if e.event in ("task", "run"))):
                assert event.json()["id"] == w.events[seq - 1].id  # the run's own event, not an impostor
            outcomes = [e for e in events if e.event == "outcome"]
            assert len(outcomes) == 1 and parse_position(outcomes[0].id).seq == w.expected["decided_seq"]
            assert {k: outcomes[0].json().get(k) for k in w.expected} == w.expected
            tally.outcomes_delivered += 1
            assert [e.event for e in events][-1] == "end"
            tally.last_answer = max(tally.last_answer, *w.done_at.values())
    return tally


_publishers: weakref.WeakKeyDictionary[Any, Publisher] = weakref.WeakKeyDictionary()


async def publish(gateway, event: Event | AssetEvent) -> int:
    """Publish as the hook does, through one publisher per gateway with a generous timeout (a
    publish that spooled on a busy machine would leave the callers waiting for nothing)."""
    if gateway not in _publishers:
        config = PublisherConfig(
            redis_url=gateway.redis_url,
            namespace=gateway.namespace,
            spool_dir=Path(tempfile.mkdtemp(prefix="rb-chaos-spool-")),
            timeout_seconds=5,
        )
        _publishers[gateway] = Publisher(config)
    seq = await asyncio.to_thread(_publishers[gateway].publish, event)
    assert seq is not None, "Redis must accept the event"
    return seq


# -- the bus, by hand -----------------------------------------------------------------------------


def raw_envelope(seq: Any, event: dict) -> bytes:
    return json.dumps({"seq": seq, "event": event}).encode()


def event_dict(run_id: str, state: str = "success", dag_id: str = DAG, **kw: Any) -> dict:
    return {
        "v": 1,
        "id": f"forged-{run_id}-{state}",
        "kind": "run",
        "dag_id": dag_id,
        "run_id": run_id,
        "state": state,
        "ts": time.time(),
        **kw,
    }


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def run_channel_junk(run_id: str) -> list[tuple[bytes, str]]:
    """(message, the drop reason the gateway must count) for a run's channel. None of them is the
    run's own: each could decide the outcome, or take a sequence number, if it were let through."""
    deep = event_dict(run_id, kind="task", task_id="answer", result_task=True, result={"value": nested(400)})
    asset = {"v": 1, "kind": "asset", "asset": {"name": ASSET}}
    return [
        (b"not json", "json"),
        (b"\xff\xfe\xfa\x00 not utf-8", "json"),
        (b"[" * 200_000, "depth"),  # nested past the JSON parser's recursion limit
        (b"[]", "shape"),
        (b'{"seq": 2}', "shape"),
        (raw_envelope(2, {**event_dict(run_id), "v": 2}), "version"),
        (raw_envelope(2, event_dict(run_id, state="exploded")), "schema"),
        (raw_envelope(0, event_dict(run_id)), "schema"),  # seq 0 does not exist
        (raw_envelope(2, asset), "schema"),  # an asset's event on a run's channel
        (raw_envelope(2, deep), "depth"),  # valid, but too deep to be encoded again (store, SSE, 200)
        (raw_envelope(2, event_dict(run_id + "-other")), "route"),  # another run's event
        (raw_envelope(2, event_dict(run_id, dag_id=DAG + "-other")), "route"),
    ]


def asset_channel_junk() -> list[tuple[bytes, str]]:
    event = {"v": 1, "id": "forged-asset", "kind": "asset", "asset": {"name": ASSET}, "ts": time.time()}
    return [
        (b"{", "json"),
        (b"[" * 200_000, "depth"),
        (raw_envelope(1, {**event, "v": 7}), "version"),
        (raw_envelope(1, event_dict("r")), "schema"),  # a run's event on an asset's channel
        (raw_envelope(1, {**event, "extra": {"deep": nested(400)}}), "depth"),
        (raw_envelope(1, {**event, "asset": {"name": ASSET + "-other"}}), "route"),  # another asset's event
    ]


async def log_only(redis: aioredis.Redis, namespace: str, event: Event) -> bytes:
    """publish.lua's seq, log and partition-stream entry for the event, with its SPUBLISH sent to a
    channel nobody listens on: the envelope, for the test to deliver later, in any order."""
    k = keys.run_keys(namespace, event.dag_id, event.run_id)
    args = [event.id, event.to_json(), 3600, f"{namespace}:void", 0, 1000, k.route]
    seq, new, epoch = await redis.eval(PUBLISH_LUA, 6, k.seq, k.log, k.ids, k.epoch, k.writer, k.stream, *args)
    assert new == 1
    return envelope_json(seq, event.to_json(), epoch.decode()).encode()


async def on_channel(redis: aioredis.Redis, k: keys.RunKeys | keys.AssetKeys, message: bytes) -> None:
    """A message on the stream's shard channel, under its route, as a publisher without checks would send it."""
    await redis.spublish(k.live, keys.live_message(k.route, message))


async def logged_envelopes(redis: aioredis.Redis, namespace: str, run_id: str) -> list[bytes]:
    return [fields[b"env"] for _, fields in await redis.xrange(keys.run_keys(namespace, DAG, run_id).log)]


# -- metrics --------------------------------------------------------------------------------------


async def scrape(http) -> dict[tuple[str, tuple], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def grew(before: dict, after: dict, name: str) -> Counter:
    """How much each labelled sample of a counter grew, by its first label's value."""
    out: Counter = Counter()
    for (sample, labels), value in after.items():
        if sample == name:
            delta = value - before.get((sample, labels), 0.0)
            if delta:
                out[labels[0][1] if labels else ""] += int(delta)
    return out


def value(metrics: dict, name: str) -> float:
    return metrics.get((name, ()), 0.0)


def dropped_count(gateway, reason: str) -> float:
    registry = gateway.app.state.metrics.registry
    return registry.get_sample_value("runbell_decode_errors_total", {"reason": reason}) or 0.0


async def still_serving(gateway, http, run_id: str) -> None:
    """/readyz is 200 (once its first checks are made: the scenario may be over sooner) and a new
    caller on a new run gets its outcome."""
    await until(lambda: gateway.app.state.readiness.ready_once)
    ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text
    await publish(gateway, run(run_id, "success"))
    response = await http.get(result_path(run_id, DAG), params={"timeout": 5})
    assert response.status_code == 200 and response.json()["decided_by"] == "run"


# -- scenarios ------------------------------------------------------------------------------------


async def test_junk_and_misrouted_messages_on_run_and_asset_channels(gateway, chaos_summary):
    """Every kind of bad message on the channels of watched runs and of a watched asset: all are
    dropped and counted by reason, none decides an outcome or takes a sequence number, and the hub's
    listener never falls over (no re-subscription)."""
    runs = watched_runs("junk", list(SCRIPTS))
    redis = aioredis.Redis.from_url(gateway.redis_url)
    await until(gateway.app.state.hub.connected.is_set)
    asset_waiter = None
    try:
        async with gateway.client() as http:
            asset_waiter = asyncio.create_task(http.get(f"/v1/assets/{ASSET}/next", params={"timeout": WAIT}))
            await attached(gateway, http, runs, others=1)
            before = await scrape(http)
            for w in runs:
                await publish(gateway, w.events[0])
            injected: Counter = Counter()
            fault = time.monotonic()
            for w in runs:
                for message, reason in run_channel_junk(w.run_id):
                    await on_channel(redis, keys.run_keys(gateway.namespace, DAG, w.run_id), message)
                    injected[reason] += 1
            for message, reason in asset_channel_junk():
                await on_channel(redis, keys.asset_keys(gateway.namespace, ASSET), message)
                injected[reason] += 1
            for w in runs:
                for event in w.events[1:]:
                    await publish(gateway, event)
            asset_seq = await publish(gateway, AssetEvent(asset=AssetInfo(name=ASSET), extra={"rows": 42}))
            tally = await settle(runs)
            asset_answer = await asyncio.wait_for(asset_waiter, WAIT)
            assert asset_answer.status_code == 200, asset_answer.text
            assert asset_answer.json()["asset"]["name"] == ASSET and asset_answer.json()["seq"] == asset_seq == 1
            assert asset_answer.json()["extra"] == {"rows": 42}
            recovered = max(tally.last_answer, time.monotonic()) - fault
            await still_serving(gateway, http, "junk-after")
            after = await scrape(http)
    finally:
        release(runs, asset_waiter)
        await redis.aclose()
    dropped = grew(before, after, "runbell_decode_errors_total")
    assert dropped == injected, (dropped, injected)
    assert value(after, "runbell_resubscribes_total") == value(before, "runbell_resubscribes_total")
    assert tally.lost == 0 and tally.duplicated == 0
    chaos_summary(
        runs=len(runs),
        outcomes_delivered=tally.outcomes_delivered + 1,
        lost=tally.lost,
        duplicated=tally.duplicated,
        recover_seconds=recovered,
        extra={
            "injected": sum(injected.values()),
            "dropped": sum(dropped.values()),
            **{f"dropped_{reason}": n for reason, n in sorted(dropped.items())},
        },
    )


async def test_oversized_messages_do_not_crash_or_stall_the_hub(gateway, chaos_summary):
    """8 MiB messages of every bad kind are dropped and counted, as over the event cap (reason size,
    before they are parsed); a 40 MiB one, past what Redis lets a pub/sub client buffer (32 MiB), gets
    the hub's connection cut by Redis: it re-subscribes and its callers re-read the replay log, so
    nothing published around it is lost."""
    runs = watched_runs("big", ["result", "critical"])
    redis = aioredis.Redis.from_url(gateway.redis_url)
    hub = gateway.app.state.hub
    await until(hub.connected.is_set)
    big = EVENT_MAX_BYTES_RANGE[1] + MIB  # over the most any publisher may send
    try:
        async with gateway.client() as http:
            await attached(gateway, http, runs)
            before = await scrape(http)
            for w in runs:
                await publish(gateway, w.events[0])
            channel = keys.run_keys(gateway.namespace, DAG, runs[0].run_id)
            oversized = [  # each also bad in another way (json, shape, version, schema, route): its size is seen first
                (b"x" * big, "size"),
                (json.dumps("y" * big).encode(), "size"),
                (raw_envelope(2, {**event_dict(runs[0].run_id), "v": 3, "pad": "z" * big}), "size"),
                (raw_envelope(2, event_dict(runs[0].run_id, state="success", msg="m" * big, kind="bogus")), "size"),
                (raw_envelope(2, event_dict(runs[0].run_id + "-other", msg="m" * big)), "size"),
            ]
            fault = time.monotonic()
            for message, reason in oversized:
                # One at a time: five at once would overflow what Redis buffers for the hub (32 MiB).
                count = dropped_count(gateway, reason)
                await on_channel(redis, channel, message)
                await until(lambda: dropped_count(gateway, reason) > count, WAIT)
            resubscribes = hub.metrics.resubscribes._value.get()
            await on_channel(redis, keys.run_keys(gateway.namespace, DAG, runs[1].run_id), b"w" * (40 * MIB))
            for w in runs:
                for event in w.events[1:]:
                    await publish(gateway, event)
            tally = await settle(runs)
            recovered = tally.last_answer - fault
            await until(lambda: hub.metrics.resubscribes._value.get() > resubscribes, WAIT)
            await until(hub.connected.is_set, WAIT)
            await still_serving(gateway, http, "big-after")
            after = await scrape(http)
    finally:
        release(runs)
        await redis.aclose()
    dropped = grew(before, after, "runbell_decode_errors_total")
    assert dropped == Counter(reason for _, reason in oversized), dropped
    chaos_summary(
        runs=len(runs),
        outcomes_delivered=tally.outcomes_delivered,
        lost=tally.lost,
        duplicated=tally.duplicated,
        recover_seconds=recovered,
        extra={
            "injected_8mib": len(oversized),
            "dropped": sum(dropped.values()),
            "cut_off_40mib": 1,
            "resubscribed": int(value(after, "runbell_resubscribes_total") - value(before, "runbell_resubscribes_total")),
        },
    )


async def test_duplicated_reordered_and_replayed_envelopes_change_nothing(gateway, chaos_summary):
    """Each real envelope is re-published several times, the later ones of each run reach pub/sub in
    reverse order (their log entries written first, as publish.lua does), the same events are sent
    again through the publisher and the HTTP API, and after the end everything is replayed once more:
    callers get each event once in order and the right outcome, late callers too, and the store
    holds each event once."""
    runs = watched_runs("dup", list(SCRIPTS))
    redis = aioredis.Redis.from_url(gateway.redis_url)
    await until(gateway.app.state.hub.connected.is_set)
    injected, late = 0, []
    try:
        async with gateway.client() as http, gateway.client(token=PUBLISH_TOKEN) as publisher_http:
            await attached(gateway, http, runs)
            fault = time.monotonic()
            for w in runs:
                channel = keys.run_keys(gateway.namespace, DAG, w.run_id)
                first = await publish(gateway, w.events[0])
                assert await publish(gateway, w.events[0]) == first  # a re-send keeps its seq (publish.lua)
                sent_again = await publisher_http.post("/v1/events", content=w.events[0].to_json())
                assert sent_again.status_code == 201 and sent_again.json()["seq"] == first
                (logged,) = await logged_envelopes(redis, gateway.namespace, w.run_id)
                for _ in range(3):
                    await on_channel(redis, channel, logged)
                    injected += 1
                later = [await log_only(redis, gateway.namespace, event) for event in w.events[1:]]
                for envelope in reversed(later):  # out of sequence order, each twice
                    await on_channel(redis, channel, envelope)
                    await on_channel(redis, channel, envelope)
                    injected += 1
                await on_channel(redis, channel, logged)  # an old one, once more, at the end
                injected += 1
            tally = await settle(runs)
            recovered = tally.last_answer - fault
            # Replays after the end: everything once more on pub/sub, and on the global stream.
            for w in runs:
                channel = keys.run_keys(gateway.namespace, DAG, w.run_id)
                for envelope in await logged_envelopes(redis, gateway.namespace, w.run_id):
                    await on_channel(redis, channel, envelope)
                    await redis.xadd(channel.stream, {"env": envelope})
                    injected += 1
            late = [Watched(w.run_id, w.kind, w.events) for w in runs]
            attach(http, late)  # after the end: all from the replay log
            late_tally = await settle(late)
            store = gateway.app.state.store

            async def recorded() -> bool:
                stored = [await store.events(DAG, w.run_id) for w in runs]
                return all([e.seq for e in s] == list(range(1, len(w.events) + 1)) for s, w in zip(stored, runs))

            async with asyncio.timeout(WAIT):
                while not (await recorded() and await caught_up(redis, gateway.namespace)):
                    await asyncio.sleep(0.05)
            for w in runs:
                stored = await store.events(DAG, w.run_id)
                assert [e.event.id for e in stored] == [e.id for e in w.events]
                record = await store.get_run(DAG, w.run_id)
                assert {k: record.outcome.get(k) for k in w.expected} == w.expected, (w.run_id, record)
            await still_serving(gateway, http, "dup-after")
    finally:
        release(runs + late)
        await redis.aclose()
    lost, duplicated = tally.lost + late_tally.lost, tally.duplicated + late_tally.duplicated
    assert lost == 0 and duplicated == 0
    chaos_summary(
        runs=len(runs),
        outcomes_delivered=tally.outcomes_delivered + late_tally.outcomes_delivered,
        lost=lost,
        duplicated=duplicated,
        recover_seconds=recovered,
        extra={"republished": injected, "late_callers": 2 * len(late)},
    )


async def caught_up(redis: aioredis.Redis, namespace: str) -> bool:
    """The recorder has read every entry of every stream partition, and of the pre-partition stream
    it drains, and acknowledged each."""
    streams = [*keys.partition_streams(namespace, keys.DEFAULT_PARTITIONS), keys.global_stream(namespace)]
    for stream in streams:
        if not await redis.exists(stream):
            continue
        groups = [g for g in await redis.xinfo_groups(stream) if g["name"] == keys.recorder_group().encode()]
        if not groups:  # the recorder has not found this stream yet
            return False
        (group,) = groups
        last = await redis.xrevrange(stream, count=1)
        if group["pending"] or (last and group["last-delivered-id"] != last[0][0]):
            return False
    return True


async def test_events_for_runs_nobody_waits_on(gateway, chaos_summary):
    """A flood for runs nobody waits on (real events, and junk on their channels): not even decoded,
    never counted as drops, no subscription left behind; the watched runs are answered as ever, and
    the recorder stores the unknown runs' real events all the same."""
    runs = watched_runs("watched", ["result", "critical"])
    strangers = [f"stranger-{i}" for i in range(40)]
    redis = aioredis.Redis.from_url(gateway.redis_url)
    hub = gateway.app.state.hub
    await until(hub.connected.is_set)
    try:
        async with gateway.client() as http:
            await attached(gateway, http, runs)
            watched_channels = set(hub.subscribers)
            before = await scrape(http)
            fault = time.monotonic()
            flood = 0
            unpublished = [iter(w.events) for w in runs]
            for i, stranger in enumerate(strangers):
                await publish(gateway, run(stranger, "running"))
                await publish(gateway, task(stranger, "t", "failed", critical=True))
                channel = keys.run_keys(gateway.namespace, DAG, stranger)
                for message, _ in run_channel_junk(stranger)[:6]:
                    await on_channel(redis, channel, message)
                flood += 2 + 6
                if i % 10 == 0:  # the watched runs go on meanwhile
                    for events in unpublished:
                        if (event := next(events, None)) is not None:
                            await publish(gateway, event)
            for events in unpublished:
                for event in events:
                    await publish(gateway, event)
            tally = await settle(runs)
            recovered = tally.last_answer - fault
            after = await scrape(http)
            assert set(hub.subscribers) <= watched_channels  # nothing subscribed for the strangers
            store = gateway.app.state.store
            async with asyncio.timeout(WAIT):
                while min([(await store.last_position(DAG, s)).seq for s in strangers]) < 2:
                    await asyncio.sleep(0.05)
            await still_serving(gateway, http, "watched-after")
    finally:
        release(runs)
        await redis.aclose()
    assert grew(before, after, "runbell_decode_errors_total") == Counter()
    in_for_watched = sum(len(w.events) for w in runs)
    assert value(after, "runbell_events_in_total") - value(before, "runbell_events_in_total") == in_for_watched
    chaos_summary(
        runs=len(runs),
        outcomes_delivered=tally.outcomes_delivered,
        lost=tally.lost,
        duplicated=tally.duplicated,
        recover_seconds=recovered,
        extra={"flood_messages": flood, "unknown_runs": len(strangers)},
    )


async def test_junk_on_the_global_stream_is_acknowledged_dead_lettered_and_counted(gateway, chaos_summary):
    """Junk entries among real ones on the stream the recorder reads: it acknowledges each and moves
    it to the dead letters (counted by reason), never wedges on one, and the store ends with every
    real event once and the right outcome of each run."""
    runs = watched_runs("stream", list(SCRIPTS))
    redis = aioredis.Redis.from_url(gateway.redis_url)
    stream = keys.global_stream(gateway.namespace)
    store = gateway.app.state.store
    deep = raw_envelope(9, event_dict("stream-deep", kind="task", task_id="answer", result={"value": nested(400)}))
    junk = [
        ({"other": "no env field"}, "field"),
        ({"env": "not json"}, "json"),
        ({"env": b"\xff\xfe garbage"}, "json"),
        ({"env": "[" * 200_000}, "depth"),  # nested past the JSON parser's recursion limit
        ({"env": "x" * (EVENT_MAX_BYTES_RANGE[1] + MIB)}, "size"),  # over the most any publisher may send (and not JSON)
        ({"env": "[]"}, "shape"),
        ({"env": raw_envelope(1, {**event_dict("stream-v"), "v": 0})}, "version"),
        ({"env": raw_envelope(-1, event_dict("stream-s"))}, "schema"),
        ({"env": deep}, "depth"),  # valid, but the store could not encode it again
    ]
    try:
        async with gateway.client() as http:
            before = await scrape(http)
            fault = time.monotonic()
            injected: Counter = Counter()
            # One junk entry after each real one, then each kind once more, together.
            interleaved = [event for w in runs for event in w.events]
            for k, event in enumerate(interleaved + [None] * len(junk)):
                if event is not None:
                    await publish(gateway, event)
                fields, reason = junk[k % len(junk)]
                await redis.xadd(stream, fields)
                injected[reason] += 1

            async def settled() -> bool:
                seqs = [(await store.last_position(DAG, w.run_id)).seq for w in runs]
                return seqs == [len(w.events) for w in runs] and await caught_up(redis, gateway.namespace)

            async with asyncio.timeout(WAIT):
                while not await settled():
                    await asyncio.sleep(0.05)
            recovered = time.monotonic() - fault
            lost = duplicated = delivered = 0
            for w in runs:
                stored = [e.event.id for e in await store.events(DAG, w.run_id)]
                lost += len({e.id for e in w.events} - set(stored))
                duplicated += len(stored) - len(set(stored))
                assert stored == [e.id for e in w.events]
                record = await store.get_run(DAG, w.run_id)
                assert {k: record.outcome.get(k) for k in w.expected} == w.expected, (w.run_id, record)
                response = await http.get(result_path(w.run_id, DAG), params={"timeout": 5})
                assert {k: response.json().get(k) for k in w.expected} == w.expected
                delivered += 1
            assert await store.get_run(DAG, "stream-deep") is None
            dead = await DeadLetters(store).list(limit=len(interleaved) + len(junk))
            assert Counter(letter.reason for letter in dead) == injected  # each junk entry once
            await still_serving(gateway, http, "stream-after")
            after = await scrape(http)
    finally:
        await redis.aclose()
    skipped = grew(before, after, "runbell_recorder_skipped_total")
    assert skipped == injected, (skipped, injected)
    chaos_summary(
        runs=len(runs),
        outcomes_delivered=delivered,
        lost=lost,
        duplicated=duplicated,
        recover_seconds=recovered,
        extra={"junk_entries": sum(injected.values()), "skipped": sum(skipped.values())},
    )
