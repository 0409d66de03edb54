"""The gateway over HTTP, against the real Redis: long-poll, SSE, auth, errors, health, resilience."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.listeners.publisher import emit
from runbell.service.client.client import parse_sse
from runbell.service.live.hub import SharedBytes
from tests.conftest import PUBLISH_TOKEN, READ_TOKEN

DAG = "etl"


def result_path(run_id: str, dag_id: str = DAG) -> str:
    return f"/v1/dags/{dag_id}/runs/{run_id}/result"


def events_path(run_id: str, dag_id: str = DAG) -> str:
    return f"/v1/dags/{dag_id}/runs/{run_id}/events"


async def publish(gateway, run_id: str, state: str, **kw) -> int:
    publisher = gateway.publisher()
    seq = await asyncio.to_thread(emit, DAG, run_id, state, publisher=publisher, **kw)
    assert seq is not None, "Redis must accept the event"
    return seq


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for a condition of the system under test (bounded, never a hang)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def waiting(gateway, count: int = 1):
    return lambda: gateway.app.state.hub.count >= count


# -- long-poll ------------------------------------------------------------------------------------


async def test_waiter_before_the_run_exists_gets_the_result_the_moment_it_lands(gateway):
    async with gateway.client() as client:
        waiter = asyncio.create_task(client.get(result_path("r1"), params={"timeout": 20}))
        await until(waiting(gateway))
        await publish(gateway, "r1", "running")
        await publish(gateway, "r1", "running", task_id="answer", result_task=True)
        await publish(gateway, "r1", "success", task_id="answer", result_task=True, result={"rows": 3})
        response = await waiter
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert body["result"] == {"rows": 3}
    assert body["decided_by"] == "result_task"
    assert body["result_task"]["task_id"] == "answer"
    assert body["run_state"] == "running"  # the run is still going: the caller did not wait for it
    assert body["seq"] == 3


async def test_critical_failure_answers_failed_with_the_task_and_error(gateway):
    await publish(gateway, "r2", "running")
    await publish(gateway, "r2", "failed", task_id="extract", critical=True, try_number=2, error="boom", error_type="KeyError")
    async with gateway.client() as client:
        response = await client.get(result_path("r2"), params={"timeout": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "failed" and body["decided_by"] == "critical_task"
    assert body["failure"] == {"task_id": "extract", "map_index": -1, "try_number": 2, "error": {"type": "KeyError", "message": "boom"}}


async def test_timeout_answers_202_pending_with_retry_after(gateway):
    await publish(gateway, "r3", "queued")
    async with gateway.client() as client:
        response = await client.get(result_path("r3"), params={"timeout": 0.2})
        unknown = await client.get(result_path("never"), params={"timeout": 0})
    assert response.status_code == 202
    assert response.headers["retry-after"] == "1"
    epoch = (await event_id(gateway, "r3", 1)).partition("-")[0]
    assert response.json() == {"status": "pending", "dag_id": DAG, "run_id": "r3", "run_state": "queued", "epoch": epoch, "seq": 1}
    assert unknown.status_code == 202 and unknown.json()["run_state"] == "unknown"


async def test_many_waiters_on_one_run_all_get_it_over_one_subscription(gateway):
    async with gateway.client() as client:
        waiters = [asyncio.create_task(client.get(result_path("r4"), params={"timeout": 20})) for _ in range(50)]
        await until(waiting(gateway, 50))
        await publish(gateway, "r4", "success")
        responses = await asyncio.gather(*waiters)
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["decided_by"] for r in responses} == {"run"}
    assert gateway.app.state.hub.count == 0  # every waiter was released


# -- errors and auth ------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["-1", "61", "abc", "nan", "inf"])
async def test_bad_timeout_is_400_saying_what_is_accepted(gateway, timeout):
    async with gateway.client() as client:
        response = await client.get(result_path("r"), params={"timeout": timeout})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad_timeout"
    assert body["accepted"] == {"min": 0, "max": 60.0, "unit": "seconds"}


async def test_unknown_route_and_method_are_json(gateway):
    async with gateway.client() as client:
        missing = await client.get("/v1/nothing")
        wrong = await client.post(result_path("r"))
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert wrong.status_code == 405 and wrong.json()["error"] == "method_not_allowed"


async def test_tokens_are_required_and_checked(gateway):
    async with gateway.client(token=None) as anonymous, gateway.client(token="wrong") as bad:
        assert (await anonymous.get(result_path("r"), params={"timeout": 0})).status_code == 401
        response = await bad.get(result_path("r"), params={"timeout": 0})
        assert response.status_code == 401 and response.json()["error"] == "bad_token"
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/metrics")).status_code == 401
        by_query = await anonymous.get(result_path("r"), params={"timeout": 0, "access_token": READ_TOKEN})
        assert by_query.status_code == 202
        not_on_metrics = await anonymous.get("/metrics", params={"access_token": READ_TOKEN})
        assert not_on_metrics.status_code == 401  # query tokens only where EventSource needs them


async def test_publish_needs_the_publish_role_and_a_valid_event(gateway):
    event = {"kind": "run", "dag_id": DAG, "run_id": "p1", "state": "success"}
    async with gateway.client(READ_TOKEN) as reader, gateway.client(PUBLISH_TOKEN) as publisher:
        forbidden = await reader.post("/v1/events", json=event)
        assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
        bad = await publisher.post("/v1/events", json={**event, "state": "exploded"})
        assert bad.status_code == 422 and bad.json()["error"] == "bad_event"
        assert "exploded" in json.dumps(bad.json()["accepted"])
        created = await publisher.post("/v1/events", json=event)
        assert created.status_code == 201 and created.json()["seq"] == 1
        outcome = await reader.get(result_path("p1"), params={"timeout": 5})
    assert outcome.json()["status"] == "success"


async def test_malformed_bus_messages_are_counted_and_dropped(gateway):
    client = aioredis.Redis.from_url(gateway.redis_url)
    k = keys.run_keys(gateway.namespace, DAG, "bad")
    try:
        async with gateway.client() as http:
            waiter = asyncio.create_task(http.get(result_path("bad"), params={"timeout": 20}))
            await until(waiting(gateway))
            for junk in (b"not json", b'{"seq":1,"event":{"v":99}}', b'{"seq":1,"event":{"v":1,"kind":"run"}}', b"[]"):
                await client.spublish(k.live, keys.live_message(k.route, junk))
            await client.spublish(k.live, junk)  # no route: counted as such
            await publish(gateway, "bad", "success")
            response = await waiter
            metrics = (await http.get("/metrics")).text
    finally:
        await client.aclose()
    assert response.status_code == 200 and response.json()["status"] == "success"
    for reason in ("json", "version", "schema", "shape", "route"):
        assert f'runbell_decode_errors_total{{reason="{reason}"}} 1.0' in metrics


# -- health, metrics, openapi ---------------------------------------------------------------------


async def test_health_readiness_and_metrics(gateway):
    await until(lambda: gateway.app.state.readiness.report().ready)  # subscribed and the recorder's first pass made
    async with gateway.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "ok", "database": "ok", "pubsub": "ok", "recorder": "ok"}
    for name in (
        "runbell_waiters",
        "runbell_sse_clients",
        "runbell_events_in_total",
        "runbell_decode_errors_total",
        "runbell_delivery_latency_seconds",
    ):
        assert name in metrics.text


async def test_openapi_describes_every_route(gateway):
    from runbell.service.http.app import ROUTES

    async with gateway.client(token=None) as client:
        document = (await client.get("/openapi.json")).json()
    for route in ROUTES:
        assert route.path in document["paths"], route.path
        for method in route.methods - {"HEAD"}:
            assert method.lower() in document["paths"][route.path]


# -- Server-Sent Events ---------------------------------------------------------------------------


async def read_sse(client, path: str, headers=None, params=None, until_event: str = "end", events=None):
    """Collect a stream's events until `until_event` (or the server closes it); into `events` when
    given, so that a test can watch them arrive."""
    events = [] if events is None else events
    async with client.stream("GET", path, headers=headers or {}, params=params) as response:
        if response.status_code != 200:
            return response.status_code, response.headers, events
        lines = response.aiter_lines()
        buffer = []
        async for line in lines:
            buffer.append(line)
            if line == "":
                events.extend(parse_sse(iter(buffer)))
                buffer = []
                if events and events[-1].event == until_event:
                    break
        return response.status_code, response.headers, events


def seqs(events) -> list[tuple[str, str | None]]:
    """(event, seq) of each frame: its id without the epoch (each test's run has one epoch)."""
    return [(e.event, e.id.rpartition("-")[2] if e.id else e.id) for e in events]


async def event_id(gateway, run_id: str, seq: int, dag_id: str = DAG) -> str:
    """The SSE id of a run's event: EPOCH-SEQ."""
    client = aioredis.Redis.from_url(gateway.redis_url)
    try:
        epoch = await client.get(keys.run_keys(gateway.namespace, dag_id, run_id).epoch)
    finally:
        await client.aclose()
    return f"{epoch.decode()}-{seq}"


async def test_sse_streams_events_outcome_then_end(gateway):
    async with gateway.client() as client:
        reader = asyncio.create_task(read_sse(client, events_path("s1")))
        await until(waiting(gateway))
        await publish(gateway, "s1", "running")
        await publish(gateway, "s1", "success", task_id="answer", result_task=True, result=[1, 2])
        await publish(gateway, "s1", "success", task_id="cleanup")
        await publish(gateway, "s1", "success")
        status, headers, events = await reader
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-accel-buffering"] == "no"
    assert seqs(events) == [
        ("run", "1"),
        ("task", "2"),
        ("outcome", "2"),
        ("task", "3"),
        ("run", "4"),
        ("end", "4"),
    ]
    assert events[2].json()["result"] == [1, 2]
    assert events[1].json()["seq"] == 2 and events[1].json()["task_id"] == "answer"


async def test_sse_sets_retry_and_heartbeats(gateway_factory):
    gateway = await gateway_factory(heartbeat_seconds=0.2, sse_retry_ms=1234)
    async with gateway.client() as client:
        async with client.stream("GET", events_path("hb")) as response:
            seen = []
            async with asyncio.timeout(5):
                async for line in response.aiter_lines():
                    seen.append(line)
                    if sum(1 for s in seen if s.startswith(": ping")) >= 2:
                        break
    assert "retry: 1234" in seen


async def test_sse_last_event_id_replays_only_what_was_missed(gateway):
    for state in ("queued", "running"):
        await publish(gateway, "s2", state)
    await publish(gateway, "s2", "success", task_id="a")
    await publish(gateway, "s2", "failed", msg="teardown broke")
    async with gateway.client() as client:
        last = await event_id(gateway, "s2", 2)
        _, _, by_header = await read_sse(client, events_path("s2"), headers={"Last-Event-ID": last})
        _, _, by_query = await read_sse(client, events_path("s2"), params={"last_event_id": last})
    assert seqs(by_header) == [("recovery", None), ("task", "3"), ("run", "4"), ("outcome", "4"), ("end", "4")]
    assert by_header[0].json() == {"recovered": True, "from": last}
    assert [(e.event, e.id) for e in by_query] == [(e.event, e.id) for e in by_header]
    assert by_header[3].json()["failure"]["error"]["message"] == "teardown broke"


async def test_sse_reconnect_after_end_gets_204(gateway):
    await publish(gateway, "s3", "success")
    async with gateway.client() as client:
        status, _, _ = await read_sse(client, events_path("s3"), headers={"Last-Event-ID": await event_id(gateway, "s3", 1)})
    assert status == 204


async def test_sse_outcome_already_sent_is_not_sent_again(gateway):
    await publish(gateway, "s4", "success", task_id="answer", result_task=True, result=1)
    await publish(gateway, "s4", "success")
    async with gateway.client() as client:
        _, _, events = await read_sse(client, events_path("s4"), headers={"Last-Event-ID": await event_id(gateway, "s4", 1)})
    assert seqs(events) == [("recovery", None), ("run", "2"), ("end", "2")]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999999999999", "²", "1²", "ABC-1", "a-b-1", "-", "a-", "x" * 33 + "-1"])
async def test_sse_bad_last_event_id_is_400(gateway, value):
    async with gateway.client() as client:
        by_query = await client.get(events_path("s5"), params={"last_event_id": value})
        by_header = await client.get(events_path("s5"), headers={"Last-Event-ID": value}) if value.isascii() else by_query
    for response in (by_query, by_header):
        assert response.status_code == 400 and response.json()["error"] == "bad_last_event_id"


# -- resilience -----------------------------------------------------------------------------------


async def test_a_lost_pubsub_message_is_filled_from_the_replay_log(gateway):
    """An event that reached the log but not pub/sub (a gap) is read from the log, in order."""
    client = aioredis.Redis.from_url(gateway.redis_url)
    k = keys.run_keys(gateway.namespace, DAG, "gap")
    try:
        async with gateway.client() as http:
            reader = asyncio.create_task(read_sse(http, events_path("gap")))
            await until(waiting(gateway))
            await publish(gateway, "gap", "running")
            # seq 2 goes to the log only, as if its pub/sub message were lost
            await client.incr(k.seq)
            lost = json.dumps(
                {
                    "epoch": (await client.get(k.epoch)).decode(),
                    "seq": 2,
                    "event": {
                        "v": 1,
                        "id": "lost",
                        "kind": "task",
                        "dag_id": DAG,
                        "run_id": "gap",
                        "state": "running",
                        "task_id": "t",
                        "ts": 0,
                    },
                }
            )
            await client.xadd(k.log, {"env": lost}, id="0-2")
            await publish(gateway, "gap", "success")
            _, _, events = await reader
    finally:
        await client.aclose()
    assert seqs(events) == [("run", "1"), ("task", "2"), ("run", "3"), ("outcome", "3"), ("end", "3")]


async def test_pubsub_connection_killed_then_events_are_recovered(gateway):
    """Redis drops the pub/sub connection: the hub re-subscribes and re-reads the log."""
    client = aioredis.Redis.from_url(gateway.redis_url)
    try:
        await until(gateway.app.state.hub.connected.is_set)
        async with gateway.client() as http:
            waiter = asyncio.create_task(http.get(result_path("kill"), params={"timeout": 30}))
            await until(waiting(gateway))
            before = gateway.app.state.metrics.resubscribes._value.get()
            await client.client_kill_filter(_type="pubsub")
            await publish(gateway, "kill", "success", task_id="answer", result_task=True, result="ok")
            response = await waiter
    finally:
        await client.aclose()
    assert response.status_code == 200 and response.json()["result"] == "ok"
    await until(lambda: gateway.app.state.metrics.resubscribes._value.get() > before)


async def test_slow_subscriber_is_cut_off_and_memory_released(gateway_factory):
    gateway = await gateway_factory(subscriber_buffer=3)
    hub = gateway.app.state.hub
    from runbell.service.live.hub import Signal, SubscriptionClosed

    async with gateway.app.state.runs.subscribe(DAG, "slow") as subscription:
        for _ in range(5):
            await publish(gateway, "slow", "running", task_id="t")
        await until(lambda: len(subscription.queue) == 1 and subscription._closed is Signal.OVERFLOW)
        with pytest.raises(SubscriptionClosed) as closed:
            async for _ in subscription:
                pass
    assert closed.value.reason is Signal.OVERFLOW
    assert hub.count == 0


async def test_subscriber_cap_answers_503(gateway_factory):
    gateway = await gateway_factory(max_subscribers=1)
    async with gateway.client() as client:
        first = asyncio.create_task(client.get(result_path("cap"), params={"timeout": 5}))
        await until(waiting(gateway))
        second = await client.get(result_path("cap"), params={"timeout": 0})
        await publish(gateway, "cap", "success")
        assert (await first).status_code == 200
    assert second.status_code == 503 and second.json()["error"] == "unavailable"
    assert second.headers["retry-after"] == "1"


async def test_drain_answers_waiters_202_and_sse_a_farewell(gateway):
    async with gateway.client() as client:
        waiter = asyncio.create_task(client.get(result_path("d1"), params={"timeout": 30}))
        stream = asyncio.create_task(read_sse(client, events_path("d1"), until_event="shutdown"))
        await until(waiting(gateway, 2))
        gateway.app.state.hub.drain()
        response = await waiter
        _, _, events = await stream
    assert response.status_code == 202
    assert events[-1].event == "shutdown" and events[-1].retry == 3000


async def test_caller_after_the_replay_log_expired_gets_the_outcome_from_the_store(gateway):
    """The recorder keeps every event in SQL, so the outcome outlives the Redis replay log."""
    await publish(gateway, "old", "running")
    await publish(gateway, "old", "failed", task_id="load", critical=True, error="disk full")
    store = gateway.app.state.store

    async def recorded() -> int:
        return (await store.last_position(DAG, "old")).seq

    async with asyncio.timeout(10):
        while await recorded() < 2:
            await asyncio.sleep(0.05)
    client = aioredis.Redis.from_url(gateway.redis_url)
    k = keys.run_keys(gateway.namespace, DAG, "old")
    await client.delete(k.seq, k.log, k.ids, k.epoch)  # as if the 7-day TTL had passed
    await client.aclose()
    async with gateway.client() as http:
        response = await http.get(result_path("old"), params={"timeout": 1})
        _, _, events = await read_sse(http, events_path("old"), until_event="outcome")
    assert response.status_code == 200
    assert response.json()["failure"]["error"]["message"] == "disk full"
    assert seqs(events) == [("run", "1"), ("task", "2"), ("outcome", "2")]


async def test_redis_down_gives_202_and_not_ready_never_a_5xx(gateway_factory):
    gateway = await gateway_factory(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    async with gateway.client() as client:
        waited = await client.get(result_path("down"), params={"timeout": 0.5})
        ready = await client.get("/readyz")
        async with client.stream("GET", events_path("down")) as stream:
            status = stream.status_code
    assert waited.status_code == 202 and waited.json()["status"] == "pending"
    checks = ready.json()["checks"]
    assert ready.status_code == 503 and checks["redis"] != "ok" and checks["pubsub"] == "not subscribed", checks
    assert checks["recorder"].startswith("catching up"), checks
    assert status == 200  # the stream opens and waits for Redis to come back


async def test_timeout_zero_answers_what_is_already_decided(gateway):
    await publish(gateway, "now", "success", task_id="answer", result_task=True, result="ready")
    async with gateway.client() as client:
        response = await client.get(result_path("now"), params={"timeout": 0})
    assert response.status_code == 200 and response.json()["result"] == "ready"


def test_shared_bytes_are_built_once_and_bounded_in_bytes():
    shared, built = SharedBytes(max_bytes=10), []

    def build(value: bytes) -> bytes:
        built.append(value)
        return value

    assert shared.get(("a",), lambda: build(b"12345")) == b"12345"
    assert shared.get(("a",), lambda: build(b"other")) == b"12345"  # built once, then shared
    shared.get(("b",), lambda: build(b"123456"))  # 11 bytes: over the bound, the oldest goes
    assert shared.get(("a",), lambda: build(b"again")) == b"again"
    assert built == [b"12345", b"123456", b"again"] and shared.held == 5


async def test_a_large_fan_out_runs_without_garbage_collection_and_turns_it_back_on():
    import gc

    from runbell.bus.schema import Event, envelope_json
    from runbell.service.core.metrics import Metrics
    from runbell.service.live.hub import GC_PAUSE_FANOUT, Hub, Subscription
    from runbell.service.live.topics import RunTopic

    hub = Hub(None, Metrics())  # no Redis: only the in-memory fan-out is exercised
    runs = RunTopic(hub, None, "ns")
    route = runs.route(("d", "r"))
    subs = hub.subscribers[route] = {Subscription(hub, runs, ("d", "r"), 0) for _ in range(GC_PAUSE_FANOUT)}
    event = Event(kind="run", dag_id="d", run_id="r", state="running", source="emit", host="h")
    hub._dispatch(runs, route, envelope_json(1, event.to_json()).encode())
    assert not gc.isenabled() and all(len(sub.queue) == 1 for sub in subs)
    await asyncio.sleep(0)  # the woken subscribers run first, then collection is back on
    assert gc.isenabled()


async def test_a_gateway_configured_with_another_partition_count_takes_the_stored_one(gateway_factory, redis_url, namespace, caplog):
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(keys.partitions_key(namespace), 4)
        gateway = await gateway_factory(stream_partitions=8)
        assert gateway.app.state.partitions == 4
        assert gateway.app.state.hub.channels == keys.live_channels(namespace, 4)  # 4 subscriptions, not 8
        assert "RUNBELL_STREAM_PARTITIONS is 8 but this namespace's Redis holds 4" in caplog.text
        publisher = gateway.publisher()  # configured with the default 16: it takes the stored 4 too
        async with gateway.client() as http:
            waiter = asyncio.create_task(http.get(result_path("p4"), params={"timeout": 20}))
            await until(waiting(gateway))
            await asyncio.to_thread(emit, DAG, "p4", "success", publisher=publisher)
            assert (await waiter).json()["status"] == "success"
    finally:
        await client.aclose()


async def test_a_gateway_started_while_redis_is_down_takes_the_stored_partition_count_once_it_answers(gateway_factory, namespace, tmp_path):
    """Redis down at start: the gateway assumes its configured count, and checks it once Redis answers.
    Hooks stored another count meanwhile (4): the gateway subscribes, replays and records by the stored one."""
    from runbell.listeners.config import PublisherConfig
    from runbell.listeners.publisher import Publisher
    from tests.engines import RedisServer

    server = RedisServer(tmp_path / "redis")  # append-only: what was stored before the outage is back after
    server.start()
    try:
        with server.client() as client:
            client.set(keys.partitions_key(namespace), 4)
        server.stop()
        url = f"redis://{server.address}/0"
        gateway = await gateway_factory(redis_url=url)  # configured with the default 16
        assert gateway.app.state.partitions == keys.DEFAULT_PARTITIONS
        server.start()
        await until(lambda: gateway.app.state.hub.connected.is_set(), timeout=30)
        await until(lambda: gateway.app.state.hub.channels == keys.live_channels(namespace, 4), timeout=30)
        publisher = Publisher(PublisherConfig(redis_url=url, namespace=namespace, spool_dir=tmp_path / "spool"))  # takes the stored 4
        async with gateway.client() as http:
            waiter = asyncio.create_task(http.get(result_path("late"), params={"timeout": 20}))
            await until(waiting(gateway))
            await asyncio.to_thread(emit, DAG, "late", "success", publisher=publisher)
            assert (await waiter).json()["status"] == "success"
        async with asyncio.timeout(30):  # the recorder reads the stored count's partitions
            while await gateway.app.state.store.get_run(DAG, "late") is None:
                await asyncio.sleep(0.05)
    finally:
        server.ensure_stopped()
