"""Queued work: OpenAI's Files and Batch APIs (``api``), a batch's life (``batches``), the
worker that answers its lines through the pipeline (``worker``), and where all of it is
kept (``local``: SQLite and files in the data directory).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline
from gateway.runtime import end_loops
from gateway.tasks.batches import Batches, Store, StoreDown
from gateway.tasks.local import LocalStore
from gateway.tasks.shared import RedisStore
from gateway.tasks.spending import Spending
from gateway.tasks.worker import Worker
from gateway.tenants import KeyBook, Limits

__all__ = ["Tasks"]

log = logging.getLogger(__name__)

WATCH_SECONDS = 2.0


class Tasks:
    """The store, the batches and (in ``gateway serve``, unless told not to) a worker."""

    def __init__(self, config: GatewayConfig, pipeline: Pipeline, book: KeyBook,
                 limits: Limits) -> None:
        tasks = config.tasks
        self.store: Store = RedisStore(tasks.redis_url, tasks.visibility_timeout) \
            if tasks.queue == "redis" else LocalStore(tasks.data_dir, tasks.visibility_timeout)
        self.queue = tasks.queue
        self.batches = Batches(self.store, tasks.max_lines)
        self.worker = Worker(self.batches, pipeline, tasks, config.server.reasoning,
                             Spending(book, limits)) if tasks.worker else None
        self._tasks: list[asyncio.Task[None]] = []
        self.recent: list[dict[str, Any]] = []  # the batches, as last looked at

    async def start(self) -> None:
        await self.store.start()
        self._tasks.append(asyncio.create_task(self._watch(), name="batches watch"))
        if self.worker is not None:
            self._tasks.append(asyncio.create_task(self.worker.run(), name="batch worker"))

    async def _watch(self) -> None:
        """Look at the batches every few seconds, for /admin/status and the metrics, and
        expire those whose window has run out.
        """
        while True:
            try:
                batches = await self.store.recent_batches()
                self.recent = [_progress(b) for b in batches]
                await self.batches.expire_overdue(batches)
            except StoreDown as exc:
                log.warning("batches: the task store is unavailable (%s)", type(exc).__name__)
            except Exception:  # the watch must outlive a bad look
                log.exception("batches: looking at them failed")
            await asyncio.sleep(WATCH_SECONDS)

    async def close(self) -> None:
        await end_loops(self._tasks)
        if self.worker is not None:
            await self.worker.close()
        await self.store.close()

    def report(self) -> dict[str, Any]:
        """For /admin/status: the queue, this process's worker, the batches' progress."""
        return {"queue": self.queue, "worker": self.worker.name if self.worker else None,
                "answered": self.worker.answered if self.worker else 0,
                "batches": self.recent}


def _progress(batch: dict[str, Any]) -> dict[str, Any]:
    counts = batch["request_counts"]
    return {"id": batch["id"], "tenant": batch["tenant"], "status": batch["status"],
            "endpoint": batch["endpoint"], "created_at": batch["created_at"],
            "total": counts["total"], "completed": counts["completed"],
            "failed": counts["failed"]}
