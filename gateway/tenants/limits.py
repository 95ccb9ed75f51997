"""What a key may still do now: requests and tokens per minute (token buckets refilled
continuously), requests at once (leases), and a token budget per day or month.

A request is admitted with an estimate of its tokens, every limit checked at once and
charged only if all allow it (the estimate taken from the tokens bucket); it is settled
when its answer is whole: what was charged corrected to the tokens used (an answer longer
than a minute's tokens leaves the bucket in debt, paid off before the next request), the
tokens added to the budget's period, its lease given back. A budget is not reserved: one
that runs out while requests are running lets them finish (reserving their estimates would
let one request with a large ``max_tokens`` turn every other away until the period ends).

Counted here in this process's memory; ``gateway.tenants.shared_limits`` counts the same
in Redis, for every gateway process together.
"""

from __future__ import annotations

import calendar
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.config import KeyConfig

MEMORY_LEASE_SECONDS = 3600.0  # (in memory a slot is always given back; this is a backstop)
DEBT_MINUTES = 60  # a bucket owes at most this many minutes' worth of tokens
Reason = Literal["", "requests", "tokens", "concurrency", "budget"]


@dataclass(slots=True)
class Admission:
    """What ``admit`` decided, and what the answer's ``x-ratelimit-*`` headers say."""

    reason: Reason = ""  # the limit that refused the request ("": admitted)
    retry_after: float = 0.0
    requests_left: float | None = None  # None: no such limit
    requests_reset: float = 0.0  # seconds until the bucket is full again
    tokens_left: float | None = None
    tokens_reset: float = 0.0
    lease: str = ""
    charged: int = 0  # tokens taken from the bucket now, corrected when settled
    period: str = ""  # the budget's period when admitted (its tokens are counted there)
    local: bool = False  # counted in this process (Redis was away, or is not used)

    def headers(self, key: KeyConfig) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, limit, left, reset in (("requests", key.rpm, self.requests_left,
                                          self.requests_reset),
                                         ("tokens", key.tpm, self.tokens_left,
                                          self.tokens_reset)):
            if limit and left is not None:
                out[f"x-ratelimit-limit-{name}"] = str(limit)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(left)))
                out[f"x-ratelimit-reset-{name}"] = duration(reset)
        return out


class Tally:
    """The tokens one request's answers used, as the pipeline reports them."""

    __slots__ = ("output", "reported", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.reported = False  # nothing said: the answer was cut off, or came without usage
        self.output = 0  # the tokens estimated of answers that did not say (what came of them)

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.reported = True

    def saw(self, tokens: int) -> None:
        self.output += tokens


class Limits(Protocol):
    async def admit(self, key: KeyConfig, tokens: int) -> Admission: ...
    async def look(self, key: KeyConfig) -> Admission:
        """What is left, for the headers of a request the limits do not count."""
    async def settle(self, key: KeyConfig, admission: Admission, used: int) -> None: ...
    async def close(self) -> None: ...


def duration(seconds: float) -> str:
    """As OpenAI writes a reset time: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, whole = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{whole}s" if minutes else f"{whole}s"


def period(key: KeyConfig, now: float) -> tuple[str, float]:
    """The budget's current period (a label) and the seconds until it ends (UTC)."""
    day = time.gmtime(now)
    if key.budget_period == "month":
        year, month = (day.tm_year + 1, 1) if day.tm_mon == 12 else (day.tm_year, day.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))
        return f"{day.tm_year}-{day.tm_mon:02d}", max(1.0, end - now)
    return time.strftime("%Y-%m-%d", day), max(1.0, 86400 - now % 86400)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class MemoryLimits:
    """The limits of this process alone."""

    buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    leases: dict[str, dict[str, float]] = field(default_factory=dict)  # key → lease → until
    budgets: dict[str, tuple[str, int]] = field(default_factory=dict)  # key → (period, used)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def admit(self, key: KeyConfig, tokens: int) -> Admission:
        now = time.monotonic()
        admission = Admission(local=True)
        waits: list[tuple[Reason, float]] = []
        requests = self._bucket(key.id, "requests", key.rpm, now) if key.rpm else None
        if requests is not None and requests.tokens < 1:
            waits.append(("requests", (1 - requests.tokens) * 60 / key.rpm))
        bucket = self._bucket(key.id, "tokens", key.tpm, now) if key.tpm else None
        cost = min(tokens, key.tpm)
        if bucket is not None and cost > bucket.tokens:
            waits.append(("tokens", (cost - bucket.tokens) * 60 / key.tpm))
        leases = {k: v for k, v in self.leases.get(key.id, {}).items() if v > now}
        self.leases[key.id] = leases
        if key.concurrency and len(leases) >= key.concurrency:
            waits.append(("concurrency", 1.0))
        label, ends = period(key, time.time())
        spent = self._spent(key.id, label)
        if key.budget and spent >= key.budget:
            waits.append(("budget", ends))
        if waits:
            admission.reason, admission.retry_after = waits[0][0], max(w for _, w in waits)
        else:
            if requests is not None:
                requests.tokens -= 1
            if bucket is not None:
                bucket.tokens -= cost
                admission.charged = cost
            if key.concurrency:
                admission.lease = str(next(self._ids))
                leases[admission.lease] = now + MEMORY_LEASE_SECONDS
            admission.period = label
        return _left(admission, key, requests, bucket)

    async def look(self, key: KeyConfig) -> Admission:
        now = time.monotonic()
        return _left(Admission(local=True), key,
                     self._bucket(key.id, "requests", key.rpm, now) if key.rpm else None,
                     self._bucket(key.id, "tokens", key.tpm, now) if key.tpm else None)

    async def settle(self, key: KeyConfig, admission: Admission, used: int) -> None:
        if key.tpm and used != admission.charged:
            bucket = self._bucket(key.id, "tokens", key.tpm, time.monotonic())
            bucket.tokens = min(float(key.tpm), max(-DEBT_MINUTES * key.tpm,
                                                    bucket.tokens - (used - admission.charged)))
        if admission.lease:
            self.leases.get(key.id, {}).pop(admission.lease, None)
        if key.budget and used:
            label = period(key, time.time())[0]
            if label == admission.period:  # (a period since begun starts from nothing)
                self.budgets[key.id] = (label, self._spent(key.id, label) + used)

    def _spent(self, key_id: str, label: str) -> int:
        kept = self.budgets.get(key_id)
        return kept[1] if kept is not None and kept[0] == label else 0  # (a new period: 0)

    def _bucket(self, key_id: str, name: str, limit: int, now: float) -> _Bucket:
        bucket = self.buckets.get((key_id, name))
        if bucket is None:
            bucket = self.buckets[(key_id, name)] = _Bucket(float(limit), now)
        bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.at) * limit / 60.0)
        bucket.at = now
        return bucket

    async def close(self) -> None:
        return None


def _left(admission: Admission, key: KeyConfig, requests: _Bucket | None,
          tokens: _Bucket | None) -> Admission:
    """The admission, with what its key has left (for its headers)."""
    if requests is not None:
        admission.requests_left = requests.tokens
        admission.requests_reset = (key.rpm - requests.tokens) * 60 / key.rpm
    if tokens is not None:
        admission.tokens_left = tokens.tokens
        admission.tokens_reset = (key.tpm - tokens.tokens) * 60 / key.tpm
    return admission
