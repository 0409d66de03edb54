"""Cancel on disconnect: a run whose caller went away, with nobody else waiting, is failed in Airflow.

Opt-in per trigger (``cancel_on_disconnect``). When that caller's connection closes before the run's
outcome is decided, the run is looked at again after ``RUNBELL_CANCEL_GRACE`` seconds (the caller may
come back: a reconnect waits on the run again) and left alone when any of these holds: its outcome is
decided, it has ended, a caller waits on it on this gateway (long-poll or SSE), or a callback is
registered for it. Otherwise the gateway marks it failed through Airflow's REST API (which stops its
unfinished tasks), with a note saying why, then publishes the run's failure with the same reason.
Only after Airflow took the change, so that the bus never says failed of a run Airflow still runs:
Airflow's own report of a running task it failed may come first, and then decides the outcome (a
critical task failed, "TaskInstance's state was manually set to failed"); the run's failed event
after it, on every stream, says why.

A caller waiting through another replica of a fleet is not seen here: cancel on disconnect is for runs
only their caller waits on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

from runbell.bus.schema import START, Event, EventKind, RunState, Source
from runbell.listeners.publisher import Publisher
from runbell.service.airflow.api import AirflowClient
from runbell.service.core.outcome import decide
from runbell.service.live.topics import RunTopic

log = logging.getLogger("runbell.cancels")

REASON = "cancelled by Runbell: its caller went away before the outcome (cancel_on_disconnect), and nobody else waited on it"


class DisconnectCancels:
    """The runs whose caller went away, each looked at once after the grace (one task each)."""

    def __init__(
        self,
        airflow: AirflowClient,
        runs: RunTopic,
        has_callback: Callable[[str, str], Awaitable[bool]],
        publisher: Publisher,
        grace: float,
    ):
        self.airflow, self.runs, self.has_callback, self.publisher, self.grace = airflow, runs, has_callback, publisher, grace
        self.cancelled = 0  # runs failed here
        self._pending: dict[tuple[str, str], asyncio.Task[None]] = {}

    def schedule(self, dag_id: str, run_id: str) -> None:
        """The caller of this run went away: look again after the grace (once, however often asked)."""
        key = (dag_id, run_id)
        if key not in self._pending:
            task = asyncio.create_task(self._after_grace(dag_id, run_id), name=f"runbell-cancel {dag_id}/{run_id}")
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))

    async def why_not(self, dag_id: str, run_id: str) -> str | None:
        """Why the run must not be cancelled now; None when nothing holds it."""
        outcome = decide(await self.runs.read((dag_id, run_id), START), dag_id, run_id)
        if outcome.decided:
            return "its outcome is decided"
        if outcome.run_state in (RunState.SUCCESS.value, RunState.FAILED.value):
            return "it has ended"
        if self.runs.hub.subscribers.get(self.runs.route((dag_id, run_id))):
            return "a caller waits on it"
        if await self.has_callback(dag_id, run_id):
            return "a callback is registered for it"
        return None

    async def airflow_says_no(self, dag_id: str, run_id: str) -> str | None:
        """Asked last, right before the change: a run Airflow has ended (its events may not have come
        yet) is never failed afterwards."""
        run = await self.airflow.get_run(dag_id, run_id)
        if run is None:
            return "Airflow has no such run"
        if run.get("state") in (RunState.SUCCESS.value, RunState.FAILED.value):
            return f"Airflow has it {run['state']} already"
        return None

    async def _after_grace(self, dag_id: str, run_id: str) -> None:
        try:
            await asyncio.sleep(self.grace)
            reason = await self.why_not(dag_id, run_id) or await self.airflow_says_no(dag_id, run_id)
            if reason is not None:
                log.info("runbell: run %s of %s is not cancelled: %s", run_id, dag_id, reason)
                return
            await self.airflow.fail_run(dag_id, run_id, REASON)
            await asyncio.to_thread(self.publisher.publish, cancelled_event(dag_id, run_id))
            self.cancelled += 1
            log.warning("runbell: run %s of %s failed in Airflow: %s", run_id, dag_id, REASON)
        except asyncio.CancelledError:
            raise
        except Exception:  # one run's failure to cancel never reaches the others, nor the gateway
            log.exception("runbell: run %s of %s could not be cancelled after its caller went away", run_id, dag_id)

    async def aclose(self) -> None:
        """The gateway stops: what is still in its grace is left alone (nobody can be sure the caller is gone for good)."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def cancelled_event(dag_id: str, run_id: str) -> Event:
    """The run's failure as the gateway caused it (a stable id: published once however often tried)."""
    event_id = hashlib.sha256(f"gateway|{dag_id}|{run_id}|cancelled".encode()).hexdigest()[:32]
    return Event(
        id=event_id, kind=EventKind.RUN, dag_id=dag_id, run_id=run_id, state=RunState.FAILED.value, source=Source.GATEWAY, msg=REASON
    )
