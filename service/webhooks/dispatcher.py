"""The webhook dispatcher: one per gateway process, posting the outbox's messages to their receivers.

It claims due messages with a lease (runbell.service.webhooks.outbox.WebhookStore.claim), so replicas sharing
one database never deliver the same attempt, and a message whose worker died mid-delivery is due
again when the lease runs out (delivery survives a restart). Each attempt follows the Standard
Webhooks specification: headers webhook-id (the message id: stable across retries), webhook-timestamp
(this attempt's unix seconds) and webhook-signature (one v1 signature per current signing secret), the
payload bytes as enqueued, through the target guard's transport, redirects not followed, a connect
timeout, a read timeout (between bytes) and one deadline over the whole attempt (a receiver that
trickles its answer is cut too), at most 4 KiB of the answer read (streamed: the rest is never read).

One bad receiver never slows the others: each endpoint has its own share of the process's slots and
a circuit breaker (runbell.service.webhooks.breaker), and a claim takes no more of an endpoint's
messages than it has room for, so a hanging endpoint's backlog is never leased while others wait.

Verdicts: 2xx delivered; 410 disables the endpoint and cancels its pending messages; 429, 502, 503
and 504 retry after their Retry-After (seconds or an HTTP date, bounded) when they give one; any
other answer, a timeout, a network error or a refused target retries on the schedule (±jitter).
After the schedule's last attempt the message is dead-lettered: one warning, a metric, and an
operational event — a log record on the logger ``runbell.webhooks.events`` whose ``runbell_event``
attribute is ``webhook.dead_lettered`` and whose ``webhook`` attribute holds the fields (endpoint,
message, run, attempts, last error). An endpoint failing continuously for ``disable_after`` seconds
is disabled (event ``webhook.endpoint_disabled``). Secrets are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from runbell.service.core import clock
from runbell.service.core.loops import Supervised
from runbell.service.core.metrics import Metrics
from runbell.service.core.redaction import url_label
from runbell.service.webhooks import signing
from runbell.service.webhooks.breaker import Breakers, healthy
from runbell.service.webhooks.outbox import (
    Endpoint,
    Message,
    MessageStatus,
    Verdict,
    WebhookStore,
)
from runbell.service.webhooks.target_guard import (
    TargetPolicy,
    TargetRefused,
    check_url,
    guarded_transport,
)

log = logging.getLogger("runbell.webhooks")
events_log = logging.getLogger("runbell.webhooks.events")


def webhook_schedule_seconds(raw: str) -> list[float]:
    """'0,5,300' -> [0.0, 5.0, 300.0]; ValueError naming what is accepted."""
    try:
        schedule = [float(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        schedule = []
    if not schedule or any(delay < 0 for delay in schedule):
        raise ValueError("RUNBELL_WEBHOOK_SCHEDULE must be comma-separated non-negative seconds, e.g. 0,5,300")
    return schedule


DEFAULT_WEBHOOK_SCHEDULE = "0,5,300,1800,7200,18000,36000,36000"  # immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
DEFAULT_SCHEDULE = tuple(webhook_schedule_seconds(DEFAULT_WEBHOOK_SCHEDULE))
RESPONSE_CAP = 4096  # bytes of a receiver's answer kept (and read at all)
RETRY_AFTER_STATUSES = (429, 502, 503, 504)
USER_AGENT = "runbell"
FINISH_TRIES = 3


class Dispatcher:
    """Delivers due webhook messages until cancelled.

    ``schedule``: its length is the number of attempts of a message; schedule[i] (i >= 1) is the
    delay in seconds before attempt i + 1 after attempt i failed. The first attempt is made as soon
    as the message is enqueued (schedule[0] is the specification's "immediately" and is not waited).
    ``max_in_flight`` bounds concurrent attempts of this process, ``per_endpoint`` those to one
    endpoint that answers; one not yet known to answer, or failing, has one slot, and one whose
    breaker is open (``breaker_failures`` failures in a row) none (breaker.Breakers). So a hanging
    receiver holds one slot, for at most ``attempt_timeout`` (the deadline of an attempt; the
    connection must be made within ``connect_timeout`` and each read of the answer take at most
    ``read_timeout``). ``lease_seconds`` must outlast an attempt; a message is claimed only when it
    can start at once, so a lease never waits.
    """

    def __init__(
        self,
        webhooks: WebhookStore,
        *,
        policy: TargetPolicy,
        worker: str,
        metrics: Metrics | None = None,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        jitter: float = 0.2,
        attempt_timeout: float = 15.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        max_in_flight: int = 256,
        per_endpoint: int = 4,
        breaker_failures: int = 5,
        breaker_open_seconds: float = 10.0,
        breaker_max_open_seconds: float = 600.0,
        lease_seconds: float = 60.0,
        poll_seconds: float = 1.0,
        disable_after: float = 5 * 86400,
        retry_after_max: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not schedule or any(delay < 0 for delay in schedule):
            raise ValueError("the schedule needs at least one attempt and no negative delay")
        if not 0 <= jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")
        if lease_seconds <= attempt_timeout:
            raise ValueError("lease_seconds must outlast attempt_timeout, or a slow attempt could be delivered twice")
        if max_in_flight < 1 or per_endpoint < 1:
            raise ValueError("max_in_flight and per_endpoint must be at least 1")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("connect_timeout and read_timeout must be positive")
        self.webhooks = webhooks
        self.policy = policy
        self.worker = worker
        self.metrics = metrics if metrics is not None else Metrics()
        self.schedule = tuple(float(delay) for delay in schedule)
        self.jitter = jitter
        self.attempt_timeout = attempt_timeout
        self.timeouts = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout)
        self.max_in_flight = max_in_flight
        self.per_endpoint = per_endpoint
        self.breakers = Breakers(
            per_endpoint=per_endpoint,
            failures=breaker_failures,
            open_seconds=breaker_open_seconds,
            max_open_seconds=breaker_max_open_seconds,
            metrics=self.metrics,
        )
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.disable_after = disable_after
        self.retry_after_max = max(self.schedule) if retry_after_max is None else retry_after_max
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], tuple[Message, str]] = {}
        self._in_flight: Counter[str] = Counter()  # endpoint id -> attempts running
        self._backlog = False  # the last claim may have left due messages behind
        # Database outages are logged and waited out; when the loop stops, the attempts in flight stop
        # and their messages are handed back.
        self.loop = Supervised("runbell-webhooks", self._round, logger=log, expected=(SQLAlchemyError, OSError), on_stop=self.aclose)

    # -- the loop -----------------------------------------------------------------------------------

    def wake(self, *_: Any) -> None:
        """Look for due messages now rather than at the next poll (after the recorder enqueued)."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and deliver until cancelled; then stop the attempts in flight and hand their
        messages back. Database outages are logged and waited out."""
        await self.loop.run()

    async def _round(self) -> None:
        """One claim, then a wait for a wake-up or the next poll (none while due messages are left
        behind and there is room for them)."""
        self._wake.clear()
        claimed = await self.step()
        if claimed and self._backlog and self._free_slots() > 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_seconds)

    async def step(self) -> int:
        """Claim the due messages this process has room for and start their attempts. Returns how
        many were claimed (their attempts run on; ``idle()`` waits for them)."""
        free = self._free_slots()
        if free <= 0:
            self._backlog = True
            return 0
        # Each endpoint's room (its breaker's limit less its attempts in flight): an endpoint with
        # none is left out, so its backlog is not leased; one not known yet gets the default, 1.
        full, caps = self.breakers.claim_caps(self._in_flight)
        token = f"{self.worker}/{uuid.uuid4().hex[:12]}"
        messages = await self.webhooks.claim(token, limit=free, per_endpoint=1, caps=caps, exclude=full, lease_seconds=self.lease_seconds)
        # Anything claimed, or an endpoint left out as busy, may mean more is due: look again as
        # soon as an attempt ends rather than at the next poll.
        self._backlog = bool(self._in_flight) or bool(messages)
        if not messages:
            return 0
        try:
            endpoints = await self.webhooks.endpoints_by_id(m.endpoint_id for m in messages)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.webhooks.release([m.id for m in messages], token)
            raise
        give_back = []
        for message in messages:
            endpoint = endpoints.get(message.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                await self.webhooks.cancel(message.id, token)  # deleted or disabled since it was claimed
            elif self._in_flight[endpoint.id] >= self.breakers.limit(endpoint.id):
                give_back.append(message.id)
                self._backlog = True
            else:
                self._start(message, endpoint, token)
        await self.webhooks.release(give_back, token)
        return len(messages)

    async def idle(self) -> None:
        """Wait until no attempt of this process is in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        """Stop the attempts in flight, give their messages back (due at once, for this process after
        a restart or for another replica) and close the HTTP client."""
        tasks = dict(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        by_token: dict[str, list[str]] = {}
        for message, token in tasks.values():
            by_token.setdefault(token, []).append(message.id)
        for token, ids in by_token.items():
            try:
                await asyncio.wait_for(self.webhooks.release(ids, token), 5)
            except Exception as exc:  # the lease runs out by itself
                log.info("webhooks: could not hand back %d messages on shutdown (%s)", len(ids), type(exc).__name__)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _free_slots(self) -> int:
        return self.max_in_flight - len(self._tasks)

    def _start(self, message: Message, endpoint: Endpoint, token: str) -> None:
        self._in_flight[endpoint.id] += 1
        self.metrics.webhook_in_flight.inc()
        task = asyncio.create_task(self._attempt(message, endpoint, token), name=f"runbell-webhook-{message.id}")
        self._tasks[task] = (message, token)
        task.add_done_callback(lambda done: self._done(done, endpoint.id))

    def _done(self, task: asyncio.Task[None], endpoint_id: str) -> None:
        self._tasks.pop(task, None)
        self._in_flight[endpoint_id] -= 1
        if self._in_flight[endpoint_id] <= 0:
            del self._in_flight[endpoint_id]
        self.metrics.webhook_in_flight.dec()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: attempt crashed", exc_info=task.exception())
        if self._backlog:
            self.wake()

    # -- one attempt --------------------------------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            transport = self._transport if self._transport is not None else guarded_transport(self.policy)
            self._client = httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=self.timeouts, trust_env=False)
        return self._client

    async def _attempt(self, message: Message, endpoint: Endpoint, token: str) -> None:
        attempted_at = clock.now()
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        body: str | None = None
        retry_after: str | None = None
        result = "error"
        try:
            status_code, body, retry_after = await asyncio.wait_for(self._post(message, endpoint), self.attempt_timeout)
        except TargetRefused as refused:
            error, result = f"target refused: {refused.reason}", "refused"
        except asyncio.TimeoutError:  # the attempt's deadline: hanging, or trickling its answer
            error, result = f"no answer within {self.attempt_timeout:g} s", "timeout"
        except httpx.TimeoutException as exc:
            error, result = timeout_error(exc, self.timeouts), "timeout"
        except httpx.HTTPError as exc:
            if isinstance(exc.__cause__, TargetRefused):  # refused at connect time (the guard's transport)
                error, result = str(exc.__cause__), "refused"
            else:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a bug, or something httpx did not wrap: still a failed attempt
            error = f"{type(exc).__name__}: {exc}"
            # The traceback is logged as text, with the URL taken out: an exception may quote it.
            trace = "".join(traceback.format_exception(exc))
            log.warning(
                "webhooks: unexpected error posting message %s to %s\n%s", message.id, target(endpoint), without_url(trace, endpoint)
            )
        if error is not None:
            error = without_url(error, endpoint)
        duration = time.monotonic() - started
        if status_code is not None:
            result = "success" if 200 <= status_code < 300 else ("gone" if status_code == 410 else "failure")
        self.breakers.record(endpoint.id, healthy(status_code, result))
        self.metrics.webhook_deliveries.labels(result).inc()
        self.metrics.webhook_attempt_latency.observe(duration)
        attempt = dict(
            attempted_at=attempted_at, duration_ms=round(duration * 1000, 3), status_code=status_code, error=error, response_body=body
        )
        verdict = self._verdict(message, status_code, retry_after)
        finished = None
        for tries in range(1, FINISH_TRIES + 1):
            try:
                finished = await self.webhooks.finish(message, token, attempt, verdict, disable_after=self.disable_after)
                break
            except Exception as exc:
                if tries == FINISH_TRIES:
                    log.warning(
                        "webhooks: could not record the attempt of message %s (%s: %s); it is retried when its lease runs out",
                        message.id,
                        type(exc).__name__,
                        exc,
                    )
                    return
                await asyncio.sleep(0.2 * tries)
        assert finished is not None
        if not finished.applied:
            log.info("webhooks: message %s was taken over or removed while it was being delivered", message.id)
            return
        if verdict.status is MessageStatus.DEAD:
            self._dead_lettered(message, endpoint, attempt)
        if finished.disabled_reason is not None:
            self._endpoint_disabled(endpoint, finished.disabled_reason, finished.cancelled)

    async def _post(self, message: Message, endpoint: Endpoint) -> tuple[int, str, str | None]:
        await check_url(self.policy, endpoint.url)
        body = message.payload.encode()
        timestamp = int(time.time())
        headers = {
            "webhook-id": message.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.signature_header(endpoint.signing_secrets(clock.now()), message.id, timestamp, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",  # the capped answer is kept as sent, never inflated
        }
        async with self.client().stream("POST", endpoint.url, content=body, headers=headers) as response:
            kept = bytearray()
            async for chunk in response.aiter_raw():
                kept.extend(chunk[: RESPONSE_CAP - len(kept)])
                if len(kept) >= RESPONSE_CAP:
                    break  # the rest is never read: the connection is closed, not reused
            return response.status_code, kept.decode("utf-8", "replace"), response.headers.get("retry-after")

    def _verdict(self, message: Message, status_code: int | None, retry_after: str | None) -> Verdict:
        if status_code is not None and 200 <= status_code < 300:
            return Verdict(MessageStatus.DELIVERED, endpoint="success")
        if status_code == 410:
            return Verdict(MessageStatus.CANCELLED, endpoint="gone", disable_reason="the receiver answered 410 Gone")
        attempts = message.attempts + 1
        if attempts >= len(self.schedule):
            return Verdict(MessageStatus.DEAD)
        delay = None
        if status_code in RETRY_AFTER_STATUSES and retry_after:
            delay = parse_retry_after(retry_after, maximum=self.retry_after_max)
        if delay is None:
            delay = self.schedule[attempts] * random.uniform(1 - self.jitter, 1 + self.jitter)
        return Verdict(MessageStatus.PENDING, next_attempt_at=clock.now() + timedelta(seconds=delay))

    # -- operational events -------------------------------------------------------------------------

    def _dead_lettered(self, message: Message, endpoint: Endpoint, attempt: dict[str, Any]) -> None:
        self.metrics.webhook_dead_letters.inc()
        last = attempt["error"] or f"HTTP {attempt['status_code']}"
        fields = dict(
            endpoint_id=endpoint.id,
            target=url_label(endpoint.url),
            message_id=message.id,
            dag_id=message.dag_id,
            run_id=message.run_id,
            seq=message.seq,
            kind=message.kind,
            attempts=message.attempts + 1,
            last_error=last,
        )
        events_log.warning(
            "webhook message %s to %s dead-lettered after %d attempts (last: %s); resend or recover it through the API",
            message.id,
            target(endpoint),
            message.attempts + 1,
            last,
            extra={"runbell_event": "webhook.dead_lettered", "webhook": fields},
        )

    def _endpoint_disabled(self, endpoint: Endpoint, reason: str, cancelled: int) -> None:
        self.metrics.webhook_endpoints_disabled.inc()
        fields = dict(endpoint_id=endpoint.id, target=url_label(endpoint.url), reason=reason, cancelled_messages=cancelled)
        events_log.warning(
            "webhook %s disabled: %s (%d pending messages cancelled)",
            target(endpoint),
            reason,
            cancelled,
            extra={"runbell_event": "webhook.endpoint_disabled", "webhook": fields},
        )


def target(endpoint: Endpoint) -> str:
    """How a log line names an endpoint: its id and its URL's label. The URL itself is never logged:
    for many receivers (Slack, Discord...) it is their key."""
    return f"endpoint {endpoint.id} ({url_label(endpoint.url)})"


def without_url(text: str, endpoint: Endpoint) -> str:
    """An error's text with the endpoint's URL (as given, or as httpx prints it) replaced by its label."""
    label = url_label(endpoint.url)
    forms = [endpoint.url]
    with contextlib.suppress(httpx.InvalidURL, TypeError, ValueError):
        forms.append(str(httpx.URL(endpoint.url)))
    for url in forms:
        text = text.replace(url, label)
    return text


def timeout_error(exc: httpx.TimeoutException, timeouts: httpx.Timeout) -> str:
    """Which of httpx's timeouts cut an attempt, for its record."""
    for kind, seconds in (
        (httpx.ConnectTimeout, timeouts.connect),
        (httpx.ReadTimeout, timeouts.read),
        (httpx.WriteTimeout, timeouts.write),
        (httpx.PoolTimeout, timeouts.pool),
    ):
        if isinstance(exc, kind):
            name = kind.__name__.removesuffix("Timeout").lower()
            return f"{name} timeout ({seconds:g} s)"
    return f"timeout: {exc}"


def parse_retry_after(value: str, *, maximum: float, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date), within [0, maximum];
    None when it is neither."""
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = clock.as_utc(parsedate_to_datetime(value))  # ValueError also when out of range
        except (TypeError, ValueError, IndexError):
            return None
        seconds = (when - (now or clock.now())).total_seconds()
    return min(max(seconds, 0.0), maximum)
