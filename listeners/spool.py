"""The local append-only spool: where events wait while Redis is unreachable.

One file per event, named by time, so any number of task processes on a host can write without a
lock and a flush can publish them in order and delete each once Redis has it. Only the flush takes a
lock (non-blocking: a process that cannot get it leaves the flush to the holder).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_counter = itertools.count()
_SUFFIX = ".event.json"


class Spool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def append(self, event_json: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid():07d}-{next(_counter):06d}{_SUFFIX}"
        final = self.directory / name
        tmp = self.directory / ("." + name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(event_json)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # readers never see a half-written event
        return final

    def pending(self) -> list[Path]:
        """Spooled events, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return [self.directory / n for n in sorted(names) if n.endswith(_SUFFIX)]

    def is_empty(self) -> bool:
        return not self.pending()

    @contextmanager
    def flush_lock(self) -> Iterator[bool]:
        """Yield True when this process holds the host's flush lock, False when another one does."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".flush.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def read_event(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:  # another flusher took it
        return None
