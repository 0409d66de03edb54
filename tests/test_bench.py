"""`runbell bench`'s pieces, checked for correctness against a real gateway: the load generator's protocol,
the floor, what is read from /proc, the report's goals, the charts. No timing is asserted: figures
belong to the bench's report, not to a test."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runbell.service.bench import Plan, bench_store, delivery, procstats, run
from runbell.service.bench.delivery import (
    Room,
    Target,
    caller_path,
    capacity,
    collect,
    crowd,
    early_waiters,
    gateway_room,
    new_run_id,
    plan_steps,
    polling,
    spread,
)
from runbell.service.bench.floor import bench_fanout_floor, bench_floor, bench_memory_floor
from runbell.service.bench.loadgen import LoadGen, parse_response, source_addresses
from runbell.service.bench.measure import percentiles, report_head
from runbell.service.bench.recorder_rate import drain
from runbell.service.bench.report import (
    GOALS,
    draw_charts,
    failures,
    judge,
    judge_matrix,
    ratios,
    redraw,
    scale_out_summary,
    summary,
    summary_markdown,
    uvicorn_floor_note,
)
from runbell.service.bench.scaleout import QUICK_SCALE_OUT, ScaleOutPlan, run_scale_out
from runbell.service.bench.stores import store_matrix


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


def test_an_empty_sample_is_a_failed_measurement_that_everything_downstream_reports(tmp_path: Path):
    """percentiles([]) used to raise IndexError and end the whole bench: now the figure is a failed
    measurement, its goals are failed (not "not measured"), and the ratios, the tables and the charts
    go on without it."""
    assert percentiles([]) == {"n": 0, "error": "no samples"}
    empty = percentiles([], "1000 of 1000 callers of decided runs never had the outcome")
    assert empty == {"n": 0, "error": "no samples: 1000 of 1000 callers of decided runs never had the outcome"}
    assert ratios(empty, {"p50_ms": 0.1, "p99_ms": 0.2}) == {"p50": None, "p99": None}
    sparse = {"callers": 1000, "runs": 1000, "decided_runs": 200, "latency": empty, "missing": 1000, "ratio_to_floor": ratios(empty, empty)}
    report = report_with(long_poll={"sparse": sparse})
    verdicts = {g["goal"]: g for g in judge(report)}
    for q in ("p50", "p99"):
        goal = verdicts[f"publish→waiter {q}, long-poll, one caller per run, all on one process"]
        assert (goal["measured"], goal["met"], goal["error"]) == (None, False, empty["error"])
    assert verdicts["publish→waiter p50, SSE, one caller per run, all on one process"]["met"] is None  # not measured: no error
    assert "FAILED: no samples: 1000 of 1000" in summary({**report, "goals": judge(report)})
    assert draw_charts({"floor": [0.0001], "long_poll_sparse": [], "crowd_sse_1000": []}, tmp_path) == ["latency_cdf.png"]


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


def test_the_memory_floor_is_bare_uvicorn_holding_as_many_streams():
    floor = bench_memory_floor(300)
    assert floor["connections"] == 300 and floor["rss_after_kib"] > floor["rss_before_kib"] > 0, floor
    assert floor["kib_per_connection"] == round((floor["rss_after_kib"] - floor["rss_before_kib"]) / 300, 2)


def test_the_summary_says_what_bare_uvicorn_costs_or_why_it_is_not_known():
    assert uvicorn_floor_note({"connections": 10, "kib_per_connection": 8.75}) == "bare uvicorn holding as many streams: 8.75 KiB each"
    assert uvicorn_floor_note({"error": "the memory floor failed: OSError: x"}) == "the memory floor failed: OSError: x"
    assert uvicorn_floor_note(None) == "bare uvicorn not measured"
    text = summary(
        report_with(capacity={"connections_held": 10_000, "kib_per_connection": 20.0, "uvicorn_floor": {"kib_per_connection": 8.75}})
    )
    assert "20.0 KiB each on average" in text and "bare uvicorn holding as many streams: 8.75 KiB each" in text


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
    assert verdicts["idle SSE connections held by one process (issue 14)"] is False  # 10,000 of 50,000
    assert verdicts["recorder throughput, PostgreSQL"] is None  # not part of this report
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


def test_the_scale_out_bench_records_every_event_and_reaches_every_client(redis_url, tmp_path: Path):
    """A small plan through the whole mode: each measurement's events all in the store (exactly: its
    rows counted), every SSE client had every event over 1 gateway and over 3, every ratio and per-core
    figure there and finite, the files written and the tables printed. 2,000 events (ten of the
    recorder's reads of 200) and 900 deliveries per gateway count: enough CPU time to show in /proc's
    10 ms units."""
    plan = ScaleOutPlan(
        events=2000, events_per_run=10, partitions=(1, 4), recorders=(2,), clients=90, gateways=(1, 3), fanout_events=10, rounds=1
    )
    report = run_scale_out(tmp_path, redis_url, quick=True, plan=plan)
    scale = report["scale_out"]
    rows = scale["recorder"]["rows"]
    assert [(row["partitions"], row["recorders"]) for row in rows] == [(1, 2), (4, 2)]
    for row in rows:
        assert row["stored"] == row["events"] == 2000 and row["recorded_exactly"]
        for name in ("events_per_s", "events_per_cpu_s", "ratio_to_1_partition", "ratio_to_1_recorder", "cores_used"):
            assert row[name] is not None and math.isfinite(row[name]) and row[name] > 0, (name, row)
    fanout = scale["fanout"]["by_gateways"]
    assert set(fanout) == {"1", "3"}
    assert (fanout["1"]["clients_per_gateway"], fanout["3"]["clients_per_gateway"]) == ([90], [30, 30, 30])  # dealt round-robin
    for row in fanout.values():
        assert (row["deliveries"], row["missing"], row["all_delivered"]) == (900, 0, True)
        assert row["latency"]["n"] == 900 and len(row["time_to_last_ms"]) == 10
        assert row["cpu_s_per_1000_deliveries"] is not None and math.isfinite(row["cpu_s_per_1000_deliveries"]), row
    assert all(r is not None and math.isfinite(r) for r in fanout["3"]["ratio_to_1_gateway"].values()), fanout
    assert all(v is not None and math.isfinite(v) for v in scale["per_core"]["fanout_deliveries_per_cpu_s"].values()), scale
    assert math.isfinite(scale["per_core"]["recorder_events_per_cpu_s"])
    samples = json.loads((tmp_path / "scale_out_samples.json").read_text())
    assert len(samples["fanout"]["gateways_3"]) == 900 and set(samples["recorder_progress"]) == {"p1_r2", "p4_r2"}
    assert json.loads((tmp_path / "scale_out.json").read_text())["scale_out"] == scale
    text = scale_out_summary(report)
    assert "events/CPU-s" in text and "deliveries/CPU-s" in text


def test_a_report_names_its_database_without_the_password(redis_url, tmp_path: Path):
    head = report_head(tmp_path / "out", True, QUICK_SCALE_OUT, redis_url, "postgresql://bench:secret@db:5432/runbell")
    assert head["database"] == "postgresql://bench:***@db:5432/runbell" and (tmp_path / "out").is_dir()


def matrix_report() -> dict:
    """A matrix report as run() writes it (made-up figures): SQLite measured, PostgreSQL not reachable."""
    own = report_with()
    shared = {key: own.pop(key) for key in ("plan", "floor", "hook_publish")}
    sqlite = {**own, "database": "sqlite (a fresh file per gateway)", "recorder": {"events": 1000, "handled": 1000, "events_per_s": 2500.0}}
    unreachable = {"database": "postgresql://postgres@127.0.0.1:1/postgres", "error": "PostgreSQL at ... not reachable: OSError"}
    return {**shared, "quick": True, "databases": {"sqlite": sqlite, "postgresql": unreachable}}


def test_summary_md_has_a_row_per_goal_and_database():
    report = matrix_report()
    report["goals"] = judge_matrix(report)
    text = summary_markdown(report)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| goal ")]
    by_database: dict[str, list[str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        by_database.setdefault(cells[1], []).append(cells[0])
    shared = [g.name for g in GOALS if g.shared]
    assert by_database["-"] == shared
    for database in ("sqlite", "postgresql"):
        expected = [g.name for g in GOALS if not g.shared and g.database in (None, database)]
        constancy = ["Redis connections and SQL statements per second do not grow with waiters"] if database == "sqlite" else []
        assert by_database[database] == ["`runbell bench` completes on this database", *expected, *constancy]
    verdicts = {(g["database"], g["goal"]): g for g in report["goals"]}
    assert verdicts[("sqlite", "recorder throughput, SQLite")]["met"] is True  # 2,500 events/s
    assert verdicts[("sqlite", "`runbell bench` completes on this database")]["met"] is True
    assert verdicts[("sqlite", "idle SSE connections held by one process")]["met"] is True  # 10,000
    assert verdicts[("sqlite", "idle SSE connections held by one process (issue 14)")]["met"] is False  # not 50,000
    # PostgreSQL not reachable: every goal of it a failed measurement, saying why; not a crash
    postgres = [g for g in report["goals"] if g["database"] == "postgresql"]
    assert all(g["met"] is False for g in postgres)
    assert all("not reachable" in g["error"] for g in postgres if g["goal"] != "`runbell bench` completes on this database")
    assert "- postgresql: every measurement: PostgreSQL at ... not reachable: OSError" in text
    assert "FAILED, nothing measured: PostgreSQL at ... not reachable" in summary(report)
    assert "## Not measured by this bench" in text


def test_postgresql_not_reachable_is_a_failed_measurement_not_a_crash(redis_url):
    sqlite, postgres = store_matrix("postgresql://postgres@127.0.0.1:1/postgres")
    assert (sqlite.name, sqlite.unreachable) == ("sqlite", None)
    assert postgres.name == "postgresql" and "not reachable" in (postgres.unreachable or "")
    figures, samples = bench_store(redis_url, postgres, TINY, {})
    assert figures == {"database": postgres.described, "error": postgres.unreachable} and samples == {}
    with pytest.raises(ValueError, match="names the PostgreSQL server"):
        store_matrix("sqlite:///elsewhere.db")


def test_the_recorder_catch_up_wait_waits_until_the_store_holds_every_event(served_gateway, redis_url, namespace, tmp_path: Path):
    """A gateway without a recorder: its store lags the events for as long as no recorder runs. The
    wait does not return while they are not recorded, and returns once another recorder (started later)
    has recorded them all: then the store has every run, with its outcome."""
    database = f"sqlite:///{tmp_path / 'lagging.db'}"
    served = served_gateway(RUNBELL_RECORDER="false", RUNBELL_DATABASE_URL=database)
    target = Target.of(served.process, served.port, redis_url, namespace)
    run_ids = [new_run_id("lag") for _ in range(5)]
    for run_id in run_ids:
        target.publish(run_id, "running")
        target.publish_result(run_id)
    events = 2 * len(run_ids)
    assert target.backlog() == events
    with pytest.raises(TimeoutError, match=f"{events} events not recorded yet"):
        target.wait_until_recorded(timeout=0.5)
    recorded = {}

    def record_later() -> None:
        time.sleep(0.5)
        recorded.update(asyncio.run(drain(redis_url, database, namespace, events)))

    recorder = threading.Thread(target=record_later)
    recorder.start()
    waited = target.wait_until_recorded(timeout=60)
    assert recorded["handled"] == events  # the wait returned only after the recorder had handled them all
    recorder.join()
    assert waited["behind"] == events and target.backlog() == 0
    for run_id in run_ids:
        answer = target.http.get(f"/v1/dags/bench/runs/{run_id}")
        assert answer.status_code == 200 and answer.json()["outcome"] == "success", answer.text  # its result recorded
    target.http.close()
    target.redis.close()


TINY = Plan(
    hook_publishes=20,
    first_in_process=1,
    floor_messages=20,
    single_rounds=2,
    crowds=(3, 6),
    crowd_rounds=1,
    fanout_events=1,
    spread=(6, 3),
    sparse=(6, 3),
    spread_gap=0.0,
    capacity_steps=(5, 10),
    early=(3, 0.02),
    burst=(4, 2, 8),
    polling=(2, 1),
    resources_window=0.2,
    webhook_rounds=2,
    webhook_burst=5,
    recorder_events=100,
    recorder_runs=5,
)


def test_a_matrix_run_measures_sqlite_and_postgresql_in_one_call(redis_url, postgres_url, tmp_path: Path):
    """The whole bench with a tiny plan, on SQLite and on the test's PostgreSQL server: every measurement
    made on both (none failed), every caller heard its outcome, every event recorded, the files written
    and the summary's goals judged per database."""
    report = run(tmp_path, redis_url, quick=True, database_url=postgres_url, plan=TINY)
    assert list(report["databases"]) == ["sqlite", "postgresql"]
    for name, figures in report["databases"].items():
        assert failures(figures) == [], (name, failures(figures))
        assert (figures["recorder"]["handled"], figures["recorder"]["caught_up"]) == (100, True)
        for via in ("long_poll", "sse"):
            assert (figures[via]["1"]["latency"]["n"], figures[via]["1"]["missing"]) == (2, 0)
            assert (figures[via]["6"]["latency"]["n"], figures[via]["6"]["missing"]) == (6, 0)
            assert (figures[via]["sparse"]["latency"]["n"], figures[via]["sparse"]["decided_runs"]) == (3, 3)
            assert (figures[via]["spread"]["latency"]["n"], figures[via]["spread"]["missing"]) == (6, 0)
        assert {kind: figures["polling"][kind]["n"] for kind in ("long-poll", "sse", "poll_1s", "poll_0.1s")} == dict.fromkeys(
            ("long-poll", "sse", "poll_1s", "poll_0.1s"), 2
        )
        assert figures["polling"]["recorder_caught_up"]["waited_s"] >= 0 and "recorder_caught_up" in figures["webhooks"]
        assert figures["throughput"]["all_delivered"] and figures["webhooks"]["latency"]["n"] == 2
        assert figures["capacity"]["connections_held"] == 10
        for n in ("5", "10"):  # memory, and fan-out against the floor of as many sockets, at each step
            step = figures["capacity"]["by_step"][n]
            assert (step["held"], step["fanout_missing"]) == (int(n), 0) and step["ratio_to_floor"] is not None, step
        for via in ("long_poll", "sse"):
            early = figures["early_waiter"][via]
            assert (early["early"]["latency"]["n"], early["settled"]["latency"]["n"], early["early"]["missing"]) == (3, 3, 0)
        assert figures["long_poll_over_sse"]["ratio"] is not None
    completes = {g["database"]: g["met"] for g in report["goals"] if g["goal"] == "`runbell bench` completes on this database"}
    assert completes == {"sqlite": True, "postgresql": True}
    text = (tmp_path / "summary.md").read_text()
    for goal in GOALS:
        databases = ["-"] if goal.shared else [d for d in ("sqlite", "postgresql") if goal.database in (None, d)]
        for database in databases:
            assert f"| {goal.name} | {database} |" in text
    assert set(report["files"]) >= {
        "report.json",
        "samples.json",
        "summary.md",
        "latency_cdf_sqlite.png",
        "latency_cdf_postgresql.png",
        "capacity_sqlite.png",
        "capacity_postgresql.png",
    }
    assert json.loads((tmp_path / "report.json").read_text())["goals"] == report["goals"]
    assert sorted(redraw(tmp_path)) == sorted(name for name in report["files"] if name.endswith(".png"))
    assert "postgresql:" in summary(report) and summary_markdown(report) in summary(report)


def test_runbell_is_judged_against_each_celery_shape_and_configuration():
    from runbell.service.bench.report import celery_rows

    report = {
        "celery": {
            "default": {"one_result_1000": {"n": 1000, "p50_ms": 36.0, "p99_ms": 70.0}},
            "thread_safe": {
                "one_result_10000": {"n": 0, "error": "no samples: every get() timed out"},
                "one_per_task_1000": {"n": 1000, "p50_ms": 2.0, "p99_ms": 12.0},
            },
        }
    }
    figures = {
        "long_poll": {
            "1000": {"latency": {"p50_ms": 30.0, "p99_ms": 84.0}},
            "10000": {"latency": {"p50_ms": 100.0, "p99_ms": 150.0}},
            "sparse": {"latency": {"p50_ms": 1.0, "p99_ms": 3.0}},
        }
    }
    rows = {(r["goal"].split(" against ")[0], r["goal"].split(", ")[1]): (r["measured"], r["met"]) for r in celery_rows(report, figures)}
    assert rows[("p50", "one result 1000 (Runbell long-poll")] == (0.833, True)
    assert rows[("p99", "one result 1000 (Runbell long-poll")] == (1.2, False)
    assert rows[("p50", "one per task 1000 (Runbell long-poll")] == (0.5, True)
    assert rows[("p99", "one per task 1000 (Runbell long-poll")] == (0.25, True)
    none = rows[("p50", "one result 10000 (Runbell long-poll")]
    assert none[1] is True and "Celery delivered none" in none[0] and "timed out" in none[0]
    assert len(rows) == 6
    assert celery_rows({"celery": {"error": "ImportError: no celery"}}, figures) == []


# -- idle connections in steps, beyond the open-file limit; the loopback source addresses -------------


def test_steps_beyond_the_room_are_reported_with_why_and_the_largest_that_fits_is_measured():
    room = Room(19_877, "the gateway process's open-file limit is 20000")
    measured, beyond = plan_steps((1000, 10_000, 20_000, 50_000), room)
    assert measured == [1000, 10_000, 19_877]
    assert set(beyond) == {20_000, 50_000}
    assert all(why == "not measurable here: the gateway process's open-file limit is 20000" for why in beyond.values())
    assert plan_steps((1000, 10_000), room) == ([1000, 10_000], {})  # all fit: nothing in place of
    assert plan_steps((1000, 19_877, 50_000), room)[0] == [1000, 19_877]  # the largest that fits is a step already
    assert plan_steps((1000, 2000), Room(500, "why"))[0] == [500]  # not even the first: the most there is


def test_the_room_is_read_from_the_gateway_processs_own_limit():
    """A process with a lower open-file limit than this one's: its limit, read from /proc, not ours."""
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(ours[0], 400)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, ours[1])),
    )
    try:
        room = gateway_room(child.pid)
        held = procstats.open_files(child.pid)
        assert procstats.open_file_limit(child.pid) == (lowered, ours[1])
        assert room.connections == lowered - held - delivery.GATEWAY_FILES_KEPT
        assert f"open-file limit is {lowered} (hard {ours[1]}; /proc/{child.pid}/limits)" in room.why
    finally:
        child.kill()
        child.wait()


