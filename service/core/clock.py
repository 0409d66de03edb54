"""Time, one way: aware UTC datetimes in, aware UTC datetimes and ISO 8601 text out.

A time without a zone means UTC. Every value is held to what both stores keep: PostgreSQL's
timestamptz spans 4713 BC to 294276 AD and SQLite keeps the text Python writes, so the bound is
Python's own, year 1 to 9999 in UTC. A time outside it (``0001-01-01T00:00:00+01:00`` is year 0 in
UTC), or an epoch that is NaN, infinite or too large, is a ``ValueError`` naming the value, which
the HTTP layer answers with a 400; the stdlib would raise ``OverflowError`` (a 500) for some of them.
"""

from __future__ import annotations

import math
import re
import sys
from datetime import datetime, timezone
from typing import overload

UTC = timezone.utc
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)

# An unencoded '+' of a UTC offset in a query string arrives as a space: "…T00:00:00 00:00".
_SPACED_OFFSET = re.compile(r" (\d{2}:?\d{2})$")


def now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """The same instant in UTC; a time without a zone is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{moment.isoformat()} is outside {EARLIEST.isoformat()} to {LATEST.isoformat()}") from None


def from_epoch(seconds: float) -> datetime:
    """Seconds since the epoch (as time.time() gives them) as an aware UTC datetime."""
    if not math.isfinite(seconds):
        raise ValueError(f"{seconds} is not a time: seconds since the epoch must be finite")
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"{seconds} seconds since the epoch is outside {EARLIEST.isoformat()} to {LATEST.isoformat()}") from None


def parse(text: str) -> datetime:
    """An ISO 8601 date or date-time as an aware UTC datetime: any form datetime.fromisoformat reads
    ('Z' for UTC too), without a zone meaning UTC, and the space a query string makes of an
    offset's '+'. ValueError when it is none of these or lies outside the bounds."""
    value = _SPACED_OFFSET.sub(r"+\1", text.strip())
    if sys.version_info < (3, 11) and value.endswith("Z"):  # 3.11 reads it (and more) itself
        value = value[:-1] + "+00:00"
    return as_utc(datetime.fromisoformat(value))


@overload
def iso(moment: datetime, *, zulu: bool = False) -> str: ...
@overload
def iso(moment: None, *, zulu: bool = False) -> None: ...
def iso(moment: datetime | None, *, zulu: bool = False) -> str | None:
    """ISO 8601 text in UTC, as the API writes it (``+00:00``; ``Z`` with zulu, as webhook payloads
    write it). None stays None."""
    if moment is None:
        return None
    text = as_utc(moment).isoformat()
    return text[: -len("+00:00")] + "Z" if zulu else text
