"""Prometheus metrics of one gateway process, on a registry of its own (one per app)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WEBHOOK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.waiters = Gauge("runbell_waiters", "Long-poll callers waiting now", registry=r)
        self.sse_clients = Gauge("runbell_sse_clients", "Server-Sent Events clients connected now", registry=r)
        self.events_in = Counter("runbell_events_in_total", "Envelopes received on pub/sub for local subscribers", registry=r)
        self.decode_errors = Counter("runbell_decode_errors_total", "Messages dropped as not valid events", ["reason"], registry=r)
        self.recorder_skipped = Counter(
            "runbell_recorder_skipped_total",
            "Global stream entries acknowledged unrecorded as not valid events",
            ["reason"],
            registry=r,
        )
        self.recorder_dead_letters = Counter(
            "runbell_recorder_dead_letters_total",
            "Global stream entries the store refused on their own, moved to the dead-letter table and acknowledged",
            registry=r,
        )
        self.recorder_dead_letters_evicted = Counter(
            "runbell_recorder_dead_letters_evicted_total",
            "Dead letters deleted to keep the table within RUNBELL_DEAD_LETTERS_MAX, by kind: malformed (entries "
            "that were no event, evicted first), event (events the store refused, once no malformed one is left)",
            ["kind"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "runbell_delivery_latency_seconds",
            "Event timestamp (publisher clock) to hand-off to local subscribers",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overflows = Counter("runbell_subscriber_overflows_total", "Subscribers cut off as too slow", registry=r)
        self.sse_direct_frames = Counter(
            "runbell_sse_direct_frames_total",
            "SSE frames written to a caught-up client's connection straight from the fan-out (no task woken)",
            registry=r,
        )
        self.long_poll_direct_answers = Counter(
            "runbell_long_poll_direct_answers_total",
            "Long-poll answers written to a caught-up waiter's connection straight from the fan-out (no task woken to answer)",
            registry=r,
        )
        self.sse_send_timeouts = Counter(
            "runbell_sse_send_timeouts_total",
            "SSE clients dropped as a write took longer than the send timeout",
            registry=r,
        )
        self.resubscribes = Counter("runbell_resubscribes_total", "Pub/sub (re)subscriptions", registry=r)
        # Counted at the driver (SQLAlchemy's before_cursor_execute): what the store is really asked.
        self.db_statements = Counter("runbell_db_statements_total", "SQL statements sent to the store", registry=r)
        self.rejected = Counter(
            "runbell_rejected_total", "Requests refused at the subscriber cap, or beyond the in-flight limit", registry=r
        )
        self.backfill_reads = Counter(
            "runbell_backfill_reads_total",
            "Reads of a backfill or its slots from Airflow, by where: airflow_api (GET /api/v2/backfills/{id}/dag_runs, "
            "Airflow 3.4+) or airflow_database (the metadata database: older Airflow, or while the API fails)",
            ["via"],
            registry=r,
        )
        self.outcomes = Counter("runbell_outcomes_total", "Outcomes answered", ["status", "via"], registry=r)
        self._outcome_counts: dict[tuple[str, str], Counter] = {}  # (status, via) -> its labelled child
        self.webhook_deliveries = Counter(
            "runbell_webhook_deliveries_total",
            "Webhook delivery attempts by result: success, failure (an answer other than 2xx), gone (410), "
            "timeout, refused (target guard), error (network)",
            ["result"],
            registry=r,
        )
        self.webhook_attempt_latency = Histogram(
            "runbell_webhook_attempt_seconds",
            "Duration of one webhook delivery attempt",
            buckets=WEBHOOK_BUCKETS,
            registry=r,
        )
        self.webhook_dead_letters = Counter(
            "runbell_webhook_dead_letters_total", "Webhook messages dead-lettered after their last attempt", registry=r
        )
        self.webhook_in_flight = Gauge("runbell_webhook_in_flight", "Webhook delivery attempts running now", registry=r)
        self.webhook_breakers_open = Gauge(
            "runbell_webhook_breakers_open",
            "Webhook endpoints whose circuit breaker is open or half-open now (their messages wait, unclaimed)",
            registry=r,
        )
        self.webhook_breaker_opened = Counter(
            "runbell_webhook_breaker_opened_total",
            "Times an endpoint's circuit breaker opened after failures in a row",
            registry=r,
        )
        self.webhook_endpoints_disabled = Counter(
            "runbell_webhook_endpoints_disabled_total",
            "Webhook endpoints disabled (410, or failing for days)",
            registry=r,
        )

    def count_outcome(self, status: str, via: str) -> None:
        """One outcome answered. The labelled child is looked up once per (status, via), not per answer:
        labels() takes a lock and builds a key, and a fan-out answers thousands of waiters at once."""
        child = self._outcome_counts.get((status, via))
        if child is None:
            child = self._outcome_counts[(status, via)] = self.outcomes.labels(status, via)
        child.inc()
