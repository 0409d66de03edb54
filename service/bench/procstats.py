"""What a process uses, read from Linux's /proc: resident memory, CPU time, TCP connections to a port.

Read from outside the gateway, so measuring costs it nothing and needs nothing of its code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of the process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def wait_until_idle(pid: int, busy_below: float = 0.1, window: float = 0.1, timeout: float = 60.0) -> float:
    """Until the process used under `busy_below` of a CPU over `window` seconds (it has finished
    accepting and subscribing callers); the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pid)
        time.sleep(window)
        if cpu_seconds(pid) - before < busy_below * window:
            break
    return time.monotonic() - start


def tcp_connections_to(pid: int, port: int) -> int:
    """Established TCP connections of the process whose remote port is `port` (e.g. its Redis)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            remote_port, state, inode = int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if remote_port == port and state == "01" and inode in inodes:  # 01: ESTABLISHED
                count += 1
    return count


def open_file_limit(pid: int) -> tuple[int, int]:
    """The process's open-file limit (RLIMIT_NOFILE), (soft, hard), from /proc/PID/limits: what it can
    hold, whatever the caller's own limit is."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise RuntimeError(f"no open-file limit for pid {pid}")


def open_files(pid: int) -> int:
    """File descriptors the process holds now."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
