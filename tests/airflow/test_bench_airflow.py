"""`runbell bench --airflow` once, quick: it starts its own Airflow 3.3.2 and gateway, and reports
for both cases how long each caller took to know. Only the shape and the sign of the lead are
asserted; the lead's size is test_e2e's to assert.

Runs once, on 3.3.2 only (the bench's default virtualenv), not per version of the matrix: what it
compares, Runbell against Airflow's /wait, does not depend on the version, and test_e2e already
checks the lead on every version. Per version: RUNBELL_AIRFLOW_VENV=~/.cache/runbell/airflow-V
`runbell bench --airflow`."""

from __future__ import annotations

from typing import Any

import pytest

from runbell.service.bench import standalone
from runbell.service.bench.airflow import CASES, bench_airflow

pytestmark = pytest.mark.airflow

CALLERS = ("runbell", "runbell_sse", "airflow_wait")


def test_quick_bench_compares_both_cases_and_runbell_leads(airflow_redis_url: str) -> None:
    report: dict[str, Any] = bench_airflow(airflow_redis_url, quick=True)
    print(f"\n[bench --airflow] {report['cases']}")
    assert report["airflow_version"] == standalone.installed_version(standalone.airflow_venv())
    assert set(report["cases"]) == set(report["samples"]) == set(CASES) == {"result", "critical_failure"}
    for name, samples in report["samples"].items():
        assert set(samples) == {*CALLERS, "airflow_end_date", "hook_ts"}
        assert min(min(samples["airflow_end_date"]), min(samples["hook_ts"])) == 0  # one of them is the reference
        assert len({len(samples[caller]) for caller in CALLERS}) == 1 and len(samples["runbell"]) >= 2
        for caller in CALLERS:
            assert all(seconds > 0 for seconds in samples[caller]), (name, caller, samples)
        for polled, streamed, waited in zip(*(samples[caller] for caller in CALLERS)):
            assert waited > polled and waited > streamed, (name, samples)  # Runbell knew first, every run
        case = report["cases"][name]
        for key in ("runbell_long_poll", "runbell_sse", "airflow_wait"):
            assert set(case[key]) == {"n", "p50_ms", "p99_ms", "max_ms", "mean_ms"}
        assert case["lead_seconds_p50"] > 0 and case["lead_seconds_p50_sse"] > 0
        assert case["ratio_p50"] > 1 and case["ratio_p50_sse"] > 1
