"""A line read before its batch says it is in progress (the queue is faster than the
batch's own change of state) waits for it: it is not dropped as if the batch were over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config import TasksConfig
from gateway.tasks.batches import Batches
from gateway.tasks.local import LocalStore
from gateway.tasks.records import Line, batch_record
from gateway.tasks.spending import Spending
from gateway.tasks.worker import Worker
from gateway.tenants import KeyBook, MemoryLimits


async def test_a_line_of_a_batch_still_validating_is_put_back(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), visibility_timeout=300)
    await store.start()
    try:
        record: dict[str, Any] = batch_record("batch_1", "alice", "/v1/chat/completions",
                                              "file-1", "24h", None)
        await store.put_batch(record)  # still "validating"
        line = Line("batch_1", 1, "request-1", {"model": "m", "messages": []})
        await store.enqueue([line])
        [claimed] = await store.claim("worker", 8, 0.1)
        worker = Worker(Batches(store, 100), pipeline=None,  # type: ignore[arg-type]
                        config=TasksConfig(), reasoning="separate",
                        spending=Spending(KeyBook([], []), MemoryLimits()))
        await worker._do(claimed)  # (the pipeline is never reached)
        assert await store.remaining("batch_1") == 1  # still queued, not dropped
        assert [x.custom_id for x in await store.claim("worker", 8, 1.0)] == ["request-1"]
    finally:
        await store.close()
