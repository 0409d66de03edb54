"""Readiness: whether a load balancer should send this replica requests (GET /readyz).

Ready the first time, when this replica is useful: Redis and the store answer, every partition's
shard channel is subscribed (the hub), and the recorder is caught up: it has made a full pass over
the partitions (its own pending entries read, every partition asked for new ones) and the streams
hold at most ``max_backlog`` entries it has not recorded (the consumer groups' lag, which every
replica's recorder works down, plus its own read but unacknowledged entries). A fresh replica so
joins the load balancer with the store it serves from up to date. Where Redis refuses the backlog
(NOPERM: an ACL from before readiness), the first pass is enough, and the check says so.

Once ready, a replica stays ready through blips of what all replicas share: a check (Redis, the
store, the subscriptions) makes it not ready only when it has not passed for longer than ``grace``
seconds, so that Redis or the database failing a ping for a second does not take every replica out
of the load balancer at once. The recorder's backlog no longer counts (it is the fleet's, not this
replica's: a burst would flip every replica together); it is still reported. Draining (SIGTERM) is
not ready at once.

The pings run in a loop of their own, every CHECK_EVERY_SECONDS (more often until first ready), each
bounded by CHECK_TIMEOUT_SECONDS: GET /readyz answers from their last results at once, even while
Redis hangs (a load balancer's check times out sooner than a ping would).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from redis.exceptions import NoPermissionError

from runbell.service.core.loops import Supervised, within
from runbell.service.live.hub import Hub
from runbell.service.store.recorder import Recorder

log = logging.getLogger("runbell.readiness")

CHECK_EVERY_SECONDS = 0.5
STARTING_CHECK_EVERY_SECONDS = 0.1  # until first ready: a replica joins soon after it has caught up
CHECK_TIMEOUT_SECONDS = 1.0  # a ping of loopback Redis or PostgreSQL takes a millisecond
# Once ready, the backlog is only reported: asked this often, not every round (two commands a partition).
BACKLOG_REPORT_SECONDS = 10.0
ACL_HINT = "its ACL user needs +xinfo|groups +xpending +xlen (deploy/redis/users.acl)"


class Check(str, Enum):
    REDIS = "redis"
    DATABASE = "database"
    PUBSUB = "pubsub"
    RECORDER = "recorder"
    SHUTDOWN = "shutdown"


@dataclass
class Probe:
    """One check's last result."""

    ok_at: float | None = None  # monotonic time it last passed (None: never)
    failure: str | None = "not checked yet"  # why its last try failed (None: it passed)


@dataclass(frozen=True)
class Report:
    ready: bool
    checks: dict[str, str]  # check -> "ok", or what is wrong


