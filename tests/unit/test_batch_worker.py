"""A line read before its batch says it is in progress (the queue is faster than the
batch's own change of state) waits for it: it is not dropped as if the batch were over; and
the watch finishes a batch's change that was left half made.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.config import TasksConfig
from gateway.tasks.batches import FORCE_SECONDS, STUCK_SECONDS, Batches
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


async def test_the_watch_finishes_a_change_left_half_made(tmp_path: Path) -> None:
    """A batch left finalizing (the store failed while its files were written) is completed
    with its files (once, when two processes do it at once); one left validating (its
    process stopped while queueing its lines) is failed, its queued lines dropped. Batches
    in those states for less than a minute are left alone: their change may be under way.
    """
    store = LocalStore(str(tmp_path), visibility_timeout=300)
    await store.start()
    batches = Batches(store, 100)
    try:
        long_ago = int(time.time()) - 2 * int(STUCK_SECONDS)
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
        content = orjson.dumps({"custom_id": "request-1", "method": "POST",
                                "url": "/v1/chat/completions", "body": body})
        done = batch_record("batch_done", "alice", "/v1/chat/completions", "file-1", "24h",
                            None)
        await store.put_batch(done)
        await batches.begin(done, content)
        [line] = await store.claim("worker", 8, 0.1)
        await store.finish(line, True, {"custom_id": "request-1", "response": {}})
        await store.change_batch("batch_done", {"status": "finalizing",
                                                "finalizing_at": long_ago},
                                 when=("in_progress",))
        left = batch_record("batch_left", "alice", "/v1/chat/completions", "file-1", "24h",
                            None)
        await store.put_batch({**left, "created_at": long_ago})
        await store.enqueue([Line("batch_left", 1, "request-1", body)])
        young = batch_record("batch_young", "alice", "/v1/chat/completions", "file-1", "24h",
                             None)
        await store.put_batch(young)

        seen = await store.recent_batches()  # two watches (two processes) at once
        await asyncio.gather(batches.expire_overdue(seen), batches.expire_overdue(seen))

        completed = await store.batch("batch_done")
        assert completed is not None and completed["status"] == "completed"
        output = await store.content(completed["output_file_id"])
        assert output is not None and orjson.loads(output)["custom_id"] == "request-1"
        # Both wrote the files; each replaced the other's, and no copy is left over.
        assert [f["id"] for f in await store.files("alice")] == [completed["output_file_id"]]
        failed = await store.batch("batch_left")
        assert failed is not None and failed["status"] == "failed"
        assert [e["code"] for e in failed["errors"]["data"]] == ["validation_interrupted"]
        assert await store.remaining("batch_left") == 0
        still = await store.batch("batch_young")
        assert still is not None and still["status"] == "validating"
    finally:
        await store.close()


async def test_an_expiring_batch_waits_for_its_lines_at_work(tmp_path: Path) -> None:
    """Expired with a line at work, a batch stays finalizing (the watch too leaves it, a
    minute on) until the line is answered, and that answer is in its output file; the line
    not yet begun is batch_expired. A count of lines that never comes down (no worker
    runs) is waited for FORCE_SECONDS at most.
    """
    store = LocalStore(str(tmp_path), visibility_timeout=300)
    await store.start()
    batches = Batches(store, 100)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
        content = b"\n".join(orjson.dumps({"custom_id": f"request-{n}", "method": "POST",
                                           "url": "/v1/chat/completions", "body": body})
                             for n in (1, 2))
        source = {"id": "file-1", "object": "file", "bytes": len(content), "created_at": 0,
                  "filename": "in.jsonl", "purpose": "batch", "tenant": "alice"}
        await store.save_file(source, content)
        record = batch_record("batch_1", "alice", "/v1/chat/completions", "file-1", "24h",
                              None)
        await store.put_batch(record)
        await batches.begin(record, content)
        [at_work] = await store.claim("worker", 1, 0.1)

        await batches.expire("batch_1")
        a_minute_on = int(time.time()) - 2 * int(STUCK_SECONDS)
        await store.change_batch("batch_1", {"finalizing_at": a_minute_on},
                                 when=("finalizing",))
        await batches.expire_overdue(await store.recent_batches())
        waiting = await store.batch("batch_1")
        assert waiting is not None and waiting["status"] == "finalizing"

        await store.finish(at_work, True, {"custom_id": at_work.custom_id, "response": {}})
        await batches.settle("batch_1")  # (as the worker does once a line is done)
        expired = await store.batch("batch_1")
        assert expired is not None and expired["status"] == "expired"
        kept = await store.content(expired["output_file_id"])
        assert kept is not None and orjson.loads(kept)["custom_id"] == at_work.custom_id
        lost = await store.content(expired["error_file_id"])
        assert lost is not None and orjson.loads(lost)["error"]["code"] == "batch_expired"

        stuck = batch_record("batch_2", "alice", "/v1/chat/completions", "file-1", "24h",
                             None)
        await store.put_batch(stuck)
        await batches.begin(stuck, content)
        await store.claim("gone", 2, 0.1)  # held by a worker that died
        await batches.expire("batch_2")
        long_ago = int(time.time()) - int(FORCE_SECONDS) - 1
        await store.change_batch("batch_2", {"finalizing_at": long_ago},
                                 when=("finalizing",))
        await batches.expire_overdue(await store.recent_batches())
        forced = await store.batch("batch_2")
        assert forced is not None and forced["status"] == "expired"
    finally:
        await store.close()


async def test_a_stop_puts_back_only_the_lines_not_yet_answered(
        tmp_path: Path, monkeypatch: Any) -> None:
    """Lines at work when the worker stops go back to the queue at once, but not one whose
    result was written as the stop came (it would be answered, and charged, again)."""
    store = LocalStore(str(tmp_path), visibility_timeout=300)
    await store.start()
    batches = Batches(store, 100)
    try:
        record: dict[str, Any] = batch_record("batch_1", "", "/v1/chat/completions",
                                              "file-1", "24h", None)
        await store.put_batch(record)
        await store.change_batch("batch_1", {"status": "in_progress"})
        await store.enqueue([Line("batch_1", n, f"request-{n}", {"model": "m"})
                             for n in (1, 2)])

        settling_now, second = asyncio.Event(), asyncio.Event()
        asked: list[int] = []

        async def answer(*_: Any, **__: Any) -> tuple[int, dict[str, Any]]:
            asked.append(1)
            if len(asked) == 2:
                second.set()
            await asyncio.sleep(0.05 if len(asked) == 1 else 30)
            return 200, {"ok": True}

        async def settling(batch: str) -> None:
            settling_now.set()  # the stop comes as the first line's batch is settled
            await asyncio.sleep(30)

        monkeypatch.setattr("gateway.tasks.worker.answer", answer)
        monkeypatch.setattr(batches, "settle", settling)
        put_back: list[str] = []
        put = store.put_back

        async def recorded(line: Line, delay: float) -> None:
            put_back.append(line.custom_id)
            await put(line, delay)

        monkeypatch.setattr(store, "put_back", recorded)
        worker = Worker(batches, pipeline=None,  # type: ignore[arg-type]
                        config=TasksConfig(), reasoning="separate",
                        spending=Spending(KeyBook([], []), MemoryLimits()))
        running = asyncio.create_task(worker.run())
        async with asyncio.timeout(10):
            await settling_now.wait()
            await second.wait()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()
        [(_, written)] = await store.results("batch_1")
        assert put_back == [n for n in ("request-1", "request-2")
                            if n != written["custom_id"]]
    finally:
        await store.close()
