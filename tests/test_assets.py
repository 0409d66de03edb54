"""Asset events: keys, the publish path (per-asset seq, window, spool), the hook's asset handlers
with fake Airflow objects, and the gateway's /v1/assets/{name}/next and /events against the real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import (
    AssetEvent,
    AssetInfo,
    BadEvent,
    decode_asset_envelope,
    decode_envelope,
    envelope_json,
)
from runbell.listeners import hook
from runbell.listeners import publisher as publisher_module
from runbell.listeners.config import PublisherConfig
from runbell.listeners.publisher import Publisher, emit, emit_asset
from runbell.service.http.auth import issue_run_token
from tests.conftest import PUBLISH_TOKEN, READ_TOKEN
from tests.test_gateway import read_sse, seqs, until

NAME = "s3://lake/daily/orders.parquet"  # a URI: '/' and ':' in the name


def next_path(name: str = NAME) -> str:
    return f"/v1/assets/{name}/next"


def events_path(name: str = NAME) -> str:
    return f"/v1/assets/{name}/events"


# -- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [NAME, "plain", "with*glob?[x]", "{braces}/and:colons", "üñí cødé %2F"])
def test_asset_keys_share_one_partition_tag(name: str) -> None:
    k = keys.asset_keys("ns", name)
    tag = keys.partition_tags("ns", keys.DEFAULT_PARTITIONS)[keys.asset_partition(name)]
    assert all(key.startswith(f"ns:asset:{tag}:") for key in (k.seq, k.log, k.ids, k.epoch))
    assert {keys.key_slot(key) for key in (k.seq, k.log, k.ids, k.epoch, k.stream, k.live)} == {keys.key_slot(tag)}
    assert k.seq.count("{") == 1 and k.seq.count("}") == 1  # one hash tag, whatever the name holds
    assert k.route == keys.asset_route(name) and "\n" not in k.route


def test_run_and_asset_routes_do_not_overlap() -> None:
    run = keys.run_keys("ns", "asset", "x")
    asset = keys.asset_keys("ns", "run")
    assert run.route.startswith("run:") and asset.route.startswith("asset:")
    assert keys.asset_keys("ns", "run:asset/x").route != run.route


# -- schema ---------------------------------------------------------------------------------------


def test_asset_envelopes_and_run_envelopes_do_not_mix() -> None:
    event = AssetEvent(asset=AssetInfo(name=NAME, uri=NAME), extra={"rows": 3})
    raw = '{"seq":4,"event":' + event.to_json() + "}"
    envelope = decode_asset_envelope(raw)
    assert envelope.seq == 4 and envelope.event.asset.name == NAME and envelope.event.extra == {"rows": 3}
    with pytest.raises(BadEvent) as not_a_run:
        decode_envelope(raw)  # an older reader of run events refuses it instead of misreading it
    assert not_a_run.value.reason == "schema"
    run = '{"seq":1,"event":{"v":1,"kind":"run","dag_id":"d","run_id":"r","state":"success"}}'
    with pytest.raises(BadEvent):
        decode_asset_envelope(run)


# -- the publish path -----------------------------------------------------------------------------


@pytest.fixture
def bus(redis_url: str, namespace: str, tmp_path, monkeypatch) -> Iterator[Publisher]:
    """The hook's default publisher, pointed at this test's namespace (small extra cap)."""
    config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path / "spool", result_max_bytes=64)
    publisher = Publisher(config)
    monkeypatch.setattr(publisher_module, "_default_publisher", publisher)
    monkeypatch.setattr(hook._log_once, "seen", set())
    yield publisher
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{namespace}:*", count=1000):
        client.delete(key)
    client.close()


def asset_log(bus: Publisher, name: str = NAME) -> list[Any]:
    with redis.Redis.from_url(bus.config.redis_url) as client:
        entries = client.xrange(keys.asset_keys(bus.config.namespace, name).log)
    return [decode_asset_envelope(fields[b"env"]) for _, fields in entries]


def test_each_asset_has_its_own_gap_free_seq(bus: Publisher) -> None:
    assert [emit_asset(NAME, publisher=bus) for _ in range(3)] == [1, 2, 3]
    assert emit_asset("other", publisher=bus) == 1
    assert emit("etl", "r1", "running", publisher=bus) == 1  # runs keep theirs
    assert [e.seq for e in asset_log(bus)] == [1, 2, 3]
    with redis.Redis.from_url(bus.config.redis_url) as client:
        ns = bus.config.namespace
        asset_streams = {keys.asset_keys(ns, name).stream for name in (NAME, "other")}
        assert sum(client.xlen(stream) for stream in asset_streams) == 4  # the asset events' partition streams
        run_stream = keys.run_keys(ns, "etl", "r1").stream
        assert [f[b"env"].count(b'"kind":"run"') for _, f in client.xrange(run_stream)] == [1]  # no asset event there


def test_a_resent_asset_event_keeps_its_seq_and_is_logged_once(bus: Publisher) -> None:
    event = AssetEvent(asset=AssetInfo(name=NAME))
    assert bus.publish(event) == 1
    assert bus.publish(event) == 1
    assert len(asset_log(bus)) == 1


def test_asset_log_is_a_window_with_a_ttl_and_the_seq_never_expires(bus: Publisher, monkeypatch) -> None:
    monkeypatch.setattr(publisher_module, "ASSET_WINDOW", 5)
    events = [AssetEvent(asset=AssetInfo(name=NAME)) for _ in range(12)]
    assert [bus.publish(e) for e in events] == list(range(1, 13))
    k = keys.asset_keys(bus.config.namespace, NAME)
    with redis.Redis.from_url(bus.config.redis_url) as client:
        assert [e.seq for e in asset_log(bus)] == [8, 9, 10, 11, 12]
        assert client.zcard(k.ids) == 5
        assert client.ttl(k.seq) == -1  # a client's Last-Event-ID must keep its meaning
        assert 0 < client.ttl(k.log) <= bus.config.log_ttl_seconds
        assert 0 < client.ttl(k.ids) <= bus.config.log_ttl_seconds
        run = keys.run_keys(bus.config.namespace, "etl", "r1")
        emit("etl", "r1", "running", publisher=bus)
        assert client.ttl(run.seq) > 0 and client.type(run.ids) == b"hash"  # a run's keys as before
    assert bus.publish(events[-1]) == 12  # still inside the window: known
    assert bus.publish(events[0]) == 13  # long out of the window: taken for new


def test_asset_events_spooled_while_redis_is_down_are_published_later(bus: Publisher, tmp_path) -> None:
    down = Publisher(PublisherConfig(redis_url="redis://127.0.0.1:1/0", namespace=bus.config.namespace, spool_dir=bus.config.spool_dir))
    assert emit_asset(NAME, extra={"n": 1}, publisher=down) is None
    assert emit("etl", "r1", "running", publisher=down) is None
    assert len(bus.spool.pending()) == 2
    assert bus.flush() == 2
    [envelope] = asset_log(bus)
    assert envelope.seq == 1 and envelope.event.extra == {"n": 1}


# -- the hook's asset handlers --------------------------------------------------------------------


def fake_asset(name: str = NAME, uri: str = NAME, group: str = "asset") -> SimpleNamespace:
    """Like Airflow's SerializedAsset."""
    return SimpleNamespace(name=name, uri=uri, group=group, extra={"owner": "not the event's extra"}, watchers=[])


