"""Webhooks in the store: endpoints, the outbox of messages, and every delivery attempt.

The outbox is written in the transaction that records events (``Store(url, outbox=WebhookOutbox())``):
for every enabled endpoint whose filter matches, one message per new task, run or progress event
(when the endpoint subscribes to that kind) and one ``outcome`` message when the run's outcome is decided in
that transaction. So no event is recorded without its deliveries, and since a message is unique by
(endpoint, dag, run, epoch, seq, kind) and inserted with ON CONFLICT DO NOTHING, recording an event twice
(two replicas, a re-delivered stream entry) enqueues nothing twice.

A message's payload is fixed when it is enqueued, so every retry sends identical bytes:

    {"type": "run.outcome" | "task.state" | "run.state" | "run.needs_input" | "task.progress",
     "timestamp": "<ISO 8601 time of the event, or of the event that decided the outcome>",
     "data": {...the outcome as GET .../result answers 200, or the event as SSE data, or the open
              input request with dag_id, run_id and respond (a needs_input item)...,
              "epoch": "...", "seq": N, "terminal": true|false}}

The dispatcher (dispatcher.py) claims due messages with a lease (claim), posts them
and writes each attempt's verdict (finish); the admin API reads and replays through WebhookStore.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import (
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from runbell.bus.schema import Envelope, EventKind, Position, TaskState
from runbell.service.core import clock
from runbell.service.core.outcome import OutcomeFold, respond_path
from runbell.service.store.models import (
    ATTEMPTS,
    ENDPOINTS,
    MESSAGES,
    WebhookEndpointRow,
    WebhookMessageRow,
    dialect_insert,
)
from runbell.service.store.store import RunChange, Store
from runbell.service.webhooks.rules import DEFAULT_KINDS, Callback, EndpointCreate, EndpointUpdate, WebhookKind, header_problem

__all__ = ["DEFAULT_KINDS", "WebhookKind"]  # defined with the rules; many import them from here

CLAIM_SCAN = 1000  # due messages looked at per claim, before the per-endpoint cut


class MessageStatus(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # every attempt of the schedule failed: dead-lettered
    CANCELLED = "cancelled"  # never delivered: its endpoint was deleted or disabled while it waited


PAYLOAD_TYPES = {
    WebhookKind.OUTCOME.value: "run.outcome",
    WebhookKind.TASK.value: "task.state",
    WebhookKind.RUN.value: "run.state",
    WebhookKind.NEEDS_INPUT.value: "run.needs_input",
    WebhookKind.PROGRESS.value: "task.progress",
}
DISABLED_BY_REQUEST = "disabled through the API"


# -- what the API sees ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    id: str
    url: str
    description: str
    dag_ids: list[str] | None  # None: every DAG
    kinds: list[str]
    enabled: bool
    secret: str = field(repr=False)  # never in a repr, so never in a log line by accident
    previous_secret: str | None = field(repr=False)
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    disabled_reason: str | None
    failing_since: datetime | None
    run_id: str | None = None  # a trigger's callback: only this run's events
    headers: dict[str, str] | None = field(default=None, repr=False)  # a callback's, sent with each delivery (may hold a credential)
    expires_at: datetime | None = None  # a callback takes no new message after this

    @property
    def is_callback(self) -> bool:
        return self.run_id is not None

    def wants(self, dag_id: str, run_id: str, now: datetime) -> bool:
        """Whether this endpoint takes messages of this run now (its kinds aside)."""
        if self.dag_ids is not None and dag_id not in self.dag_ids:
            return False
        return self.run_id is None or (self.run_id == run_id and (self.expires_at is None or self.expires_at > now))

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets that sign a delivery now: the current one, then the previous one while its
        grace lasts."""
        found = [self.secret]
        if self.previous_secret and self.previous_secret_expires_at is not None and self.previous_secret_expires_at > now:
            found.append(self.previous_secret)
        return found


@dataclass(frozen=True)
class Message:
    id: str
    endpoint_id: str
    dag_id: str
    run_id: str
    seq: int
    kind: str
    terminal: bool
    payload: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class Attempt:
    id: int
    message_id: str
    endpoint_id: str
    attempted_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str | None


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(**{name: getattr(row, name) for name in Endpoint.__dataclass_fields__})


def _message(row: Any) -> Message:
    return Message(**{name: getattr(row, name) for name in Message.__dataclass_fields__})


