"""The Celery baseline: what a Celery user waits with, AsyncResult.get() on the Redis result backend.

Two configurations side by side, each shape measured under both before the next shape:
- default: Celery's defaults. Every thread gets a backend of its own, so every waiter holds two Redis
  connections (the client's and its pub/sub): 10,000 waiters want 20,000, over Redis's default
  maxclients. What fails is counted, as a Celery user would meet it, never raised;
- thread_safe: result_backend_thread_safe=True, one backend per process shared by its threads, and
  its connection pool sized for them (redis_max_connections: every thread reading at once, and the
  shared pub/sub, which comes from the same pool; redis-py's pool stops at 100 and raises
  MaxConnectionsError past it): the best configuration a Celery user would pick.

The waiters are threads (get() blocks) in processes of their own (`python -c`, waiter_main()), at most
WAITERS_PER_PROCESS each: thousands of threads in one process queue for its GIL (each wake-up waits out
the switch interval), which would be measured as Celery's latency. A process reads its job as one JSON
line on stdin, starts a thread per waiter, each taking its backend, and answers {"prepared": n}; on
`go` every thread calls get(), so the get()s start at about the same time whatever the processes took
to import and start; then it answers one line with what arrived.

The publisher is this process and stores each result as a Celery worker does (backend.store_result:
SET and PUBLISH in one pipeline), once every waiter's subscription is seen by Redis (PUBSUB NUMSUB),
so each latency is a push, not a read of a result already there; or once none was added for STALL
seconds, or half the get()s' timeout passed: what is missing then is reported as held_before_publish. Publish and arrival are stamped with time.perf_counter(): CLOCK_MONOTONIC on Linux, one
clock for the machine, so the two processes' stamps subtract.

Every key and channel is under a namespace of the run's own (Celery's global_keyprefix), dropped at
the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import celery
import redis
from celery import states
from celery.result import AsyncResult

from runbell.service.bench import procstats
from runbell.service.bench.loadgen import raise_fd_limit
from runbell.service.bench.measure import drop_namespace, percentiles, say

CONFIGS = {"default": False, "thread_safe": True}  # name: result_backend_thread_safe
WAITERS_PER_PROCESS = 250  # threads: 10,000 waiters are 40 processes
MIN_PROCESSES = 2
POOL_SIZE = WAITERS_PER_PROCESS + 1  # the thread-safe backend's pool: every thread at once, and the pub/sub
SPREAD_GAP = 0.003  # seconds between two tasks' results, as the gateway's spread shape publishes them
FULL_TIMEOUT = 60.0  # seconds a get() waits (the publish comes within half of it)
QUICK_TIMEOUT = 20.0
# After its get()s' timeout, how long a waiter process still waits for its threads: a get() that cannot
# connect retries with Celery's retry policy (20 tries, up to a second apart) before it raises.
GRACE = 30.0
STALL = 3.0  # seconds without a new subscription after which the missing ones are taken as failed
THREAD_STACK = 512 * 1024  # thousands of threads a process: their stacks are mostly never touched
WAITER = "from runbell.service.bench.celery import waiter_main; waiter_main()"


@dataclass(frozen=True)
class Shape:
    tasks: int
    waiters: int  # dealt round-robin over the tasks

    @property
    def name(self) -> str:
        return f"one_per_task_{self.tasks}" if self.tasks > 1 else f"one_result_{self.waiters}"


FULL_SHAPES = (Shape(1000, 1000), Shape(1, 1000), Shape(1, 10_000))
QUICK_SHAPES = (Shape(20, 20), Shape(1, 20), Shape(1, 50))


def celery_app(redis_url: str, namespace: str, thread_safe: bool) -> celery.Celery:
    """An app whose result backend is this Redis, its keys and channels under `namespace:`; no broker
    is ever reached (get() and store_result() only use the backend)."""
    app = celery.Celery("runbell-bench", broker="memory://", backend=redis_url, set_as_current=False)
    app.conf.result_backend_transport_options = {"global_keyprefix": f"{namespace}:"}
    app.conf.result_backend_thread_safe = thread_safe
    if thread_safe:
        app.conf.redis_max_connections = POOL_SIZE
    return app


# -- the waiter process -----------------------------------------------------------------------------


def waiter_main() -> None:
    """Wait on the job's task ids, one thread each; print what arrived, then exit at once (a thread
    stuck in Celery's retries must not hold the process)."""
    raise_fd_limit()
    threading.stack_size(THREAD_STACK)
    logging.disable(logging.CRITICAL)  # thousands of failed connections would each log: they are counted
    job = json.loads(sys.stdin.readline())
    app = celery_app(job["redis_url"], job["namespace"], job["thread_safe"])
    # Made before the threads: the first threads to ask for a shared backend at once would each make
    # one (app.backend is not locked), as an app that has been serving for a while never does.
    app.backend  # noqa: B018
    timeout = job["timeout"]
    prepared = threading.Semaphore(0)
    go = threading.Event()
    records: list[list[Any]] = []  # [waiter index, value, perf_counter]
    failures: list[str] = []

    def wait(index: int, task_id: str) -> None:
        result = AsyncResult(task_id, app=app)  # takes this thread's backend: its own, with Celery's defaults
        prepared.release()
        go.wait()
        try:
            value = result.get(timeout=timeout)
            t = time.perf_counter()
        except Exception as exc:  # what a Celery user meets: counted by kind
            failures.append(f"{type(exc).__name__}: {exc}")
            return
        records.append([index, value, t])

    threads = [threading.Thread(target=wait, args=(i, task_id), daemon=True) for i, task_id in enumerate(job["task_ids"])]
    for thread in threads:
        thread.start()
    for _ in threads:
        prepared.acquire()
    print(json.dumps({"prepared": len(threads)}), flush=True)
    sys.stdin.readline()
    go.set()
    deadline = time.monotonic() + timeout + GRACE
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    print(json.dumps({"records": list(records), "failures": list(failures)}), flush=True)
    os._exit(0)


