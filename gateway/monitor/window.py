"""Traffic over the last minutes, from the metrics: every second a snapshot of the
cumulative counters and histograms (nothing is added on the request path), and rates,
shares and quantiles over any window from the difference of two snapshots, as Prometheus's
``rate()`` and ``histogram_quantile()`` do.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config.observing import LONGEST_WINDOW
from gateway.telemetry import Instruments, Metrics

KEEP_SECONDS = LONGEST_WINDOW  # the longest window a rule or chart may ask for
HIT = (("hit",), ("coalesced",))  # cache lookups answered without a backend


@dataclass(slots=True)
class Snapshot:
    at: float
    requests: float = 0.0
    errors: float = 0.0  # answered with a 5xx
    duration: list[float] = field(default_factory=list)  # bucket counts, every series
    ttft: list[float] = field(default_factory=list)
    output_tokens: float = 0.0
    hits: float = 0.0
    misses: float = 0.0
    # backend → [attempts it answered (a rightful refusal too), attempts failed by its fault]
    attempts: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Traffic:
    """What happened between two snapshots."""

    seconds: float
    requests: float  # to the models (not /health, /metrics, /v1/models...)
    errors: float
    timed: float  # model requests answered, whose time is in the quantiles
    p50: float | None
    p95: float | None
    ttft_p95: float | None
    output_tokens: float
    hits: float
    misses: float
    attempts: dict[str, tuple[float, float]]  # backend → (ok, failed)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def hit_ratio(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None

    def summary(self) -> dict[str, float | None]:
        return {"seconds": round(self.seconds, 1), "requests": self.requests,
                "rate": round(self.rate, 3), "errors": self.errors,
                "p50_ms": _ms(self.p50), "p95_ms": _ms(self.p95),
                "ttft_p95_ms": _ms(self.ttft_p95),
                "tokens_per_second": round(self.tokens_per_second, 1),
                "cache_hit_ratio": None if self.hit_ratio is None else round(self.hit_ratio, 3)}


class Window:
    def __init__(self, metrics: Metrics, instruments: Instruments) -> None:
        self._metrics = metrics
        self._i = instruments
        self._bounds = instruments.duration.bounds if metrics.enabled else ()
        self._ttft_bounds = instruments.ttft.bounds if metrics.enabled else ()
        self.snapshots: deque[Snapshot] = deque()

    @property
    def enabled(self) -> bool:
        return self._metrics.enabled

    def sample(self, now: float) -> None:
        """A snapshot of what the whole gateway counted (all its workers, with ``serve
        --workers N``: each worker's status and dashboard show the traffic of all).
        """
        if not self._metrics.enabled:
            return
        counters, histograms = self._metrics.totals()
        snap = Snapshot(now)
        for (door, status, model), n in counters[self._i.requests.name].items():
            if door == "gateway" or (not model and status[0] != "5"):
                # /health, /ready, /metrics, /admin/status, the dashboard; and what a door
                # answers or refuses without a model (its list of models, files and
                # batches, a stale key's polls, an unknown path): a model's answer, and its
                # refusal, always names it; the gateway's failure counts either way
                continue
            snap.requests += n
            if status.startswith("5"):
                snap.errors += n
        snap.duration = _buckets(histograms[self._i.duration.name], len(self._bounds) + 1)
        snap.ttft = _buckets(histograms[self._i.ttft.name], len(self._ttft_bounds) + 1)
        snap.output_tokens = sum(s[1] for (kind, _), s in
                                 histograms[self._i.tokens.name].items() if kind == "output")
        # [attempts the backend answered, those that failed by its fault]: one that rightly
        # refused a request (a content policy, too long a prompt) answered.
        for (backend, _, _), n in counters[self._i.attempts.name].items():
            snap.attempts.setdefault(backend, [0.0, 0.0])[0] += n
        for (backend,), n in counters[self._i.faults.name].items():
            pair = snap.attempts.setdefault(backend, [0.0, 0.0])
            pair[0] -= n
            pair[1] += n
        lookups = counters.get("gateway.cache.lookups", {})
        snap.hits = sum(n for labels, n in lookups.items() if labels[:1] in HIT)
        snap.misses = sum(n for labels, n in lookups.items() if labels[:1] == ("miss",))
        self.snapshots.append(snap)
        while self.snapshots and now - self.snapshots[0].at > KEEP_SECONDS:
            self.snapshots.popleft()

    def over(self, seconds: float) -> Traffic | None:
        """The traffic of about the last ``seconds`` (None before two snapshots)."""
        if len(self.snapshots) < 2:
            return None
        last = self.snapshots[-1]
        first = self.snapshots[0]
        for snap in reversed(self.snapshots):
            if last.at - snap.at >= seconds:
                first = snap
                break
        return _between(first, last, self._bounds, self._ttft_bounds)


def _between(a: Snapshot, b: Snapshot, bounds: tuple[float, ...],
             ttft_bounds: tuple[float, ...]) -> Traffic:
    attempts = {}
    for backend, (ok, failed) in b.attempts.items():
        before = a.attempts.get(backend, [0.0, 0.0])
        attempts[backend] = (ok - before[0], failed - before[1])
    duration = _minus(b.duration, a.duration)
    ttft = _minus(b.ttft, a.ttft)
    return Traffic(
        seconds=b.at - a.at, requests=b.requests - a.requests, errors=b.errors - a.errors,
        timed=sum(duration),
        p50=quantile(0.5, bounds, duration), p95=quantile(0.95, bounds, duration),
        ttft_p95=quantile(0.95, ttft_bounds, ttft),
        output_tokens=b.output_tokens - a.output_tokens, hits=b.hits - a.hits,
        misses=b.misses - a.misses, attempts=attempts)


def quantile(q: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """The ``q`` quantile of a histogram's bucket counts (the last: above every bound),
    interpolated linearly within its bucket; None for no observations.
    """
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    running = 0.0
    for i, n in enumerate(counts):
        if running + n >= rank and n:
            if i >= len(bounds):
                return bounds[-1] if bounds else math.inf  # above the top bound
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - running) / n
        running += n
    return bounds[-1] if bounds else None


def _buckets(series: Mapping[tuple[str, ...], list[Any]], size: int) -> list[float]:
    out = [0.0] * size
    for values in series.values():
        counts = values[0]
        assert isinstance(counts, list)
        for i, n in enumerate(counts):
            out[i] += n
    return out


def _minus(b: list[float], a: list[float]) -> list[float]:
    if len(a) != len(b):
        return list(b)
    return [y - x for x, y in zip(a, b, strict=True)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
