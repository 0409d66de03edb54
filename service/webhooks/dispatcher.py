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
import json
import logging
import random
import time
import traceback
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from opentelemetry.trace import SpanKind
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from runbell.bus.schema import TraceContext
from runbell.service.core import clock, tracing
from runbell.service.core.loops import Supervised, within
from runbell.service.core.metrics import Metrics
from runbell.service.core.redaction import url_label
from runbell.service.store.dead_letters import is_outage
from runbell.service.webhooks import signing
from runbell.service.webhooks.breaker import Breakers, healthy
from runbell.service.webhooks.outbox import (
    Endpoint,
    Finish,
    Finished,
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
PREFETCH = 8  # an endpoint known to answer: claim up to this many times its slots (queued here)
LEASE_MARGIN_SECONDS = 1.0  # a queued message starts only while its lease outlasts the attempt by this
MAX_HOST_CLIENTS = 256  # idle receiver hosts' connection pools kept (least recently used closed first)


@dataclass
class Queued:
    """A claimed message waiting here for a slot of its endpoint."""

    message: Message
    endpoint: Endpoint
    token: str
    claimed_at: float  # time.monotonic() when the lease was taken


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
    ``read_timeout``). ``lease_seconds`` must outlast an attempt. An endpoint known to answer gets
    up to ``prefetch`` times its slots claimed at once, queued here, each started as a slot frees only
    while its lease still outlasts the attempt (else it is handed back): claims, like the recording of
    attempts (one transaction for all that end together), are batches, not one per delivery. An
    endpoint not known to answer, or failing, gets only what can start at once. Each receiver host has
    its own connection pool (kept alive between attempts; the idle ones bounded by MAX_HOST_CLIENTS).
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
        prefetch: int = PREFETCH,
    ):
        if not schedule or any(delay < 0 for delay in schedule):
            raise ValueError("the schedule needs at least one attempt and no negative delay")
        if not 0 <= jitter < 1:
            raise ValueError("jitter is a fraction in [0, 1)")
        if lease_seconds <= attempt_timeout:
            raise ValueError("lease_seconds must outlast attempt_timeout, or a slow attempt could be delivered twice")
        if max_in_flight < 1 or per_endpoint < 1 or prefetch < 1:
            raise ValueError("max_in_flight, per_endpoint and prefetch must be at least 1")
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
        self.prefetch = prefetch
        self._transport = transport
        self._clients: OrderedDict[str, httpx.AsyncClient] = OrderedDict()  # receiver origin -> its pool, least recent first
        self._host_in_flight: Counter[str] = Counter()  # receiver origin -> requests under way
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], tuple[Message, str]] = {}
        self._in_flight: Counter[str] = Counter()  # endpoint id -> attempts posting (slots held)
        self._posting: set[str] = set()  # message ids whose attempt holds a slot
        self._queued: dict[str, deque[Queued]] = {}  # endpoint id -> claimed messages waiting for a slot
        self._give_back: list[tuple[str, str]] = []  # (message id, token) to hand back at the next step
        self._finishing: list[tuple[Finish, asyncio.Future[Finished]]] = []  # attempts to record, batched
        self._finisher: asyncio.Task[None] | None = None
        self._backlog = False  # the last claim may have left due messages behind
        self._closing = False  # aclose under way: a freed slot starts nothing more
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
        # within, not asyncio.wait_for: on Python 3.11 that loses a stop arriving as the wake-up ends
        # the wait, and the loop slept a whole poll instead of stopping.
        with contextlib.suppress(TimeoutError):
            await within(self.poll_seconds, self._wake.wait())

    async def step(self) -> int:
        """Claim the due messages this process has room for, start the attempts that have a slot and
        queue the rest. Returns how many were claimed (their attempts run on; ``idle()`` waits for them)."""
        await self._hand_back()
        room = self.max_in_flight * self.prefetch - len(self._tasks) - self._queued_count()
        if self._free_slots() <= 0 or room <= 0:
            self._backlog = True
            return 0
        # Each endpoint's room (its breaker's limit, times prefetch for one known to answer, less its
        # attempts and queue): an endpoint with none is left out, so its backlog is not leased; one not
        # known yet gets the default, 1.
        held = Counter(self._in_flight)
        for endpoint_id, queue in self._queued.items():
            held[endpoint_id] += len(queue)
        full, caps = self.breakers.claim_caps(held, prefetch=self.prefetch)
        token = f"{self.worker}/{uuid.uuid4().hex[:12]}"
        messages = await self.webhooks.claim(token, limit=room, per_endpoint=1, caps=caps, exclude=full, lease_seconds=self.lease_seconds)
        claimed_at = time.monotonic()
        # Anything claimed, or an endpoint left out as busy, may mean more is due: look again as
        # soon as an attempt ends rather than at the next poll.
        self._backlog = bool(self._tasks) or bool(self._queued) or bool(messages)
        if not messages:
            return 0
        try:
            endpoints = await self.webhooks.endpoints_by_id(m.endpoint_id for m in messages)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.webhooks.release([m.id for m in messages], token)
            raise
        for message in messages:
            endpoint = endpoints.get(message.endpoint_id)
            if endpoint is None or not endpoint.enabled:
                await self.webhooks.cancel(message.id, token)  # deleted or disabled since it was claimed
            else:
                self._queued.setdefault(endpoint.id, deque()).append(Queued(message, endpoint, token, claimed_at))
        for endpoint_id in {m.endpoint_id for m in messages}:
            self._pump(endpoint_id)
        await self._hand_back()
        return len(messages)

    async def idle(self) -> None:
        """Wait until no attempt of this process is in flight or queued."""
        while self._tasks or self._queued:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            else:  # queued behind a breaker: handed back
                for endpoint_id in list(self._queued):
                    self._pump(endpoint_id)
                await self._hand_back()
        await self._hand_back()

    async def aclose(self) -> None:
        """Stop the attempts in flight, give their messages and the queued ones back (due at once, for
        this process after a restart or for another replica) and close the HTTP clients."""
        self._closing = True  # a cancelled attempt frees its slot: its endpoint's queue must not start
        tasks = dict(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._finisher is not None:  # attempts that ended: recorded, or their leases run out
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._finisher, 5)
        back = [(message.id, token) for message, token in tasks.values()]
        for queue in self._queued.values():
            back.extend((queued.message.id, queued.token) for queued in queue)
        self._queued.clear()
        self._give_back.extend(back)
        try:
            await asyncio.wait_for(self._hand_back(), 5)
        except Exception as exc:  # the leases run out by themselves
            log.info("webhooks: could not hand back %d messages on shutdown (%s)", len(back), type(exc).__name__)
        clients, self._clients = list(self._clients.values()), OrderedDict()
        for client in clients:
            await client.aclose()
        self._closing = False  # nothing held any more: a loop started again claims afresh

    def _free_slots(self) -> int:
        return self.max_in_flight - len(self._tasks)

    def _queued_count(self) -> int:
        return sum(len(queue) for queue in self._queued.values())

    def _pump(self, endpoint_id: str) -> None:
        """Start the endpoint's queued messages while it has free slots; hand back those whose lease
        would not outlast an attempt now, and all of them while its breaker is open or the dispatcher
        closes."""
        queue = self._queued.get(endpoint_id)
        if not queue:
            self._queued.pop(endpoint_id, None)
            return
        limit = self.breakers.limit(endpoint_id)
        if limit <= 0 or self._closing:  # an open breaker; or aclose, which then hands them back
            self._give_back.extend((queued.message.id, queued.token) for queued in queue)
            queue.clear()
        latest_start = self.lease_seconds - self.attempt_timeout - LEASE_MARGIN_SECONDS
        while queue and self._in_flight[endpoint_id] < limit and self._free_slots() > 0:
            queued = queue.popleft()
            if time.monotonic() - queued.claimed_at > latest_start:
                self._give_back.append((queued.message.id, queued.token))  # another claim starts it in time
            else:
                self._start(queued.message, queued.endpoint, queued.token)
        if not queue:
            del self._queued[endpoint_id]
        if self._give_back:
            self._backlog = True
            self.wake()

    async def _hand_back(self) -> None:
        """Release the messages set aside to hand back (due again at once)."""
        if not self._give_back:
            return
        back, self._give_back = self._give_back, []
        by_token: dict[str, list[str]] = {}
        for message_id, token in back:
            by_token.setdefault(token, []).append(message_id)
        try:
            for token, ids in by_token.items():
                await self.webhooks.release(ids, token)
        except BaseException:
            self._give_back.extend(back)  # tried again at the next step (or their leases run out)
            raise

    def _start(self, message: Message, endpoint: Endpoint, token: str) -> None:
        self._in_flight[endpoint.id] += 1
        self._posting.add(message.id)
        self.metrics.webhook_in_flight.inc()
        task = asyncio.create_task(self._attempt(message, endpoint, token), name=f"runbell-webhook-{message.id}")
        self._tasks[task] = (message, token)
        task.add_done_callback(lambda done: self._done(done, message.id, endpoint.id))

    def _slot_free(self, message_id: str, endpoint_id: str) -> None:
        """The attempt's request is over (its recording may still be under way): the endpoint's next
        queued message may start."""
        if message_id not in self._posting:
            return
        self._posting.discard(message_id)
        self._in_flight[endpoint_id] -= 1
        if self._in_flight[endpoint_id] <= 0:
            del self._in_flight[endpoint_id]
        self._pump(endpoint_id)

    def _done(self, task: asyncio.Task[None], message_id: str, endpoint_id: str) -> None:
        self._tasks.pop(task, None)
        self._slot_free(message_id, endpoint_id)  # when the attempt ended before its request did
        self.metrics.webhook_in_flight.dec()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: attempt crashed", exc_info=task.exception())
        for other in list(self._queued):  # a slot of the process freed: any endpoint may start one
            if self._free_slots() <= 0:
                break
            self._pump(other)
        if self._backlog:
            self.wake()

    # -- recording attempts, in batches -------------------------------------------------------------

    async def _record(self, item: Finish) -> Finished:
        """Record one attempt with every other one that ends meanwhile: one transaction for the lot
        (finish_many), while the previous lot is being written."""
        future: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()
        self._finishing.append((item, future))
        if self._finisher is None or self._finisher.done():
            self._finisher = asyncio.create_task(self._flush_finishes(), name="runbell-webhook-finish")
        return await future

    async def _flush_finishes(self) -> None:
        batch: list[tuple[Finish, asyncio.Future[Finished]]] = []
        try:
            await self._flush_batches(batch)
        except BaseException as exc:  # cancelled (shutdown): no attempt waits for ever on its recording
            for _, future in [*batch, *self._finishing]:
                _settle(future, exc=RuntimeError(f"the recording of attempts stopped ({type(exc).__name__})"))
            self._finishing = []
            raise

    async def _flush_batches(self, batch: list[tuple[Finish, asyncio.Future[Finished]]]) -> None:
        """Record the attempts waiting, one lot at a time; ``batch`` holds the lot under way."""
        while self._finishing:
            batch[:], self._finishing = self._finishing, []
            try:
                results = await self.webhooks.finish_many([item for item, _ in batch], disable_after=self.disable_after)
            except Exception as exc:
                if len(batch) == 1 or is_outage(exc):
                    for _, future in batch:
                        _settle(future, exc=exc)
                    continue
                # One attempt's row may be what the database refuses: each alone, so the rest record.
                for item, future in batch:
                    try:
                        [one] = await self.webhooks.finish_many([item], disable_after=self.disable_after)
                    except Exception as alone:
                        _settle(future, exc=alone)
                    else:
                        _settle(future, result=one)
                continue
            for (_, future), result in zip(batch, results):
                _settle(future, result=result)

    # -- one attempt --------------------------------------------------------------------------------

    def client(self, url: str = "") -> httpx.AsyncClient:
        """The connection pool of the URL's origin (scheme, host, port), made on first use: one slow or
        hanging host never takes the connections another needs (trim_clients bounds the idle ones)."""
        origin = self._origin(url)
        client = self._clients.get(origin)
        if client is not None:
            self._clients.move_to_end(origin)
            return client
        if self._transport is not None:
            transport = self._transport
        else:
            # Keep-alive for the host's endpoints' slots; more connections than that are closed after use.
            limits = httpx.Limits(
                max_connections=self.max_in_flight, max_keepalive_connections=min(self.max_in_flight, 4 * self.per_endpoint)
            )
            transport = guarded_transport(self.policy, limits=limits)
        client = self._clients[origin] = httpx.AsyncClient(
            transport=transport, follow_redirects=False, timeout=self.timeouts, trust_env=False
        )
        return client

    def _origin(self, url: str) -> str:
        if self._transport is not None or not url:
            return ""  # one client: the given transport's
        parsed = httpx.URL(url)
        return f"{parsed.scheme}://{parsed.host}:{parsed.port}"

    async def _trim_clients(self) -> None:
        """Close the least recently used pools of hosts with no request under way, past MAX_HOST_CLIENTS."""
        excess = len(self._clients) - MAX_HOST_CLIENTS
        if excess > 0:
            # Taken out before any is closed: another attempt trimming meanwhile, or taking one up,
            # sees them gone (closed once, and never while in use).
            idle = [self._clients.pop(o) for o in [o for o in self._clients if not self._host_in_flight[o]][:excess]]
            for client in idle:
                await client.aclose()

    async def _attempt(self, message: Message, endpoint: Endpoint, token: str) -> None:
        attempted_at = clock.now()
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        body: str | None = None
        retry_after: str | None = None
        result = "error"
        try:
            try:
                status_code, body, retry_after = await within(self.attempt_timeout, self._post(message, endpoint))
            finally:
                self._slot_free(message.id, endpoint.id)
        except TargetRefused as refused:
            error, result = f"target refused: {refused.reason}", "refused"
        except TimeoutError:  # the attempt's deadline (within's): hanging, or trickling its answer
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
                finished = await self._record(Finish(message, token, attempt, verdict))
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
        attributes = {"runbell.webhook.endpoint": endpoint.id, "runbell.webhook.message": message.id, "runbell.run_id": message.run_id}
        with tracing.span("runbell.webhook.delivery", traced_by(message), kind=SpanKind.CLIENT, attributes=attributes) as span:
            status, answer, retry_after = await self._post_now(message, endpoint)
            span.set_attribute("http.response.status_code", status)
            return status, answer, retry_after

    async def _post_now(self, message: Message, endpoint: Endpoint) -> tuple[int, str, str | None]:
        await check_url(self.policy, endpoint.url)
        body = message.payload.encode()
        timestamp = int(time.time())
        headers = {
            **(endpoint.headers or {}),  # a callback's own (none of the names below: rules.RESERVED_HEADERS)
            "webhook-id": message.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signing.signature_header(endpoint.signing_secrets(clock.now()), message.id, timestamp, body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "accept-encoding": "identity",  # the capped answer is kept as sent, never inflated
        }
        context = tracing.current()  # the delivery's span: the receiver's own spans can join the trace
        if context is not None:
            headers["traceparent"] = context.traceparent
        origin, client = self._origin(endpoint.url), self.client(endpoint.url)
        self._host_in_flight[origin] += 1
        try:
            await self._trim_clients()
            async with client.stream("POST", endpoint.url, content=body, headers=headers) as response:
                kept = bytearray()
                async for chunk in response.aiter_raw():
                    kept.extend(chunk[: RESPONSE_CAP - len(kept)])
                    if len(kept) >= RESPONSE_CAP:
                        break  # the rest is never read: the connection is closed, not reused
                # PostgreSQL's text holds no NUL: escaped, or the attempt could never be recorded.
                answer = kept.decode("utf-8", "replace").replace("\x00", "\\x00")
                return response.status_code, answer, response.headers.get("retry-after")
        finally:
            self._host_in_flight[origin] -= 1
            if self._host_in_flight[origin] <= 0:
                del self._host_in_flight[origin]

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


def _settle(future: asyncio.Future[Finished], *, result: Finished | None = None, exc: BaseException | None = None) -> None:
    """Hand a recording's outcome to its attempt (gone when the attempt was cancelled meanwhile)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # result is given when exc is not


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


def traced_by(message: Message) -> TraceContext | None:
    """The trace context of the event a message carries (its data's trace: events of a traced run)."""
    if '"trace":' not in message.payload:  # most carry none: not parsed for nothing
        return None
    try:
        trace = json.loads(message.payload)["data"].get("trace")
        return TraceContext.model_validate(trace) if trace is not None else None
    except (ValueError, KeyError, AttributeError, ValidationError):
        return None
