"""Publishing from inside an orchestrator's own processes (Airflow's listener, Metaflow's decorator):
bounded (the publisher's timeouts), silent when turned off, and never raising into the host."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from runbell.bus.schema import AnyEvent, AssetEvent
from runbell.listeners.publisher import Publisher, default_publisher


class LogOnce:
    """Log a warning once per kind, so a hook failing on every event does not flood the host's logs."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.seen: set[str] = set()

    def __call__(self, kind: str, msg: str, *args: Any) -> None:
        if kind not in self.seen:
            self.seen.add(kind)
            self.logger.warning(msg, *args)


def publish_guarded(hook: str, build: Callable[[Publisher], Iterable[AnyEvent]], log_once: LogOnce) -> None:
    """Build and publish events with the process's publisher (RUNBELL_HOOK_ENABLED and
    RUNBELL_HOOK_SKIP_DAGS honoured); nothing may escape into the host."""
    try:
        publisher = default_publisher()
        if not publisher.config.enabled:
            return
        for event in build(publisher):
            dag_id = event.source_dag_id if isinstance(event, AssetEvent) else event.dag_id
            if dag_id not in publisher.config.skip_dags:
                publisher.publish(event)
    except Exception as exc:
        log_once(f"{hook}:{type(exc).__name__}", "runbell: %s dropped an event: %r", hook, exc)
