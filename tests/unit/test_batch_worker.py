"""A line read before its batch says it is in progress (the queue is faster than the
batch's own change of state) waits for it: it is not dropped as if the batch were over; and
the watch finishes a batch's change that was left half made.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import TasksConfig
from gateway.tasks.batches import FORCE_SECONDS, REQUEUE_SECONDS, STUCK_SECONDS, Batches
from gateway.tasks.local import LocalStore
from gateway.tasks.records import Line, batch_record
from gateway.tasks.shared import RedisStore
from gateway.tasks.spending import Spending
from gateway.tasks.worker import Worker
from gateway.tenants import KeyBook, MemoryLimits
from tests.redis_peer import RedisServer


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


@contextlib.asynccontextmanager
async def a_store(kind: str, folder: Path) -> AsyncIterator[LocalStore | RedisStore]:
    """The local store, or the Redis one on a redis-server of the test's own."""
    with contextlib.ExitStack() as stack:
        store: LocalStore | RedisStore
        if kind == "redis":
            store = RedisStore(stack.enter_context(RedisServer()).url, visibility_timeout=300)
        else:
            store = LocalStore(str(folder), visibility_timeout=300)
        await store.start()
        try:
            yield store
        finally:
            await store.close()


def batch_input(n: int) -> tuple[bytes, list[Line]]:
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    content = b"\n".join(orjson.dumps({"custom_id": f"request-{i}", "method": "POST",
                                       "url": "/v1/chat/completions", "body": body})
                         for i in range(1, n + 1))
    return content, [Line("batch_1", i, f"request-{i}", body) for i in range(1, n + 1)]


async def drop_what_is_queued(store: LocalStore | RedisStore, batches: Batches) -> None:
    """As a worker does with the lines of a batch no longer in progress (on Redis, an
    expiring batch waits for that)."""
    for line in await store.claim("worker", 100, 0.1):
        await store.discard(line)
        await batches.settle(line.batch)


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_a_batch_left_half_queued_is_queued_again_and_completes(
        kind: str, tmp_path: Path) -> None:
    """The gateway stopped while it queued a batch's lines: the batch said in_progress for a
    day with nothing left to do, then expired (on Redis, its count of lines left never came
    down to 0). The watch queues again the lines not yet answered.
    """
    async with a_store(kind, tmp_path) as store:
        batches = Batches(store, 100)
        content, lines = batch_input(3)
        await store.save_file({"id": "file-1", "object": "file", "bytes": len(content),
                               "created_at": 0, "filename": "in.jsonl", "purpose": "batch",
                               "tenant": "alice"}, content)
        record = batch_record("batch_1", "alice", "/v1/chat/completions", "file-1", "24h",
                              None)
        await store.put_batch(record)
        await store.change_batch("batch_1", {
            "status": "in_progress", "in_progress_at": int(time.time()), "queued": False,
            "request_counts": {"total": 3, "completed": 0, "failed": 0}})
        await store.enqueue(lines[:1], total=3)  # ... and the process stopped
        [first] = await store.claim("worker", 8, 0.1)
        await store.finish(first, True, {"custom_id": first.custom_id, "response": {}})
        await batches.expire_overdue(await store.recent_batches())
        assert await store.claim("worker", 8, 0.1) == []  # (it may be queueing them still)

        long_ago = int(time.time()) - int(REQUEUE_SECONDS) - 1
        await store.change_batch("batch_1", {"in_progress_at": long_ago})
        seen = await store.recent_batches()  # two watches (two processes) at once
        await asyncio.gather(batches.expire_overdue(seen), batches.expire_overdue(seen))
        again = await store.claim("worker", 8, 1.0)
        assert sorted(x.custom_id for x in again) == ["request-2", "request-3"]  # once each
        for line in again:
            await store.finish(line, True, {"custom_id": line.custom_id, "response": {}})
        await batches.settle("batch_1")  # (as the worker does once a line is done)
        done = await store.batch("batch_1")
        assert done is not None and done["status"] == "completed", done
        assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        output = await store.content(done["output_file_id"])
        assert output is not None and len(output.splitlines()) == 3


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_a_batch_left_half_queued_with_its_input_deleted_keeps_what_it_answered(
        kind: str, tmp_path: Path) -> None:
    async with a_store(kind, tmp_path) as store:
        batches = Batches(store, 100)
        _, lines = batch_input(3)
        record = batch_record("batch_1", "alice", "/v1/chat/completions", "file-1", "24h",
                              None)
        await store.put_batch(record)
        long_ago = int(time.time()) - int(REQUEUE_SECONDS) - 1
        await store.change_batch("batch_1", {
            "status": "in_progress", "in_progress_at": long_ago, "queued": False,
            "request_counts": {"total": 3, "completed": 0, "failed": 0}})
        await store.keep_ids("batch_1", [x.custom_id for x in lines])
        await store.enqueue(lines[:1], total=3)
        [first] = await store.claim("worker", 8, 0.1)
        await store.finish(first, True, {"custom_id": first.custom_id, "response": {}})
        await batches.expire_overdue(await store.recent_batches())  # (no file-1: deleted)
        failed = await store.batch("batch_1")
        assert failed is not None and failed["status"] == "failed"
        kept = await store.content(failed["output_file_id"])
        assert kept is not None and orjson.loads(kept)["custom_id"] == "request-1"
        lost = await store.content(failed["error_file_id"])
        assert lost is not None
        assert {orjson.loads(x)["error"]["code"] for x in lost.splitlines()} == \
            {"batch_interrupted"}


