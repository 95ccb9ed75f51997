"""The gateway's metrics: counters and histograms updated on the request path with a dict
update each (the OpenTelemetry SDK's own instruments cost about 5 µs a call, a few percent
of a request apiece), gauges read when collected, all shown at ``/metrics`` in Prometheus's
text format and turned into OpenTelemetry's data model for an OTLP exporter.

Names follow OpenTelemetry (and its GenAI semantic conventions where they have one); the
Prometheus names are the OpenTelemetry ones as its exporters write them: dots become
underscores, the unit a suffix, counters end in ``_total``.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

log = logging.getLogger(__name__)

# Seconds: from a cache hit (well under a millisecond) to a long generation.
SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           120.0, 300.0)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)  # GenAI's advice
RATES = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)  # tokens a second
UNIT_SUFFIX = {"s": "_seconds", "{token}": "", "1": "", "{token}/s": "_tokens_per_second",
               "{request}": "", "By": "_bytes"}

Labels = tuple[str, ...]
# A gauge's reading: each label set and its value, read when the metrics are collected.
Reading = Callable[[], Iterable[tuple[Labels, float]]]
# How a gauge's readings in several workers of one host make one: added up (requests in
# flight), the highest (a breaker's state: the worst), the lowest (up: down in any is
# down), or this worker's own (read from a store the workers share).
Across = Literal["sum", "max", "min", "own"]
# Every instrument's values, as plain data (JSON): kind → name → [[labels, value...]...];
# "at": when it was taken (time.time()).
Snapshot = dict[str, Any]
GAUGES_FRESH = 5.0  # seconds another worker's gauges count for (it may have died)


class Counter:
    __slots__ = ("description", "labels", "name", "unit", "values")

    def __init__(self, name: str, description: str, labels: Sequence[str], unit: str) -> None:
        self.name, self.description, self.unit = name, description, unit
        self.labels = tuple(labels)
        self.values: dict[Labels, float] = {}

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount


class Histogram:
    __slots__ = ("bounds", "description", "labels", "name", "series", "unit")

    def __init__(self, name: str, description: str, labels: Sequence[str], unit: str,
                 bounds: Sequence[float]) -> None:
        self.name, self.description, self.unit = name, description, unit
        self.labels = tuple(labels)
        self.bounds = tuple(bounds)
        # labels → [count in each bucket (the last: above every bound), sum, count, min, max]
        self.series: dict[Labels, list[Any]] = {}

    def record(self, labels: Labels, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [[0] * (len(self.bounds) + 1), 0.0, 0, value, value]
        series[0][bisect.bisect_left(self.bounds, value)] += 1
        series[1] += value
        series[2] += 1
        if value < series[3]:
            series[3] = value
        elif value > series[4]:
            series[4] = value


class Gauge:
    __slots__ = ("across", "description", "labels", "name", "read", "unit")

    def __init__(self, name: str, description: str, labels: Sequence[str], unit: str,
                 read: Reading, across: Across = "sum") -> None:
        self.name, self.description, self.unit = name, description, unit
        self.labels = tuple(labels)
        self.read = read
        self.across = across


class _Off:
    """An instrument of metrics that are off: every update does nothing."""

    __slots__ = ()

    def add(self, labels: Labels, amount: float = 1.0) -> None:
        return None

    def record(self, labels: Labels, value: float) -> None:
        return None


OFF = _Off()


class Metrics:
    """The instruments of one gateway (each app its own: tests run several at once)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.started = time.time()
        self.counters: list[Counter] = []
        self.histograms: list[Histogram] = []
        self.gauges: list[Gauge] = []
        # Counters kept elsewhere (a plugin's statistics), read when collected.
        self.external: list[tuple[Counter, Reading]] = []
        # One of several workers: the totals of this worker's predecessors (counters and
        # histograms go on from there), and the other workers' latest snapshots.
        self.carried: Snapshot | None = None
        self.siblings: Callable[[], list[Snapshot]] = list

    def counter(self, name: str, description: str, labels: Sequence[str] = (),
                unit: str = "1") -> Counter:
        counter = Counter(name, description, labels, unit)
        if self.enabled:
            self.counters.append(counter)
            return counter
        return OFF  # type: ignore[return-value]

    def histogram(self, name: str, description: str, labels: Sequence[str] = (),
                  unit: str = "s", bounds: Sequence[float] = SECONDS) -> Histogram:
        histogram = Histogram(name, description, labels, unit, bounds)
        if self.enabled:
            self.histograms.append(histogram)
            return histogram
        return OFF  # type: ignore[return-value]

    def gauge(self, name: str, description: str, labels: Sequence[str], read: Reading,
              unit: str = "1", across: Across = "sum") -> None:
        if self.enabled:
            self.gauges.append(Gauge(name, description, labels, unit, read, across))

    def observed_counter(self, name: str, description: str, labels: Sequence[str],
                         read: Reading, unit: str = "1") -> None:
        """A counter whose totals something else keeps (a plugin), read when collected;
        not one whose name is taken (two copies of a plugin): Prometheus refuses a whole
        scrape that names a metric twice.
        """
        if not self.enabled:
            return
        if name in {c.name for c in self.counters} | {c.name for c, _ in self.external}:
            log.warning("metrics: %s is counted already; a second counter of that name is "
                        "left out", name)
            return
        self.external.append((Counter(name, description, labels, unit), read))

    def read_counter(self, name: str) -> dict[Labels, float]:
        """A counter's values now, by name (one kept elsewhere read now); {} for none."""
        for counter in self.counters:
            if counter.name == name:
                return dict(counter.values)
        for counter, reading in self.external:
            if counter.name == name:
                return dict(reading())
        return {}

    def prometheus(self) -> str:
        """Everything, in Prometheus's text exposition format (version 0.0.4); with the
        other workers' (of ``gateway serve --workers N``) when there are some.
        """
        counters, histograms, gauges = self._totals(self.siblings())
        out: list[str] = []
        for counter in self._counters():
            name = prometheus_name(counter.name, counter.unit) + "_total"
            _header(out, name, counter.description, "counter")
            for labels, value in counters[counter.name].items():
                out.append(f"{name}{_labels(counter.labels, labels)} {_number(value)}")
        for histogram in self.histograms:
            name = prometheus_name(histogram.name, histogram.unit)
            _header(out, name, histogram.description, "histogram")
            for labels, (buckets, total, count, *_) in histograms[histogram.name].items():
                running = 0
                for bound, n in zip((*histogram.bounds, math.inf), buckets, strict=True):
                    running += n
                    le = _labels((*histogram.labels, "le"), (*labels, _number(bound)))
                    out.append(f"{name}_bucket{le} {running}")
                tags = _labels(histogram.labels, labels)
                out.append(f"{name}_sum{tags} {_number(total)}")
                out.append(f"{name}_count{tags} {count}")
        for gauge in self.gauges:
            name = prometheus_name(gauge.name, gauge.unit)
            _header(out, name, gauge.description, "gauge")
            for labels, value in gauges[gauge.name].items():
                out.append(f"{name}{_labels(gauge.labels, labels)} {_number(value)}")
        out.append("")
        return "\n".join(out)

    def totals(self) -> tuple[dict[str, dict[Labels, float]],
                              dict[str, dict[Labels, list[Any]]]]:
        """Each counter's and histogram's values now, by name, with the other workers' (of
        ``gateway serve --workers N``) when there are some: what the whole gateway counted.
        """
        counters, histograms, _ = self._totals(self.siblings())
        return counters, histograms

    def snapshot(self) -> Snapshot:
        """This worker's totals (its predecessors' included), as plain data."""
        counters, histograms, gauges = self._totals([])
        return {"at": time.time(),
                "counters": {name: [[list(k), v] for k, v in found.items()]
                             for name, found in counters.items()},
                "histograms": {name: [[list(k), *v] for k, v in found.items()]
                               for name, found in histograms.items()},
                "gauges": {name: [[list(k), v] for k, v in found.items()]
                           for name, found in gauges.items()}}

    def _totals(self, others: list[Snapshot]) -> tuple[
            dict[str, dict[Labels, float]], dict[str, dict[Labels, list[Any]]],
            dict[str, dict[Labels, float]]]:
        """Each instrument's values now, by name: this worker's, plus what its predecessors
        counted, plus ``others`` (snapshots of the other workers; instruments this worker
        does not have are left out).
        """
        counters = {c.name: dict(c.values) for c in self._counters()}
        histograms = {h.name: {k: [list(v[0]), *v[1:]] for k, v in list(h.series.items())}
                      for h in self.histograms}
        buckets = {h.name: len(h.bounds) + 1 for h in self.histograms}
        gauges = {g.name: dict(g.read()) for g in self.gauges}
        across = {g.name: g.across for g in self.gauges}
        now = time.time()
        for other in [self.carried, *others] if self.carried else others:
            for name, rows in other.get("counters", {}).items():
                if name in counters:
                    _add_counts(counters[name], rows)
            for name, rows in other.get("histograms", {}).items():
                if name in histograms:
                    _add_series(histograms[name], rows, buckets[name])
            if other is self.carried or now - other.get("at", 0) > GAUGES_FRESH:
                continue  # (gauges: what is now, in workers alive)
            for name, rows in other.get("gauges", {}).items():
                if name in gauges and across[name] != "own":
                    _add_gauge(gauges[name], across[name], rows)
        return counters, histograms, gauges

    def _counters(self) -> list[Counter]:
        """Every counter, those kept elsewhere read now."""
        read = []
        for counter, reading in self.external:
            counter.values = dict(reading())
            read.append(counter)
        return self.counters + read

    def collect(self) -> list[tuple[str, Any, list[tuple[Labels, Any]]]]:
        """Each instrument, its kind and its values now (for an exporter)."""
        out: list[tuple[str, Any, list[tuple[Labels, Any]]]] = []
        out += [("counter", c, list(c.values.items())) for c in self._counters()]
        out += [("histogram", h, [(k, (list(v[0]), *v[1:])) for k, v in
                                  list(h.series.items())]) for h in self.histograms]
        out += [("gauge", g, list(g.read())) for g in self.gauges]
        return out