def fake_asset_event(asset: Any = None, **kw: Any) -> SimpleNamespace:
    """Like airflow.listeners.types.AssetEvent (3.2+)."""
    values = dict(
        asset=asset or fake_asset(),
        extra={"rows": 3},
        source_dag_id="producer",
        source_task_id="write",
        source_run_id="manual__1",
        source_map_index=-1,
        source_aliases=[SimpleNamespace(name="orders")],
        partition_key=None,
        partition_date=None,
    )
    values.update(kw)
    return SimpleNamespace(**values)


def test_emitted_asset_event_is_published_with_extra_and_source(bus: Publisher) -> None:
    started = time.time()
    hook.on_asset_event_emitted(asset_event=fake_asset_event())
    [envelope] = asset_log(bus)
    event = envelope.event
    assert envelope.seq == 1 and event.kind == "asset" and event.source.value == "hook" and event.host
    assert (event.asset.name, event.asset.uri, event.asset.group) == (NAME, NAME, "asset")
    assert event.extra == {"rows": 3} and event.extra_size == len('{"rows":3}') and not event.extra_truncated
    assert (event.source_dag_id, event.source_run_id, event.source_task_id, event.source_map_index) == (
        "producer",
        "manual__1",
        "write",
        -1,
    )
    assert event.aliases == ["orders"]
    assert started <= event.ts <= time.time()