@pytest.mark.parametrize("kind", ["local", "redis"])
async def test_an_expired_batch_lists_its_unanswered_lines_with_its_input_deleted(
        kind: str, tmp_path: Path) -> None:
    """(OpenAI lets a batch's input file be deleted once the batch is made: its error file
    then listed no batch_expired line at all.)"""
    async with a_store(kind, tmp_path) as store:
        batches = Batches(store, 100)
        content, _ = batch_input(3)
        record = batch_record("batch_1", "alice", "/v1/chat/completions", "file-1", "24h",
                              None)
        await store.put_batch(record)
        await batches.begin(record, content)
        await store.delete_file("file-1")
        await batches.expire("batch_1")
        await drop_what_is_queued(store, batches)
        expired = await store.batch("batch_1")
        assert expired is not None and expired["status"] == "expired"
        lost = await store.content(expired["error_file_id"])
        assert lost is not None
        assert sorted(orjson.loads(x)["custom_id"] for x in lost.splitlines()) == \
            ["request-1", "request-2", "request-3"]


async def test_the_watch_sees_an_open_batch_behind_a_hundred_newer_ones(tmp_path: Path
                                                                       ) -> None:
    """(On Redis the watch read the hundred newest batches only: an older one left in
    progress past its window never expired.)"""
    async with a_store("redis", tmp_path) as store:
        batches = Batches(store, 100)
        content, _ = batch_input(1)
        old = batch_record("batch_old", "alice", "/v1/chat/completions", "file-1", "24h", None)
        await store.put_batch(old)
        await batches.begin(old, content)
        await store.change_batch("batch_old", {"expires_at": int(time.time()) - 1})
        for n in range(120):
            newer = batch_record(f"batch_{n:03}", "bob", "/v1/chat/completions", "file-2",
                                 "24h", None)
            await store.put_batch({**newer, "status": "completed"})
        await store._redis.delete("gw:tasks:open", "gw:tasks:open:filled")  # (as before the
        # set was kept: it is made once from every batch)
        await batches.expire_overdue(await store.recent_batches())
        await drop_what_is_queued(store, batches)
        expired = await store.batch("batch_old")
        assert expired is not None and expired["status"] == "expired"
        assert await store._redis.zrange("gw:tasks:open", 0, -1) == []
        assert len([b for b in await store.recent_batches()
                    if b["status"] == "completed"]) == 10


@contextlib.asynccontextmanager
async def one_line_claimed() -> AsyncIterator[tuple[RedisStore, Worker, Line]]:
    """A Redis queue of the test's own holding one line, claimed, and a worker."""
    with RedisServer() as redis:
        store = RedisStore(redis.url, visibility_timeout=30)
        await store.start()
        try:
            await store.enqueue([Line("batch_1", 1, "request-1", {"model": "m"})], 1)
            [claimed] = await store.claim("worker", 8, 1.0)
            yield store, Worker(Batches(store, 100), pipeline=None,  # type: ignore[arg-type]
                                config=TasksConfig(retry_initial=0.01, retry_max=0.01),
                                reasoning="separate",
                                spending=Spending(KeyBook([], []), MemoryLimits())), claimed
        finally:
            await store.close()


async def test_a_line_whose_put_back_broke_half_way_is_queued_once() -> None:
    """The store failed after the line went into the queue's later set and before its
    claim was acknowledged: the worker put the line back again, as it was claimed, where
    the set held it with its tries counted: two members, and the line answered twice.
    """
    async with one_line_claimed() as (store, worker, claimed):
        acknowledge = store._done_with
        broken = [True]

        async def done_with(line: Line) -> None:
            if broken.pop() if broken else False:
                raise ConnectionError("the connection broke")  # (once)
            await acknowledge(line)

        store._done_with = done_with  # type: ignore[method-assign]

        async def do(line: Line) -> None:  # as for a 503: put back for later
            await worker._later(line)

        worker._do = do  # type: ignore[method-assign]
        await worker._safely(claimed)
        await asyncio.sleep(0.1)
        again = [line for _ in range(3) for line in await store.claim("other", 8, 0.2)]
        assert [(line.n, line.tries) for line in again] == [(1, 1)]


async def test_a_line_put_back_half_way_as_the_worker_stops_is_queued_once() -> None:
    """(The same, when the worker stops as the put-back is half way: it put the line back
    as it was claimed.)"""
    async with one_line_claimed() as (store, worker, claimed):
        acknowledge = store._done_with
        stalled = asyncio.Event()

        async def done_with(line: Line) -> None:  # an acknowledgement that takes long
            stalled.set()
            await asyncio.sleep(5)

        store._done_with = done_with  # type: ignore[method-assign]

        async def do(line: Line) -> None:
            await worker._later(line)

        worker._do = do  # type: ignore[method-assign]
        task = asyncio.create_task(worker._safely(claimed))
        worker._running[task] = claimed
        await stalled.wait()  # (in the later set; its claim not acknowledged)
        store._done_with = acknowledge  # type: ignore[method-assign]
        await worker.close()
        again = [line for _ in range(3) for line in await store.claim("other", 8, 0.2)]
        assert [(line.n, line.tries) for line in again] == [(1, 1)]
