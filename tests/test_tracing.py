"""Traces across the whole path, with the OpenTelemetry SDK's in-memory exporter: a caller's traceparent on
the trigger and on its wait; the trigger's context carried in the run's conf to the hook; the hook's
span of the result event; the gateway's fan-out, outcome decided and webhook delivery as its children.
One trace, from the trigger to the waiter's answer, with the hook's span in it. Against a real gateway,
Redis and receiver, with a stand-in Airflow (the hook called as the worker calls it)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from runbell.bus.schema import TaskState
from runbell.listeners import hook
from runbell.listeners.tracing import TRACEPARENT_CONF_KEY, trace_of_conf
from tests.conftest import TRIGGER_TOKEN
from tests.test_gateway import until
from tests.test_hook import WorkerTI, make_dag
from tests.test_webhook_delivery import receiver  # noqa: F401  # the fixture: a real HTTP receiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = {"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "tracestate": "vendor=opaque"}


class SwitchableProvider(TracerProvider):
    """The SDK's provider, turned off after this module: OpenTelemetry sets the process's provider
    once, and the tests after these must see the API's no-op spans again (no trace in a run's conf)."""

    on = True

    def get_tracer(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().get_tracer(*args, **kwargs) if self.on else trace.NoOpTracer()


PROVIDER = SwitchableProvider()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider, on for this module: every span ends up in memory."""
    exporter = InMemorySpanExporter()
    PROVIDER.add_span_processor(SimpleSpanProcessor(exporter))
    PROVIDER.on = True
    trace.set_tracer_provider(PROVIDER)
    yield exporter
    PROVIDER.on = False


@pytest.fixture
async def gateway(gateway_factory, stand_in_airflow):
    return await gateway_factory(
        airflow_url=stand_in_airflow.url,
        reconcile_after=3600,
        token_secret="test-secret-of-at-least-32-bytes!!",
        webhook_allowed_hosts="127.0.0.1",
    )


def ours(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        if format(span.context.trace_id, "032x") == TRACE_ID:
            found.setdefault(span.name, []).append(span)
    return found


def parent_of(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent is not None else None


def span_id(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


async def test_one_trace_from_the_trigger_to_the_waiters_answer_with_the_hooks_span(spans, gateway, stand_in_airflow, receiver) -> None:  # noqa: F811
    spans.clear()
    callback = {"url": receiver.at("/traced"), "kinds": ["task", "outcome"]}
    async with gateway.client(TRIGGER_TOKEN) as client:
        triggered = await client.post("/v1/dags/etl/runs", json={"conf": {"q": 1}, "callback": callback}, headers=CALLER)
        assert triggered.status_code == 202, triggered.text
        run_id = triggered.json()["run_id"]
        (posted,) = stand_in_airflow.posts
        carried = trace_of_conf(posted["conf"])
        assert posted["conf"]["q"] == 1 and carried is not None and TRACE_ID in carried.traceparent  # into the run's conf

        waiter = asyncio.create_task(client.get(f"/v1/dags/etl/runs/{run_id}/result", params={"timeout": 20}, headers=CALLER))
        await until(lambda: gateway.app.state.hub.count >= 1)
        # The result task succeeds in its worker: the hook makes the event inside its span.
        task = make_dag("answer", result="answer")["answer"]
        ti = WorkerTI(task, conf=posted["conf"], xcom={"answer": 42})
        ti.dag_id, ti.run_id = "etl", run_id
        publisher = gateway.publisher()
        event = hook._task_event(ti, TaskState.SUCCESS, publisher)
        assert event.trace is not None and TRACE_ID in event.trace.traceparent
        assert await asyncio.to_thread(publisher.publish, event) is not None
        answer = await waiter
    assert answer.status_code == 200 and answer.json()["result"] == {"answer": 42}
    await until(lambda: len(receiver.hits_at("/traced")) >= 2 and "runbell.outcome.decided" in ours(spans), timeout=30)
    await until(lambda: "runbell.webhook.delivery" in ours(spans), timeout=10)  # the task event's (an outcome's carries no context)

    found = ours(spans)
    (trigger_span,) = found["runbell.trigger"]
    (hook_span,) = found["runbell.hook.publish"]
    assert parent_of(trigger_span) == CALLER_SPAN  # the caller's span is the trigger's parent
    assert parent_of(hook_span) == span_id(trigger_span)  # the hook's span joins the trigger's trace
    assert [format(link.context.span_id, "016x") for link in hook_span.links] == [span_id(trigger_span)]
    assert hook_span.attributes["runbell.task_id"] == "answer"
    fanouts = [s for s in found["runbell.fanout"] if parent_of(s) == span_id(hook_span)]
    assert fanouts and fanouts[0].attributes["runbell.subscribers"] >= 1  # the waiter's fan-out
    (decided,) = found["runbell.outcome.decided"]
    assert parent_of(decided) == span_id(hook_span) and decided.attributes["runbell.status"] == "success"
    waits = [s for s in found["runbell.wait"] if s.attributes.get("http.response.status_code") == 200]
    assert len(waits) == 1 and parent_of(waits[0]) == CALLER_SPAN  # the waiter's answer, in the caller's trace
    deliveries = found["runbell.webhook.delivery"]
    assert any(parent_of(d) == span_id(hook_span) for d in deliveries)  # the task event's delivery
    # The receiver is told the delivery's context: its own spans can join the trace.
    assert any(TRACE_ID in hit.headers.get("traceparent", "") for hit in receiver.hits_at("/traced"))


async def test_a_malformed_traceparent_is_a_400(gateway, stand_in_airflow) -> None:
    async with gateway.client(TRIGGER_TOKEN) as client:
        bad = await client.post("/v1/dags/etl/runs", json={}, headers={"traceparent": "00-nothex-00f067aa0ba902b7-01"})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_traceparent"
        for tail in ("result", "progress", "events"):  # every way to wait on a run
            wait = await client.get(f"/v1/dags/etl/runs/x/{tail}", params={"timeout": 0}, headers={"traceparent": "garbage"})
            assert wait.status_code == 400 and wait.json()["error"] == "bad_traceparent", tail
    assert not stand_in_airflow.runs


def test_the_hook_carries_the_conf_s_context_without_a_span_and_none_without_one() -> None:
    conf = {TRACEPARENT_CONF_KEY: f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    assert trace_of_conf(conf) is not None and trace_of_conf({}) is None
    assert trace_of_conf({TRACEPARENT_CONF_KEY: "not-a-traceparent"}) is None
    ti = WorkerTI(make_dag("t")["t"], conf={})
    assert hook._task_event(ti, TaskState.RUNNING, hook.default_publisher()).trace is None


def test_spans_are_exported_over_otlp_when_an_endpoint_is_set(tmp_path) -> None:
    """configure_otlp in a process of its own (it sets the process's provider): a span made there is
    POSTed to /v1/traces of the endpoint, as OTLP/HTTP protobuf, with the gateway's service name."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  # the http.server name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = (
        "from opentelemetry import trace\n"
        "from runbell.service.core import tracing\n"
        f"assert tracing.configure_otlp('http://127.0.0.1:{server.server_address[1]}')\n"
        "assert not tracing.configure_otlp(None)\n"
        "with tracing.span('runbell.exported'):\n"
        "    pass\n"
        "trace.get_tracer_provider().shutdown()\n"  # flushes the batch
    )
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-3000:]
    ((path, content_type, body),) = received
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    assert b"runbell.exported" in body and b"runbell-gateway" in body
