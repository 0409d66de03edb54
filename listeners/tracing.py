"""The hook's spans (optional OpenTelemetry): each event of a run triggered with a trace context joins it.

The gateway's trigger puts its span's W3C trace context into the run's conf (TRACEPARENT_CONF_KEY,
TRACESTATE_CONF_KEY). The hook makes each event of that run inside a span ``runbell.hook.publish``,
a child of that context and linked to it, and the event carries the span's context (Event.trace), so
the gateway's spans of the event continue the same trace. Where OpenTelemetry is not installed, or
no provider is set up in the process (the API's spans then record nothing), the event carries the
conf's context as it is; a run without one gets none. Never raises: tracing must not cost an event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from runbell.bus.schema import TraceContext

log = logging.getLogger("runbell.tracing")

TRACEPARENT_CONF_KEY = "runbell_traceparent"
TRACESTATE_CONF_KEY = "runbell_tracestate"
TRACER_NAME = "runbell.hook"


def trace_of_conf(conf: Mapping[str, Any]) -> TraceContext | None:
    """The trigger's trace context from a run's conf; None without a valid one."""
    traceparent = conf.get(TRACEPARENT_CONF_KEY)
    if not isinstance(traceparent, str):
        return None
    tracestate = conf.get(TRACESTATE_CONF_KEY)
    try:
        return TraceContext(traceparent=traceparent, tracestate=tracestate if isinstance(tracestate, str) else None)
    except ValidationError:
        return None


def conf_with(conf: Mapping[str, Any], context: TraceContext | None) -> dict[str, Any]:
    """A run's conf carrying a trace context (the trigger's)."""
    if context is None:
        return dict(conf)
    carried = {**conf, TRACEPARENT_CONF_KEY: context.traceparent}
    if context.tracestate:
        carried[TRACESTATE_CONF_KEY] = context.tracestate
    return carried


@contextlib.contextmanager
def publish_span(parent: TraceContext | None, attributes: Mapping[str, Any]) -> Iterator[TraceContext | None]:
    """Inside the span of one event's publishing (when the run has a trace context): the context the event carries."""
    if parent is None:
        yield None
        return
    try:
        from opentelemetry import trace
        from opentelemetry.trace import Link, SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:  # no OpenTelemetry here: the trigger's context, as it is
        yield parent
        return
    propagator = TraceContextTextMapPropagator()
    carrier = {"traceparent": parent.traceparent, **({"tracestate": parent.tracestate} if parent.tracestate else {})}
    context = propagator.extract(carrier)
    link = Link(trace.get_current_span(context).get_span_context())
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        "runbell.hook.publish", context=context, kind=SpanKind.PRODUCER, links=[link], attributes=dict(attributes)
    ):
        out: dict[str, str] = {}
        propagator.inject(out)
        try:
            carried = TraceContext(traceparent=out["traceparent"], tracestate=out.get("tracestate") or None) if out else parent
        except (KeyError, ValidationError):
            carried = parent
        yield carried
