"""The supervised-loop helper (runbell.service.core.loops): backoff, logging by state, clean stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from runbell.service.core.loops import Backoff, LoopState, Once, Supervised, keep_trying, within

LOGGER = "runbell.test.loops"
WAIT = 20.0  # upper bound for what should happen at once; never reached when it works


def tiny() -> Backoff:
    return Backoff(first=0.0001, cap=0.001)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.001)


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# -- Backoff -----------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_starts_over_after_reset():
    backoff = Backoff(first=0.1, cap=1.0, jitter=0.5, rng=lambda: 0.0)  # no jitter drawn: the bare schedule
    assert [backoff.next() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.attempt == 6
    backoff.reset()
    assert backoff.next() == pytest.approx(0.1)


def test_backoff_jitter_shortens_each_delay_by_at_most_its_fraction():
    assert Backoff(first=1.0, cap=8.0, jitter=0.5, rng=lambda: 1.0).next() == pytest.approx(0.5)
    backoff = Backoff(first=1.0, cap=8.0, jitter=0.5)
    delays = [backoff.next() for _ in range(200)]
    assert all(0.5 * 8.0 <= d <= 8.0 for d in delays[10:])
    assert len(set(delays[10:])) > 1  # jittered: not all the same


def test_backoff_stays_capped_after_very_many_failures():
    backoff = Backoff(first=0.1, cap=5.0, rng=lambda: 0.0)
    for _ in range(5000):
        delay = backoff.next()
    assert delay == 5.0


@pytest.mark.parametrize("first, cap, jitter", [(0, 1, 0.5), (2, 1, 0.5), (0.1, 1, 1.0), (0.1, 1, -0.1)])
def test_backoff_refuses_bad_settings(first, cap, jitter):
    with pytest.raises(ValueError):
        Backoff(first=first, cap=cap, jitter=jitter)


# -- Once ----------------------------------------------------------------------------------------------


def test_once_warns_on_the_first_of_each_kind_and_counts_the_rest(caplog):
    once = Once(logging.getLogger(LOGGER))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert once("a", "first a %d", 1) is True
        assert once("a", "second a %d", 2) is False
        assert once("b", "first b") is True
    assert records(caplog, logging.WARNING) == ["first a 1", "first b"]
    assert records(caplog, logging.DEBUG) == ["second a 2"]
    assert once.counts == {"a": 2, "b": 1}


# -- keep_trying ---------------------------------------------------------------------------------------


async def test_keep_trying_retries_what_it_is_told_logs_each_type_once_and_returns_the_result(caplog):
    failures = [ConnectionError("a"), ConnectionError("b"), OSError("c")]

    async def read() -> str:
        if failures:
            raise failures.pop(0)
        return "value"

    once = Once(logging.getLogger(LOGGER))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await keep_trying(read, retry_on=(OSError,), log_once=once, what="log", backoff=tiny()) == "value"
    assert [m.split(" (")[0] for m in records(caplog, logging.WARNING)] == ["log unreadable", "log unreadable"]
    assert once.counts == {"log-ConnectionError": 2, "log-OSError": 1}


async def test_keep_trying_lets_other_errors_through():
    async def read() -> str:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await keep_trying(read, retry_on=(OSError,), log_once=Once(logging.getLogger(LOGGER)), what="log", backoff=tiny())


# -- Supervised ----------------------------------------------------------------------------------------


class Script:
    """A body that fails as told, call by call: an exception to raise, or None to succeed."""

    def __init__(self, *outcomes: Exception | None):
        self.outcomes = list(outcomes)
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.outcomes:
            await asyncio.Event().wait()  # the script is played: hold here until stopped
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome

    @property
    def done(self) -> bool:
        return not self.outcomes


async def test_a_failure_streak_is_one_warning_then_debug_then_one_recovery_line(caplog):
    body = Script(*[ConnectionError("refused")] * 5, None)
    loop = Supervised("rec", body, backoff=tiny(), logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        loop.start()
        await until(lambda: body.done and loop.state is LoopState.RUNNING)
        await loop.stop()
    [warning] = records(caplog, logging.WARNING)
    assert "rec: ConnectionError: refused" in warning
    assert len(records(caplog, logging.DEBUG)) == 4
    assert records(caplog, logging.INFO) == ["rec: recovered after 5 failures"]
    assert loop.failures == 0 and loop.total_failures == 5


async def test_a_new_kind_of_failure_is_warned_again_and_a_new_streak_too(caplog):
    body = Script(ConnectionError("a"), ConnectionError("a"), TimeoutError("b"), None, ConnectionError("c"), None)
    loop = Supervised("rec", body, backoff=tiny(), logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        await asyncio.wait_for(_run_until(loop, body), WAIT)
    warnings = records(caplog, logging.WARNING)
    assert [w.split(":")[1].strip() for w in warnings] == ["ConnectionError", "TimeoutError", "ConnectionError"]
    assert records(caplog, logging.INFO) == ["rec: recovered after 3 failures", "rec: recovered after 1 failures"]


async def _run_until(loop: Supervised, body: Script) -> None:
    loop.start()
    await until(lambda: body.done and loop.state is LoopState.RUNNING)
    await loop.stop()


async def test_only_unexpected_errors_get_a_traceback(caplog):
    body = Script(OSError("outage"), None, ValueError("bug"), None)
    loop = Supervised("rec", body, backoff=tiny(), logger=logging.getLogger(LOGGER), expected=(OSError,))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await asyncio.wait_for(_run_until(loop, body), WAIT)
    tracebacks = {r.getMessage().split(":")[1].strip(): r.exc_info is not None for r in caplog.records if r.name == LOGGER}
    assert tracebacks == {"OSError": False, "ValueError": True}


async def test_a_body_that_always_raises_never_stops_the_loop_and_backs_off():
    delays: list[float] = []

    class Recorded(Backoff):
        def next(self) -> float:
            delays.append(super().next())
            return delays[-1]

    async def broken() -> None:
        raise RuntimeError("always")

    loop = Supervised("broken", broken, backoff=Recorded(first=0.0001, cap=0.0008, rng=lambda: 0.0))
    loop.start()
    await until(lambda: loop.total_failures >= 50)
    assert loop.state is LoopState.FAILING and loop.failures >= 50
    assert loop._task is not None and not loop._task.done()
    await loop.stop()
    assert delays[:5] == pytest.approx([0.0001, 0.0002, 0.0004, 0.0008, 0.0008])
    assert max(delays) == pytest.approx(0.0008)


async def test_ok_from_a_long_running_body_ends_the_streak_and_restarts_the_backoff(caplog):
    connected = asyncio.Event()
    drops = 0

    async def listen() -> None:  # as the hub's listener: runs until its connection drops
        nonlocal drops
        if drops < 3:
            drops += 1
            raise ConnectionError("dropped")
        loop.ok()  # (re)connected
        connected.set()
        await asyncio.Event().wait()

    loop = Supervised("listener", listen, backoff=tiny(), logger=logging.getLogger(LOGGER))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loop.start()
        await asyncio.wait_for(connected.wait(), WAIT)
        assert loop.backoff.attempt == 0 and loop.failures == 0 and loop.state is LoopState.RUNNING
        await loop.stop()
    assert records(caplog, logging.INFO) == ["listener: recovered after 3 failures"]


async def test_stop_cancels_awaits_and_runs_on_stop_once():
    stopped: list[str] = []
    started = asyncio.Event()

    async def body() -> None:
        started.set()
        await asyncio.sleep(3600)

    async def on_stop() -> None:
        stopped.append("closed")

    loop = Supervised("sleeper", body, on_stop=on_stop)
    assert loop.state is LoopState.IDLE
    await loop.stop()  # never started: nothing to do
    loop.start()
    with pytest.raises(RuntimeError, match="already running"):
        loop.start()
    await asyncio.wait_for(started.wait(), WAIT)
    task = loop._task
    await loop.stop()
    assert task is not None and task.done() and task.cancelled()
    assert loop.state is LoopState.STOPPED and stopped == ["closed"]
    await loop.stop()  # twice is harmless
    assert stopped == ["closed"]


async def test_run_in_the_callers_task_ends_only_by_cancellation():
    body = Script(ValueError("x"), None)
    loop = Supervised("inline", body, backoff=tiny())
    task = asyncio.create_task(loop.run())
    await until(lambda: body.done and loop.state is LoopState.RUNNING)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert loop.state is LoopState.STOPPED


async def test_pause_between_successful_runs():
    calls = 0

    async def body() -> None:
        nonlocal calls
        calls += 1

    loop = Supervised("ticker", body, pause=3600)
    loop.start()
    await until(lambda: calls == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert calls == 1  # waiting out its pause, not spinning
    await loop.stop()


# -- within: a bound on one await ------------------------------------------------------------------


async def test_within_gives_the_result_or_a_timeout_after_the_awaitable_cleaned_up():
    assert await within(1, asyncio.sleep(0, result="done")) == "done"
    cleaned: list[str] = []

    async def slow_with_clean_up() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # an await in the clean-up (a connection closed) runs to its end
            cleaned.append("closed")

    with pytest.raises(TimeoutError, match="no answer within 0.05 s"):
        await within(0.05, slow_with_clean_up())
    assert cleaned == ["closed"]


@pytest.mark.parametrize("turns", range(6))
async def test_within_never_loses_its_callers_cancellation(turns):
    """Cancelled just as the awaited wait ends (asyncio.wait_for on 3.11 returned the result then, and
    its caller went on): each ``turns`` cancels one loop turn later, so one lands in that window."""
    woken = asyncio.Event()

    async def caller() -> None:
        await within(60, woken.wait())
        await asyncio.sleep(60)  # where a caller whose cancellation was lost would still be

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    woken.set()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    try:
        assert task.cancelled(), "the caller went on after it was cancelled"
    finally:
        task.cancel()


async def test_within_cancelled_cancels_what_it_awaits():
    started = asyncio.Event()
    inner: list[asyncio.Task] = []

    async def waits() -> None:
        inner.append(asyncio.current_task())  # type: ignore[arg-type]
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(within(60, waits()))
    await started.wait()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled() and inner[0].cancelled()  # the awaitable had ended when within did