def test_connections_beyond_one_addresss_ports_are_spread_over_loopback_addresses():
    assert source_addresses(20_000, 28_232) == [None]  # fits: the kernel's own choice, as before
    assert source_addresses(50_000, 28_232) == ["127.0.0.2", "127.0.0.3"]  # 90% of 28,232 ports each
    many = source_addresses(300_000, 1000)  # 900 usable each
    assert len(many) == 334 and many[0] == "127.0.0.2" and many[254] == "127.0.1.0"


def peer_addresses(pid: int, port: int) -> list[str]:
    """The remote addresses of the established connections to `port` (the process's listening port)."""
    peers = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
            peers.append(str(ipaddress.IPv4Address(int(remote.split(":")[0], 16).to_bytes(4, "little"))))
    return peers


def test_the_load_generator_connects_from_each_source_address_in_turn(target):
    run_id = new_run_id("sources")
    target.publish(run_id, "running")
    with LoadGen(target.host, target.port, workers=2, sources=["127.0.0.2", "127.0.0.3"]) as gen:
        assert gen.open("sse", [caller_path("sse", run_id)] * 6)["opened"] == 6
        assert sorted(peer_addresses(target.pid, target.port)) == ["127.0.0.2"] * 3 + ["127.0.0.3"] * 3
        task = target.publish(run_id, "running", task_id="step")
        assert gen.await_events("task", 1, timeout=10)  # served as any other connection
        arrivals, _ = gen.collect(timeout=0)
    assert sum(1 for a in arrivals if (a.event, a.seq) == ("task", task.seq)) == 6


