"""The metrics of ``gateway serve --workers N``: each worker writes its totals, every second
and when it stops, to a file of its own in a folder its supervisor made for the run, and
``/metrics`` on any worker answers for all of them (its own values as they are now, the
others' as last written). A worker started again in a dead one's place goes on from its
predecessor's totals, so counters never go back; gauges count only from workers that wrote
in the last few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import orjson

from gateway.runtime import end_loops
from gateway.telemetry.metrics import Metrics, Snapshot

log = logging.getLogger(__name__)

WRITE_EVERY = 1.0  # seconds between a worker's snapshots


class WorkerMetrics:
    def __init__(self, metrics: Metrics, folder: str, number: str) -> None:
        self._metrics = metrics
        self._folder = Path(folder)
        self._path = self._folder / f"worker-{number}.json"
        self._writing: asyncio.Task[None] | None = None
        self._attached = False

    def attach(self) -> None:
        """Counts go on from a predecessor's, and read the others': from before anything
        (the monitor's traffic window above all) first reads them, or the jump from this
        worker's own counts to all of theirs reads as a burst of traffic.
        """
        self._metrics.carried = _read(self._path)
        self._metrics.siblings = self._others
        self._attached = True

    def start(self) -> None:
        if not self._attached:
            self.attach()
        self._writing = asyncio.get_running_loop().create_task(self._keep_writing())

    async def close(self) -> None:
        if self._writing is not None:
            await end_loops([self._writing])
        self._write()

    def _others(self) -> list[Snapshot]:
        """The other workers' snapshots, read for a scrape; this worker's own written first,
        so that what a scrape shows is on disk (a worker killed the moment after must not
        leave counters that went back).
        """
        self._write()
        found = (_read(path) for path in self._folder.glob("worker-*.json")
                 if path != self._path)
        return [snapshot for snapshot in found if snapshot is not None]

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.sleep(WRITE_EVERY)
            self._write()

    def _write(self) -> None:
        """The snapshot replaces the last one whole (a reader never sees half of one)."""
        partial = self._path.with_suffix(".partial")
        try:
            partial.write_bytes(orjson.dumps(self._metrics.snapshot()))
            os.replace(partial, self._path)
        except (OSError, TypeError, orjson.JSONEncodeError) as exc:
            log.warning("metrics: cannot write %s (%s)", self._path, exc)


def _read(path: Path) -> Snapshot | None:
    try:
        snapshot = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return snapshot if isinstance(snapshot, dict) else None
