"""A Metaflow run's status in the runs listing: Metaflow's own rules, from what Runbell records.

Metaflow's metadata service (Netflix/metaflow-service, the runs endpoint's status filter, PR #481)
derives a run's status from the ``end`` step's attempt metadata and the run's heartbeat, in this
order:

1. ``end``'s latest ``attempt_ok`` is false but a newer ``attempt`` record exists (a retry): running;
2. ``end``'s latest ``attempt_ok`` is true: completed (even while the heartbeat is fresh);
3. ``end``'s latest ``attempt_ok`` is false: failed;
4. the heartbeat is at most the cutoff old (360 s): running;
5. otherwise (an older heartbeat, or none): failed.

Runbell has no such metadata; it has the events the ``@runbell`` decorator publishes, which stand for
them, and the heartbeats it sends:

- an ``attempt_ok`` record is the end step's terminal event of an attempt, stamped with the event's
  time: ``success`` is true; ``failed`` and ``up_for_retry`` are false (Metaflow writes
  attempt_ok=false for an attempt that will be retried too);
- an ``attempt`` record is the end step's ``running`` event (published as the attempt starts);
- the heartbeat is the newer of the run's last event of any kind and the last heartbeat its running
  tasks sent (every ``RUNBELL_METAFLOW_HEARTBEAT_SECONDS``, 60 s by default, like Metaflow's own
  tasks; the store's ``runs.heartbeat_at``). The cutoff is the gateway's ``stale_after`` (default
  360 s, Metaflow's ``RUN_INACTIVE_CUTOFF_TIME``). A step running for hours keeps its run running; a
  run silent that long, e.g. one whose task was killed or that failed before ``end`` ran, reads
  failed, as Metaflow's UI shows it; the run's ``outcome`` says failed as soon as it is known.

Completed is Runbell's ``success``. The store applies branches 1 to 4 when it records (the heartbeat
is fresh then, by definition), and the listing applies branch 5 when it reads (``listed_state``,
mirrored in SQL for the status filter), since only then is "now" known.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from runbell.bus.schema import Event, EventKind, TaskState
from runbell.listeners.metaflow_hook import END_STEP, RUN_TYPE

RUNNING, SUCCESS, FAILED = "running", "success", "failed"


@dataclass(frozen=True)
class EndAttempts:
    """What Metaflow's rules read of the end step, as times in seconds since the epoch."""

    ok: bool | None = None  # the latest attempt_ok: None when no attempt of end has ended
    ok_at: float | None = None  # when it was recorded
    attempt_at: float | None = None  # when the latest attempt of end started


def end_attempts(events: Iterable[Event]) -> EndAttempts:
    """The end step's attempt records from a run's events (in position order: the later of equal times wins)."""
    ok: bool | None = None
    ok_at = attempt_at = None
    for event in events:
        if event.kind is not EventKind.TASK or event.task_id != END_STEP:
            continue
        state = event.task_state
        if state is TaskState.RUNNING and (attempt_at is None or event.ts >= attempt_at):
            attempt_at = event.ts
        elif state in (TaskState.SUCCESS, TaskState.FAILED, TaskState.UP_FOR_RETRY) and (ok_at is None or event.ts >= ok_at):
            ok, ok_at = state is TaskState.SUCCESS, event.ts
    return EndAttempts(ok=ok, ok_at=ok_at, attempt_at=attempt_at)


def metaflow_status(end: EndAttempts, heartbeat_at: float | None, now: float, cutoff: float) -> str:
    """The five branches, in Metaflow's order."""
    if end.ok is False and end.attempt_at is not None and end.ok_at is not None and end.ok_at < end.attempt_at:
        return RUNNING
    if end.ok is True:
        return SUCCESS
    if end.ok is False:
        return FAILED
    if heartbeat_at is not None and now - heartbeat_at <= cutoff:
        return RUNNING
    return FAILED


def listed_state(state: str, run_type: str | None, alive_at: float, now: float, cutoff: float) -> str:
    """The state the listing shows for a stored run: a Metaflow run stored as running whose
    heartbeat (last event or heartbeat, ``alive_at``) is older than the cutoff is failed (branch 5);
    every other run as stored."""
    if run_type == RUN_TYPE and state == RUNNING and now - alive_at > cutoff:
        return FAILED
    return state
