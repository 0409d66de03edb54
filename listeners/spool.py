"""The local append-only spool: where events wait while Redis is unreachable.

One file per event, named by time, so any number of task processes on a host can write without a
lock and a flush can publish them in order and delete each once Redis has it. Only the flush takes a
lock (non-blocking: a process that cannot get it leaves the flush to the holder).

An appended event is durable when append() returns: the file is written to a temporary name,
fsynced, renamed, and the directory fsynced (the rename itself survives a power cut). Each namespace
spools in a subdirectory of its own (``namespace_spool``), so publishers of two namespaces sharing a
spool directory never send each other's events.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from hashlib import sha256
from pathlib import Path
from urllib.parse import quote

_counter = itertools.count()
_SUFFIX = ".event.json"
_NAME_MAX = 120  # a namespace's directory name beyond this is cut and given a hash (NAME_MAX is 255)


class Spool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def append(self, event_json: str) -> Path:
        """Write one event durably; OSError when the directory cannot take it (nothing is kept then)."""
        self._make_directory()
        name = f"{time.time_ns():020d}-{os.getpid():07d}-{next(_counter):06d}{_SUFFIX}"
        final = self.directory / name
        tmp = self.directory / ("." + name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(event_json)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # readers never see a half-written event
            fsync_directory(self.directory)  # the rename is on disk too
        except OSError:
            for path in (tmp, final):  # not durable: not an event either (the caller is told it failed)
                with suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        return final

    def _make_directory(self) -> None:
        if self.directory.is_dir():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fsync_directory(self.directory.parent)  # a new directory's entry is on disk as well

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
        self._make_directory()
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


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def namespace_dirname(namespace: str) -> str:
    """The namespace's spool directory name: readable, one path segment, never '.', '..' or hidden."""
    name = quote(namespace, safe="-_~").replace(".", "%2E") or "%"
    if len(name) > _NAME_MAX:
        name = name[: _NAME_MAX - 17] + "-" + sha256(namespace.encode()).hexdigest()[:16]
    return name


def namespace_spool(root: Path, namespace: str) -> Spool:
    """The spool of one namespace under a spool directory that several namespaces may share."""
    return Spool(Path(root) / namespace_dirname(namespace))


def has_legacy(root: Path) -> bool:
    """Whether events spooled before spools were per namespace lie at the top of ``root``."""
    try:
        return any(n.endswith(_SUFFIX) for n in os.listdir(root))
    except OSError:
        return False


def adopt_legacy(root: Path, spool: Spool) -> int:
    """Move events spooled at the top of ``root`` (before spools were per namespace) into ``spool``.

    Such a file does not say its namespace. When ``root`` holds no other namespace's spool it was not
    shared, and the events are this namespace's: they are moved (in order: names are kept). When it
    does, they are left for an operator to move into the right namespace's directory; the caller is
    told how many (0 when there were none, -n when n were left). Best effort: never raises."""
    root = Path(root)
    try:
        legacy = sorted(n for n in os.listdir(root) if n.endswith(_SUFFIX))
        if not legacy:
            return 0
        others = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".") and e.name != spool.directory.name]
        if others:
            return -len(legacy)
        spool._make_directory()
        for name in legacy:
            with suppress(FileNotFoundError):  # another process of this namespace moved it first
                os.rename(root / name, spool.directory / name)
        fsync_directory(spool.directory)
        fsync_directory(root)
    except OSError:
        return 0
    return len(legacy)
