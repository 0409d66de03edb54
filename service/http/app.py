"""The gateway application: routes, error handlers, and the parts started for its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import event as sa_event
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from runbell.bus import keys
from runbell.listeners.config import EVENT_MAX_BYTES_RANGE, PublisherConfig
from runbell.listeners.connect import agreed_partitions, async_client
from runbell.listeners.publisher import Publisher
from runbell.service.airflow.api import AirflowClient, AirflowError, AirflowSettings
from runbell.service.airflow.cancels import DisconnectCancels
from runbell.service.airflow.reconciler import Reconciler
from runbell.service.core import tracing
from runbell.service.core.loops import Supervised
from runbell.service.core.metrics import Metrics
from runbell.service.http import (
    answers,
    assets,
    asyncapi,
    backfills,
    dashboard,
    dead_letters,
    health,
    openapi,
    runs,
    trigger,
)
from runbell.service.http import run_routes as routes
from runbell.service.http import webhooks as webhook_routes
from runbell.service.http.body_limit import BodyLimit
from runbell.service.http.errors import (
    ApiError,
    api_error_handler,
    error_response,
    http_error_handler,
    unexpected_error_handler,
)
from runbell.service.http.idempotency import IdempotencyKeys
from runbell.service.http.params import EncodedSlashes
from runbell.service.http.readiness import Readiness
from runbell.service.http.sse import Sweep
from runbell.service.live.broker import EmbeddedBroker, resolve_redis
from runbell.service.live.hub import Hub
from runbell.service.live.topics import AssetTopic, RunTopic
from runbell.service.settings import Settings
from runbell.service.store.dead_letters import DeadLetters
from runbell.service.store.recorder import Recorder
from runbell.service.store.store import Store
from runbell.service.webhooks.dispatcher import Dispatcher, webhook_schedule_seconds
from runbell.service.webhooks.outbox import WebhookOutbox, WebhookStore
from runbell.service.webhooks.target_guard import TargetPolicy

log = logging.getLogger("runbell.app")

PARTITIONS_CHECK_SECONDS = 30.0  # how often the gateway asks for the stored partition count again
CALLBACK_SWEEP_SECONDS = 600.0  # how often expired callbacks are deleted
REDIS_COMMAND_CONNECTIONS = 16  # loopback commands take ~0.1 ms: 16 in flight is far beyond one core's need

RUN = "/v1/dags/{dag_id}/runs/{run_id}"
EVENTS = "/v1/events"
WEBHOOKS, WEBHOOK, WEBHOOK_MESSAGE = "/v1/webhooks", "/v1/webhooks/{endpoint_id}", "/v1/webhooks/messages/{message_id}"
ROUTES = [
    Route("/v1/dags/{dag_id}/runs", trigger.trigger_run, methods=["POST"], name="trigger_run"),
    Route("/v1/runs", runs.list_runs, methods=["GET"], name="list_runs"),
    Route("/v1/dags/{dag_id}/runs", runs.list_runs, methods=["GET"], name="list_dag_runs"),
    Route(RUN, runs.get_run, methods=["GET"], name="get_run"),
    Route("/v1/backfills/{backfill_id}/runs", backfills.backfill_runs, methods=["GET"], name="backfill_runs"),
    Route("/v1/backfills/{backfill_id}/events", backfills.backfill_events, methods=["GET"], name="backfill_events"),
    Route(RUN + "/result", routes.run_result, methods=["GET"], name="run_result"),
    Route(RUN + "/events", routes.run_events, methods=["GET"], name="run_events"),
    Route(RUN + "/progress", routes.run_progress, methods=["GET"], name="run_progress"),
    Route(RUN + "/tasks/{task_id}/input", answers.answer_input, methods=["POST"], name="answer_input"),
    Route(EVENTS, routes.publish_event, methods=["POST"], name="publish_event"),
    *assets.ROUTES,  # /v1/assets/{name}/events and /next: {name} may hold '/'
    Route(WEBHOOKS, webhook_routes.create_webhook, methods=["POST"], name="create_webhook"),
    Route(WEBHOOKS, webhook_routes.list_webhooks, methods=["GET"], name="list_webhooks"),
    Route(WEBHOOK_MESSAGE, webhook_routes.get_message, methods=["GET"], name="get_webhook_message"),
    Route(WEBHOOK_MESSAGE + "/resend", webhook_routes.resend_message, methods=["POST"], name="resend_webhook_message"),
    Route(WEBHOOK, webhook_routes.get_webhook, methods=["GET"], name="get_webhook"),
    Route(WEBHOOK, webhook_routes.update_webhook, methods=["PATCH"], name="update_webhook"),
    Route(WEBHOOK, webhook_routes.delete_webhook, methods=["DELETE"], name="delete_webhook"),
    Route(WEBHOOK + "/rotate-secret", webhook_routes.rotate_secret, methods=["POST"], name="rotate_webhook_secret"),
    Route(WEBHOOK + "/attempts", webhook_routes.endpoint_attempts, methods=["GET"], name="webhook_attempts"),
    Route(WEBHOOK + "/messages", webhook_routes.endpoint_messages, methods=["GET"], name="webhook_messages"),
    Route(WEBHOOK + "/recover", webhook_routes.recover_endpoint, methods=["POST"], name="recover_webhook"),
    Route("/v1/dead-letters", dead_letters.list_dead_letters, methods=["GET"], name="list_dead_letters"),
    Route("/v1/dead-letters/redrive", dead_letters.redrive_all, methods=["POST"], name="redrive_dead_letters"),
    Route("/v1/dead-letters/{letter_id}/redrive", dead_letters.redrive_dead_letter, methods=["POST"], name="redrive_dead_letter"),
    Route("/healthz", health.healthz, methods=["GET"], name="healthz"),
    Route("/readyz", health.readyz, methods=["GET"], name="readyz"),
    Route("/metrics", health.metrics, methods=["GET"], name="metrics"),
    Route("/openapi.json", openapi.openapi_json, methods=["GET"], name="openapi"),
    Route("/asyncapi.json", asyncapi.asyncapi_json, methods=["GET"], name="asyncapi"),
]
APP_ROUTES = [*ROUTES, *dashboard.ROUTES]  # the dashboard: its page at / and files under /ui/


def create_app(settings: Settings, *, embedded: EmbeddedBroker | None = None) -> Starlette:
    """The ASGI app. Everything that talks to Redis or the database starts in the lifespan."""
    app = Starlette(
        routes=APP_ROUTES,
        lifespan=lifespan,
        middleware=[
            Middleware(EncodedSlashes),  # before routing, which sees the decoded path
            # An event may be larger than other bodies: up to the event cap.
            Middleware(BodyLimit, limit=settings.body_max_bytes, limits={EVENTS: settings.event_max_bytes}),
        ],
        exception_handlers={
            ApiError: api_error_handler,
            AirflowError: airflow_error_handler,
            HTTPException: http_error_handler,
            Exception: unexpected_error_handler,
        },
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.sse_sweep = Sweep.of(settings)  # the heartbeats and send timeouts of every SSE stream
    app.state.embedded = embedded
    app.state.token_secret = token_secret(settings)
    return app


def token_secret(settings: Settings) -> str:
    if settings.token_secret is not None:
        return settings.token_secret.get_secret_value()
    log.warning(
        "RUNBELL_TOKEN_SECRET is not set: run-scoped tokens are signed with a random key of this "
        "process and are not accepted by other replicas or after a restart"
    )
    return secrets.token_urlsafe(32)


def airflow_client(settings: Settings) -> AirflowClient | None:
    if not settings.airflow_url:
        return None
    reveal = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
    return AirflowClient(
        AirflowSettings(
            base_url=settings.airflow_url,
            token=reveal(settings.airflow_token),
            username=settings.airflow_username,
            password=reveal(settings.airflow_password),
            timeout=settings.airflow_timeout,
        )
    )


async def airflow_error_handler(request, exc: Exception):
    assert isinstance(exc, AirflowError)
    return error_response(exc.status, exc.code, str(exc))


async def agree_partitions(client: aioredis.Redis, namespace: str, configured: int) -> int:
    """The namespace's stream partition count: the one stored in Redis, else ours, stored now. When
    Redis does not answer at start-up, ours (logged): the gateway starts and waits for Redis as before,
    and ``partition_keeper`` takes the stored count once Redis answers."""
    try:
        stored = await client.set(keys.partitions_key(namespace), configured, nx=True, get=True)
    except (RedisError, OSError) as exc:
        log.warning("Redis unreachable at start (%s): assuming %d stream partitions, as configured", type(exc).__name__, configured)
        return configured
    return agreed_partitions(stored, configured, log)


def partition_keeper(state: State, namespace: str) -> Supervised:
    """Asks for the stored partition count again, at once and then every PARTITIONS_CHECK_SECONDS
    (SET NX GET: a count lost with Redis's data is stored again, the one in use). The stored count
    wins, as at start: when it is not the one in use (Redis did not answer at start-up), the topics,
    the hub's subscriptions and the recorder move to it, so nothing is read where nobody publishes."""

    async def check() -> None:
        stored = await state.redis.set(keys.partitions_key(namespace), state.partitions, nx=True, get=True)
        count = agreed_partitions(stored, state.partitions, log)
        if count != state.partitions:
            state.partitions = count
            for topic in (state.runs, state.assets):
                topic.repartition(count)
            if state.recorder is not None:
                state.recorder.repartition(count)
            await state.hub.resubscribe()

    return Supervised("runbell-partitions", check, pause=PARTITIONS_CHECK_SECONDS, logger=log, expected=(RedisError, OSError))


def callback_sweeper(webhooks: WebhookStore) -> Supervised:
    """Deletes the triggers' callbacks past their expiry with nothing left to deliver, every
    CALLBACK_SWEEP_SECONDS (one per trigger would otherwise pile up)."""

    async def sweep() -> None:
        await webhooks.purge_expired_callbacks()

    return Supervised("runbell-callbacks", sweep, pause=CALLBACK_SWEEP_SECONDS, logger=log, expected=(SQLAlchemyError, OSError))


def spool_flusher(publisher: Publisher, every: float) -> Supervised:
    """Sends the namespace's spool (events POSTed while Redis was unreachable, also before a restart)
    at start-up and then every ``every`` seconds, whether or not anything else is published."""

    async def flush() -> None:
        while await asyncio.to_thread(publisher.flush) and not publisher.spool.is_empty():
            pass  # sent some, more waits: go on (each flush is bounded in time)

    return Supervised("runbell-spool", flush, pause=every, logger=log)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    redis_url = settings.redis_url
    if redis_url is None:
        redis_url, app.state.embedded = resolve_redis(None)
    state = app.state
    tracing.configure_otlp(settings.otlp_endpoint)
    # Three kinds of connection: commands (short timeouts), the one pub/sub connection and the
    # recorder's blocking reads (no socket timeout: redis-py would retry a long XREAD and skip entries).
    # Commands share a bounded pool: a crowd of arriving waiters queues for a connection instead of
    # opening one each, so the process's connections to Redis do not grow with its waiters.
    # (On a cluster, each is a RedisCluster: a pool per master.)
    state.redis = async_client(redis_url, max_connections=REDIS_COMMAND_CONNECTIONS, socket_timeout=5, socket_connect_timeout=2)
    pubsub_client = async_client(redis_url, socket_timeout=None, socket_connect_timeout=2)
    recorder_client = async_client(redis_url, socket_timeout=5, socket_connect_timeout=2)
    state.partitions = partitions = await agree_partitions(state.redis, settings.namespace, settings.stream_partitions)
    # Every recording process writes the webhook outbox, whether or not it delivers (settings.webhooks).
    outbox = WebhookOutbox()
    state.store = Store(settings.database_url, outbox=outbox)
    await state.store.start()
    sa_event.listen(state.store.engine.sync_engine, "before_cursor_execute", lambda *_: state.metrics.db_statements.inc())
    state.webhooks = WebhookStore(state.store)
    state.webhook_policy = TargetPolicy.from_setting(settings.webhook_allowed_hosts)
    state.hub = Hub(pubsub_client, state.metrics, buffer=settings.subscriber_buffer, max_subscribers=settings.max_subscribers)
    # The bus readers take whatever a publisher may send (a hook's cap may be set above this gateway's,
    # up to the ceiling): only an event over the ceiling is dropped. POST /v1/events keeps this gateway's cap.
    cap = EVENT_MAX_BYTES_RANGE[1]
    state.runs = RunTopic(state.hub, state.redis, settings.namespace, archive=state.store, max_event_bytes=cap, partitions=partitions)
    state.assets = AssetTopic(state.hub, state.redis, settings.namespace, max_event_bytes=cap, partitions=partitions)
    await state.hub.start()
    publisher_config = replace(
        PublisherConfig.from_env(),
        redis_url=redis_url,
        namespace=settings.namespace,
        result_max_bytes=settings.result_max_bytes,
        event_max_bytes=settings.event_max_bytes,
        stream_partitions=partitions,
    )
    state.publisher = Publisher(publisher_config)
    state.idempotency = IdempotencyKeys(state.redis, settings.namespace, settings.idempotency_ttl)
    state.airflow = airflow_client(settings)
    # Airflow's REST API where it lists backfill slots, else its metadata database, read only (or None)
    state.backfills = backfills.source_from(settings, state.airflow, state.metrics)
    loops = [
        spool_flusher(state.publisher, settings.spool_flush_interval),
        partition_keeper(state, settings.namespace),
        callback_sweeper(state.webhooks),
    ]  # besides the hub's listener, each started and stopped the same way
    state.cancels = None
    if state.airflow is not None:
        loops.append(Reconciler(state.runs, state.airflow, state.publisher, settings.reconcile_after).loop)
        state.cancels = DisconnectCancels(state.airflow, state.runs, state.webhooks.has_callback, state.publisher, settings.cancel_grace)
    state.recorder = None
    if settings.recorder:
        consumer = f"{socket.gethostname()}:{settings.port}"  # stable: a restart re-reads its own pending entries
        dead_letters = DeadLetters(
            state.store, state.metrics, raw_max_bytes=settings.dead_letter_raw_max_bytes, max_rows=settings.dead_letters_max
        )
        state.recorder = recorder = Recorder(
            recorder_client,
            state.store,
            settings.namespace,
            consumer,
            metrics=state.metrics,
            max_event_bytes=cap,
            dead_letters=dead_letters,
            partitions=partitions,
        )
        loops.append(recorder.loop)
    state.dispatcher = None
    if settings.webhooks:
        worker = f"{socket.gethostname()}:{settings.port}:{os.getpid()}"
        timeout = settings.webhook_attempt_timeout
        state.dispatcher = Dispatcher(
            state.webhooks,
            policy=state.webhook_policy,
            worker=worker,
            metrics=state.metrics,
            attempt_timeout=timeout,
            connect_timeout=settings.webhook_connect_timeout,
            read_timeout=settings.webhook_read_timeout,
            max_in_flight=settings.webhook_max_in_flight,
            per_endpoint=settings.webhook_per_endpoint,
            breaker_failures=settings.webhook_breaker_failures,
            breaker_open_seconds=settings.webhook_breaker_open,
            breaker_max_open_seconds=settings.webhook_breaker_max_open,
            lease_seconds=2 * timeout + 5,  # a lease outlasts an attempt
            schedule=webhook_schedule_seconds(settings.webhook_schedule),
        )
        outbox.on_enqueued = state.dispatcher.wake  # after each committed batch that enqueued something
        loops.append(state.dispatcher.loop)
    state.readiness = Readiness(
        state.hub,
        state.redis.ping,
        state.store.ping,
        state.recorder,
        grace=settings.readiness_grace,
        max_backlog=settings.readiness_max_backlog,
        max_catch_up=settings.readiness_max_catch_up,
    )
    loops.append(state.readiness.loop)
    for loop in loops:
        loop.start()
    state.loops = [state.hub.listener, *loops]  # their states, for readiness and metrics
    log.info("runbell gateway ready (namespace %r)", settings.namespace)
    try:
        yield
    finally:
        await state.hub.stop()
        for loop in loops:
            await loop.stop()
        if state.cancels is not None:
            await state.cancels.aclose()
        if state.airflow is not None:
            await state.airflow.aclose()
        if state.backfills is not None:
            await state.backfills.close()
        await state.store.close()
        for client in (state.redis, pubsub_client, recorder_client):
            await client.aclose()
        if state.embedded is not None:
            state.embedded.stop()
