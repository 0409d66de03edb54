"""One way to run a background loop, and one way to log a repeated failure once.

``Supervised(name, body)`` runs ``body`` again and again in a task of its own until it is stopped.
A body that raises is retried after an exponential, capped, jittered delay (``Backoff``): an outage
of Redis, the database or Airflow is waited out, never ends the loop. Logging follows the state,
not the attempts: the first failure is one warning with the error (a traceback only when the error
is not an expected outage), identical failures after it are debug lines and counted, a different
error is a warning again, and the first success after failures is one info line, "recovered after
N failures". Only cancellation (``stop()``) ends the loop.

``Once`` is the same rule for failures that are not a loop's: the first of each kind is a warning,
the rest are counted and logged at debug. ``keep_trying`` is the same backoff for one read that a
caller's own timeout bounds (a waiter's read of a replay log while Redis is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TypeVar

log = logging.getLogger("runbell.loops")

R = TypeVar("R")


class Backoff:
    """Delays that double from ``first`` up to ``cap``, each shortened by up to ``jitter`` (a fraction)
    at random, so that replicas failing together do not retry in step."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, *, jitter: float = 0.5, rng: Callable[[], float] = random.random):
        if not 0 < first <= cap:
            raise ValueError("backoff needs 0 < first <= cap")
        if not 0 <= jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")
        self.first, self.cap, self.jitter, self.rng = first, cap, jitter, rng
        self.attempt = 0  # delays handed out since the last reset

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0 ** min(self.attempt, 60))  # bounded exponent: no float overflow
        self.attempt += 1
        return delay * (1 - self.jitter * self.rng())

    def reset(self) -> None:
        self.attempt = 0


class Once:
    """Logs the first occurrence of each kind of failure as a warning, later ones at debug; counts all."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.counts: Counter[str] = Counter()

    def __call__(self, kind: str, msg: str, *args: object) -> bool:
        """Log ``msg % args``; True when this was the first of its kind (the warning)."""
        self.counts[kind] += 1
        first = self.counts[kind] == 1
        self.logger.log(logging.WARNING if first else logging.DEBUG, msg, *args)
        return first


async def keep_trying(
    call: Callable[[], Awaitable[R]], *, retry_on: tuple[type[Exception], ...], log_once: Once, what: str, backoff: Backoff | None = None
) -> R:
    """``call()``'s result, calling again after each failure of a ``retry_on`` type (logged once per
    type, backed off): for a caller whose own timeout bounds the wait, as a waiter's does."""
    backoff = backoff if backoff is not None else Backoff(first=0.05)
    while True:
        try:
            return await call()
        except retry_on as exc:
            log_once(f"{what}-{type(exc).__name__}", "%s unreadable (%r); retrying", what, exc)
            await asyncio.sleep(backoff.next())


async def within(seconds: float, awaitable: Awaitable[R]) -> R:
    """The awaitable's result, or TimeoutError after ``seconds``, when it is cancelled and its clean-up
    waited for (as when the caller is cancelled). What asyncio.wait_for is meant to be: on Python 3.11
    wait_for loses a cancellation of its caller that arrives as the awaitable completes (the caller
    then goes on, and a loop never stops). Not an anyio scope either: that cancels again at every
    await until it is left, which cuts the clean-up of asyncio libraries short (SQLAlchemy's
    connection close, redis-py's disconnect)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:  # the caller's: never lost; the awaitable is cancelled and waited for
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: a failure on its way out is not logged as never retrieved
        raise
    if task not in done:
        task.cancel()
        await asyncio.wait({task})  # its clean-up runs to its end, as wait_for's did
        if not task.cancelled() and task.exception() is None:
            return task.result()  # it finished as it was being cancelled
        raise TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


class LoopState(Enum):
    IDLE = "idle"  # not started
    RUNNING = "running"  # the last run of the body succeeded (or none ended yet)
    FAILING = "failing"  # the last run of the body raised; waiting to retry
    STOPPED = "stopped"


class Supervised:
    """Runs ``body`` repeatedly in a task named ``name`` until ``stop()``.

    After a body returns: ``pause`` seconds, then the next run. After it raises: the next delay of
    ``backoff``. A long-running body (one that returns only on failure) calls ``ok()`` when it has
    made progress, so that a later failure counts as new and the backoff starts over.
    ``expected``: exception types that are outages, logged without a traceback (anything else looks
    like a bug and gets one). ``on_stop``: awaited when the loop ends, to hand back what it holds.
    """

    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[object]],
        *,
        backoff: Backoff | None = None,
        pause: float = 0.0,
        logger: logging.Logger | None = None,
        expected: tuple[type[BaseException], ...] = (OSError,),
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ):
        self.name = name
        self.body = body
        self.backoff = backoff if backoff is not None else Backoff()
        self.pause = pause
        self.logger = logger if logger is not None else log
        self.expected = expected
        self.on_stop = on_stop
        self.state = LoopState.IDLE
        self.failures = 0  # consecutive failed runs of the body (0 while running well)
        self.total_failures = 0
        self.last_error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the loop in a task of its own."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"{self.name} is already running")
        self._task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        """Cancel the loop's task and wait until it has ended (``on_stop`` included)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """The loop itself, in the caller's task: returns only by cancellation."""
        self.state = LoopState.RUNNING
        try:
            while True:
                try:
                    await self.body()
                except Exception as exc:  # anything but cancellation: log by state, wait, retry
                    self._failed(exc)
                    await asyncio.sleep(self.backoff.next())
                    continue
                self.ok()
                await asyncio.sleep(self.pause)  # even 0: a body that never waits must not starve the event loop
        finally:
            self.state = LoopState.STOPPED
            if self.on_stop is not None:
                await self.on_stop()

    def ok(self) -> None:
        """The body made progress: a failure streak ends here (one info line) and the backoff restarts."""
        if self.failures:
            self.logger.info("%s: recovered after %d failures", self.name, self.failures)
            self.failures = 0
            self.last_error = None
        self.backoff.reset()
        self.state = LoopState.RUNNING

    def _failed(self, exc: Exception) -> None:
        same = self.last_error is not None and _identity(self.last_error) == _identity(exc)
        self.failures += 1
        self.total_failures += 1
        self.last_error = exc
        self.state = LoopState.FAILING
        if same:
            self.logger.debug("%s: still failing (%s), %d failures in a row", self.name, type(exc).__name__, self.failures)
            return
        self.logger.warning(
            "%s: %s: %s; retrying (identical failures are counted, not logged again)",
            self.name,
            type(exc).__name__,
            exc,
            exc_info=None if isinstance(exc, self.expected) else exc,
        )


def _identity(exc: BaseException) -> type[BaseException]:
    # By type, not message: messages carry addresses and ids that would make every failure look new.
    return type(exc)