def test_asset_event_made_outside_a_task_has_no_source(bus: Publisher) -> None:
    hook.on_asset_event_emitted(
        asset_event=fake_asset_event(
            source_dag_id=None, source_task_id=None, source_run_id=None, source_map_index=None, source_aliases=[], extra={}
        )
    )
    event = asset_log(bus)[0].event
    assert event.source_dag_id is None and event.source_run_id is None and event.extra == {}


def test_big_extra_is_left_out_with_its_size(bus: Publisher) -> None:
    hook.on_asset_event_emitted(asset_event=fake_asset_event(extra={"blob": "x" * 500}))
    event = asset_log(bus)[0].event
    assert event.extra is None and event.extra_truncated and event.extra_size > 500


def test_asset_changed_is_published_only_where_the_emitted_hook_does_not_exist(bus: Publisher, monkeypatch) -> None:
    monkeypatch.setattr(hook, "_emitted_hook", True)  # 3.2+: on_asset_event_emitted follows with more
    hook.on_asset_changed(asset=fake_asset())
    assert asset_log(bus) == []
    monkeypatch.setattr(hook, "_emitted_hook", False)  # 3.0 / 3.1: this is all there is
    hook.on_asset_changed(asset=fake_asset())
    [envelope] = asset_log(bus)
    assert envelope.event.asset.name == NAME and envelope.event.source_dag_id is None and envelope.event.extra is None


def test_one_change_in_airflow_order_publishes_one_event(bus: Publisher, monkeypatch) -> None:
    monkeypatch.setattr(hook, "_emitted_hook", True)
    hook.on_asset_changed(asset=fake_asset())  # AssetManager calls these two, in this order
    hook.on_asset_event_emitted(asset_event=fake_asset_event())
    assert [e.seq for e in asset_log(bus)] == [1]


def test_asset_hook_errors_are_swallowed_and_logged_once(bus: Publisher, caplog) -> None:
    for _ in range(3):
        hook.on_asset_event_emitted(asset_event=SimpleNamespace())  # no asset at all
        hook.on_asset_event_emitted(asset_event=fake_asset_event(asset=fake_asset(name="")))  # invalid name
    warnings = [r for r in caplog.records if r.name == "runbell.hook"]
    assert len(warnings) == 2  # once per kind of error; nothing raised
    with redis.Redis.from_url(bus.config.redis_url) as client:
        assert not list(client.scan_iter(match=f"{bus.config.namespace}:*asset-events", count=1000))


def test_asset_events_of_a_skipped_dag_are_not_published(redis_url, namespace, tmp_path, monkeypatch) -> None:
    config = PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, skip_dags=frozenset({"producer"}))
    publisher = Publisher(config)
    monkeypatch.setattr(publisher_module, "_default_publisher", publisher)
    hook.on_asset_event_emitted(asset_event=fake_asset_event())
    hook.on_asset_event_emitted(asset_event=fake_asset_event(source_dag_id="other"))
    try:
        assert [e.event.source_dag_id for e in asset_log(publisher)] == ["other"]
    finally:
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=f"{namespace}:*"):
                client.delete(key)


def test_asset_hook_with_redis_unreachable_is_bounded_and_spools(tmp_path, monkeypatch) -> None:
    config = PublisherConfig(redis_url="redis://10.255.255.1:6379/0", spool_dir=tmp_path / "spool")
    monkeypatch.setattr(publisher_module, "_default_publisher", Publisher(config))
    started = time.monotonic()
    hook.on_asset_event_emitted(asset_event=fake_asset_event())
    hook.on_asset_event_emitted(asset_event=fake_asset_event())
    assert time.monotonic() - started < 1.0
    spooled = publisher_module.default_publisher().spool.pending()
    assert len(spooled) == 2 and json.loads(spooled[0].read_text())["kind"] == "asset"


# -- the gateway ----------------------------------------------------------------------------------


async def publish_asset(gateway, name: str = NAME, **kw: Any) -> int:
    seq = await asyncio.to_thread(emit_asset, name, publisher=gateway.publisher(), **kw)
    assert seq is not None, "Redis must accept the event"
    return seq


def waiting(gateway, count: int = 1):
    return lambda: gateway.app.state.hub.count >= count


