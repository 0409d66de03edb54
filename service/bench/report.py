"""The bench's outputs: goals judged against the figures, the summary table, the PNG charts.

Charts are drawn from DIR/samples.json alone, so they can be redrawn (`runbell bench --redraw --out DIR`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
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
    ("polling_long-poll", "Runbell long-poll, beside the pollers"),
    ("polling_poll_0.1s", "polling the store every 0.1 s"),
    ("polling_poll_1s", "polling the store every 1 s"),
)


# runbell.service.bench.airflow's samples per caller (the others are reference offsets), and its figures' names.
AIRFLOW_CALLERS = {"runbell": "runbell_long_poll", "runbell_sse": "runbell_sse", "airflow_wait": "airflow_wait"}


@dataclass(frozen=True)
class Goal:
    name: str
    target: float
    unit: str
    read: Callable[[dict[str, Any]], float | None]  # the measured figure, from the report
    at: Callable[[dict[str, Any]], int | None]  # how many callers it was measured with (the goals say 10,000)
    at_least: bool = False  # the target is a floor (connections held), not a ceiling


def dig(report: dict[str, Any], *path: str | int) -> Any:
    """report[path[0]][path[1]]... or None where any step is missing."""
    node: Any = report
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def median(values: list[float]) -> float | None:
    finite = sorted(v for v in values if not math.isnan(v))
    return finite[len(finite) // 2] if finite else None


def latency_goal(via: str, case: str, q: str, target: float) -> Goal:
    name = {"long_poll": "long-poll", "sse": "SSE"}[via]
    where = {"sparse": "one caller per run", "spread": "10 callers per run"}[case]
    return Goal(
        f"publish→waiter {q}, {name}, {where}, all on one process",
        target,
        "ms",
        lambda r: dig(r, via, case, "latency", f"{q}_ms"),
        lambda r: dig(r, via, case, "callers"),
    )


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
        lambda r: dig(r, "capacity", "connections_held"),
        lambda r: dig(r, "plan", "capacity_steps", -1),
        at_least=True,
    ),
    Goal(
        "resident memory per idle SSE connection",
        25.0,
        "KiB",
        lambda r: dig(r, "capacity", "kib_per_connection"),
        lambda r: dig(r, "capacity", "connections_held"),
    ),
    Goal(
        "one event to every SSE client of one run, until the last has it (median)",
        150.0,
        "ms",
        lambda r: dig(r, "fanout", "largest", "median_ms"),
        lambda r: dig(r, "fanout", "largest", "clients"),
    ),
    Goal("hook publish p99 (warm)", 1.0, "ms", lambda r: dig(r, "hook_publish", "warm", "p99_ms"), lambda r: None),
)


def judge(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its target, what was measured (and at how many callers), and whether it was met."""
    rows = []
    for goal in GOALS:
        measured = goal.read(report)
        met = None if measured is None else (measured >= goal.target if goal.at_least else measured < goal.target)
        rows.append(
            {
                "goal": goal.name,
                "target": goal.target,
                "unit": goal.unit,
                "at_callers": goal.at(report),
                "comparison": ">=" if goal.at_least else "<",
                "measured": measured,
                "met": met,
            }
        )
    constant = dig(report, "resources", "constant")
    if constant is not None:
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


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to three significant digits (ratios against polling are small)."""
    return float(f"{a / b:.3g}") if a is not None and b else None


def ratios(figures: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """p50 and p99 of `figures` over those of `base` (both percentiles() dicts)."""
    return {q: ratio(figures.get(f"{q}_ms"), base.get(f"{q}_ms")) for q in ("p50", "p99")}


# -- the summary table --------------------------------------------------------------------------------


def summary_rows(report: dict[str, Any]) -> list[tuple[str, Any, Any, Any, str]]:
    """(figure, p50 ms, p99 ms, ratio of p50 to its reference, note)."""
    rows: list[tuple[str, Any, Any, Any, str]] = []

    def add(name: str, figures: dict[str, Any] | None, ref: str | None = None, note: str = "") -> None:
        if figures:
            r = figures.get("ratio_to_floor", {}).get("p50") if ref == "floor" else figures.get("ratio_p50")
            rows.append((name, figures.get("p50_ms"), figures.get("p99_ms"), r, note))

    for key in ("floor", "floor_sparse"):
        gap = dig(report, key, "publish_gap_ms")
        add("floor: Redis publish→subscriber" + (f", one every {gap:g} ms" if gap else ""), report.get(key))
    add("hook publish, warm", dig(report, "hook_publish", "warm"))
    add("hook publish, first in process", dig(report, "hook_publish", "first_in_process"))
    for via in ("long_poll", "sse"):
        for figures in (report.get(via) or {}).values():
            latency = dict(figures["latency"], ratio_to_floor=figures.get("ratio_to_floor", {}))
            where = f"{figures['callers']} on {figures['runs']} run{'s' if figures['runs'] > 1 else ''}"
            if figures.get("decided_runs", figures["runs"]) < figures["runs"]:
                where += f", {figures['decided_runs']} decided"
            add(f"{via.replace('_', '-')} publish→waiter, {where}", latency, "floor", f"max {figures['latency']['max_ms']} ms")
    for n, fan in (dig(report, "fanout", "by_clients") or {}).items():
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
    for kind, label in (
        ("long-poll", "long-poll beside pollers"),
        ("sse", "SSE beside pollers"),
        ("poll_0.1s", "poll store every 0.1 s"),
        ("poll_1s", "poll store every 1 s"),
    ):
        if kind in polling:
            rows.append((label, polling[kind]["p50_ms"], polling[kind]["p99_ms"], None, ""))
    for name, r in (polling.get("ratios") or {}).items():
        rows.append((f"ratio {name}", r["p50"], r["p99"], None, "p50 / p99 ratios"))
    capacity = report.get("capacity")
    if capacity:
        rows.append(
            (
                "idle SSE connections held",
                capacity["connections_held"],
                None,
                None,
                f"{capacity['kib_per_connection']} KiB each on average, "
                f"{capacity.get('marginal_kib_per_connection')} KiB each beyond the first step",
            )
        )
    burst = report.get("throughput")
    if burst:
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
    for case, figures in (dig(report, "airflow", "cases") or {}).items():
        for caller in AIRFLOW_CALLERS.values():
            if caller in figures:
                rows.append(
                    (
                        f"airflow {case}: {caller}",
                        figures[caller]["p50_ms"],
                        figures[caller]["p99_ms"],
                        None,
                        "from the deciding task's end",
                    )
                )
        rows.append((f"airflow {case}: /wait over Runbell long-poll, p50", figures.get("ratio_p50"), None, None, ""))
    return rows


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def summary(report: dict[str, Any]) -> str:
    lines = [f"{'figure':<58} {'p50 ms':>10} {'p99 ms':>10} {'×floor':>8}  note"]
    for name, p50, p99, r, note in summary_rows(report):
        lines.append(f"{name:<58} {cell(p50):>10} {cell(p99):>10} {cell(r):>8}  {note}")
    lines.append("")
    lines.append(f"{'goal':<72} {'target':>17} {'measured':>10} {'callers':>8}  met")
    for goal in report.get("goals", []):
        target = f"{goal['comparison']} {goal['target']:g} {goal['unit']}" if goal["unit"] else goal["target"]
        measured = goal["measured"] if not isinstance(goal["measured"], str) else "see below"
        lines.append(
            f"{goal['goal']:<72} {target:>17} {cell(measured):>10} {cell(goal.get('at_callers')):>8}  "
            f"{'yes' if goal['met'] else 'no' if goal['met'] is False else '-'}"
        )
        if isinstance(goal["measured"], str):
            lines.append(f"    {goal['measured']}")
    return "\n".join(lines)


# -- charts -------------------------------------------------------------------------------------------


def cdf(axes: Any, seconds: list[float], label: str, scale: float = 1e3) -> None:
    values = sorted(s * scale for s in seconds if s > 0)
    if values:
        axes.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=f"{label} (n={len(values)})")


def draw_charts(samples: dict[str, Any], out: Path, spread: str = "") -> list[str]:
    """latency_cdf.png (Runbell against the floor and the polling baselines), fanout_cdf.png (arrival
    times of one event at every client of a crowd), airflow_cdf.png (with --airflow). The file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    written = []

    def chart(
        name: str, title: str, series: list[tuple[list[float], str]], unit: str = "ms", scale: float = 1e3, since: str = "publish"
    ) -> None:
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


def redraw(directory: Path) -> list[str]:
    """Draw the charts of a bench's output directory again from its report.json and samples.json."""
    report = json.loads((directory / "report.json").read_text())
    spread = str(dig(report, "long_poll", "spread", "callers") or "")
    return draw_charts(json.loads((directory / "samples.json").read_text()), directory, spread)
