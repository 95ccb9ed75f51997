"""Times as the wire formats write them: RFC 3339 (Ollama, Anthropic) and Unix seconds."""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime
from typing import Any


def ms(seconds: float) -> float:
    """A duration in milliseconds, to a tenth (as records and logs give it; a fraction of
    ``round(x, 1)``'s cost, which counts on the request path).
    """
    return int(seconds * 10_000 + 0.5) / 10


def stamp(seconds: float) -> float:
    """Unix seconds to the millisecond, for a record."""
    return int(seconds * 1000) / 1000


def rfc3339(seconds: float) -> str:
    """Unix seconds as RFC 3339 in UTC, to the microsecond."""
    whole = math.floor(seconds)
    micro = round((seconds - whole) * 1e6)  # as datetime rounds it
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    return f"{_second(whole)}.{micro:06d}Z"


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    """One second, formatted (stream lines come many to a second)."""
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")


_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$")


def epoch_seconds(text: Any) -> int | None:
    """RFC 3339 times as Ollama writes them ("2024-05-01T12:00:00.123456789-07:00",
    nanoseconds and all) as Unix seconds; None for anything else.
    """
    match = _TIME.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    zone = match.group(3) or "Z"
    stamp = datetime.fromisoformat(match.group(1) + ("+00:00" if zone == "Z" else zone))
    return int(stamp.timestamp())


LATEST = 2**33  # Unix seconds in the year 2242: larger is milliseconds, or a mistake


def plausible_seconds(value: Any) -> int | None:
    """A backend's Unix time in seconds, or None when it is not one (a count of
    milliseconds, say, which would be a date thousands of years away).
    """
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < LATEST
    return value if ok else None