def test_capacity_measures_the_steps_that_fit_and_reports_the_others(gen, target, monkeypatch):
    """With room for 8 (as if the gateway's open-file limit allowed 8): 5 and 8 measured (memory, then
    fan-out to as many on one run against the floor), 10 and 20 reported as not measurable, with why."""
    monkeypatch.setattr(delivery, "gateway_room", lambda pid: Room(8, "a limit of 8 for this test"))
    floors: list[int] = []
    memory_floors: list[int] = []

    def memory_floor(n: int) -> dict:
        memory_floors.append(n)
        return {"connections": n, "kib_per_connection": 9.0}

    figures = capacity(gen, target, (5, 10, 20), lambda n: floors.append(n) or [1.0, 2.0, 3.0], fanout_events=2, memory_floor=memory_floor)
    assert floors == [5, 8] and figures["connections_held"] == 8 and figures["room"]["connections"] == 8
    assert memory_floors == [8] and figures["uvicorn_floor"] == {"connections": 8, "kib_per_connection": 9.0}  # at the largest held
    steps = figures["by_step"]
    assert list(steps) == ["5", "8", "10", "20"]
    for n in ("5", "8"):
        assert (steps[n]["held"], steps[n]["fanout_missing"], len(steps[n]["fanout_ms"])) == (int(n), 0, 2), steps[n]
        assert steps[n]["rss_kib"] > 0 and steps[n]["floor_median_ms"] == 2.0 and steps[n]["ratio_to_floor"] is not None
    assert steps["10"] == {"connections": 10, "not_measurable": "not measurable here: a limit of 8 for this test"}
    target.wait_for_metric("runbell_sse_clients", lambda value: value == 0, timeout=10)  # every set let go


