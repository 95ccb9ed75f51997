"""Queued work: OpenAI's Files and Batch APIs (``api``), a batch's life (``batches``), the
worker that answers its lines through the pipeline (``worker``), and where all of it is
kept (``local``: SQLite and files in the data directory).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline
from gateway.tasks.batches import Batches
from gateway.tasks.local import LocalStore
from gateway.tasks.worker import Worker

__all__ = ["Tasks"]


class Tasks:
    """The store, the batches and (in ``gateway serve``, unless told not to) a worker."""

    def __init__(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        tasks = config.tasks
        self.store = LocalStore(tasks.data_dir, tasks.visibility_timeout)
        self.batches = Batches(self.store, tasks.max_lines)
        self.worker = Worker(self.batches, pipeline, tasks, config.server.reasoning) \
            if tasks.worker else None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.start()
        if self.worker is not None:
            self._task = asyncio.create_task(self.worker.run(), name="batch worker")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.worker is not None:
            await self.worker.close()
        await self.store.close()

    def report(self) -> dict[str, Any]:
        return {"queue": "local", "worker": self.worker.name if self.worker else None,
                "answered": self.worker.answered if self.worker else 0}
