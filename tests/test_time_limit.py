"""The suite's per-test time limit (tests/conftest.py): a test that hangs fails, showing where."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HANGING = """
import asyncio


async def stuck_here():
    await asyncio.Event().wait()


async def test_hangs():
    await asyncio.create_task(stuck_here(), name="the-stuck-one")


def test_after_it():
    pass
"""


def test_a_hanging_test_fails_with_its_tasks_stacks_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_hanging.py").write_text(HANGING)
    env = {**os.environ, "RUNBELL_TEST_TIME_LIMIT": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "tests.conftest",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-q",
        str(tmp_path),
        "--rootdir",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 failed, 1 passed" in out, out
    assert "TimeLimitExceeded: the test ran past its 1 s" in out, out
    assert "task the-stuck-one, awaiting" in out, out
    assert "test_hanging.py:6 in stuck_here" in out, out
