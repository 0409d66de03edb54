"""The reconciler: no waiter hangs because an event was lost.

Hooks can be lost (a SIGKILLed task fires none; a worker can lose Redis and die before its spool is
flushed; a host can run without the hook). For every run someone here waits on that has been silent
for a while, Airflow's REST API is asked, and what it says is published as events from the
reconciler, through the same path as the hook's, so waiters, SSE clients and the store all see it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from runbell.bus.schema import ErrorInfo, Event, EventKind, RunState, Source, TaskState
from runbell.listeners.publisher import Publisher
from runbell.service.airflow.api import AirflowAuthFailed, AirflowClient, AirflowError, AirflowUnavailable
from runbell.service.core.loops import Backoff, Once, Supervised
from runbell.service.live.topics import RunTopic

log = logging.getLogger("runbell.reconciler")

TICK_SECONDS = 1.0
MAX_INTERVAL_SECONDS = 300.0
OUTAGE_BACKOFF_MAX_SECONDS = 60.0  # while Airflow is unreachable or refuses our credentials

# Airflow's task states that are events on the bus; the others (scheduled, queued, deferred,
# upstream_failed, removed...) mean the task did not run, or has not yet.
TASK_STATES = {
    "running": TaskState.RUNNING,
    "success": TaskState.SUCCESS,
    "failed": TaskState.FAILED,
    "up_for_retry": TaskState.UP_FOR_RETRY,
    "skipped": TaskState.SKIPPED,
}
RUN_STATES = {s.value: s for s in RunState}


class Reconciler:
    """Asks Airflow about the runs waited on here that were silent for ``after`` seconds, each again
    at a doubling interval while it stays silent.

    An Airflow that cannot be reached (or refuses the gateway's credentials) fails the whole step: the
    loop backs off and logs the outage once, and its end. Any other error is about one run: logged
    once per error code, and that run is asked again at its next interval."""

    def __init__(
        self, runs: RunTopic, airflow: AirflowClient, publisher: Publisher, after: float, *, clock: Callable[[], float] = time.monotonic
    ):
        self.runs, self.airflow, self.publisher, self.after = runs, airflow, publisher, after
        self.clock = clock  # monotonic seconds (tests pass their own)
        self._next: dict[tuple[str, str], tuple[float, float]] = {}  # run -> (due, interval)
        self._run_errors = Once(log)
        self.loop = Supervised(
            "runbell-reconciler",
            self.step,
            backoff=Backoff(first=TICK_SECONDS, cap=OUTAGE_BACKOFF_MAX_SECONDS),
            pause=TICK_SECONDS,
            logger=log,
            expected=(AirflowError,),
        )

    async def run(self) -> None:
        """Reconcile until cancelled."""
        await self.loop.run()

    async def step(self) -> int:
        """Reconcile every silent run that is due. Returns how many were asked about."""
        now, asked = self.clock(), 0
        silent = {(dag, run) for dag, run, _ in self.runs.silent(self.after)}
        for run in list(self._next):
            if run not in silent:
                del self._next[run]  # heard from again, or nobody waits any more
        for dag_id, run_id in silent:
            due, interval = self._next.get((dag_id, run_id), (now, self.after))
            if now < due:
                continue
            asked += 1
            await self.reconcile(dag_id, run_id)
            interval = min(interval * 2, MAX_INTERVAL_SECONDS)  # backing off while it stays silent
            self._next[(dag_id, run_id)] = (self.clock() + interval, interval)
        return asked

    async def reconcile(self, dag_id: str, run_id: str) -> list[Event]:
        """Ask Airflow about one run; publish what it knows. Returns the events published."""
        try:
            run = await self.airflow.get_run(dag_id, run_id)
            if run is None:
                if await self.runs.heard_of(dag_id, run_id):
                    # Not Airflow's (a Metaflow run, one published with `runbell emit`): it exists,
                    # its waiters wait on, and it is asked about again as it stays silent.
                    self._run_errors("foreign", "%s/%s is not Airflow's run, the bus knows it: not reconciled", dag_id, run_id)
                    return []
                self.runs.mark_missing(dag_id, run_id)
                return []
            task_instances = await self.airflow.task_instances(dag_id, run_id)
        except (AirflowUnavailable, AirflowAuthFailed):
            raise  # not about this run: the loop backs off
        except AirflowError as exc:
            self._run_errors(exc.code, "cannot reconcile %s/%s: %s", dag_id, run_id, exc)
            return []
        events = events_from_airflow(dag_id, run_id, run, task_instances)
        for event in events:
            await asyncio.to_thread(self.publisher.publish, event)
        return events


def events_from_airflow(dag_id: str, run_id: str, run: dict[str, Any], task_instances: list[dict[str, Any]]) -> list[Event]:
    """The bus events that Airflow's REST view of a run amounts to: tasks first, in the order they
    ended, then the run. Ids are derived from the content, so asking again publishes nothing new."""
    events = []
    ordered = sorted(task_instances, key=lambda ti: (ti.get("end_date") or "9999", ti.get("task_id") or ""))
    for ti in ordered:
        state = TASK_STATES.get(ti.get("state") or "")
        if state is None:
            continue
        error = None
        if state in (TaskState.FAILED, TaskState.UP_FOR_RETRY):
            error = ErrorInfo(type="task_failed", message=f"Airflow reports the task {state.value} (the hook sent nothing)")
        events.append(
            _event(
                dag_id,
                run_id,
                EventKind.TASK,
                state.value,
                task_id=ti["task_id"],
                map_index=ti.get("map_index", -1),
                try_number=ti.get("try_number"),
                error=error,
            )
        )
    run_state = RUN_STATES.get(run.get("state") or "")
    if run_state is not None:
        events.append(
            _event(
                dag_id,
                run_id,
                EventKind.RUN,
                run_state.value,
                run_type=run.get("run_type"),
                logical_date=run.get("logical_date"),
                run_after=run.get("run_after"),
                backfill_id=_text(run.get("backfill_id")),
                msg="reconciled from Airflow's REST API",
            )
        )
    return events


def _event(dag_id: str, run_id: str, kind: EventKind, state: str, **fields: Any) -> Event:
    identity = "|".join(
        str(x)
        for x in ("reconciler", dag_id, run_id, kind.value, state, fields.get("task_id"), fields.get("map_index"), fields.get("try_number"))
    )
    event_id = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return Event(id=event_id, kind=kind, dag_id=dag_id, run_id=run_id, state=state, source=Source.RECONCILER, **fields)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
