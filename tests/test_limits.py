"""Limits on everything a client sends: request bodies (413 before they are read in full), events
and result values (refused over HTTP, never published, dropped by the gateway's bus readers), and a
result over the limit that is not lost: published as a reference, read from Airflow when asked."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from runbell.bus import keys
from runbell.bus.schema import Event, EventKind, Result, envelope_json
from runbell.listeners.config import EVENT_MAX_BYTES_RANGE, PublisherConfig
from runbell.listeners.publisher import Publisher, emit, within_cap
from runbell.service.client import cli
from runbell.service.client.client import AsyncRunbellClient
from runbell.service.http.app import ROUTES
from runbell.service.http.openapi import OPERATIONS
from tests.conftest import ADMIN_TOKEN, PUBLISH_TOKEN, READ_TOKEN
from tests.test_gateway import until

BODY_MAX, EVENT_MAX, RESULT_MAX = 4096, 65536, 16384
LIMITS = dict(body_max_bytes=BODY_MAX, event_max_bytes=EVENT_MAX, result_max_bytes=RESULT_MAX)


def body_taking_routes() -> list[tuple[str, str]]:
    """(method, path) of every route that takes a body (as the contract says), its path ids filled in."""
    found = []
    for route in ROUTES:
        if OPERATIONS[route.name].body is None:
            continue
        for method in sorted((route.methods or set()) & {"POST", "PUT", "PATCH"}):
            path = route.path
            for name in route.param_convertors:
                path = path.replace("{" + name + "}", "x").replace("{" + name + ":path}", "x")
            found.append((method, path))
    return found


def is_body_too_large(response: httpx.Response, limit: int) -> bool:
    body = response.json()
    return response.status_code == 413 and body["error"] == "body_too_large" and body["accepted"] == {"max_bytes": limit}


def test_the_body_taking_routes_are_all_found():
    routes = body_taking_routes()
    readers = [path for path in Path(__file__).parent.parent.glob("service/http/*.py") if "await read_body(" in path.read_text()]
    assert len(readers) == 4  # run_routes, trigger, answers, webhooks: the routes of each are below
    expected_routes = [
        ("POST", "/v1/events"),
        ("POST", "/v1/webhooks"),
        ("PATCH", "/v1/webhooks/x"),
        ("POST", "/v1/dags/x/runs"),
        ("POST", "/v1/dags/x/runs/x/tasks/x/input"),
    ]
    for expected in expected_routes:
        assert expected in routes


async def test_every_body_is_refused_with_413_past_its_limit_declared_or_chunked(gateway_factory):
    gateway = await gateway_factory(**LIMITS)

    async def chunks(size: int):
        for _ in range(size // 1024):
            yield b" " * 1024

    async with gateway.client(ADMIN_TOKEN) as client:
        for method, path in body_taking_routes():
            limit = EVENT_MAX if path == "/v1/events" else BODY_MAX
            declared = await client.request(method, path, content=b" " * (limit + 1))
            assert is_body_too_large(declared, limit), (method, path, declared.status_code, declared.text)
            chunked = await client.request(method, path, content=chunks(limit + 4096))  # no Content-Length
            assert is_body_too_large(chunked, limit), (method, path, chunked.status_code, chunked.text)
        # At the limit a body is read: a malformed one is a 422 as before, and the connection serves on.
        at_limit = await client.post("/v1/webhooks", content=b" " * BODY_MAX)
        assert at_limit.status_code == 422 and at_limit.json()["error"] == "bad_body"


async def test_an_event_larger_than_other_bodies_is_taken_up_to_the_event_cap(gateway_factory):
    gateway = await gateway_factory(**LIMITS)
    event = {"kind": "task", "dag_id": "etl", "run_id": "r1", "state": "success", "task_id": "t", "result": {"value": "v" * 10_000}}
    async with gateway.client(PUBLISH_TOKEN) as client:
        response = await client.post("/v1/events", json=event)
    assert response.status_code == 201, response.text


async def test_a_result_over_the_result_cap_is_refused_and_a_reference_is_taken(gateway_factory):
    gateway = await gateway_factory(**LIMITS)
    event = {"kind": "task", "dag_id": "etl", "run_id": "r1", "state": "success", "task_id": "t", "result_task": True}
    big = {**event, "result": {"value": "v" * RESULT_MAX}}
    ref = {**event, "result": {"ref": {"dag_id": "etl", "run_id": "r1", "task_id": "t"}, "size": 10**9}}
    async with gateway.client(PUBLISH_TOKEN) as client:
        refused = await client.post("/v1/events", json=big)
        taken = await client.post("/v1/events", json=ref)
    assert refused.status_code == 413, refused.text
    assert refused.json()["error"] == "result_too_large" and refused.json()["accepted"]["max_bytes"] == RESULT_MAX
    assert str(RESULT_MAX) in refused.json()["message"]
    assert taken.status_code == 201, taken.text


def test_settings_refuse_a_result_cap_that_does_not_fit_an_event():
    from runbell.service.settings import Settings

    with pytest.raises(ValueError, match="result_max_bytes must be smaller"):
        Settings(event_max_bytes=65536, result_max_bytes=65536)
    with pytest.raises(ValueError):
        Settings(event_max_bytes=64 * 1024 * 1024)  # Redis would drop the gateway's subscription


# -- the publisher --------------------------------------------------------------------------------


def test_the_publisher_sends_a_result_over_the_event_cap_as_a_reference(redis_url, namespace, tmp_path):
    # A hook whose result cap is not below its event cap: the event cap still holds.
    config = PublisherConfig(
        redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, result_max_bytes=10 * 1024 * 1024, event_max_bytes=65536
    )
    publisher = Publisher(config)
    value = {"rows": "x" * 100_000}
    seq = emit("etl", "big", "success", task_id="answer", map_index=2, result_task=True, result=value, publisher=publisher)
    assert seq == 1
    sent = publisher._redis().xrange(keys.run_keys(namespace, "etl", "big").log)
    (_, fields), *_ = sent
    assert len(fields[b"env"]) < 65536
    event = json.loads(fields[b"env"])["event"]
    assert event["result"] == {"ref": {"dag_id": "etl", "run_id": "big", "task_id": "answer", "map_index": 2}, "size": 100_011}


def test_an_event_that_cannot_fit_is_never_published(redis_url, namespace, tmp_path):
    publisher = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, event_max_bytes=65536))
    # The schema bounds msg, so only an event built without validation can be this large.
    huge = Event.model_construct(kind=EventKind.RUN, dag_id="etl", run_id="huge", state="failed", msg="m" * 70_000)
    assert publisher.publish(huge) is None
    assert publisher._redis().xlen(keys.run_keys(namespace, "etl", "huge").log) == 0
    assert not list(Path(tmp_path).iterdir())  # not spooled either
    small = Event(kind=EventKind.RUN, dag_id="etl", run_id="huge", state="failed", msg="m")
    assert publisher.publish(small) == 1


def test_within_cap_leaves_an_event_that_fits_as_it_is():
    event = Event(kind=EventKind.TASK, dag_id="d", run_id="r", state="success", task_id="t", result=Result(value=[1, 2], size=5))
    assert within_cap(event, event.to_json(), 65536) == (event, event.to_json())


# -- the gateway's bus readers ---------------------------------------------------------------------


async def test_an_event_over_the_ceiling_on_the_bus_is_a_bad_event_and_the_next_one_decides(gateway_factory):
    gateway = await gateway_factory(**LIMITS)
    run = keys.run_keys(gateway.namespace, "etl", "r1")
    big = Event(
        kind=EventKind.TASK,
        dag_id="etl",
        run_id="r1",
        state="success",
        task_id="answer",
        result_task=True,
        result=Result(value="x" * EVENT_MAX_BYTES_RANGE[1]),  # no publisher may send it, whatever its cap
    )
    r = aioredis.Redis.from_url(gateway.redis_url)
    try:
        async with gateway.client(READ_TOKEN) as client:
            waiter = asyncio.create_task(client.get("/v1/dags/etl/runs/r1/result", params={"timeout": 20}))
            await until(lambda: gateway.app.state.hub.count >= 1)
            # As a publisher without the cap would write it: replay log, shard channel and partition stream.
            raw = envelope_json(1, big.to_json())
            await r.set(run.seq, 1)
            await r.xadd(run.log, {"env": raw}, id="0-1")
            await r.spublish(run.live, keys.live_message(run.route, raw))
            await r.xadd(run.stream, {"env": raw})
            await asyncio.to_thread(
                emit, "etl", "r1", "success", task_id="answer", result_task=True, result={"ok": 1}, publisher=gateway.publisher()
            )
            response = await waiter
            metrics = (await client.get("/metrics")).text
    finally:
        await r.aclose()
    assert response.status_code == 200
    assert response.json()["result"] == {"ok": 1} and response.json()["seq"] == 2
    assert 'runbell_decode_errors_total{reason="size"}' in metrics
    store = gateway.app.state.store
    for _ in range(500):  # the recorder records the valid one, bounded: never a hang
        if stored := await store.events("etl", "r1"):
            break
        await asyncio.sleep(0.02)
    assert [e.seq for e in stored] == [2]
    assert gateway.app.state.metrics.recorder_skipped.labels("size")._value.get() >= 1


# -- a result over the limit is not lost ----------------------------------------------------------


@pytest.fixture
async def airflow_gateway(gateway_factory, stand_in_airflow):
    return await gateway_factory(airflow_url=stand_in_airflow.url, **LIMITS)


async def publish_big_result(gateway, airflow, run_id: str) -> dict:
    big = {"rows": list(range(10_000))}  # over RESULT_MAX
    airflow.xcoms[("etl", run_id, "answer", -1)] = big
    publisher = Publisher(
        PublisherConfig(
            redis_url=gateway.redis_url,
            namespace=gateway.namespace,
            spool_dir=Path(gateway.publisher().config.spool_dir),
            result_max_bytes=RESULT_MAX,
        )
    )
    seq = await asyncio.to_thread(emit, "etl", run_id, "success", task_id="answer", result_task=True, result=big, publisher=publisher)
    assert seq is not None
    return big


async def test_a_result_over_the_cap_comes_as_a_marked_reference_and_is_read_from_airflow_when_asked(airflow_gateway, stand_in_airflow):
    big = await publish_big_result(airflow_gateway, stand_in_airflow, "big")
    ref = {"dag_id": "etl", "run_id": "big", "task_id": "answer", "map_index": -1}
    async with airflow_gateway.client(READ_TOKEN) as client:
        plain = (await client.get("/v1/dags/etl/runs/big/result", params={"timeout": 5})).json()
        resolved = (await client.get("/v1/dags/etl/runs/big/result", params={"timeout": 5, "resolve": "true"})).json()
        bad = await client.get("/v1/dags/etl/runs/big/result", params={"timeout": 5, "resolve": "yes"})
    assert plain["result"] == ref  # not fetched unless asked: the marker and where the value is
    assert plain["result_task"]["is_ref"] is True
    # Its size: over the cap, at most its JSON's (the hook stops counting once past the cap).
    assert RESULT_MAX < plain["result_task"]["size"] <= len(json.dumps(big, separators=(",", ":")))
    assert resolved["result"] == big and resolved["result_ref"] == ref
    assert bad.status_code == 400 and bad.json()["error"] == "bad_resolve"


async def test_the_client_reads_a_referenced_result_when_asked(airflow_gateway, stand_in_airflow):
    big = await publish_big_result(airflow_gateway, stand_in_airflow, "big2")
    async with AsyncRunbellClient(airflow_gateway.url, READ_TOKEN) as client:
        plain = await client.wait("etl", "big2", timeout=10)
        resolved = await client.wait("etl", "big2", timeout=10, resolve=True)
    assert plain.result_task is not None and plain.result_task.is_ref and plain.result["task_id"] == "answer"
    assert resolved.result == big and resolved.body["result_ref"]["run_id"] == "big2"


async def test_runbell_wait_resolve_prints_the_value(airflow_gateway, stand_in_airflow, capsys):
    big = await publish_big_result(airflow_gateway, stand_in_airflow, "big3")
    argv = ["wait", "etl", "big3", "--url", airflow_gateway.url, "--token", READ_TOKEN, "--timeout", "10", "--resolve"]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert json.loads(capsys.readouterr().out)["result"] == big


async def test_a_reference_airflow_cannot_give_says_why_and_keeps_the_reference(airflow_gateway, stand_in_airflow):
    await publish_big_result(airflow_gateway, stand_in_airflow, "gone")
    stand_in_airflow.xcoms.clear()
    async with airflow_gateway.client(READ_TOKEN) as client:
        body = (await client.get("/v1/dags/etl/runs/gone/result", params={"timeout": 5, "resolve": "true"})).json()
    assert body["result"]["run_id"] == "gone" and body["result_task"]["is_ref"] is True
    assert "could not be read from Airflow" in body["result_error"]


# -- a served gateway: memory -------------------------------------------------------------------


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM): what a request needed, even if freed since."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


BIG_BODY = 48 * 1024 * 1024


def send_raw(port: int, head: bytes, chunks) -> bytes:
    """Send a request (its body in chunks, stopping when the server stops reading), then its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed
        sock.settimeout(10)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
        return answer


