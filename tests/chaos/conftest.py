"""The chaos suite: gateways killed, Redis stopped and restarted, bad input, abuse.

Each scenario records one summary line (runs, outcomes delivered, lost, duplicated, time to recover),
printed at the end of the pytest run and written to tests/chaos/artifacts/summary.json (gitignored).
A scenario asserts lost == 0 and duplicated == 0 itself; the summary is what the figures were.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@dataclass
class ScenarioSummary:
    scenario: str
    runs: int = 0
    outcomes_delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    recover_seconds: float | None = None  # from the fault until the last caller had its answer
    extra: dict[str, object] = field(default_factory=dict)  # scenario-specific counts (drops, 503s, ...)

    def line(self) -> str:
        recover = "-" if self.recover_seconds is None else f"{self.recover_seconds:.2f}s"
        extra = "".join(f" {key}={value}" for key, value in self.extra.items())
        return (
            f"chaos {self.scenario}: runs={self.runs} outcomes_delivered={self.outcomes_delivered}"
            f" lost={self.lost} duplicated={self.duplicated} recovered_in={recover}{extra}"
        )


SUMMARIES: list[ScenarioSummary] = []


@pytest.fixture
def chaos_summary(request):
    """chaos_summary(**fields) records this test's summary line (scenario defaults to the test's name)."""

    def record(**fields) -> ScenarioSummary:
        summary = ScenarioSummary(**{"scenario": request.node.name.removeprefix("test_"), **fields})
        SUMMARIES.append(summary)
        return summary

    return record


def pytest_terminal_summary(terminalreporter):
    if not SUMMARIES:
        return
    terminalreporter.section("chaos summary")
    for summary in SUMMARIES:
        terminalreporter.write_line(summary.line())
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "summary.json").write_text(json.dumps([asdict(s) for s in SUMMARIES], indent=2))