# -- the parent: waiter processes, the publisher ------------------------------------------------------


class Waiters:
    """The waiter processes, the waiters dealt round-robin to them."""

    def __init__(self, redis_url: str, namespace: str, thread_safe: bool, task_ids: list[str], timeout: float):
        raise_fd_limit()
        self.task_ids = task_ids
        processes = max(MIN_PROCESSES, -(-len(task_ids) // WAITERS_PER_PROCESS))
        self.shares = [share for w in range(processes) if (share := list(range(w, len(task_ids), processes)))]
        self.procs = [
            subprocess.Popen([sys.executable, "-c", WAITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in self.shares
        ]
        # A process stuck past its own deadline is killed: its waiters then count as unfinished.
        self.watchdogs = [threading.Timer(timeout + GRACE + 30, proc.kill) for proc in self.procs]
        job = {"redis_url": redis_url, "namespace": namespace, "thread_safe": thread_safe, "timeout": timeout}
        for proc, share in zip(self.procs, self.shares):
            self.send(proc, json.dumps({**job, "task_ids": [task_ids[i] for i in share]}))
        self.expect("prepared")
        for proc, watchdog in zip(self.procs, self.watchdogs):
            self.send(proc, "go")
            proc.stdin.close()  # type: ignore[union-attr]  # started with PIPEs
            watchdog.start()

    @staticmethod
    def send(proc: subprocess.Popen, line: str) -> None:
        proc.stdin.write(line + "\n")  # type: ignore[union-attr]  # started with PIPEs
        proc.stdin.flush()  # type: ignore[union-attr]

    def expect(self, what: str) -> None:
        """Every process's next line, which says `what`; killed and raised if one died."""
        if not all(what in proc.stdout.readline() for proc in self.procs):  # type: ignore[union-attr]
            for proc in self.procs:
                proc.kill()
            self.close()
            raise RuntimeError("a Celery waiter process died")

    def subscriptions(self, thread_safe: bool) -> int:
        """The (connection, channel) pairs Redis holds once every waiter is subscribed: one per waiter
        with a backend per thread, one per task a process waits on with a shared backend."""
        if not thread_safe:
            return len(self.task_ids)
        return sum(len({self.task_ids[i] for i in share}) for share in self.shares)

    def redis_connections(self, redis_port: int) -> int:
        """Connections the processes hold to Redis (one whose waiters have all failed has exited)."""
        held = 0
        for proc in self.procs:
            with contextlib.suppress(OSError):
                held += procstats.tcp_connections_to(proc.pid, redis_port)
        return held

    def settle(self, timeout: float = 10.0) -> None:
        """Until the processes are idle (their threads are waiting, not subscribing), at most `timeout`."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            with contextlib.suppress(OSError):
                procstats.wait_until_idle(proc.pid, timeout=max(0.0, deadline - time.monotonic()))

    def collect(self) -> tuple[list[list[Any]], list[str], int]:
        """Records (waiter indexes into task_ids), failures, and how many processes never answered."""
        records: list[list[Any]] = []
        failures: list[str] = []
        lost = 0
        for proc, share in zip(self.procs, self.shares):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                lost += 1
                continue
            reply = json.loads(line)
            records += [[share[i], value, t] for i, value, t in reply["records"]]
            failures += reply["failures"]
        return records, failures, lost

    def close(self, timeout: float = 10.0) -> None:
        """Ten seconds for them all to exit (they do once they answered), then the rest are killed."""
        deadline = time.monotonic() + timeout
        for proc, watchdog in zip(self.procs, self.watchdogs):
            watchdog.cancel()
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]

    def __enter__(self) -> Waiters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_subscribed(client: redis.Redis, channels: list[str], expected: int, timeout: float) -> int:
    """Until Redis holds `expected` subscriptions to the channels, or none was added for STALL seconds
    (the rest failed to connect, or are still retrying); how many it holds."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        held = sum(count for _, count in client.pubsub_numsub(*channels))
        now = time.monotonic()
        if held >= expected or now > deadline:
            return held
        if held != last:
            last, since = held, now
        elif now - since > STALL:
            return held
        time.sleep(0.05)


def measure_shape(redis_url: str, namespace: str, thread_safe: bool, shape: Shape, timeout: float) -> dict[str, Any]:
    """Latency from each store_result() to each of its waiters' get() returning, and what went wrong."""
    backend = celery_app(redis_url, namespace, thread_safe).backend
    backend.client.ping()  # connected before the waiters take Redis's connections
    task_ids = [str(uuid.uuid4()) for _ in range(shape.tasks)]
    waiting_on = [task_ids[i % shape.tasks] for i in range(shape.waiters)]
    channels = [backend.get_key_for_task(task_id) for task_id in task_ids]
    with Waiters(redis_url, namespace, thread_safe, waiting_on, timeout) as waiters:
        expected = waiters.subscriptions(thread_safe)
        # Half the get()s' timeout at most: published before the subscribed waiters time out.
        subscribed = wait_subscribed(backend.client, channels, expected, timeout / 2)
        waiters.settle()
        connections = waiters.redis_connections(urlparse(redis_url).port or 6379)
        published: dict[str, float] = {}
        for task_id in task_ids:
            published[task_id] = time.perf_counter()
            backend.store_result(task_id, {"task_id": task_id}, states.SUCCESS)
            if shape.tasks > 1:
                time.sleep(SPREAD_GAP)
        records, failures, lost = waiters.collect()
    backend.client.connection_pool.disconnect()
    return {
        **shape_figures(waiting_on, published, records, failures),
        "tasks": shape.tasks,
        "waiters": shape.waiters,
        "subscriptions": {"expected": expected, "held_before_publish": subscribed},
        "processes": len(waiters.procs),
        "redis_connections": connections,
        "lost_processes": lost,
    }


def shape_figures(waiting_on: list[str], published: dict[str, float], records: list[list[Any]], failures: list[str]) -> dict[str, Any]:
    """Percentiles of the waiters that got their own task's value once; the others counted: `wrong`
    (another value, or a second arrival), `errors` (get() raised, by kind), `unfinished` (neither)."""
    latencies: list[float] = []
    heard: set[int] = set()
    wrong = 0
    for index, value, t in records:
        task_id = waiting_on[index]
        if index in heard or value != {"task_id": task_id}:
            wrong += 1
            continue
        heard.add(index)
        latencies.append(t - published[task_id])
    kinds = Counter(failure.split(":", 1)[0] for failure in failures)
    unfinished = len(waiting_on) - len({record[0] for record in records}) - len(failures)
    figures = percentiles(latencies) if latencies else {"n": 0, "error": "no waiter got its result"}
    return {
        **figures,
        "errors": len(failures),
        "error_kinds": dict(kinds),
        "first_error": failures[0] if failures else None,
        "wrong": wrong,
        "unfinished": max(0, unfinished),
    }


def bench_celery(redis_url: str, quick: bool, namespace: str | None = None) -> dict[str, Any]:
    """Each shape under both configurations; per configuration, shape → percentiles and counts, and
    `errors`: per configuration, what went wrong (get() raised, a wrong or second value, no answer).
    Keys and channels under `namespace:` (a fresh one by default), dropped at the end."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    timeout = QUICK_TIMEOUT if quick else FULL_TIMEOUT
    namespace = namespace or f"runbell-bench-celery-{uuid.uuid4().hex[:8]}"
    report: dict[str, Any] = {
        "celery": celery.__version__,
        "configs": {
            "default": "Celery's defaults (a backend per thread)",
            "thread_safe": f"result_backend_thread_safe=True, redis_max_connections={POOL_SIZE}",
        },
        "waiters_per_process": WAITERS_PER_PROCESS,
        "publish_gap_ms": SPREAD_GAP * 1e3,
    }
    report.update({config: {} for config in CONFIGS})
    try:
        for shape in shapes:
            for config, thread_safe in CONFIGS.items():
                say(f"Celery ({config}): {shape.waiters} waiters on {shape.tasks} task(s)")
                report[config][shape.name] = measure_shape(redis_url, namespace, thread_safe, shape, timeout)
    finally:
        drop_namespace(redis_url, namespace)
    report["errors"] = {
        config: sum(figures["errors"] + figures["wrong"] + figures["unfinished"] for figures in report[config].values())
        for config in CONFIGS
    }
    return report