def test_an_unreachable_step_is_in_the_summary_with_its_reason():
    report = matrix_report()
    sqlite = report["databases"]["sqlite"]
    why = "not measurable here: the gateway process's open-file limit is 20000 (hard 20000)"
    sqlite["capacity"] = {
        **sqlite["capacity"],
        "by_step": {
            "1000": {"connections": 1000, "rss_kib": 1, "kib_per_connection": 20.0, "fanout_median_ms": 9.0, "ratio_to_floor": 1.5},
            "19877": {"connections": 19_877, "rss_kib": 1, "kib_per_connection": 15.0, "fanout_median_ms": 300.0, "ratio_to_floor": 2.5},
            "50000": {"connections": 50_000, "not_measurable": why},
            "5000": {"connections": 5000, "rss_kib": 1, "kib_per_connection": 14.0, "fanout_error": "RuntimeError: 3 could not connect"},
        },
    }
    report["goals"] = judge_matrix(report)
    verdicts = {g["goal"]: g for g in report["goals"] if g["database"] == "sqlite"}
    assert verdicts["resident memory per idle SSE connection at 1,000"]["met"] is False  # 20 KiB
    assert verdicts["resident memory per idle SSE connection at 19,877"]["met"] is True  # 15 KiB
    assert verdicts["one event to 1,000 SSE clients of one run, over raw socket writes to as many"]["met"] is True  # 1.5×
    assert verdicts["one event to 19,877 SSE clients of one run, over raw socket writes to as many"]["met"] is False  # 2.5×
    assert verdicts["resident memory per idle SSE connection at 5,000"]["met"] is True  # its fan-out's failure is not its own
    fanout_failed = verdicts["one event to 5,000 SSE clients of one run, over raw socket writes to as many"]
    assert (fanout_failed["met"], fanout_failed["error"]) == (False, "RuntimeError: 3 could not connect")
    unreachable = verdicts["idle SSE connections at 50,000: memory and fan-out"]
    assert (unreachable["measured"], unreachable["met"]) == (why, None)
    text = summary_markdown(report)
    assert f"| idle SSE connections at 50,000: memory and fan-out | sqlite | 50,000 held | {why} | 50000 | - | not measured |" in text
    assert f"- sqlite: 50,000 idle SSE connections: {why}" in text.split("## Not measured by this bench")[1]
    assert why in summary(report)  # the printed figures say it too