def test_a_48_mib_body_is_refused_without_the_gateway_growing(served_gateway):
    gateway = served_gateway()
    assert gateway.process is not None
    pid, port = gateway.process.pid, gateway.port
    piece = b"x" * (1024 * 1024)
    head = b"POST /v1/events HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    before = peak_rss_bytes(pid)
    declared = send_raw(port, head + f"Content-Length: {BIG_BODY}\r\n\r\n".encode(), (piece for _ in range(48)))
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    chunked = send_raw(port, head + b"Transfer-Encoding: chunked\r\n\r\n", (chunk for _ in range(48)))
    grown = peak_rss_bytes(pid) - before
    print(f"gateway peak RSS growth after two 48 MiB bodies: {grown / 2**20:.1f} MiB")
    for answer in (declared, chunked):
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        assert b'"error":"body_too_large"' in answer and b'"max_bytes":1048576' in answer
    assert grown < 16 * 2**20, f"the gateway grew by {grown / 2**20:.0f} MiB"
    assert httpx.get(gateway.url + "/readyz").status_code == 200


def listen_backlog(port: int) -> int:
    """The accept queue's size of the socket listening on the port, as the kernel holds it (ss's Send-Q)."""
    import subprocess

    line = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout.split()
    return int(line[2])


def test_the_listen_backlog_holds_a_crowd_connecting_at_once(served_gateway):
    """uvicorn's default queue (2,048) overflowed under 10,000 callers connecting at once while the
    gateway was busy subscribing the first ones: the kernel dropped 4-9% of them (ListenOverflows, then
    a reset). The gateway asks for RUNBELL_LISTEN_BACKLOG, capped by the kernel's somaxconn."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listen_backlog(served_gateway().port) == min(65535, somaxconn)
    assert listen_backlog(served_gateway(RUNBELL_LISTEN_BACKLOG="100").port) == 100


def test_a_body_declared_to_a_run_stream_is_refused_as_served(served_gateway):
    """The run events route is served ahead of the app's middleware (runbell.service.http.streams): a
    declared body over the limit still meets BodyLimit's 413, instead of being read and dropped by a
    stream (a chunked one is dropped once the stream has begun, as on every stream: see BodyLimit)."""
    gateway = served_gateway()
    piece = b"x" * (1024 * 1024)
    head = b"GET /v1/dags/d/runs/r/events HTTP/1.1\r\nHost: gw\r\n"
    answer = send_raw(gateway.port, head + f"Content-Length: {2 * len(piece)}\r\n\r\n".encode(), (piece for _ in range(2)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"error":"body_too_large"' in answer


async def test_a_mapped_result_keeps_the_marker_of_any_referenced_value_and_resolves_each(airflow_gateway, stand_in_airflow):
    big = {"rows": list(range(10_000))}
    stand_in_airflow.xcoms[("etl", "mapped", "answer", 0)] = big
    config = PublisherConfig(
        redis_url=airflow_gateway.redis_url,
        namespace=airflow_gateway.namespace,
        spool_dir=Path(airflow_gateway.publisher().config.spool_dir),
        result_max_bytes=RESULT_MAX,
    )
    publisher = Publisher(config)
    for map_index, value in ((0, big), (1, {"small": 1})):  # the small one last: it must not clear the marker
        assert emit("etl", "mapped", "success", task_id="answer", map_index=map_index, result_task=True, result=value, publisher=publisher)
    assert emit("etl", "mapped", "success", publisher=publisher)
    ref = {"dag_id": "etl", "run_id": "mapped", "task_id": "answer", "map_index": 0}
    async with airflow_gateway.client(READ_TOKEN) as client:
        plain = (await client.get("/v1/dags/etl/runs/mapped/result", params={"timeout": 5})).json()
        resolved = (await client.get("/v1/dags/etl/runs/mapped/result", params={"timeout": 5, "resolve": "true"})).json()
    assert plain["result"] == [ref, {"small": 1}] and plain["result_task"]["is_ref"] is True
    assert resolved["result"] == [big, {"small": 1}] and resolved["result_ref"] == [ref]


async def test_an_event_over_this_gateways_cap_but_within_the_ceiling_is_delivered_and_recorded(
    gateway_factory, redis_url, namespace, tmp_path
):
    """A hook whose RUNBELL_EVENT_MAX_BYTES is set above the gateway's publishes an event the gateway's
    POST would refuse: on the bus it is a valid event, delivered and recorded, never dropped."""
    gateway = await gateway_factory(**LIMITS)
    hook = Publisher(PublisherConfig(redis_url=redis_url, namespace=namespace, spool_dir=tmp_path, event_max_bytes=4 * EVENT_MAX))
    value = "y" * (2 * EVENT_MAX)
    async with gateway.client(READ_TOKEN) as client:
        waiter = asyncio.create_task(client.get("/v1/dags/etl/runs/wide/result", params={"timeout": 20}))
        await until(lambda: gateway.app.state.hub.count >= 1)
        event = Event(
            kind=EventKind.TASK, dag_id="etl", run_id="wide", state="success", task_id="t", result_task=True, result=Result(value=value)
        )
        assert await asyncio.to_thread(hook.publish, event) == 1
        response = await waiter
    assert response.status_code == 200 and response.json()["result"] == value
    store = gateway.app.state.store
    for _ in range(500):
        if stored := await store.events("etl", "wide"):
            break
        await asyncio.sleep(0.02)
    assert [e.seq for e in stored] == [1]
