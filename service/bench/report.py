"""The bench's outputs: goals judged against the figures, the summary table, the PNG charts.

Charts are drawn from DIR/samples.json alone, so they can be redrawn (`runbell bench --redraw --out DIR`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sample series drawn on the main chart, in this order: (key in samples.json, legend).
LATENCY_SERIES = (
    ("floor", "floor: Redis PUBLISH → redis-py subscriber, one every 3 ms"),
    ("floor_sparse", "floor, one publish every 50 ms"),
    ("long_poll_1", "Runbell long-poll, 1 waiter"),
    ("sse_1", "Runbell SSE, 1 client"),
    ("long_poll_sparse", "Runbell long-poll, {spread} waiters, one per run"),
    ("sse_sparse", "Runbell SSE, {spread} clients, one per run"),
    ("long_poll_spread", "Runbell long-poll, {spread} waiters, 10 per run"),
    ("sse_spread", "Runbell SSE, {spread} clients, 10 per run"),
    ("long_poll_early", "Runbell long-poll, each waiter arriving 0.5 s before its result"),
    ("sse_early", "Runbell SSE, each client arriving 0.5 s before its result"),
    ("polling_long-poll", "Runbell long-poll, beside the pollers"),
    ("polling_poll_0.1s", "polling the store every 0.1 s"),
    ("polling_poll_1s", "polling the store every 1 s"),
)


# runbell.service.bench.airflow's samples per caller (the others are reference offsets), and its figures' names.
AIRFLOW_CALLERS = {"runbell": "runbell_long_poll", "runbell_sse": "runbell_sse", "airflow_wait": "airflow_wait"}


@dataclass(frozen=True)
class Goal:
    """A target for one figure of the report, found at `path` (and how many callers it was measured
    with at `at`). `database`: a goal of that store only; `shared`: measured once, not per store (it
    does not touch the store)."""

    name: str
    target: float
    unit: str
    path: tuple[str | int, ...]
    at: tuple[str | int, ...] = ()
    at_least: bool = False  # the target is a floor (connections held, events/s), not a ceiling
    database: str | None = None
    shared: bool = False


def dig(report: dict[str, Any], *path: str | int) -> Any:
    """report[path[0]][path[1]]... or None where any step is missing."""
    node: Any = report
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def failure_on(report: dict[str, Any], path: tuple[str | int, ...]) -> str | None:
    """The error of the failed measurement on the way to `path` (a phase that raised, a sample that was
    empty), if any: where a figure is missing because its measurement failed, not because it was not
    part of this run."""
    node: Any = report
    for key in path:
        if isinstance(node, dict) and "error" in node:
            return str(node["error"])
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return str(node["error"]) if isinstance(node, dict) and "error" in node else None


def failures(figures: Any, where: str = "") -> list[str]:
    """Every failed measurement in a report's tree, as "where: error"."""
    if isinstance(figures, dict):
        if "error" in figures:
            return [f"{where or 'every measurement'}: {figures['error']}"]
        return [line for key, value in figures.items() for line in failures(value, f"{where}.{key}" if where else str(key))]
    return []