def _attempt(row: Any) -> Attempt:
    return Attempt(**{name: getattr(row, name) for name in Attempt.__dataclass_fields__})


def checked_headers(url: str, headers: dict[str, str]) -> dict[str, str]:
    """A callback's headers by the API's rules (ValueError saying what is wrong)."""
    checked = Callback.model_validate({"url": url, "headers": headers}).headers
    problem = header_problem(checked)
    if problem is not None:
        raise ValueError(problem)
    return checked


def callback_id(dag_id: str, run_id: str) -> str:
    """The id of a run's callback: one per run, whoever registers it again."""
    return "ep_cb_" + hashlib.sha256(f"callback|{dag_id}|{run_id}".encode()).hexdigest()[:24]


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


# -- the outbox: written in the recording transaction -----------------------------------------------


def _payload(kind: str, ts: float, data: dict[str, Any], seq: int, terminal: bool) -> str:
    body = {
        "type": PAYLOAD_TYPES[kind],
        "timestamp": clock.iso(clock.from_epoch(ts), zulu=True),
        "data": {**data, "seq": seq, "terminal": terminal},
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def event_message(envelope: Envelope) -> tuple[str, bool, str]:
    """(kind, terminal, payload) of a task, run or progress event: the event as SSE data, plus terminal."""
    event = envelope.event
    terminal = event.run_state.terminal if event.kind is EventKind.RUN else event.kind is EventKind.TASK and event.task_state.terminal
    data = {"epoch": envelope.epoch, "seq": envelope.seq, **event.model_dump(mode="json", exclude_none=True)}
    return event.kind.value, terminal, _payload(event.kind.value, event.ts, data, envelope.seq, terminal)


def input_messages(change: RunChange) -> list[tuple[Position, str]]:
    """(position, payload) of each input request the new events opened: once per request (a duplicate
    or a late copy opens nothing, in this transaction or a later one), with where to answer it."""
    fold, new = OutcomeFold(*change.run), {envelope.position for envelope in change.new}
    found = []
    for envelope in change.history:
        fold.apply(envelope)
        if fold.opened is not None and envelope.position in new:
            request = fold.opened
            data = {
                "dag_id": change.run[0],
                "run_id": change.run[1],
                **request.model_dump(mode="json"),
                "respond": respond_path(*change.run, request.task_id, request.map_index),
                "epoch": envelope.epoch,
            }
            found.append((envelope.position, _payload(WebhookKind.NEEDS_INPUT.value, envelope.event.ts, data, envelope.seq, False)))
    return found


def outcome_message(change: RunChange) -> tuple[Position, str] | None:
    """(position of the deciding event, payload) of the run's outcome as it stood when it was
    decided (as the SSE `outcome` event and the result endpoint give it), or None while it is pending."""
    fold = OutcomeFold(*change.run)
    for envelope in sorted(change.history, key=lambda e: e.position):
        if fold.apply(envelope):
            at_decision = fold.outcome.model_dump(mode="json")
            return envelope.position, _payload(WebhookKind.OUTCOME.value, envelope.event.ts, at_decision, envelope.seq, True)
    return None


class WebhookOutbox:
    """The store's outbox: ``Store(url, outbox=WebhookOutbox())``. ``on_enqueued`` is called (with
    how many messages) after a recording transaction that enqueued something has committed: the
    app points it at the dispatcher's ``wake``."""

    def __init__(self, on_enqueued: Callable[[int], None] | None = None):
        self.on_enqueued = on_enqueued

    async def enqueue(self, conn: AsyncConnection, changes: Sequence[RunChange]) -> int:
        """Insert the messages of these runs' new events and newly decided outcomes, inside the
        caller's transaction. Returns how many were new."""
        # The subscriptions, and the callbacks of these runs only: callbacks pile up, one per trigger.
        run_ids = sorted({change.run[1] for change in changes})
        query = select(ENDPOINTS).where(ENDPOINTS.c.enabled.is_(True), or_(ENDPOINTS.c.run_id.is_(None), ENDPOINTS.c.run_id.in_(run_ids)))
        endpoints = [_endpoint(row) for row in (await conn.execute(query)).all()]
        if not endpoints:
            return 0
        now = clock.now()
        rows: list[dict[str, Any]] = []

        def add(endpoint: Endpoint, change: RunChange, position: Position, kind: str, terminal: bool, payload: str) -> None:
            rows.append(
                dict(
                    id=_new_id("msg_"),
                    endpoint_id=endpoint.id,
                    dag_id=change.run[0],
                    run_id=change.run[1],
                    epoch=position.epoch,
                    seq=position.seq,
                    kind=kind,
                    terminal=terminal,
                    payload=payload,
                    status=MessageStatus.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    locked_by=None,
                    locked_until=None,
                    created_at=now,
                    delivered_at=None,
                )
            )

        for change in changes:
            dag_id = change.run[0]
            wanted = [e for e in endpoints if e.wants(dag_id, change.run[1], now)]
            if not wanted:
                continue
            for envelope in change.new:
                subscribed = [e for e in wanted if envelope.event.kind.value in e.kinds]
                if subscribed:
                    kind, terminal, payload = event_message(envelope)
                    for endpoint in subscribed:
                        add(endpoint, change, envelope.position, kind, terminal, payload)
            asking = [e for e in wanted if WebhookKind.NEEDS_INPUT.value in e.kinds]
            if asking and any(envelope.event.state == TaskState.AWAITING_INPUT.value for envelope in change.new):
                for position, payload in input_messages(change):
                    for endpoint in asking:
                        add(endpoint, change, position, WebhookKind.NEEDS_INPUT.value, False, payload)
            if change.decided:
                subscribed = [e for e in wanted if WebhookKind.OUTCOME.value in e.kinds]
                decided = outcome_message(change) if subscribed else None
                if decided is not None:
                    for endpoint in subscribed:
                        add(endpoint, change, decided[0], WebhookKind.OUTCOME.value, True, decided[1])
        if not rows:
            return 0
        # executemany: the statement is compiled once (cached), the driver batches the rows.
        statement = dialect_insert(conn, WebhookMessageRow).on_conflict_do_nothing().returning(MESSAGES.c.id)
        return len((await conn.execute(statement, rows)).all())

    def committed(self, count: int) -> None:
        if self.on_enqueued is not None:
            self.on_enqueued(count)


# -- the dispatcher's side --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What one attempt means for its message and endpoint (decided by the dispatcher)."""

    status: MessageStatus  # the message's new status
    next_attempt_at: datetime | None = None
    endpoint: str = "failure"  # "success" (clears failing_since), "failure", or "gone" (disable)
    disable_reason: str | None = None  # with endpoint == "gone"


@dataclass(frozen=True)
class Finish:
    """One attempt to record: the message, the lease it was made under, its row, and its verdict."""

    message: Message
    token: str
    attempt: dict[str, Any]
    verdict: Verdict


@dataclass(frozen=True)
class Finished:
    applied: bool  # False: the lease was lost (another worker holds the message now) or it is gone
    disabled_reason: str | None = None  # set when this attempt disabled the endpoint
    cancelled: int = 0  # pending messages cancelled with that


# -- the API's and the dispatcher's access --------------------------------------------------------


RELEASED = {"locked_by": None, "locked_until": None}


class WebhookStore:
    def __init__(self, store: Store):
        self.store = store

    # -- endpoints ----------------------------------------------------------------------------------

    async def create_endpoint(
        self,
        *,
        url: str,
        description: str = "",
        dag_ids: list[str] | None = None,
        kinds: list[str] | None = None,
        enabled: bool = True,
        run_id: str | None = None,
        headers: dict[str, str] | None = None,
        expires_at: datetime | None = None,
    ) -> Endpoint:
        """A subscription; with run_id (and dag_ids naming its DAG), a trigger's callback for that one
        run: its id is the run's (callback_id), and the run's callback already registered is returned
        as it is (a retried trigger registers none twice)."""
        from runbell.service.webhooks.signing import new_secret

        # The API's rules (pydantic's ValidationError is a ValueError naming the bad field).
        checked = EndpointCreate.model_validate(
            {
                "url": url,
                "description": description,
                "dag_ids": dag_ids,
                "kinds": DEFAULT_KINDS if kinds is None else kinds,
                "enabled": enabled,
            }
        )
        now = clock.now()
        values = dict(
            id=callback_id(dag_ids[0], run_id) if run_id is not None and dag_ids else _new_id("ep_"),
            **checked.model_dump(mode="json"),
            secret=new_secret(),
            previous_secret=None,
            previous_secret_expires_at=None,
            created_at=now,
            updated_at=now,
            disabled_reason=None,
            failing_since=None,
            run_id=run_id,
            headers=checked_headers(url, headers) if headers else None,
            expires_at=expires_at,
        )
        async with self.store._transaction(write=True) as conn:
            await conn.execute(dialect_insert(conn, WebhookEndpointRow).values(values).on_conflict_do_nothing())
            row = (await conn.execute(select(ENDPOINTS).where(ENDPOINTS.c.id == values["id"]))).first()
        return _endpoint(row)

    async def list_endpoints(self) -> list[Endpoint]:
        """The subscriptions (a trigger's callbacks are found by their id, not listed: one per trigger)."""
        query = select(ENDPOINTS).where(ENDPOINTS.c.run_id.is_(None)).order_by(ENDPOINTS.c.created_at, ENDPOINTS.c.id)
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_endpoint(row) for row in rows]

    async def purge_expired_callbacks(self, now: datetime | None = None) -> int:
        """Delete the callbacks past their expiry that have no delivery left to try (their messages
        and attempts are kept, as a deleted endpoint's). Returns how many."""
        now = now or clock.now()
        undelivered = select(MESSAGES.c.id).where(
            MESSAGES.c.endpoint_id == ENDPOINTS.c.id, MESSAGES.c.status == MessageStatus.PENDING.value
        )
        statement = delete(ENDPOINTS).where(ENDPOINTS.c.run_id.is_not(None), ENDPOINTS.c.expires_at < now, ~undelivered.exists())
        async with self.store._transaction(write=True) as conn:
            return (await conn.execute(statement)).rowcount

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id))).first()
        return _endpoint(row) if row is not None else None

    async def update_endpoint(self, endpoint_id: str, **fields: Any) -> Endpoint | None:
        """Change url, description, dag_ids, kinds or enabled. Re-enabling clears disabled_reason and
        failing_since; disabling cancels the endpoint's pending messages (recover replays them)."""
        values: dict[str, Any] = EndpointUpdate.model_validate(fields).changes()  # the API's rules; ValueError
        now = clock.now()
        async with self.store._transaction(write=True) as conn:
            current = (await conn.execute(select(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id).with_for_update())).first()
            if current is None:
                return None
            if "enabled" in values:
                if values["enabled"] and not current.enabled:
                    values.update(disabled_reason=None, failing_since=None)
                elif not values["enabled"] and current.enabled:
                    values.update(disabled_reason=DISABLED_BY_REQUEST)
                    await _cancel_pending(conn, endpoint_id)
            values["updated_at"] = now
            row = (await conn.execute(update(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id).values(values).returning(ENDPOINTS))).first()
        return _endpoint(row)

    async def has_callback(self, dag_id: str, run_id: str) -> bool:
        """Whether a callback that has not expired is registered for this run."""
        query = select(ENDPOINTS).where(ENDPOINTS.c.run_id == run_id, ENDPOINTS.c.enabled.is_(True))
        async with self.store.engine.connect() as conn:
            endpoints = [_endpoint(row) for row in (await conn.execute(query)).all()]
        return any(endpoint.wants(dag_id, run_id, clock.now()) for endpoint in endpoints)

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete the endpoint; its pending messages are cancelled (kept, with their attempts)."""
        async with self.store._transaction(write=True) as conn:
            deleted = (await conn.execute(delete(ENDPOINTS).where(ENDPOINTS.c.id == endpoint_id))).rowcount
            if deleted:
                await _cancel_pending(conn, endpoint_id)
        return bool(deleted)

    async def rotate_secret(self, endpoint_id: str, grace_seconds: float) -> Endpoint | None:
        """A new secret; the current one keeps signing beside it until now + grace_seconds."""
        from runbell.service.webhooks.signing import new_secret

        now = clock.now()
        async with self.store._transaction(write=True) as conn:
            row = (
                await conn.execute(
                    update(ENDPOINTS)
                    .where(ENDPOINTS.c.id == endpoint_id)
                    .values(
                        previous_secret=ENDPOINTS.c.secret,
                        previous_secret_expires_at=now + timedelta(seconds=max(0.0, grace_seconds)),
                        secret=new_secret(),
                        updated_at=now,
                    )
                    .returning(ENDPOINTS)
                )
            ).first()
        return _endpoint(row) if row is not None else None

    # -- messages and attempts ----------------------------------------------------------------------

    async def get_message(self, message_id: str) -> Message | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(MESSAGES).where(MESSAGES.c.id == message_id))).first()
        return _message(row) if row is not None else None

    async def messages(self, endpoint_id: str, *, since: datetime | None = None, limit: int = 100) -> list[Message]:
        """The endpoint's messages, newest first."""
        query = select(MESSAGES).where(MESSAGES.c.endpoint_id == endpoint_id)
        if since is not None:
            query = query.where(MESSAGES.c.created_at >= since)
        query = query.order_by(MESSAGES.c.created_at.desc(), MESSAGES.c.seq.desc(), MESSAGES.c.id).limit(limit)
        async with self.store.engine.connect() as conn:
            return [_message(row) for row in (await conn.execute(query)).all()]

    async def attempts(self, *, message_id: str | None = None, endpoint_id: str | None = None, limit: int = 100) -> list[Attempt]:
        """Attempts of a message or of an endpoint (or both filters), newest first."""
        query = select(ATTEMPTS)
        if message_id is not None:
            query = query.where(ATTEMPTS.c.message_id == message_id)
        if endpoint_id is not None:
            query = query.where(ATTEMPTS.c.endpoint_id == endpoint_id)
        query = query.order_by(ATTEMPTS.c.id.desc()).limit(limit)
        async with self.store.engine.connect() as conn:
            return [_attempt(row) for row in (await conn.execute(query)).all()]

    # Re-queueing drops any lease, so that an attempt still in flight cannot settle the message
    # (its finish no longer holds the lease): the requested attempt is made whatever that one does.

    async def resend(self, message_id: str) -> Message | None:
        """Back to pending, due now: one more attempt with the same webhook-id. (A message whose
        schedule is used up gets that one attempt and is dead again if it fails.)"""
        async with self.store._transaction(write=True) as conn:
            row = (
                await conn.execute(
                    update(MESSAGES)
                    .where(MESSAGES.c.id == message_id)
                    .values(status=MessageStatus.PENDING.value, next_attempt_at=clock.now(), **RELEASED)
                    .returning(MESSAGES)
                )
            ).first()
        return _message(row) if row is not None else None

    async def recover(self, endpoint_id: str, since: datetime) -> int:
        """Re-queue every message of the endpoint created since then (whatever its status), due now."""
        async with self.store._transaction(write=True) as conn:
            result = await conn.execute(
                update(MESSAGES)
                .where(MESSAGES.c.endpoint_id == endpoint_id, MESSAGES.c.created_at >= since)
                .values(status=MessageStatus.PENDING.value, next_attempt_at=clock.now(), **RELEASED)
            )
        return result.rowcount

    # -- for the dispatcher -------------------------------------------------------------------------

    async def claim(
        self,
        token: str,
        *,
        limit: int,
        per_endpoint: int,
        caps: Mapping[str, int] | None = None,
        exclude: Sequence[str] = (),
        lease_seconds: float,
        now: datetime | None = None,
    ) -> list[Message]:
        """Lease up to ``limit`` due messages of enabled endpoints, at most ``per_endpoint`` of each
        endpoint (``caps[endpoint_id]`` for those it names), none of the endpoints in ``exclude``;
        the lease is ``token`` until now + lease.

        The candidates are chosen first, then leased with UPDATE ... WHERE id IN (SELECT ... WHERE
        still due FOR UPDATE SKIP LOCKED) RETURNING on PostgreSQL, and in one BEGIN IMMEDIATE
        transaction on SQLite; so two workers never hold one message. A lease that ran out (its
        worker died mid-delivery) makes the message due again."""
        if limit <= 0:
            return []
        # The lease runs from when this claim holds the writer (SQLite's writers queue in this process,
        # maybe for seconds): counted from before that wait, it would be shorter than lease_seconds.
        async with self.store._transaction(write=True) as conn:
            now = now or clock.now()
            due = and_(
                MESSAGES.c.status == MessageStatus.PENDING.value,
                MESSAGES.c.next_attempt_at <= now,
                or_(MESSAGES.c.locked_until.is_(None), MESSAGES.c.locked_until < now),
            )
            scan: Any = (  # a Select, then its subquery
                select(MESSAGES.c.id, MESSAGES.c.endpoint_id, MESSAGES.c.next_attempt_at)
                .join(ENDPOINTS, ENDPOINTS.c.id == MESSAGES.c.endpoint_id)
                .where(due, ENDPOINTS.c.enabled.is_(True))
            )
            if exclude:
                scan = scan.where(MESSAGES.c.endpoint_id.not_in(list(exclude)))
            scan = scan.order_by(MESSAGES.c.next_attempt_at, MESSAGES.c.id).limit(max(CLAIM_SCAN, limit)).subquery()
            ranked = select(
                scan.c.id,
                scan.c.endpoint_id,
                scan.c.next_attempt_at,
                func.row_number().over(partition_by=scan.c.endpoint_id, order_by=(scan.c.next_attempt_at, scan.c.id)).label("rank"),
            ).subquery()
            cap: Any = case(dict(caps), value=ranked.c.endpoint_id, else_=per_endpoint) if caps else per_endpoint
            candidates = select(ranked.c.id).where(ranked.c.rank <= cap).order_by(ranked.c.next_attempt_at, ranked.c.id).limit(limit)
            # Two steps, so that the locking one is a plain primary-key lookup whatever the planner
            # thinks of the window query: pick candidates, then lock those still due (skipping any
            # another worker holds: it got them first).
            ids = list((await conn.execute(candidates)).scalars())
            if not ids:
                return []
            pick = select(MESSAGES.c.id).where(MESSAGES.c.id.in_(ids), due)
            if conn.dialect.name == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            statement = (
                update(MESSAGES)
                .where(MESSAGES.c.id.in_(pick.scalar_subquery()))
                .values(locked_by=token, locked_until=now + timedelta(seconds=lease_seconds))
                .returning(MESSAGES)
            )
            rows = (await conn.execute(statement)).all()
        return sorted((_message(row) for row in rows), key=lambda m: (m.next_attempt_at or now, m.id))

    async def endpoints_by_id(self, ids: Iterable[str]) -> dict[str, Endpoint]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(select(ENDPOINTS).where(ENDPOINTS.c.id.in_(wanted)))).all()
        return {row.id: _endpoint(row) for row in rows}

    async def release(self, message_ids: Sequence[str], token: str) -> None:
        """Give leased messages back unattempted (due again at once)."""
        if not message_ids:
            return
        async with self.store._transaction(write=True) as conn:
            await conn.execute(
                update(MESSAGES)
                .where(MESSAGES.c.id.in_(list(message_ids)), MESSAGES.c.locked_by == token)
                .values(locked_by=None, locked_until=None)
            )

    async def cancel(self, message_id: str, token: str) -> None:
        """A leased message that must not be delivered (its endpoint is gone or disabled)."""
        async with self.store._transaction(write=True) as conn:
            await conn.execute(
                update(MESSAGES)
                .where(MESSAGES.c.id == message_id, MESSAGES.c.locked_by == token)
                .values(status=MessageStatus.CANCELLED.value, next_attempt_at=None, locked_by=None, locked_until=None)
            )

    async def finish(
        self, message: Message, token: str, attempt: dict[str, Any], verdict: Verdict, *, disable_after: float, now: datetime | None = None
    ) -> Finished:
        """Record one attempt and apply its verdict, in one transaction (finish_many of one)."""
        [finished] = await self.finish_many([Finish(message, token, attempt, verdict)], disable_after=disable_after, now=now)
        return finished

    async def finish_many(self, items: Sequence[Finish], *, disable_after: float, now: datetime | None = None) -> list[Finished]:
        """Record attempts and apply their verdicts, all in one transaction: each message (only while
        its lease still holds it), its endpoint's failing_since, and disabling the endpoint (410, or
        failing continuously for disable_after seconds), which cancels its pending messages.

        Deliveries, the common case, take one statement for all of them (and one for their endpoints);
        the other verdicts are applied one by one in the same transaction. Returns, per item, whether
        it applied."""
        if not items:
            return []
        now = now or clock.now()
        found: dict[int, Finished] = {}
        async with self.store._transaction(write=True) as conn:
            if conn.dialect.name == "postgresql":
                # The verdicts update their endpoints' rows one after another: locked first, all, in
                # one order, or two replicas' batches naming two endpoints crosswise deadlock. (NO KEY:
                # the attempts' foreign keys share those rows.)
                touched = sorted({item.message.endpoint_id for item in items})
                await conn.execute(
                    select(ENDPOINTS.c.id).where(ENDPOINTS.c.id.in_(touched)).order_by(ENDPOINTS.c.id).with_for_update(key_share=True)
                )
            rows = [dict(message_id=item.message.id, endpoint_id=item.message.endpoint_id, **item.attempt) for item in items]
            await conn.execute(insert(ATTEMPTS), rows)
            delivered = [
                i for i, item in enumerate(items) if item.verdict.status is MessageStatus.DELIVERED and item.verdict.endpoint == "success"
            ]
            if delivered:
                held = [(items[i].message.id, items[i].token) for i in delivered]
                applied = set(
                    (
                        await conn.execute(
                            update(MESSAGES)
                            .where(tuple_(MESSAGES.c.id, MESSAGES.c.locked_by).in_(held))
                            .values(
                                status=MessageStatus.DELIVERED.value,
                                attempts=MESSAGES.c.attempts + 1,
                                next_attempt_at=None,
                                delivered_at=now,
                                **RELEASED,
                            )
                            .returning(MESSAGES.c.id)
                        )
                    ).scalars()
                )
                endpoint_ids = sorted({items[i].message.endpoint_id for i in delivered})
                await conn.execute(
                    update(ENDPOINTS)
                    .where(ENDPOINTS.c.id.in_(endpoint_ids), ENDPOINTS.c.failing_since.is_not(None))
                    .values(failing_since=None)
                )
                found.update((i, Finished(items[i].message.id in applied)) for i in delivered)
            for i, item in enumerate(items):
                if i not in found:
                    found[i] = await _apply_verdict(conn, item, disable_after, now)
        return [found[i] for i in range(len(items))]


