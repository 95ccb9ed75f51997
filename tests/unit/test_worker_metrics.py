"""The metrics of several workers made one, as ``/metrics`` on any of them shows them (read
back with Prometheus's own parser): counters and histograms added up, each gauge made one as
it says (added up, the worst, or this worker's own), a dead worker's gauges dropped after a
few seconds, and a worker started again going on from its predecessor's counts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.metrics import GAUGES_FRESH, Metrics, Snapshot
from gateway.telemetry.workers import WorkerMetrics


def worker(requests: int, durations: list[float], in_flight: int, breaker: int, up: int,
           batches: int) -> Metrics:
    metrics = Metrics()
    counter = metrics.counter("gateway.requests", "Requests", ("status",), unit="{request}")
    counter.add(("200",), requests)
    histogram = metrics.histogram("gen_ai.client.operation.duration", "Time", ("door",))
    for seconds in durations:
        histogram.record(("openai",), seconds)
    deployment = (("ollama", "qwq"),)
    metrics.gauge("gateway.deployment.in_flight", "In flight", ("backend", "model"),
                  lambda: [(deployment[0], in_flight)])
    metrics.gauge("gateway.breaker.state", "Breaker", ("backend", "model"),
                  lambda: [(deployment[0], breaker)], across="max")
    metrics.gauge("gateway.backend.up", "Up", ("backend",), lambda: [(("ollama",), up)],
                  across="min")
    metrics.gauge("gateway.batch.requests", "Batches", ("state",),
                  lambda: [(("total",), batches)], across="own")
    return metrics


def scraped(metrics: Metrics) -> dict[str, Any]:
    """Each sample's value by its name (and, for buckets, its bound)."""
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(metrics.prometheus()):
        for sample in family.samples:
            name = sample.name + (f"[{sample.labels['le']}]" if "le" in sample.labels else "")
            out[name] = sample.value
    return out


def as_written(metrics: Metrics, **changes: Any) -> Snapshot:
    """A worker's snapshot as another reads it from its file (JSON: lists, not tuples)."""
    return {**orjson.loads(orjson.dumps(metrics.snapshot())), **changes}


def test_a_scrape_of_one_worker_counts_them_all() -> None:
    one = worker(requests=5, durations=[0.002, 0.3], in_flight=2, breaker=0, up=1, batches=7)
    two = worker(requests=3, durations=[0.3], in_flight=1, breaker=2, up=0, batches=7)
    one.siblings = lambda: [as_written(two)]
    seen = scraped(one)
    assert seen["gateway_requests_total"] == 8
    assert seen["gen_ai_client_operation_duration_seconds_count"] == 3
    assert seen["gen_ai_client_operation_duration_seconds_bucket[0.005]"] == 1
    assert seen["gen_ai_client_operation_duration_seconds_bucket[0.5]"] == 3
    assert seen["gen_ai_client_operation_duration_seconds_sum"] == 0.602
    assert seen["gateway_deployment_in_flight"] == 3  # added up
    assert seen["gateway_breaker_state"] == 2  # open in one: open
    assert seen["gateway_backend_up"] == 0  # down for one: down
    assert seen["gateway_batch_requests"] == 7  # the same batches: not counted twice


def test_a_dead_workers_gauges_drop_out_but_its_counts_stay() -> None:
    one = worker(requests=5, durations=[], in_flight=2, breaker=0, up=1, batches=0)
    gone = worker(requests=3, durations=[], in_flight=9, breaker=2, up=0, batches=0)
    one.siblings = lambda: [as_written(gone, at=time.time() - GAUGES_FRESH - 1)]
    seen = scraped(one)
    assert seen["gateway_requests_total"] == 8
    assert (seen["gateway_deployment_in_flight"], seen["gateway_breaker_state"],
            seen["gateway_backend_up"]) == (2, 0, 1)


def test_a_worker_started_again_goes_on_from_its_predecessors_counts() -> None:
    before = worker(requests=5, durations=[0.3], in_flight=4, breaker=2, up=0, batches=0)
    after = worker(requests=1, durations=[0.3], in_flight=1, breaker=0, up=1, batches=0)
    after.carried = as_written(before)
    seen = scraped(after)
    assert seen["gateway_requests_total"] == 6
    assert seen["gen_ai_client_operation_duration_seconds_count"] == 2
    assert seen["gateway_deployment_in_flight"] == 1  # what is now, not what was
    assert as_written(after)["counters"]["gateway.requests"] == [[["200"], 6.0]]  # (passed on)


async def test_what_a_scrape_showed_outlives_its_worker(tmp_path: Path) -> None:
    """A worker killed the moment after it answered a scrape (before its next write): the
    next scrape, through another worker or its successor, shows no less.
    """
    one = worker(requests=1000, durations=[], in_flight=0, breaker=0, up=1, batches=0)
    two = worker(requests=1000, durations=[], in_flight=0, breaker=0, up=1, batches=0)
    shared = [WorkerMetrics(one, str(tmp_path), "1"), WorkerMetrics(two, str(tmp_path), "2")]
    for each in shared:
        each.start()
    await shared[1].close()  # (written)
    one.counters[0].add(("200",), 50)  # counted since its last write...
    assert scraped(one)["gateway_requests_total"] == 2050  # ...and shown
    shared[0]._writing.cancel()  # type: ignore[union-attr]  # killed: no write at the end
    successor = worker(requests=0, durations=[], in_flight=0, breaker=0, up=1, batches=0)
    again = WorkerMetrics(successor, str(tmp_path), "1")
    again.start()
    assert scraped(two)["gateway_requests_total"] == 2050
    assert scraped(successor)["gateway_requests_total"] == 2050
    await again.close()
