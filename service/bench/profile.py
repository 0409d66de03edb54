"""Where a gateway's time goes while a fan-out runs: py-spy's samples of the process, summarized.

`runbell bench --profile` runs one extra round of its largest crowds, of its spread callers and of its
webhook burst with py-spy recording the gateway
(native frames included, so that uvloop's writes show) and keeps py-spy's raw stacks beside the report.
Only the event loop's busy time counts: py-spy leaves out the loop waiting in epoll, and the stacks of
other threads (idle pool threads waiting on a lock show as busy in native mode) are counted apart.
So the shares are of the loop's work, not of the wall clock. Sampling pauses the process briefly each time, which is why
the profiled round is an extra one: the measured rounds run unobserved.

py-spy is optional (the bench extra installs it); without it the profile says so instead.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RATE = 1000  # samples per second: a 10,000-client fan-out takes ~0.2 s of work
ATTACH_TIMEOUT = 20.0  # py-spy says it samples once attached (~0.1 s idle, seconds on a loaded machine)
TOP = 12
EVENT_LOOP = "run_forever"  # on the stack of the loop's thread: asyncio's, and uvloop's (loop.c)


def is_event_loop(frame: str) -> bool:
    """Whether a frame is the event loop's: `run_forever (loop.c:9)`, or py-spy 0.4.3's qualified
    `BaseEventLoop.run_forever (asyncio/base_events.py:607)`."""
    name = frame.split(" ", 1)[0]
    return name == EVENT_LOOP or name.endswith("." + EVENT_LOOP)


def py_spy() -> str | None:
    """The py-spy executable: beside this Python (a virtualenv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


@contextlib.contextmanager
def sampled(pid: int, raw: Path, rate: int = RATE) -> Iterator[dict[str, Any]]:
    """Record process `pid` while the block runs; the yielded dict is filled on the way out with the
    summary (summarize()) and the raw file's name, or {"error": why there is no profile}."""
    profile: dict[str, Any] = {}
    exe = py_spy()
    if exe is None:
        profile["error"] = "no profile: py-spy is not installed (pip install py-spy, or runbell[bench])"
        yield profile
        return
    command = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--native", "--format", "raw", "--output", str(raw)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc, said, began := threading.Event()), daemon=True)
    reader.start()
    attached = _until(began, proc)
    try:
        yield profile
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)  # what py-spy said, to its last line
        if not attached or not raw.is_file():
            reason = next((line for line in said if line.startswith("Error")), " ".join(said)[-300:] or "no output")
            profile["error"] = f"no profile: py-spy did not record pid {pid}: {reason}"
        else:
            profile.update(summarize(raw.read_text(errors="replace")), file=raw.name)


def _read_lines(proc: subprocess.Popen, said: list[str], began: threading.Event) -> None:
    """What py-spy says, into `said`; `began` once it samples (it says so on stdout; a failure's reason,
    no permission to ptrace or not a Python process, comes on stderr, merged)."""
    assert proc.stdout is not None  # started with stdout=PIPE, stderr into it
    for line in proc.stdout:
        said.append(line.strip())
        if "Sampling process" in line:
            began.set()


def _until(began: threading.Event, proc: subprocess.Popen) -> bool:
    """Whether py-spy has begun sampling within ATTACH_TIMEOUT (False at once when it exits)."""
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if began.wait(0.05):
            return True
    return began.is_set()


def summarize(raw: str, top: int = TOP) -> dict[str, Any]:
    """From py-spy's raw format (one line per distinct stack: `frame;frame;...;leaf COUNT`, the root
    first): the event loop's samples, the functions that were running (self) and those on the stack
    (inclusive, each counted once per stack; not those on every stack, the process's start down to the
    loop's machinery, 100% each and telling nothing), the top of each as [function, share of the
    samples in %]; and how many samples were of other threads."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = other_threads = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [function_of(frame) for frame in stack.split(";")]
        if not any(is_event_loop(frame) for frame in frames):
            other_threads += n
            continue
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        return {"samples": 0, "other_threads": other_threads, "error": "no samples: the event loop was idle while it was recorded"}

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    inclusive = Counter({name: n for name, n in inclusive.items() if n < total})
    return {"samples": total, "other_threads": other_threads, "self": share(own), "inclusive": share(inclusive)}


def function_of(frame: str) -> str:
    """`send (uvicorn/protocols/http/httptools_impl.py:412)` → `send (httptools_impl.py)`: the line
    goes (one function, many lines), the file's last part stays (many modules name a function `send`)."""
    name, _, where = frame.partition(" (")
    if not where:
        return name.strip()
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name.strip()} ({path.rsplit('/', 1)[-1]})"