async def test_next_attached_before_the_event_gets_it_the_moment_it_lands(gateway):
    async with gateway.client() as client:
        waiter = asyncio.create_task(client.get(next_path(), params={"timeout": 20}))
        await until(waiting(gateway))
        await publish_asset(gateway, uri=NAME, extra={"rows": 3}, source_dag_id="producer", source_run_id="r1", source_task_id="write")
        response = await waiter
    assert response.status_code == 200
    body = response.json()
    assert body["seq"] == 1 and body["kind"] == "asset"
    assert body["asset"] == {"name": NAME, "uri": NAME} and body["extra"] == {"rows": 3}
    assert (body["source_dag_id"], body["source_run_id"], body["source_task_id"]) == ("producer", "r1", "write")
    assert gateway.app.state.hub.count == 0


async def test_next_after_a_seq_answers_from_the_log_at_once(gateway):
    for n in range(3):
        await publish_asset(gateway, extra={"n": n})
    async with gateway.client() as client:
        first = await client.get(next_path(), params={"after": 0, "timeout": 0})
        second = await client.get(next_path(), params={"after": 1, "timeout": 5})
        none_yet = await client.get(next_path(), params={"after": 3, "timeout": 0.2})
        without_after = await client.get(next_path(), params={"timeout": 0.2})  # only what comes next
    assert (first.status_code, first.json()["seq"], first.json()["extra"]) == (200, 1, {"n": 0})
    assert (second.status_code, second.json()["seq"]) == (200, 2)
    assert none_yet.status_code == 202 and none_yet.headers["retry-after"] == "1"
    assert none_yet.json() == {"status": "pending", "asset": NAME, "seq": 3}
    assert without_after.status_code == 202 and without_after.json()["seq"] == 3


async def test_next_on_an_asset_never_seen_waits_and_answers_202_with_seq_0(gateway):
    async with gateway.client() as client:
        response = await client.get(next_path("never/seen"), params={"timeout": 0})
    assert response.status_code == 202 and response.json() == {"status": "pending", "asset": "never/seen", "seq": 0}


async def test_next_after_then_live(gateway):
    await publish_asset(gateway)
    async with gateway.client() as client:
        waiter = asyncio.create_task(client.get(next_path(), params={"after": 1, "timeout": 20}))
        await until(waiting(gateway))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await publish_asset(gateway, extra={"live": True})
        response = await waiter
    assert response.status_code == 200 and response.json()["seq"] == 2 and response.json()["extra"] == {"live": True}


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "", "99999999999999999999", "٣"])
async def test_bad_after_is_400(gateway, after):
    async with gateway.client() as client:
        response = await client.get(next_path(), params={"after": after, "timeout": 0})
    assert response.status_code == 400 and response.json()["error"] == "bad_after"


@pytest.mark.parametrize("timeout", ["-1", "61", "abc", "nan"])
async def test_bad_timeout_is_400_as_for_a_result(gateway, timeout):
    async with gateway.client() as client:
        response = await client.get(next_path(), params={"timeout": timeout})
    assert response.status_code == 400 and response.json()["error"] == "bad_timeout"
    assert response.json()["accepted"] == {"min": 0, "max": 60.0, "unit": "seconds"}


@pytest.mark.parametrize("name", [NAME, "plain", "with space?#%", "x/next", "y/events", "ünï:cødé"])
async def test_names_with_slashes_colons_and_escapes_reach_their_asset(gateway, name):
    await publish_asset(gateway, name=name)
    async with gateway.client() as client:
        encoded = await client.get(next_path(quote(name, safe="")), params={"after": 0, "timeout": 0})
        as_is = await client.get(next_path(quote(name, safe="/:")), params={"after": 0, "timeout": 0})
        _, _, events = await read_sse(client, events_path(quote(name, safe="")), params={"last_event_id": 0}, until_event="asset")
    assert encoded.status_code == 200 and encoded.json()["asset"]["name"] == name
    assert as_is.status_code == 200 and as_is.json()["asset"]["name"] == name
    assert events[-1].json()["asset"]["name"] == name


async def test_empty_or_too_long_name_is_400(gateway):
    async with gateway.client() as client:
        empty = await client.get("/v1/assets//next", params={"timeout": 0})
        long = await client.get(next_path("x" * 1501), params={"timeout": 0})
    assert empty.status_code == 400 and empty.json()["error"] == "bad_asset"
    assert long.status_code == 400 and long.json()["error"] == "bad_asset"