class Readiness:
    def __init__(
        self,
        hub: Hub,
        ping_redis: Callable[[], Awaitable[object]],
        ping_store: Callable[[], Awaitable[object]],
        recorder: Recorder | None,
        *,
        grace: float,
        max_backlog: int,
        max_catch_up: float = float("inf"),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.hub, self.recorder = hub, recorder
        self.ping_redis, self.ping_store = ping_redis, ping_store
        self.grace, self.max_backlog, self.max_catch_up, self.clock = grace, max_backlog, max_catch_up, clock
        self.probes = {Check.REDIS: Probe(), Check.DATABASE: Probe()}
        self.recorder_state = "not checked yet"
        self.caught_up = recorder is None  # no recorder here: the store is fed by other processes
        self.started_at = clock()
        self.ready_once = False
        self._backlog_at = float("-inf")  # when the backlog was last asked
        self.loop = Supervised("runbell-readiness", self.check, pause=STARTING_CHECK_EVERY_SECONDS, logger=log)

    async def check(self) -> None:
        """One round: both pings and the recorder's backlog, side by side, each bounded."""
        await asyncio.gather(
            self._ping(Check.REDIS, self.ping_redis),
            self._ping(Check.DATABASE, self.ping_store),
            self._check_recorder(),
        )
        self.report()  # logs the first time this replica is ready

    async def _ping(self, check: Check, ping: Callable[[], Awaitable[object]]) -> None:
        probe = self.probes[check]
        try:
            await within(CHECK_TIMEOUT_SECONDS, ping())
        except Exception as exc:  # reported, never raised: readiness must answer
            probe.failure = type(exc).__name__
        else:
            probe.ok_at, probe.failure = self.clock(), None

    async def _check_recorder(self) -> None:
        recorder = self.recorder
        if recorder is None:
            self.recorder_state = "ok"
            return
        if not recorder.passes:  # at start, or on a new partition count (then only said: see the module's doc)
            pass_state = f"first pass over the {recorder.partitions} partitions not done"
            self.recorder_state = f"ok: {pass_state}" if self.caught_up else f"catching up: {pass_state}"
            return
        if self.caught_up and self.clock() - self._backlog_at < BACKLOG_REPORT_SECONDS:
            return
        self._backlog_at = self.clock()
        try:
            backlog = await within(CHECK_TIMEOUT_SECONDS, recorder.backlog())
        except NoPermissionError:
            # An ACL from before readiness asked the backlog: it will never be known, and holding the
            # replica out for ever would stall a rolling upgrade. Its first pass done, it is ready.
            if not self.caught_up:
                log.warning(
                    "the gateway's Redis user may not ask the recorder's backlog (NOPERM): ready after the first pass; %s", ACL_HINT
                )
            self.caught_up = True
            self.recorder_state = f"ok: backlog unknown (NOPERM: {ACL_HINT})"
            return
        except Exception as exc:  # the pings say what is down; the last figure stays meanwhile
            if not self.caught_up:
                self.recorder_state = f"catching up: backlog unknown ({type(exc).__name__})"
            return
        if backlog.behind <= self.max_backlog:
            self.caught_up = True
            self.recorder_state = "ok" if not backlog.behind else f"ok: {backlog.behind} entries behind"
        elif self.caught_up:  # the fleet's backlog after this replica was ready: said, never held against it
            self.recorder_state = f"ok: {backlog.behind} entries behind (over {self.max_backlog}, the start's bound)"
        elif self.clock() - self.started_at >= self.max_catch_up:
            log.warning(
                "the streams' backlog (%d) stayed over %d for %.0f s: ready anyway, to take a share of the load",
                backlog.behind,
                self.max_backlog,
                self.max_catch_up,
            )
            self.caught_up = True
            self.recorder_state = f"ok: {backlog.behind} entries behind after the longest catch-up ({self.max_catch_up:g} s)"
        else:
            self.recorder_state = f"catching up: {backlog.behind} entries behind"

    def report(self) -> Report:
        """Ready or not, and each check's state, as of now."""
        now = self.clock()
        checks: dict[str, str] = {}
        failing: list[bool] = []
        for check, probe in self.probes.items():
            checks[check.value] = self._state(probe.ok_at, probe.failure, now)
            failing.append(self._fails(probe.ok_at, probe.failure, now))
        hub = self.hub
        subscribed = hub.connected.is_set()
        if subscribed:
            checks[Check.PUBSUB.value] = "ok"
        elif hub.lost_at is None:
            checks[Check.PUBSUB.value] = "not subscribed"
        else:
            checks[Check.PUBSUB.value] = f"not subscribed (lost {now - hub.lost_at:.1f} s ago)"
        failing.append(self._fails(now if subscribed else hub.lost_at, None if subscribed else "lost", now))
        checks[Check.RECORDER.value] = self.recorder_state
        failing.append(not self.caught_up)
        ready = not any(failing)
        if hub.draining:
            checks[Check.SHUTDOWN.value] = "draining"
            ready = False
        if ready and not self.ready_once:
            self.ready_once = True
            self.loop.pause = CHECK_EVERY_SECONDS
            log.info("ready after %.1f s: %s", now - self.started_at, ", ".join(f"{k} {v}" for k, v in checks.items()))
        return Report(ready, checks)

    def _fails(self, ok_at: float | None, failure: str | None, now: float) -> bool:
        """Before the first ready: any failure. After it: not passed for longer than the grace."""
        if not self.ready_once:
            return failure is not None or ok_at is None
        return ok_at is None or now - ok_at > self.grace

    @staticmethod
    def _state(ok_at: float | None, failure: str | None, now: float) -> str:
        if failure is None:
            return "ok"
        if ok_at is None:
            return failure
        return f"{failure} (last ok {now - ok_at:.1f} s ago)"
