"""Per-endpoint circuit breakers: how many delivery attempts each endpoint may have in flight now.

One bad receiver must never slow the others. The dispatcher's slots (``max_in_flight``) are shared,
so each endpoint gets a share that follows how it behaves:

- an endpoint not yet known to answer has one slot (slow start), so receivers that hang take one
  slot each, not ``per_endpoint``, until they answer;
- once an attempt got an answer, it has ``per_endpoint`` slots;
- a failure (no answer in time, a network error, 408, 429 or 5xx) brings it back to one slot, and
  ``failures`` of them in a row open its breaker: no attempt at all for ``open_seconds``, doubling
  (jittered) after each failed probe up to ``max_open_seconds``; then the breaker is half-open and
  one probe goes out; an answer closes it.

While a breaker is open its messages stay pending in the outbox and are not claimed: nothing is lost,
and their attempts are not used up. The state lives in the dispatcher's process (a replica learns
an endpoint's health on its own, starting from one slot).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from runbell.service.core.loops import Backoff
from runbell.service.core.metrics import Metrics

log = logging.getLogger("runbell.webhooks")

MAX_TRACKED = 1000  # endpoints remembered; past it, healthy idle ones are forgotten (back to slow start)


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"  # no attempt until opened_until
    HALF_OPEN = "half_open"  # one probe in flight or due


@dataclass
class Breaker:
    backoff: Backoff
    state: BreakerState = BreakerState.CLOSED
    answered: bool = False  # an attempt got an answer since the last failure: full share
    failures: int = 0  # in a row
    opened_until: float = 0.0
    opened: int = field(default=0)  # times opened, for the log


def healthy(status_code: int | None, result: str) -> bool | None:
    """What an attempt says about its receiver: True (it answered), False (it did not, or said it is
    overloaded or down), None (nothing: the target guard refused to send)."""
    if result == "refused":
        return None
    if status_code is None:
        return False
    return not (status_code >= 500 or status_code in (408, 429))


class Breakers:
    def __init__(
        self,
        *,
        per_endpoint: int,
        failures: int = 5,
        open_seconds: float = 10.0,
        max_open_seconds: float = 600.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if per_endpoint < 1 or failures < 1:
            raise ValueError("per_endpoint and failures must be at least 1")
        if not 0 < open_seconds <= max_open_seconds:
            raise ValueError("the breaker needs 0 < open_seconds <= max_open_seconds")
        self.per_endpoint, self.failures = per_endpoint, failures
        self.open_seconds, self.max_open_seconds = open_seconds, max_open_seconds
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self._breakers: dict[str, Breaker] = {}
        self.metrics.webhook_breakers_open.set_function(self.open_count)

    def limit(self, endpoint_id: str) -> int:
        """Attempts the endpoint may have in flight now (0 while its breaker is open)."""
        breaker = self._breakers.get(endpoint_id)
        if breaker is None:
            return 1
        if breaker.state is BreakerState.OPEN:
            if self.clock() < breaker.opened_until:
                return 0
            breaker.state = BreakerState.HALF_OPEN
        if breaker.state is BreakerState.HALF_OPEN or not breaker.answered:
            return 1
        return self.per_endpoint

    def claim_caps(self, in_flight: Mapping[str, int], prefetch: int = 1) -> tuple[list[str], dict[str, int]]:
        """For a claim: the endpoints with no room now, and the room of those with more than one slot
        free (every other endpoint has one: the claim's default). ``in_flight``: the messages each
        endpoint holds (attempts, and claimed ones queued); an endpoint known to answer may hold
        ``prefetch`` times its limit."""
        exclude, caps = [], {}
        for endpoint_id in self._breakers.keys() | in_flight.keys():
            limit, held = self.limit(endpoint_id), in_flight.get(endpoint_id, 0)
            if prefetch > 1 and self._answering(endpoint_id):
                # Refilled once half of it is left, so that claims come in batches, not one per attempt.
                limit = limit * prefetch if held <= limit * prefetch // 2 else 0
            room = limit - held
            if room <= 0:
                exclude.append(endpoint_id)
            elif room > 1:
                caps[endpoint_id] = room
        return sorted(exclude), caps

    def _answering(self, endpoint_id: str) -> bool:
        """Closed, and known to answer: the endpoint gets its full limit."""
        breaker = self._breakers.get(endpoint_id)
        return breaker is not None and breaker.state is BreakerState.CLOSED and breaker.answered

    def record(self, endpoint_id: str, answered: bool | None) -> None:
        """An attempt ended: ``answered`` as ``healthy`` says."""
        if answered is None:
            return
        breaker = self._breakers.get(endpoint_id)
        if breaker is None:
            self._trim(MAX_TRACKED - 1)  # room for this one
            breaker = self._breakers[endpoint_id] = Breaker(Backoff(self.open_seconds, self.max_open_seconds, jitter=0.2))
        if answered:
            if breaker.state is not BreakerState.CLOSED:
                log.info("webhooks: endpoint %s answers again; its breaker is closed", endpoint_id)
            breaker.state, breaker.answered, breaker.failures = BreakerState.CLOSED, True, 0
            breaker.backoff.reset()
            return
        breaker.answered = False
        breaker.failures += 1
        if breaker.state is BreakerState.HALF_OPEN or (breaker.state is BreakerState.CLOSED and breaker.failures >= self.failures):
            self._open(endpoint_id, breaker)

    def state(self, endpoint_id: str) -> BreakerState:
        breaker = self._breakers.get(endpoint_id)
        return BreakerState.CLOSED if breaker is None else breaker.state

    def open_count(self) -> int:
        return sum(b.state is not BreakerState.CLOSED for b in self._breakers.values())

    def _open(self, endpoint_id: str, breaker: Breaker) -> None:
        seconds = breaker.backoff.next()
        first = breaker.state is BreakerState.CLOSED
        breaker.state, breaker.opened_until = BreakerState.OPEN, self.clock() + seconds
        if first:  # a failed probe re-opens it quietly: one warning per outage
            breaker.opened += 1
            self.metrics.webhook_breaker_opened.inc()
            log.warning(
                "webhooks: endpoint %s failed %d times in a row; its breaker is open (probed again after %.0f s, backing off to %.0f s); "
                "its messages wait in the outbox",
                endpoint_id,
                breaker.failures,
                seconds,
                self.max_open_seconds,
            )

    def _trim(self, keep: int) -> None:
        """Forget endpoints beyond ``keep``, healthy ones first, oldest first (one forgotten starts
        again from one slot: safe, only slower; an endpoint deleted meanwhile is never seen again)."""
        for forgettable in (lambda b: b.state is BreakerState.CLOSED and b.failures == 0, lambda b: True):
            for endpoint_id, breaker in list(self._breakers.items()):
                if len(self._breakers) <= keep:
                    return
                if forgettable(breaker):
                    del self._breakers[endpoint_id]