async def test_runs_and_assets_of_the_same_name_do_not_cross(gateway):
    async with gateway.client() as client:
        run_waiter = asyncio.create_task(client.get("/v1/dags/etl/runs/r1/result", params={"timeout": 1}))
        asset_waiter = asyncio.create_task(client.get(next_path("etl/r1"), params={"timeout": 20}))
        await until(waiting(gateway, 2))
        await publish_asset(gateway, name="etl/r1")
        asset_response = await asset_waiter
        run_response = await run_waiter
    assert asset_response.status_code == 200 and asset_response.json()["seq"] == 1, asset_response.json()
    assert run_response.status_code == 202 and run_response.json()["seq"] == 0


async def test_sse_replays_after_last_event_id_then_streams_live(gateway):
    for n in range(3):
        await publish_asset(gateway, extra={"n": n})
    async with gateway.client() as client:
        by_header = asyncio.create_task(read_sse(client, events_path(), headers={"Last-Event-ID": "1"}, until_event="never"))
        by_query = asyncio.create_task(read_sse(client, events_path(), params={"last_event_id": "2"}, until_event="never"))
        await until(waiting(gateway, 2))
        await asyncio.sleep(0.1)
        await publish_asset(gateway, extra={"n": 3})
        await until(lambda: gateway.app.state.metrics.events_in._value.get() >= 1)
        await asyncio.sleep(0.1)
        gateway.app.state.hub.drain()  # the stream never ends by itself: end it like a shutdown
        _, headers, header_events = await by_header
        _, _, query_events = await by_query
    assert headers["content-type"].startswith("text/event-stream") and headers["x-accel-buffering"] == "no"
    assert seqs(header_events) == [("ready", "1"), ("asset", "2"), ("asset", "3"), ("asset", "4"), ("shutdown", None)]
    assert seqs(query_events) == [("ready", "2"), ("asset", "3"), ("asset", "4"), ("shutdown", None)]
    assert [e.json()["extra"]["n"] for e in header_events[1:4]] == [1, 2, 3]
    assert header_events[1].json()["seq"] == 2 and header_events[0].json() == {"asset": NAME, "seq": 1}
    assert header_events[-1].retry == 3000


async def test_sse_without_last_event_id_starts_now_and_says_where(gateway):
    await publish_asset(gateway)
    await publish_asset(gateway)
    async with gateway.client() as client:
        reader = asyncio.create_task(read_sse(client, events_path(), until_event="asset"))
        await until(waiting(gateway))
        await asyncio.sleep(0.1)
        await publish_asset(gateway, extra={"new": True})
        _, _, events = await reader
        _, _, everything = await read_sse(client, events_path(), params={"last_event_id": 0}, until_event="ready")
    assert seqs(events) == [("ready", "2"), ("asset", "3")]
    assert events[1].json()["extra"] == {"new": True}
    assert seqs(everything)[-1] == ("ready", "0")


async def test_sse_sets_retry_and_heartbeats(gateway_factory):
    gateway = await gateway_factory(heartbeat_seconds=0.2, sse_retry_ms=1234)
    async with gateway.client() as client:
        async with client.stream("GET", events_path()) as response:
            seen = []
            async with asyncio.timeout(5):
                async for line in response.aiter_lines():
                    seen.append(line)
                    if sum(1 for s in seen if s.startswith(": ping")) >= 2:
                        break
    assert "retry: 1234" in seen


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
async def test_sse_bad_last_event_id_is_400(gateway, value):
    async with gateway.client() as client:
        response = await client.get(events_path(), headers={"Last-Event-ID": value})
    assert response.status_code == 400 and response.json()["error"] == "bad_last_event_id"


async def test_tokens_role_query_token_and_run_scoped_tokens(gateway):
    scoped, _ = issue_run_token(gateway.app.state.token_secret, "etl", "r1", 60)
    async with (
        gateway.client(token=None) as anonymous,
        gateway.client(token=scoped) as run_token,
        gateway.client(token=PUBLISH_TOKEN) as publisher,
    ):
        assert (await anonymous.get(next_path(), params={"timeout": 0})).status_code == 401
        by_query = await anonymous.get(next_path(), params={"timeout": 0, "access_token": READ_TOKEN})
        assert by_query.status_code == 202  # EventSource cannot send headers
        refused = await run_token.get(next_path(), params={"timeout": 0})
        assert refused.status_code == 403  # a run's token reads that run only
        assert (await publisher.get(next_path(), params={"timeout": 0})).status_code == 202  # publish includes read


