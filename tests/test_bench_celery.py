"""The Celery baseline of `runbell bench` (runbell.service.bench.celery), its quick shapes against the real
Redis: every waiter hears its own task's value once, under both configurations. No timing is asserted."""

from __future__ import annotations

import redis
from celery import states

from runbell.service.bench.celery import CONFIGS, QUICK_SHAPES, bench_celery, celery_app, shape_figures


def test_every_waiter_gets_its_own_tasks_value_once_under_both_configurations(redis_url, namespace):
    report = bench_celery(redis_url, quick=True, namespace=namespace)
    assert set(CONFIGS) == {"default", "thread_safe"}
    for config in CONFIGS:
        assert list(report[config]) == [shape.name for shape in QUICK_SHAPES]
        for shape in QUICK_SHAPES:
            figures = report[config][shape.name]
            assert (figures["tasks"], figures["waiters"]) == (shape.tasks, shape.waiters)
            assert figures["n"] == shape.waiters, figures
            assert (figures["errors"], figures["wrong"], figures["unfinished"], figures["lost_processes"]) == (0, 0, 0, 0), figures
            assert figures["subscriptions"]["held_before_publish"] == figures["subscriptions"]["expected"]
            assert figures["processes"] >= 2  # the waiters are not in one process
    assert report["errors"] == {"default": 0, "thread_safe": 0}
    # Celery's defaults: a backend per thread, two connections per waiter; one shared backend holds fewer.
    for shape in QUICK_SHAPES:
        assert report["default"][shape.name]["redis_connections"] == 2 * shape.waiters
        assert report["thread_safe"][shape.name]["redis_connections"] < 2 * shape.waiters
    assert report["default"][QUICK_SHAPES[1].name]["subscriptions"]["expected"] == QUICK_SHAPES[1].waiters
    assert (
        report["thread_safe"][QUICK_SHAPES[1].name]["subscriptions"]["expected"] == report["thread_safe"][QUICK_SHAPES[1].name]["processes"]
    )
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{namespace}:*")) == []  # the stored results went with the bench
    client.close()


def test_the_results_are_stored_under_the_benchs_namespace(redis_url, namespace):
    backend = celery_app(redis_url, namespace, thread_safe=False).backend
    backend.store_result("t-1", {"task_id": "t-1"}, states.SUCCESS)
    client = redis.Redis.from_url(redis_url)
    try:
        assert [key.decode() for key in client.scan_iter(match=f"{namespace}:*")] == [f"{namespace}:celery-task-meta-t-1"]
        assert backend.get_key_for_task("t-1") == f"{namespace}:celery-task-meta-t-1".encode()  # its channel too
    finally:
        client.delete(f"{namespace}:celery-task-meta-t-1")
        client.close()
        backend.client.connection_pool.disconnect()


def test_a_second_arrival_or_another_value_is_wrong_and_a_silent_waiter_unfinished():
    waiting_on = ["a", "b", "b", "c"]
    published = {"a": 1.0, "b": 2.0, "c": 3.0}
    records = [
        [0, {"task_id": "a"}, 1.5],
        [0, {"task_id": "a"}, 1.6],  # a second arrival
        [1, {"task_id": "a"}, 2.5],  # another task's value
        [2, {"task_id": "b"}, 2.25],
    ]
    figures = shape_figures(waiting_on, published, records, ["ConnectionError: max number of clients reached"])
    assert figures["n"] == 2
    assert (figures["p50_ms"], figures["max_ms"]) == (500.0, 500.0)
    assert figures["wrong"] == 2
    assert figures["errors"] == 1
    assert figures["error_kinds"] == {"ConnectionError": 1}
    assert figures["unfinished"] == 0  # waiter 1 was wrong, waiter 3 raised


def test_no_arrival_at_all_is_reported_not_raised():
    figures = shape_figures(["a", "a"], {"a": 1.0}, [], [])
    assert figures["n"] == 0
    assert figures["error"] == "no waiter got its result"
    assert figures["unfinished"] == 2