def median(values: list[float]) -> float | None:
    finite = sorted(v for v in values if v is not None and not math.isnan(v))
    return finite[len(finite) // 2] if finite else None


def latency_goal(via: str, case: str, q: str, target: float) -> Goal:
    name = {"long_poll": "long-poll", "sse": "SSE"}[via]
    where = {"sparse": "one caller per run", "spread": "10 callers per run"}[case]
    return Goal(
        f"publish→waiter {q}, {name}, {where}, all on one process", target, "ms", (via, case, "latency", f"{q}_ms"), (via, case, "callers")
    )


# "No different from a settled waiter": two samples of the same callers, one after the other on this
# shared machine, differ by up to about a third at p99; the early waiter was 30-100× slower.
EARLY_NO_DIFFERENT = 1.5
# Issue 14's targets at each step of idle SSE connections one process holds (capacity_rows()).
STEP_KIB_PER_CONNECTION = 16.0
STEP_FANOUT_OVER_FLOOR = 2.0

# The project's goals, then the rows of issue 14's table that this bench measures (its targets: where
# one is for a figure that already has a goal, both are judged).
GOALS = (
    *(
        latency_goal(via, case, q, target)
        for case in ("sparse", "spread")
        for via in ("long_poll", "sse")
        for q, target in (("p50", 1.0), ("p99", 5.0))
    ),
    Goal(
        "idle SSE connections held by one process",
        10_000,
        "connections",
        ("capacity", "connections_held"),
        ("plan", "capacity_steps", -1),
        at_least=True,
    ),
    Goal("resident memory per idle SSE connection", 25.0, "KiB", ("capacity", "kib_per_connection"), ("capacity", "connections_held")),
    Goal(
        "one event to every SSE client of one run, until the last has it (median)",
        150.0,
        "ms",
        ("fanout", "largest", "median_ms"),
        ("fanout", "largest", "clients"),
    ),
    Goal(
        "idle SSE connections held by one process (issue 14)",
        50_000,
        "connections",
        ("capacity", "connections_held"),
        ("plan", "capacity_steps", -1),
        at_least=True,
    ),
    Goal(
        "resident memory per idle SSE connection (issue 14)",
        16.0,
        "KiB",
        ("capacity", "kib_per_connection"),
        ("capacity", "connections_held"),
    ),
    Goal(
        "one event to every SSE client of one run, over raw socket writes to as many",
        2.0,
        "× raw",
        ("fanout", "largest", "ratio_to_floor"),
        ("fanout", "largest", "clients"),
    ),
    Goal(
        "long-poll waiters on one run, until the last has it, over SSE clients (median)",
        1.0,
        "× SSE",
        ("long_poll_over_sse", "ratio"),
        ("long_poll_over_sse", "callers"),
    ),
    Goal("recorder throughput, SQLite", 2000, "events/s", ("recorder", "events_per_s"), ("recorder", "events"), True, "sqlite"),
    Goal("recorder throughput, PostgreSQL", 5000, "events/s", ("recorder", "events_per_s"), ("recorder", "events"), True, "postgresql"),
    Goal(
        "webhook deliveries to a local receiver, PostgreSQL",
        1000,
        "deliveries/s",
        ("webhooks", "deliveries_per_second"),
        ("webhooks", "burst"),
        True,
        "postgresql",
    ),
    *(
        Goal(
            f"a{name} that arrives 0.5 s before its result, {q} over a settled one's (issue 14)",
            EARLY_NO_DIFFERENT,
            "× settled",
            ("early_waiter", via, "ratio", q),
            ("early_waiter", via, "callers"),
        )
        for via, name in (("long_poll", " long-poll waiter"), ("sse", "n SSE client"))
        for q in ("p50", "p99")
    ),
    Goal("hook publish p99 (warm)", 1.0, "ms", ("hook_publish", "warm", "p99_ms"), shared=True),
)

# Rows of issue 14's table that this bench does not measure: where they are (or will be) measured.
NOT_MEASURED = (
    "with --quick, the Celery comparison (one waiter per task and many waiters on one result, default and "
    "result_backend_thread_safe=True): the full run has it",
)
# Beside them, in summary.md: each capacity step that this machine's limits leave no room for, per database,
# with the limit read (runbell.service.bench.delivery.capacity measures the largest count that fits instead).


def judge(report: dict[str, Any], database: str | None = None, shared: bool | None = None) -> list[dict[str, Any]]:
    """Each goal with its target, what was measured (and at how many callers), and whether it was met
    (None: not measured; False also where its measurement failed, with the error). `database` keeps
    the goals of that store (and those of any); `shared` keeps only the shared goals, or only the others."""
    rows = []
    for goal in GOALS:
        if (database and goal.database not in (None, database)) or shared not in (None, goal.shared):
            continue
        measured = dig(report, *goal.path)
        error = failure_on(report, goal.path) if measured is None else None
        met = None if measured is None else (measured >= goal.target if goal.at_least else measured < goal.target)
        rows.append(
            {
                "goal": goal.name,
                "target": goal.target,
                "unit": goal.unit,
                "at_callers": dig(report, *goal.at) if goal.at else None,
                "comparison": ">=" if goal.at_least else "<",
                "measured": measured,
                "met": False if error else met,
                **({"error": error} if error else {}),
            }
        )
    constant = dig(report, "resources", "constant")
    if constant is not None and not shared:
        rows.append(
            {
                "goal": "Redis connections and SQL statements per second do not grow with waiters",
                "target": "constant",
                "unit": "",
                "comparison": "",
                "at_callers": None,
                "measured": constant["detail"],
                "met": constant["redis_connections"] and constant["db_statements"],
            }
        )
    return rows


# Celery's shapes (runbell.service.bench.celery) and the Runbell figure each is compared with: one waiter
# per task against one caller per run (the sparse case), many on one result against a crowd of as many.
CELERY_CONFIGS = {"default": "Celery's defaults", "thread_safe": "Celery with result_backend_thread_safe=True"}


def runbell_counterpart(figures: dict[str, Any], shape: str) -> tuple[str, Any] | None:
    """(where, latency percentiles) of the Runbell figure a Celery shape is compared with, over long-poll."""
    if shape.startswith("one_per_task_"):
        return "long-poll, one caller per run", dig(figures, "long_poll", "sparse", "latency")
    if shape.startswith("one_result_"):
        n = shape.removeprefix("one_result_")
        return f"long-poll, {n} callers on one run", dig(figures, "long_poll", n, "latency")
    return None


def celery_rows(report: dict[str, Any], figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Runbell (this store's gateway) against Celery's AsyncResult, each shape, configuration and
    percentile: Runbell's latency over Celery's, below 1 where Runbell is ahead. A shape where Celery
    delivered nothing is Runbell's where Runbell delivered."""
    celery = report.get("celery")
    if not isinstance(celery, dict) or "error" in celery:
        return []
    rows = []
    for config, described in CELERY_CONFIGS.items():
        for shape, theirs in (celery.get(config) or {}).items():
            found = runbell_counterpart(figures, shape)
            if found is None or not isinstance(theirs, dict):
                continue
            where, ours = found
            for q in ("p50", "p99"):
                mine, other = (ours or {}).get(f"{q}_ms"), theirs.get(f"{q}_ms")
                measured: Any = ratio(mine, other)
                met = None if measured is None else measured < 1.0
                if other is None and mine is not None:
                    measured, met = f"Celery delivered none ({theirs.get('error') or 'no answer'})", True
                rows.append(
                    {
                        "goal": f"{q} against {described}, {shape.replace('_', ' ')} (Runbell {where})",
                        "target": 1.0,
                        "unit": "× Celery",
                        "comparison": "<",
                        "at_callers": theirs.get("n"),
                        "measured": measured,
                        "met": met,
                    }
                )
    return rows


def judge_matrix(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of a matrix run: the shared ones once (database "-"), the others per database, each
    database first with whether the bench completed on it (every measurement made, none failed)."""
    rows = [{**row, "database": "-"} for row in judge(report, shared=True)]
    for name, figures in report["databases"].items():
        failed = failures(figures)
        rows.append(
            {
                "goal": "`runbell bench` completes on this database",
                "target": "completes",
                "unit": "",
                "comparison": "",
                "at_callers": None,
                "measured": "yes" if not failed else f"no: {len(failed)} measurement(s) failed (listed below)",
                "met": not failed,
                "database": name,
            }
        )
        view = {**report, **figures}  # the shared figures (floors, plan) beside this store's
        rows += [{**row, "database": name} for row in judge(view, database=name, shared=False)]
        rows += [{**row, "database": name} for row in celery_rows(report, figures)]
        rows += [{**row, "database": name} for row in capacity_rows(figures)]
    return rows


def capacity_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's figures at each step of idle SSE connections: KiB per connection and fan-out over the
    raw-socket floor where the step was measured; where it could not be reached, why (not measured)."""
    rows = []
    steps = dig(figures, "capacity", "by_step") or {}
    for n, step in sorted(steps.items(), key=lambda item: int(item[0])):
        if "not_measurable" in step:
            rows.append(
                step_row(
                    f"idle SSE connections at {int(n):,}: memory and fan-out", f"{int(n):,} held", "", int(n), step["not_measurable"], None
                )
            )
            continue
        error = step.get("error")  # the memory pass's; the fan-out's (or its floor's) fails only its own row
        kib, over = step.get("kib_per_connection"), step.get("ratio_to_floor")
        rows.append(step_row(f"resident memory per idle SSE connection at {int(n):,}", STEP_KIB_PER_CONNECTION, "KiB", int(n), kib, error))
        rows.append(
            step_row(
                f"one event to {int(n):,} SSE clients of one run, over raw socket writes to as many",
                STEP_FANOUT_OVER_FLOOR,
                "× raw",
                int(n),
                over,
                error or step.get("fanout_error") or step.get("floor_error"),
            )
        )
    return rows


def step_row(goal: str, target: Any, unit: str, at: int, measured: Any, error: str | None) -> dict[str, Any]:
    """A goal's row (judge()'s shape) for one capacity step; a text measured (why not) is not judged."""
    judged = isinstance(measured, (int, float)) and isinstance(target, (int, float))
    return {
        "goal": goal,
        "target": target,
        "unit": unit,
        "comparison": "<" if unit else "",
        "at_callers": at,
        "measured": measured,
        "met": False if error else (measured < target if judged else None),
        **({"error": error} if error else {}),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to three significant digits (ratios against polling are small)."""
    return float(f"{a / b:.3g}") if a is not None and b else None


def ratios(figures: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """p50 and p99 of `figures` over those of `base` (both percentiles() dicts)."""
    return {q: ratio(figures.get(f"{q}_ms"), base.get(f"{q}_ms")) for q in ("p50", "p99")}


# -- the summary table --------------------------------------------------------------------------------


def summary_rows(report: dict[str, Any]) -> list[tuple[str, Any, Any, Any, str]]:
    """(figure, p50 ms, p99 ms, ratio of p50 to its reference, note); a failed measurement is a row
    with its error as the note."""
    rows: list[tuple[str, Any, Any, Any, str]] = []

    def failed(name: str, figures: Any) -> bool:
        if isinstance(figures, dict) and "error" in figures:
            rows.append((name, None, None, None, f"FAILED: {figures['error']}"))
            return True
        return False

    def add(name: str, figures: dict[str, Any] | None, ref: str | None = None, note: str = "") -> None:
        if figures and not failed(name, figures):
            r = figures.get("ratio_to_floor", {}).get("p50") if ref == "floor" else figures.get("ratio_p50")
            rows.append((name, figures.get("p50_ms"), figures.get("p99_ms"), r, note))

    for key in ("floor", "floor_sparse"):
        gap = dig(report, key, "publish_gap_ms")
        add("floor: Redis publish→subscriber" + (f", one every {gap:g} ms" if gap else ""), report.get(key))
    add("hook publish, warm", dig(report, "hook_publish", "warm"))
    add("hook publish, first in process", dig(report, "hook_publish", "first_in_process"))
    recorder = report.get("recorder")
    if recorder and not failed("recorder: events recorded per second", recorder):
        rows.append(("recorder: events recorded per second", recorder["events_per_s"], None, None, f"{recorder['handled']} events"))
    for via in ("long_poll", "sse"):
        name = via.replace("_", "-")
        if failed(f"{name} publish→waiter", report.get(via)):
            continue
        for case, figures in (report.get(via) or {}).items():
            if failed(f"{name} publish→waiter, {case}", figures):
                continue
            latency = dict(figures["latency"], ratio_to_floor=figures.get("ratio_to_floor", {}))
            where = f"{figures['callers']} on {figures['runs']} run{'s' if figures['runs'] > 1 else ''}"
            if figures.get("decided_runs", figures["runs"]) < figures["runs"]:
                where += f", {figures['decided_runs']} decided"
            add(f"{name} publish→waiter, {where}", latency, "floor", f"max {latency.get('max_ms')} ms, {figures.get('missing')} missing")
    fanout = report.get("fanout")
    for n, fan in ({} if failed("SSE fan-out", fanout) else dig(report, "fanout", "by_clients") or {}).items():
        if failed(f"SSE fan-out to {n}", fan):
            continue
        rows.append(
            (
                f"SSE fan-out to {n}: time to last (median)",
                fan["median_ms"],
                None,
                fan.get("ratio_to_floor"),
                f"rounds {fan['time_to_last_ms']}",
            )
        )
        if "floor_median_ms" in fan:
            rows.append((f"fan-out floor: bare server to {n} sockets", fan["floor_median_ms"], None, None, f"rounds {fan['floor_ms']}"))
    polling = report.get("polling") or {}
    if not failed("polling", polling):
        for kind, label in (
            ("long-poll", "long-poll beside pollers"),
            ("sse", "SSE beside pollers"),
            ("poll_0.1s", "poll store every 0.1 s"),
            ("poll_1s", "poll store every 1 s"),
        ):
            if kind in polling:
                add(label, polling[kind])
        for name, r in (polling.get("ratios") or {}).items():
            rows.append((f"ratio {name}", r["p50"], r["p99"], None, "p50 / p99 ratios"))
    capacity = report.get("capacity")
    if capacity and not failed("idle SSE connections held", capacity):
        rows.append(
            (
                "idle SSE connections held",
                capacity["connections_held"],
                None,
                None,
                f"{capacity['kib_per_connection']} KiB each on average, "
                f"{capacity.get('marginal_kib_per_connection')} KiB each beyond the first step; "
                + uvicorn_floor_note(capacity.get("uvicorn_floor")),
            )
        )
    for n, step in (dig(report, "capacity", "by_step") or {}).items():
        if "not_measurable" in step:
            rows.append((f"idle SSE connections, step {n}", None, None, None, step["not_measurable"]))
        elif not failed(f"idle SSE connections, step {n}", step):
            rows.append(
                (
                    f"fan-out to {n} held SSE clients (median)",
                    step.get("fanout_median_ms"),
                    None,
                    step.get("ratio_to_floor"),
                    f"floor {step.get('floor_median_ms')} ms; {step.get('kib_per_connection')} KiB per connection",
                )
            )
    early = report.get("early_waiter")
    if early and not failed("early waiters", early):
        for via in ("long_poll", "sse"):
            name, figures = via.replace("_", "-"), early.get(via)
            if not figures or failed(f"{name}: arrives 0.5 s early", figures):
                continue
            add(f"{name}: settled, {figures['callers']} on own runs", figures["settled"]["latency"])
            early_latency = {**figures["early"]["latency"], "ratio_p50": figures["ratio"]["p50"]}
            add(
                f"{name}: arrives 0.5 s early, {figures['callers']} on own runs",
                early_latency,
                note=f"×settled p99 {figures['ratio']['p99']}",
            )
    burst = report.get("throughput")
    if burst and not failed("events/s in, fanned out", burst):
        rows.append(
            (
                "events/s in, fanned out",
                burst["events_per_s"],
                None,
                None,
                f"{burst['deliveries_per_s']} deliveries/s to {burst['clients']} SSE clients"
                + (" (publisher-bound)" if burst["publisher_bound"] else ""),
            )
        )
    webhooks = report.get("webhooks")
    if webhooks and not failed("webhooks", webhooks):
        add("webhook: outcome published → received", webhooks["latency"])
        rows.append(("webhook deliveries/s, a burst", webhooks["deliveries_per_second"], None, None, f"{webhooks['burst']} outcomes"))
    for case, figures in (dig(report, "airflow", "cases") or {}).items():
        for caller in AIRFLOW_CALLERS.values():
            if caller in figures:
                add(f"airflow {case}: {caller}", figures[caller], note="from the deciding task's end")
        rows.append((f"airflow {case}: /wait over Runbell long-poll, p50", figures.get("ratio_p50"), None, None, ""))
    return rows


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def figures_table(report: dict[str, Any]) -> list[str]:
    lines = [f"{'figure':<58} {'p50 ms':>10} {'p99 ms':>10} {'×floor':>8}  note"]
    for name, p50, p99, r, note in summary_rows(report):
        lines.append(f"{name:<58} {cell(p50):>10} {cell(p99):>10} {cell(r):>8}  {note}")
    return lines


def summary(report: dict[str, Any]) -> str:
    """What `runbell bench` prints: the figures (per database, in a matrix run), then the goals (summary.md)."""
    if "databases" not in report:  # one store's report, as before the matrix
        return "\n".join([*figures_table(report), "", summary_markdown(report)])
    shared: dict[str, Any] = {key: report[key] for key in ("floor", "floor_sparse", "hook_publish", "airflow") if key in report}
    lines = ["store-independent (Redis, the hook):", *figures_table(shared)]
    for name, figures in report["databases"].items():
        lines += ["", f"{name}: {figures.get('database', '')}"]
        lines += [f"FAILED, nothing measured: {figures['error']}"] if "error" in figures else figures_table(figures)
    return "\n".join([*lines, "", summary_markdown(report)])


def verdict(goal: dict[str, Any]) -> str:
    if goal.get("error"):
        return f"**failed**: {goal['error']}"
    return {True: "yes", False: "no", None: "not measured"}[goal["met"]]


def summary_markdown(report: dict[str, Any]) -> str:
    """summary.md: every goal with its target, what was measured, the ratio of the two and whether it
    was met, per database, all from this one run; then what failed and what this bench does not measure."""
    quick = " --quick" if report.get("quick") else ""
    machine = report.get("machine") or {}
    load = [f"{name} {machine[key][0]:.1f}" for key, name in (("load_before", "before"), ("load_after", "after")) if machine.get(key)]
    lines = [
        f"# runbell bench{quick}: goals",
        "",
        "All figures from one run on this machine"
        + (
            f" ({machine['cpus']} cores" + (f"; 1-minute load average {', '.join(load)}" if load else "") + ")"
            if machine.get("cpus")
            else ""
        )
        + ". `measured / target`: at most 1 meets a ceiling, at least 1 a floor.",
        "",
        "| goal | database | target | measured | at callers | measured / target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for goal in report.get("goals", []):
        numeric = isinstance(goal["target"], (int, float)) and isinstance(goal["measured"], (int, float))
        target = f"{goal['comparison']} {goal['target']:g} {goal['unit']}" if goal["unit"] else str(goal["target"])
        lines.append(
            f"| {goal['goal']} | {goal.get('database', '-')} | {target} | {cell(goal['measured'])} | {cell(goal.get('at_callers'))} "
            f"| {cell(ratio(goal['measured'], goal['target']) if numeric else None)} | {verdict(goal).replace('|', '/')} |"
        )
    failed = [(name, line) for name, figures in (report.get("databases") or {}).items() for line in failures(figures)]
    if failed:
        lines += ["", "## Failed measurements", ""] + [f"- {name}: {line}" for name, line in failed]
    lines += profiles_markdown(report)
    unreachable = [
        f"{name}: {int(n):,} idle SSE connections: {step['not_measurable']}"
        for name, figures in (report.get("databases") or {}).items()
        for n, step in (dig(figures, "capacity", "by_step") or {}).items()
        if "not_measurable" in step
    ]
    lines += ["", "## Not measured by this bench", ""] + [f"- {item}" for item in [*NOT_MEASURED, *unreachable]]
    return "\n".join(lines) + "\n"


def uvicorn_floor_note(floor: dict[str, Any] | None) -> str:
    """What as many idle streams cost bare uvicorn (the capacity phase's memory floor), or why not known."""
    if floor is None:
        return "bare uvicorn not measured"
    if "error" in floor:
        return floor["error"]
    return f"bare uvicorn holding as many streams: {floor['kib_per_connection']} KiB each"


def profiles_markdown(report: dict[str, Any], top: int = 8) -> list[str]:
    """With --profile: where the gateway spent its busy time in each profiled round (the largest crowd
    and the spread callers of each way in, the webhook burst), the top functions running (self) and on
    the stack (inclusive), in % of py-spy's samples."""
    lines: list[str] = []
    for title, profile in profiled_rounds(report):
        lines += ["", f"### {title}"]
        if "error" in profile:
            lines += ["", profile["error"]]
            continue
        lines += [
            "",
            f"{profile['samples']} samples ({profile['file']})." + (f" Note: {profile['unfinished']}." if "unfinished" in profile else ""),
            "",
            "| self % | function | inclusive % | function |",
            "|---|---|---|---|",
        ]
        for own, inclusive in itertools.zip_longest(profile["self"][:top], profile["inclusive"][:top], fillvalue=["", ""]):
            lines.append(f"| {own[1]} | `{own[0]}` | {inclusive[1]} | `{inclusive[0]}` |".replace("``", ""))
    return ["", "## Where the gateway's time goes (--profile)", *lines] if lines else []


def profiled_rounds(report: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(title, profile) of each profiled round of the report, per database."""
    for database, figures in (report.get("databases") or {}).items():
        for via in ("sse", "long_poll"):
            for name, measured in (figures.get(via) or {}).items():
                profile = measured.get("profile") if isinstance(measured, dict) else None
                if profile is not None:
                    what = (
                        f"{measured.get('callers')} callers over {measured.get('runs')} runs"
                        if name == "spread"
                        else f"{name} callers on one run"
                    )
                    yield f"{database}, {via.replace('_', '-')}, {what}", profile
        webhooks = figures.get("webhooks")
        if isinstance(webhooks, dict) and webhooks.get("profile") is not None:
            burst = webhooks["profile"].get("burst", webhooks.get("burst"))
            yield f"{database}, webhooks, a burst of {burst} outcomes", webhooks["profile"]


def scale_out_summary(report: dict[str, Any]) -> str:
    """The tables of `runbell bench --scale-out`: the recorder by partitions and recorders, fan-out by
    gateways, and the per-core figures a deployment is sized with."""
    scale = report["scale_out"]
    lines = [
        f"recorder: {scale['recorder']['events']} events pre-loaded, then into the store",
        f"{'partitions':>10} {'recorders':>9} {'events/s':>10} {'×1 part.':>9} {'×1 rec.':>8} {'cores':>6} {'events/CPU-s':>13} "
        f"{'Redis µs/ev':>11}  stored",
    ]
    for row in scale["recorder"]["rows"]:
        lines.append(
            f"{row['partitions']:>10} {row['recorders']:>9} {cell(row['events_per_s']):>10} {cell(row['ratio_to_1_partition']):>9} "
            f"{cell(row['ratio_to_1_recorder']):>8} {cell(row['cores_used']):>6} {cell(row['events_per_cpu_s']):>13} "
            f"{cell(row.get('redis_cpu_us_per_event')):>11}  {row['stored']}/{row['events']}"
        )
    fanout = scale["fanout"]
    lines += [
        "",
        f"fan-out: one event to {fanout['clients']} SSE clients of one run, dealt round-robin over the gateways",
        f"{'gateways':>10} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'last, median ms':>16} {'×1 gw (last)':>13} "
        f"{'CPU-s/1000 deliv.':>18} {'deliveries/CPU-s':>17}  missing",
    ]
    for n, row in fanout["by_gateways"].items():
        latency = row["latency"]
        lines.append(
            f"{n:>10} {cell(latency.get('p50_ms')):>9} {cell(latency.get('p99_ms')):>9} {cell(latency.get('max_ms')):>9} "
            f"{cell(row['time_to_last_median_ms']):>16} {cell(dig(row, 'ratio_to_1_gateway', 'time_to_last_median')):>13} "
            f"{cell(row['cpu_s_per_1000_deliveries']):>18} {cell(row['deliveries_per_cpu_s']):>17}  {row['missing']}"
        )
    core = scale["per_core"]
    lines += [
        "",
        f"per core (CPU time, this machine: {report['machine']['cpus']} cores, shared): recorder "
        f"{cell(core['recorder_events_per_cpu_s'])} events/CPU-s at {core['recorder_at_partitions']} partitions; "
        f"fan-out {', '.join(f'{cell(v)} deliveries/CPU-s over {n} gateway(s)' for n, v in core['fanout_deliveries_per_cpu_s'].items())}; "
        f"Redis {cell(core['redis_cpu_us_per_publish'])} µs CPU per publish, {cell(core['redis_cpu_us_per_recorded_event'])} µs per "
        "event recorded",
    ]
    return "\n".join(lines)


# -- charts -------------------------------------------------------------------------------------------


def cdf(axes: Any, seconds: list[float], label: str, scale: float = 1e3) -> None:
    values = sorted(s * scale for s in seconds if s > 0)
    if values:
        axes.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{label} (n={len(values)})")


def draw_charts(samples: dict[str, Any], out: Path, spread: str = "", database: str = "") -> list[str]:
    """latency_cdf.png (Runbell against the floor and the polling baselines), fanout_cdf.png (arrival
    times of one event at every client of a crowd), airflow_cdf.png (with --airflow); each only where
    it has samples. With `database`, latency_cdf_DATABASE.png and fanout_cdf_DATABASE.png. The file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    written = []

    def chart(
        name: str, title: str, series: list[tuple[list[float], str]], unit: str = "ms", scale: float = 1e3, since: str = "publish"
    ) -> None:
        if not any(seconds for seconds, _ in series):
            return
        if database and not name.startswith("airflow"):
            name, title = name.replace(".png", f"_{database}.png"), f"{title}, {database}"
        figure, axes = pyplot.subplots(figsize=(10, 6))
        for seconds, label in series:
            cdf(axes, seconds, label, scale)
        axes.set_xscale("log")
        axes.set_xlabel(f"{since} → caller knows ({unit}, log scale)")
        axes.set_ylabel("fraction of callers")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8, loc="lower right")
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        pyplot.close(figure)
        written.append(name)

    chart(
        "latency_cdf.png",
        "Runbell against the Redis floor and polling baselines (one run of the bench)",
        [(samples[key], label.format(spread=spread)) for key, label in LATENCY_SERIES if samples.get(key)],
    )
    crowds = [
        (seconds, key.replace("crowd_", "").replace("_", " ") + " on one run")
        for key, seconds in samples.items()
        if key.startswith("crowd_") and seconds
    ]
    if crowds:
        chart("fanout_cdf.png", "One event to every caller of one run: arrival times (fan-out)", crowds)
    steps = [step for step in samples.get("capacity") or [] if step.get("kib_per_connection") is not None]
    if steps:
        name = f"capacity_{database}.png" if database else "capacity.png"
        draw_capacity(steps, out / name, f", {database}" if database else "")
        written.append(name)
    airflow = samples.get("airflow") or {}
    series = [
        (callers[key], f"{case}: {AIRFLOW_CALLERS[key]}")
        for case, callers in airflow.items()
        for key in AIRFLOW_CALLERS
        if callers.get(key)
    ]
    if series:
        chart("airflow_cdf.png", "Runbell against Airflow's /wait (interval=1), real Airflow", series, "s", 1.0, "the deciding task's end")
    return written


def draw_capacity(steps: list[dict[str, Any]], path: Path, suffix: str) -> None:
    """Memory per idle SSE connection, and the fan-out of one event to all of them beside the raw-socket
    floor, against how many one process holds (runbell.service.bench.delivery.capacity's steps)."""
    from matplotlib import pyplot

    counts = [step["connections"] for step in steps]
    figure, memory = pyplot.subplots(figsize=(10, 6))
    memory.plot(
        counts, [step["kib_per_connection"] for step in steps], "o-", color="tab:blue", label="resident memory per connection (KiB)"
    )
    memory.axhline(STEP_KIB_PER_CONNECTION, color="tab:blue", linestyle=":", label=f"goal: {STEP_KIB_PER_CONNECTION:g} KiB")
    memory.set_xscale("log")
    memory.set_xlabel("idle SSE connections held by one gateway process (log scale)")
    memory.set_ylabel("KiB per connection (each on a run of its own)")
    memory.set_ylim(bottom=0)
    fanout = memory.twinx()
    for key, label, color in (
        ("fanout_median_ms", "one event to all, until the last has it (ms)", "tab:red"),
        ("floor_median_ms", "raw socket writes to as many (ms)", "tab:gray"),
    ):
        points = [(step["connections"], step[key]) for step in steps if step.get(key) is not None]
        if points:
            fanout.plot(*zip(*points), "s--", color=color, label=label)
    fanout.set_ylabel("fan-out, ms (clients on one run)")
    fanout.set_ylim(bottom=0)
    (mine, my_labels), (theirs, their_labels) = memory.get_legend_handles_labels(), fanout.get_legend_handles_labels()
    memory.legend(mine + theirs, my_labels + their_labels, fontsize=8, loc="upper left")
    memory.set_title(f"Memory and fan-out against idle SSE connections{suffix}")
    memory.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def draw_matrix_charts(samples: dict[str, Any], out: Path, spread: str = "") -> list[str]:
    """The charts of a matrix run: each database's beside the shared floors, then Airflow's."""
    shared = {key: value for key, value in samples.items() if key != "by_database"}
    written = []
    for name, own in (samples.get("by_database") or {}).items():
        written += draw_charts({**{k: v for k, v in shared.items() if k != "airflow"}, **own}, out, spread, name)
    return written + draw_charts({"airflow": shared.get("airflow") or {}}, out)


def redraw(directory: Path) -> list[str]:
    """Draw the charts of a bench's output directory again from its report.json and samples.json."""
    report = json.loads((directory / "report.json").read_text())
    samples = json.loads((directory / "samples.json").read_text())
    if "by_database" in samples:
        return draw_matrix_charts(samples, directory, str(report["plan"]["spread"][0]))
    return draw_charts(samples, directory, str(dig(report, "long_poll", "spread", "callers") or ""))