def _add_counts(into: dict[Labels, float], rows: list[list[Any]]) -> None:
    for labels, value in rows:
        if isinstance(value, (int, float)):  # (not a number: written as null, skipped)
            key = tuple(labels)
            into[key] = into.get(key, 0.0) + value


def _add_series(into: dict[Labels, list[Any]], rows: list[list[Any]], buckets: int) -> None:
    """Histograms' series added up: counts in each of ``buckets``, sum and count; lowest and
    highest (a series with other bounds, written by another version, is skipped).
    """
    for labels, counts, total, count, low, high in rows:
        if len(counts) != buckets:
            continue
        key = tuple(labels)
        mine = into.get(key)
        if mine is None:
            into[key] = [list(counts), total, count, low, high]
            continue
        mine[0] = [a + b for a, b in zip(mine[0], counts, strict=True)]
        mine[1] += total
        mine[2] += count
        mine[3], mine[4] = min(mine[3], low), max(mine[4], high)


def _add_gauge(into: dict[Labels, float], across: Across, rows: list[list[Any]]) -> None:
    for labels, value in rows:
        if not isinstance(value, (int, float)):
            continue
        key = tuple(labels)
        if key not in into:
            into[key] = value
        elif across == "sum":
            into[key] += value
        else:
            into[key] = max(into[key], value) if across == "max" else min(into[key], value)


def prometheus_name(name: str, unit: str) -> str:
    base = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    suffix = UNIT_SUFFIX.get(unit, "")
    return base if base.endswith(suffix) else base + suffix


def _header(out: list[str], name: str, description: str, kind: str) -> None:
    escaped = description.replace("\\", "\\\\").replace("\n", "\\n")  # (as the format says)
    out.append(f"# HELP {name} {escaped}")
    out.append(f"# TYPE {name} {kind}")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = (f'{re.sub(r"[^a-zA-Z0-9_]", "_", n)}="{_escape(v)}"'
             for n, v in zip(names, values, strict=True))
    return "{" + ",".join(pairs) + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