def test_charts_show_memory_and_fanout_against_connections(tmp_path: Path):
    steps = [
        {"connections": 1000, "kib_per_connection": 30.0, "fanout_median_ms": 10.0, "floor_median_ms": 4.0},
        {"connections": 19_877, "kib_per_connection": 25.0, "fanout_median_ms": 300.0, "floor_median_ms": None},
    ]
    assert draw_charts({"capacity": steps}, tmp_path, database="sqlite") == ["capacity_sqlite.png"]
    assert (tmp_path / "capacity_sqlite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("via", ["long-poll", "sse"])
def test_early_callers_each_connect_before_their_result_and_all_hear_it(gen, target, via):
    """Each caller opened 0.2 s before its run's result is published, the publishes paced: every one
    heard its own outcome, after it was published, and connected before it; as many settled callers
    beside them, on the same gateway."""
    figures, samples = early_waiters(gen, target, via, callers=4, gap=0.02, lead=0.2)
    assert (figures["early"]["missing"], figures["settled"]["missing"]) == (0, 0)
    assert (len(samples["early"]), len(samples["settled"])) == (4, 4)
    assert all(latency > 0 for latency in samples["early"] + samples["settled"])  # heard after the publish
    assert figures["connected_before_publish"]["n"] == 4 and figures["connected_before_publish"]["max_ms"] > 0  # each before it
    assert figures["ratio"]["p50"] is not None and figures["ratio"]["p99"] is not None
    target.wait_for_metric(delivery.GAUGES[via], lambda value: value == 0, timeout=10)
