"""`runbell bench --profile`: py-spy's samples of a process, summarized (runbell.service.bench.profile).
Against a real process doing known work, and py-spy's raw format by hand for the counting rules."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from runbell.service.bench import profile
from runbell.service.bench.profile import function_of, sampled, summarize
from runbell.service.bench.report import profiles_markdown

# Busy in a function of a known name on an event loop until killed: what py-spy must find there.
SPINNER = """
import asyncio
def half_of_the_work():
    sum(range(1000))
def other_half():
    sum(range(1000))
def spin_in_a_named_function():
    while True:
        half_of_the_work()
        other_half()
print("spinning", flush=True)
loop = asyncio.new_event_loop()
loop.call_soon(spin_in_a_named_function)
loop.run_forever()
"""


def test_summarize_counts_self_once_per_sample_and_inclusive_once_per_stack():
    raw = "\n".join(
        [
            "<module> (app.py:1);run_forever (loop.c:9);serve (server.py:10);write (uvloop/handles/stream.pyx:20) 6",
            "<module> (app.py:1);run_forever (loop.c:9);serve (server.py:10);fold (outcome.py:5);fold (outcome.py:9) 3",  # recursion: once
            # py-spy 0.4.3 qualifies the loop's frame with its class
            "<module> (app.py:1);BaseEventLoop.run_forever (base_events.py:607);serve (server.py:11) 1",
            "_bootstrap (threading.py:1);_worker (thread.py:2);0x7f00 (libc.so.6) 40",  # a pool thread waiting: apart
            "not a sample line",
            "",
        ]
    )
    summary = summarize(raw)
    assert (summary["samples"], summary["other_threads"]) == (10, 40)
    assert summary["self"] == [["write (stream.pyx)", 60.0], ["fold (outcome.py)", 30.0], ["serve (server.py)", 10.0]]
    inclusive = dict(summary["inclusive"])
    assert "<module> (app.py)" not in inclusive and "serve (server.py)" not in inclusive  # on every stack: says nothing
    assert inclusive["fold (outcome.py)"] == 30.0  # two frames of one stack count its samples once
    assert "_worker (thread.py)" not in inclusive


def test_summarize_without_samples_says_so():
    assert summarize("")["error"].startswith("no samples")
    assert summarize("_worker (thread.py:2);0x7f00 (libc.so.6) 5")["other_threads"] == 5
    assert summarize("garbage\nmore garbage")["samples"] == 0


def test_function_of_keeps_the_name_and_the_file_not_the_line():
    assert function_of("send (uvicorn/protocols/http/httptools_impl.py:412)") == "send (httptools_impl.py)"
    assert function_of("epoll_wait") == "epoll_wait"  # a native frame without a file


def test_a_real_process_is_sampled_and_its_busy_function_found(tmp_path: Path):
    if profile.py_spy() is None:
        pytest.fail("py-spy is part of the test extra (pip install -e '.[test]')")
    proc = subprocess.Popen([sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spinning"
        raw = tmp_path / "profile.txt"
        with sampled(proc.pid, raw, rate=200) as recorded:
            time.sleep(1.0)  # work to sample, not a timing under test
    finally:
        proc.kill()
        proc.wait()
    assert "error" not in recorded, recorded
    assert recorded["samples"] > 0 and recorded["file"] == "profile.txt" and raw.is_file()
    inclusive = dict(recorded["inclusive"])
    # On every sample, so not listed (it says nothing); each half on about half of them.
    assert "spin_in_a_named_function (<string>)" not in inclusive, recorded["inclusive"]
    assert 20 < inclusive.get("half_of_the_work (<string>)", 0) < 80, recorded["inclusive"]


def test_a_process_that_is_gone_gives_a_reason_not_a_crash(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with sampled(proc.pid, tmp_path / "none.txt") as recorded:
        pass
    assert recorded["error"].startswith("no profile: py-spy did not record"), recorded


def test_without_py_spy_the_profile_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(profile, "py_spy", lambda: None)
    with sampled(1, tmp_path / "x.txt") as recorded:
        pass
    assert recorded == {"error": "no profile: py-spy is not installed (pip install py-spy, or runbell[bench])"}


def test_the_summary_shows_each_profiled_crowd_or_why_it_has_none():
    report = {
        "databases": {
            "sqlite": {
                "sse": {
                    "10000": {
                        "profile": {
                            "samples": 4,
                            "file": "p.txt",
                            "self": [["write (x.pyx)", 75.0]],
                            "inclusive": [["serve (s.py)", 100.0]],
                        }
                    }
                },
                "long_poll": {
                    "10000": {"profile": {"error": "no profile: py-spy is not installed"}},
                    "1": {"latency": {}},
                    "spread": {"callers": 1000, "runs": 100, "profile": {"error": "spread: none"}},
                },
                "webhooks": {"burst": 300, "profile": {"error": "webhooks: none"}},
            },
            "postgresql": {
                "webhooks": {
                    "burst": 300,
                    "profile": {"burst": 60, "samples": 2, "file": "w.txt", "self": [], "inclusive": [], "unfinished": "not all arrived"},
                }
            },
        }
    }
    text = "\n".join(profiles_markdown(report))
    assert "### sqlite, long-poll, 1000 callers over 100 runs\n\nspread: none" in text
    assert "### sqlite, webhooks, a burst of 300 outcomes\n\nwebhooks: none" in text
    assert "### postgresql, webhooks, a burst of 60 outcomes\n\n2 samples (w.txt). Note: not all arrived." in text
    assert text.count("###") == 5, text  # nothing for the unprofiled rounds
    assert "### sqlite, sse, 10000 callers on one run" in text
    assert "| 75.0 | `write (x.pyx)` | 100.0 | `serve (s.py)` |" in text
    assert "### sqlite, long-poll, 10000 callers on one run" in text and "no profile: py-spy is not installed" in text
    assert profiles_markdown({"databases": {"sqlite": {"sse": {"1": {"latency": {}}}}}}) == []


def test_a_process_that_is_not_python_gives_py_spys_reason(tmp_path: Path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        with sampled(proc.pid, tmp_path / "none.txt") as recorded:
            pass
    finally:
        proc.kill()
        proc.wait()
    assert recorded["error"].startswith(f"no profile: py-spy did not record pid {proc.pid}: "), recorded
    assert "Error" in recorded["error"], recorded  # py-spy's own words, not "no output"
