"""OpenTelemetry spans of the gateway, joined to the caller's W3C trace context.

A caller's ``traceparent``/``tracestate`` on a trigger or a wait is the parent of the gateway's span
for it. The trigger's span context goes into the run's conf (runbell.listeners.tracing reads it
there), so the hook's span of each event is in the same trace, and each event carries its publishing
span's context (``Event.trace``): the gateway's spans of that event (fan-out, the outcome decided, a
webhook delivery) are its children. One trace runs from the trigger to the waiter's answer.

Spans are made with the OpenTelemetry API only: without an SDK they are no-ops and cost next to
nothing. ``configure_otlp`` sets up the SDK with an OTLP exporter when RUNBELL_OTLP_ENDPOINT is set
(the ``otlp`` extra); an application embedding the gateway may set up its own provider instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import ValidationError

from runbell.bus.schema import TraceContext

log = logging.getLogger("runbell.tracing")

TRACER_NAME = "runbell.gateway"
_PROPAGATOR = TraceContextTextMapPropagator()


class BadTraceContext(ValueError):
    """A traceparent or tracestate that is not W3C Trace Context."""


def from_headers(headers: Mapping[str, str]) -> TraceContext | None:
    """The caller's trace context (traceparent, tracestate headers); None without one; BadTraceContext when malformed."""
    traceparent = headers.get("traceparent")
    if traceparent is None:
        return None
    try:
        return TraceContext(traceparent=traceparent.strip().lower(), tracestate=headers.get("tracestate"))
    except ValidationError as exc:
        raise BadTraceContext(str(exc.errors(include_url=False)[0]["msg"])) from None


def context_of(parent: TraceContext | None) -> Context | None:
    if parent is None:
        return None
    carrier = {"traceparent": parent.traceparent}
    if parent.tracestate:
        carrier["tracestate"] = parent.tracestate
    return _PROPAGATOR.extract(carrier)


def current() -> TraceContext | None:
    """The current span's context, to carry on (None when there is no valid one)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if "traceparent" not in carrier:
        return None
    return TraceContext(traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate") or None)


@contextlib.contextmanager
def span(
    name: str,
    parent: TraceContext | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    links: Sequence[TraceContext | None] = (),
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span of the gateway, current inside the block: a child of ``parent`` (else of the current
    span), linked to ``links``."""
    linked = [Link(trace.get_current_span(context_of(link)).get_span_context()) for link in links if link is not None]
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        name, context=context_of(parent), kind=kind, links=linked, attributes=dict(attributes or {})
    ) as started:
        yield started


def configure_otlp(endpoint: str | None, service_name: str = "runbell-gateway") -> bool:
    """Export spans over OTLP/HTTP to ``endpoint`` (the otlp extra). False when not asked for."""
    if not endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"RUNBELL_OTLP_ENDPOINT is set but the OTLP exporter is not installed (pip install 'runbell[otlp]'): {exc}"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    trace.set_tracer_provider(provider)
    log.info("runbell: spans are exported over OTLP to %s", endpoint)
    return True
