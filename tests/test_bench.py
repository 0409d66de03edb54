"""`runbell bench`'s pieces, checked for correctness against a real gateway: the load generator's protocol,
the floor, what is read from /proc, the report's goals, the charts. No timing is asserted: figures
belong to the bench's report, not to a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runbell.service.bench import procstats
from runbell.service.bench.delivery import (
    Target,
    caller_path,
    collect,
    crowd,
    new_run_id,
    polling,
    spread,
)
from runbell.service.bench.floor import bench_fanout_floor, bench_floor
from runbell.service.bench.loadgen import LoadGen, parse_response
from runbell.service.bench.measure import percentiles
from runbell.service.bench.report import (
    GOALS,
    draw_charts,
    judge,
    ratios,
    redraw,
    summary,
)


@pytest.fixture
def target(served_gateway, redis_url, namespace):
    served = served_gateway()
    target = Target.of(served.process, served.port, redis_url, namespace)
    yield target
    target.http.close()
    target.redis.close()


@pytest.fixture
def gen(target):
    with LoadGen(target.host, target.port, workers=2) as gen:
        yield gen


def test_percentiles_pick_from_the_sorted_samples():
    figures = percentiles([0.003, 0.001, 0.002, 0.010])
    assert figures == {"n": 4, "p50_ms": 3.0, "p99_ms": 10.0, "max_ms": 10.0, "mean_ms": 4.0}


def test_a_response_is_parsed_once_its_body_is_whole():
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    assert parse_response(head + b"abc") is None
    assert parse_response(head + b"abcdeHTTP") == (200, b"abcde", b"HTTP")


def test_long_poll_waiters_in_worker_processes_get_the_outcome(gen, target):
    run_id = new_run_id("lp")
    target.publish(run_id, "running")
    assert gen.open("long-poll", [caller_path("long-poll", run_id)] * 5) == {"opened": 5, "failed": 0, "error": None}
    target.wait_for_metric("runbell_waiters", lambda value: value >= 5)
    published = target.publish_result(run_id)
    arrivals = collect(gen, "long-poll")
    assert sorted(a.path for a in arrivals) == [0, 1, 2, 3, 4]  # paths dealt over both workers, indexed in order
    assert {a.event for a in arrivals} == {"outcome"}
    assert all(a.t > published.t for a in arrivals)  # one clock across processes


def test_sse_clients_get_each_event_with_its_seq(gen, target):
    run_id = new_run_id("sse")
    target.publish(run_id, "running")
    gen.open("sse", [caller_path("sse", run_id)] * 4)  # answers once each stream's first comment came
    task = target.publish(run_id, "running", task_id="step")
    assert gen.await_events("task", 1, timeout=10)
    result = target.publish_result(run_id)
    target.publish(run_id, "success")
    arrivals, unfinished = gen.collect(timeout=10)  # every stream ends after `end`
    assert unfinished == 0
    by_event = {(a.event, a.seq) for a in arrivals}
    assert by_event == {
        ("run", 1),
        ("task", task.seq),
        ("task", result.seq),
        ("outcome", result.seq),
        ("run", result.seq + 1),
        ("end", result.seq + 1),
    }
    assert len(arrivals) == 4 * len(by_event)


def test_a_collect_closes_its_connections_and_the_next_batch_starts_clean(gen, target):
    gen.open("sse", [caller_path("sse", new_run_id("idle")) for _ in range(3)])
    arrivals, unfinished = gen.collect(timeout=0)
    assert (arrivals, unfinished) == ([], 3)
    figures, samples = crowd(gen, target, "long-poll", 3, rounds=2, resources_window=0.2)
    assert figures["latency"]["n"] == 6 and figures["missing"] == 0 and len(samples["latency"]) == 6
    assert figures["resources"]["redis_connections"] >= 1


def test_pollers_and_runbell_hear_the_same_outcomes(gen, target):
    figures, samples = polling(gen, target, runs=3, rounds=1, gap=0.01, intervals=(0.2, 0.05))
    assert {kind: len(s) for kind, s in samples.items()} == {"long-poll": 3, "sse": 3, "poll_0.2s": 3, "poll_0.05s": 3}
    assert figures["store_read"] == "GET /v1/dags/{dag_id}/runs/{run_id}"


def test_the_gateway_is_read_from_proc(target):
    assert procstats.rss_kib(target.pid) > 10_000
    assert procstats.tcp_connections_to(target.pid, target.redis_port) >= 2  # pub/sub and the recorder at least
    assert procstats.cpu_seconds(target.pid) > 0
    assert procstats.wait_until_idle(target.pid, timeout=5) < 5
    target.wait_until_recorded(timeout=5)  # no events yet
    target.publish(new_run_id("recorded"), "running")
    target.wait_until_recorded(timeout=10)


def test_the_floor_is_measured_in_another_process(redis_url):
    samples = bench_floor(redis_url, 20, gap=0.0)
    assert len(samples) == 20 and all(0 < s < 5 for s in samples)


def test_the_fanout_floor_reaches_every_socket_each_round():
    assert len(bench_fanout_floor(clients=5, rounds=2)) == 2


def report_with(**overrides):
    """A report as run() writes it, with made-up figures (only the shape matters here)."""
    latency = {"n": 10, "p50_ms": 0.5, "p99_ms": 2.0, "max_ms": 3.0, "mean_ms": 0.7}
    report = {
        "plan": {"capacity_steps": [5000, 10_000]},
        "floor": {"n": 10, "p50_ms": 0.1, "p99_ms": 0.2, "max_ms": 0.3, "mean_ms": 0.1},
        "hook_publish": {"warm": {**latency, "p99_ms": 0.4}, "first_in_process": latency},
        "long_poll": {"spread": {"callers": 10_000, "runs": 1000, "latency": latency, "ratio_to_floor": ratios(latency, latency)}},
        "sse": {"spread": {"callers": 10_000, "runs": 1000, "latency": {**latency, "p99_ms": 7.0}}},
        "capacity": {"connections_held": 10_000, "kib_per_connection": 30.0},
        "fanout": {
            "by_clients": {"10000": {"median_ms": 120.0, "time_to_last_ms": [120.0]}},
            "largest": {"clients": 10_000, "median_ms": 120.0},
        },
        "resources": {"constant": {"redis_connections": True, "db_statements": True, "detail": "Redis connections [3]"}},
    }
    report.update(overrides)
    return report


def test_every_goal_has_its_target_measurement_and_verdict():
    goals = judge(report_with())
    assert len(goals) == len(GOALS) + 1  # and the resources' constancy
    verdicts = {g["goal"]: g["met"] for g in goals}
    assert verdicts["publish→waiter p99, SSE, 10 callers per run, all on one process"] is False  # 7.0 ms
    assert verdicts["publish→waiter p50, long-poll, 10 callers per run, all on one process"] is True
    assert verdicts["publish→waiter p50, long-poll, one caller per run, all on one process"] is None  # not measured
    assert verdicts["resident memory per idle SSE connection"] is False  # 30 KiB
    assert verdicts["idle SSE connections held by one process"] is True  # at least 10,000
    assert all(set(g) >= {"target", "unit", "measured", "met", "at_callers"} for g in goals)
    missing = judge(report_with(capacity={}))
    assert {g["goal"]: g["met"] for g in missing}["resident memory per idle SSE connection"] is None
    text = summary({**report_with(), "goals": goals})
    assert "publish→waiter" in text and "goal" in text


def test_ratios_keep_three_significant_digits():
    assert ratios({"p50_ms": 1.0, "p99_ms": 2.0}, {"p50_ms": 300.0, "p99_ms": 0.0}) == {"p50": 0.00333, "p99": None}


def test_charts_are_png_files_and_can_be_redrawn(tmp_path: Path):
    samples = {
        "floor": [0.0001, 0.0002],
        "long_poll_spread": [0.001, 0.002],
        "polling_poll_1s": [0.4, 0.9],
        "crowd_sse_1000": [0.01, 0.05],
        "airflow": {"result": {"runbell": [0.01], "airflow_wait": [3.0]}},
    }
    written = draw_charts(samples, tmp_path, "10000")
    assert written == ["latency_cdf.png", "fanout_cdf.png", "airflow_cdf.png"]
    for name in written:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    (tmp_path / "report.json").write_text(json.dumps(report_with()))
    assert redraw(tmp_path) == written


def test_a_run_without_samples_draws_no_empty_lines(tmp_path: Path):
    assert draw_charts({"floor": [0.0001]}, tmp_path) == ["latency_cdf.png"]


def test_the_airflow_comparison_is_in_the_summary():
    latency = {"n": 3, "p50_ms": 12.0, "p99_ms": 20.0, "max_ms": 20.0, "mean_ms": 13.0}
    cases = {"result": {"runbell_long_poll": latency, "runbell_sse": latency, "airflow_wait": latency, "ratio_p50": 90.5}}
    text = summary({**report_with(airflow={"cases": cases}), "goals": []})
    assert "airflow result: airflow_wait" in text and "airflow result: /wait over Runbell long-poll, p50" in text


def test_callers_of_undecided_runs_are_let_go(gen, target):
    figures, samples = spread(gen, target, "long-poll", callers=6, runs=6, gap=0.0, decided=2)
    assert (figures["decided_runs"], figures["missing"], len(samples["latency"])) == (2, 0, 2)
    target.wait_for_metric("runbell_waiters", lambda value: value == 0, timeout=10)  # none left waiting