async def test_a_lost_pubsub_message_is_filled_from_the_asset_log(gateway):
    client = aioredis.Redis.from_url(gateway.redis_url)
    k = keys.asset_keys(gateway.namespace, NAME)
    try:
        async with gateway.client() as http:
            reader = asyncio.create_task(read_sse(http, events_path(), params={"last_event_id": 0}, until_event="never"))
            await until(waiting(gateway))
            await publish_asset(gateway)
            await client.incr(k.seq)  # seq 2 reaches the log only, as if its pub/sub message were lost
            lost = AssetEvent(id="lost", asset=AssetInfo(name=NAME))
            epoch = (await client.get(k.epoch)).decode()
            await client.xadd(k.log, {"env": envelope_json(2, lost.to_json(), epoch)}, id="0-2")
            await publish_asset(gateway)
            await until(lambda: gateway.app.state.metrics.events_in._value.get() >= 2)
            await asyncio.sleep(0.1)
            gateway.app.state.hub.drain()
            _, _, events = await reader
    finally:
        await client.aclose()
    assert seqs(events) == [("ready", "0"), ("asset", "1"), ("asset", "2"), ("asset", "3"), ("shutdown", None)]
    assert events[2].json()["id"] == "lost"


async def test_pubsub_connection_killed_then_asset_events_are_recovered(gateway):
    client = aioredis.Redis.from_url(gateway.redis_url)
    try:
        await until(gateway.app.state.hub.connected.is_set)
        async with gateway.client() as http:
            waiter = asyncio.create_task(http.get(next_path(), params={"after": 0, "timeout": 30}))
            await until(waiting(gateway))
            before = gateway.app.state.metrics.resubscribes._value.get()
            await client.client_kill_filter(_type="pubsub")
            await publish_asset(gateway, extra={"after": "kill"})
            response = await waiter
    finally:
        await client.aclose()
    assert response.status_code == 200 and response.json()["extra"] == {"after": "kill"}
    await until(lambda: gateway.app.state.metrics.resubscribes._value.get() > before)


async def test_malformed_asset_messages_are_counted_and_dropped(gateway):
    client = aioredis.Redis.from_url(gateway.redis_url)
    k = keys.asset_keys(gateway.namespace, NAME)
    try:
        async with gateway.client() as http:
            waiter = asyncio.create_task(http.get(next_path(), params={"after": 0, "timeout": 20}))
            await until(waiting(gateway))
            run_event = '{"seq":1,"event":{"v":1,"kind":"run","dag_id":"d","run_id":"r","state":"success"}}'
            for junk in (b"not json", run_event.encode()):
                await client.spublish(k.live, keys.live_message(k.route, junk))
            await publish_asset(gateway)
            response = await waiter
            metrics = (await http.get("/metrics")).text
    finally:
        await client.aclose()
    assert response.status_code == 200 and response.json()["seq"] == 1
    for reason in ("json", "schema"):
        assert f'runbell_decode_errors_total{{reason="{reason}"}} 1.0' in metrics


async def test_asset_waiters_are_not_reported_as_silent_runs(gateway):
    hub, assets, runs = gateway.app.state.hub, gateway.app.state.assets, gateway.app.state.runs
    async with assets.subscribe(NAME):
        assert runs.silent(longer_than=-1) == []
        assert [key for key, _ in hub.silent(assets, longer_than=-1)] == [NAME]
    assert hub.count == 0 and hub.subscribers == {}


async def test_drain_answers_asset_waiters_202(gateway):
    async with gateway.client() as client:
        waiter = asyncio.create_task(client.get(next_path(), params={"timeout": 30}))
        await until(waiting(gateway))
        gateway.app.state.hub.drain()
        response = await waiter
    assert response.status_code == 202 and response.json()["status"] == "pending"


async def test_redis_down_gives_202_never_a_5xx(gateway_factory):
    gateway = await gateway_factory(redis_url="redis://127.0.0.1:1/0")
    async with gateway.client() as client:
        without_after = await client.get(next_path(), params={"timeout": 0.3})
        with_after = await client.get(next_path(), params={"after": 4, "timeout": 0.3})
        async with client.stream("GET", events_path()) as stream:
            status = stream.status_code
    assert without_after.status_code == 202 and without_after.json()["seq"] is None
    assert with_after.status_code == 202 and with_after.json()["seq"] == 4
    assert status == 200  # the stream opens and waits for Redis to come back


async def test_the_openapi_document_describes_the_asset_routes(gateway):
    async with gateway.client(token=None) as client:
        document = (await client.get("/openapi.json")).json()
    for path in ("/v1/assets/{name}/next", "/v1/assets/{name}/events"):
        assert document["paths"][path]["get"]["parameters"][0]["name"] == "name"