async def _apply_verdict(conn: AsyncConnection, item: Finish, disable_after: float, now: datetime) -> Finished:
    """One attempt's verdict, inside the caller's transaction (its attempt row is written already)."""
    message, verdict = item.message, item.verdict
    values: dict[str, Any] = dict(
        status=verdict.status.value,
        attempts=MESSAGES.c.attempts + 1,
        next_attempt_at=verdict.next_attempt_at,
        **RELEASED,
    )
    if verdict.status is MessageStatus.DELIVERED:
        values["delivered_at"] = now
    applied = (
        await conn.execute(update(MESSAGES).where(MESSAGES.c.id == message.id, MESSAGES.c.locked_by == item.token).values(values))
    ).rowcount == 1
    endpoint_id = message.endpoint_id
    where = ENDPOINTS.c.id == endpoint_id
    if verdict.endpoint == "success":
        await conn.execute(update(ENDPOINTS).where(where, ENDPOINTS.c.failing_since.is_not(None)).values(failing_since=None))
        return Finished(applied)
    if verdict.endpoint == "gone":
        reason = verdict.disable_reason or "the receiver asked to stop"
    else:
        await conn.execute(update(ENDPOINTS).where(where, ENDPOINTS.c.failing_since.is_(None)).values(failing_since=now))
        row = (await conn.execute(select(ENDPOINTS.c.enabled, ENDPOINTS.c.failing_since).where(where))).first()
        if row is None or not row.enabled or row.failing_since is None:
            return Finished(applied)
        failing = (now - row.failing_since).total_seconds()
        if failing < disable_after:
            return Finished(applied)
        reason = f"failing continuously since {row.failing_since.isoformat()} ({failing / 86400:.1f} days)"
    disabled = (
        await conn.execute(
            update(ENDPOINTS).where(where, ENDPOINTS.c.enabled.is_(True)).values(enabled=False, disabled_reason=reason, updated_at=now)
        )
    ).rowcount
    if not disabled:
        return Finished(applied)
    cancelled = await _cancel_pending(conn, endpoint_id)
    return Finished(applied, disabled_reason=reason, cancelled=cancelled)


async def _cancel_pending(conn: AsyncConnection, endpoint_id: str) -> int:
    result = await conn.execute(
        update(MESSAGES)
        .where(MESSAGES.c.endpoint_id == endpoint_id, MESSAGES.c.status == MessageStatus.PENDING.value)
        .values(status=MessageStatus.CANCELLED.value, next_attempt_at=None)
    )
    return result.rowcount
