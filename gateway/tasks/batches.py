"""A batch's life: validating → in_progress → finalizing → completed, or failed (its input
did not pass), expired (its window ran out first: what was done is kept), cancelling →
cancelled (lines in flight finish, the rest are not answered). Each change is made only
from the states it may come from, so two processes (the API and a worker, two workers)
never both make it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from gateway.tasks import local, shared
from gateway.tasks.local import LocalStore
from gateway.tasks.records import Line, check_input, file_record, new_id
from gateway.tasks.shared import RedisStore

log = logging.getLogger(__name__)

# A change left half made (its process stopped, the store failed while the files were
# written) is made again by the watch once the batch has been in its state this long.
STUCK_SECONDS = 60.0
# A batch whose lines are not all queued this long after it began (or after it was last
# queued again) is queued again: its process stopped as it queued them (a live one queues
# 100 MB of lines in seconds).
REQUEUE_SECONDS = 300.0
# An expiring batch waits for its lines at work; past this, for nothing more (a count of
# lines left that does not come down: no worker runs). Longer than a line takes unless
# the backend's limits were raised (their total is 600 s).
FORCE_SECONDS = 900.0
Store = LocalStore | RedisStore  # (the same methods: local.py is the reference)
StoreDown = (*local.DOWN, *shared.DOWN)  # what a store raises when it cannot answer now


class Batches:
    def __init__(self, store: Store, max_lines: int) -> None:
        self.store = store
        self._max_lines = max_lines
        # One batch begun at a time: a 100 MB file's lines take several times that in memory
        # until they are queued (four at once took 2 GB); the others wait their turn.
        self._checking = asyncio.Semaphore(1)

    async def begin(self, record: dict[str, Any], content: bytes | None = None
                    ) -> dict[str, Any]:
        """Check the input file (``content``, or read from the store in its turn); queue its
        lines, or fail the batch with what is wrong.
        """
        async with self._checking:
            if content is None:
                content = await self.store.content(record["input_file_id"]) or b""
            return await self._begin(record, content)

    async def _begin(self, record: dict[str, Any], content: bytes) -> dict[str, Any]:
        lines, errors = await asyncio.to_thread(check_input, content, record["id"],
                                                record["endpoint"], self._max_lines)
        now = int(time.time())
        if errors:
            changed = await self.store.change_batch(record["id"], {
                "status": "failed", "failed_at": now,
                "errors": {"object": "list", "data": errors}}, when=("validating",))
        else:
            changed = await self.store.change_batch(record["id"], {
                "status": "in_progress", "in_progress_at": now, "queued": False,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0}},
                when=("validating",))
            if changed is not None:  # (queued once in progress: a worker that reads a line
                # at once finds its batch in progress, not still validating)
                await self.store.keep_ids(record["id"], [x.custom_id for x in lines])
                changed = await self._queue(record["id"], lines, len(lines)) or changed
        if changed is None:  # cancelled meanwhile, or failed by a watch that took it for
            # abandoned: nothing is queued
            changed = await self.store.batch(record["id"])
        assert changed is not None
        return changed

    async def _queue(self, batch_id: str, lines: list[Line], total: int
                     ) -> dict[str, Any] | None:
        """``lines`` (of ``total``) queued, and the batch said to be: one whose process
        stopped half way is queued again by the watch (a line queued twice is answered
        twice, and counted once).
        """
        await self.store.enqueue(lines, total)
        return await self.store.change_batch(batch_id, {"queued": True}, when=("in_progress",))

    async def _requeue(self, batch: dict[str, Any]) -> None:
        """A batch left in progress with its lines not all queued (its process stopped as
        it queued them): queued again by one process (the others' watches find it taken),
        or, its input gone, failed with the answers it has.
        """
        now = int(time.time())
        claimed = await self.store.change_batch(
            batch["id"], {"requeued_at": now}, when=("in_progress",),
            match={"queued": False, "requeued_at": batch.get("requeued_at")})
        if claimed is None:
            return
        async with self._checking:  # (a big input's lines take memory, as a begin's do)
            await self._requeue_lines(claimed)

    async def _requeue_lines(self, batch: dict[str, Any]) -> None:
        now = int(time.time())
        content = await self.store.content(batch["input_file_id"])
        if content is None:
            files = await self._write_files(batch, await self.store.ids(batch["id"]),
                                            "batch_interrupted")
            await self.store.change_batch(batch["id"], {
                **files, "status": "failed", "failed_at": now, "errors": {
                    "object": "list", "data": [{
                        "code": "batch_interrupted", "param": None, "line": None,
                        "message": "The gateway stopped while it queued this batch's lines, "
                                   "and its input file is gone: the lines answered are in "
                                   "its output file; create a batch of the rest."}]}},
                when=("in_progress",))
            return
        lines, _ = await asyncio.to_thread(check_input, content, batch["id"],
                                           batch["endpoint"], self._max_lines)
        answered = {r["custom_id"] for _, r in await self.store.results(batch["id"])}
        log.warning("batch %s was left with its lines not all queued; queued again",
                    batch["id"])
        await self._queue(batch["id"], [x for x in lines if x.custom_id not in answered],
                          len(lines))
        await self.settle(batch["id"])  # (should every line have been answered meanwhile)

    async def cancel(self, batch_id: str) -> dict[str, Any] | None:
        """Stop answering the batch's lines; those in flight finish."""
        changed = await self.store.change_batch(
            batch_id, {"status": "cancelling", "cancelling_at": int(time.time())},
            when=("validating", "in_progress"))
        if changed is not None:
            await self.store.drop_lines(batch_id)
            return await self.settle(batch_id) or changed
        return None

    async def expire(self, batch_id: str) -> None:
        """Its window ran out: lines not yet answered are not answered; the error file
        lists them (``batch_expired``) beside the lines that failed. One process makes the
        change (the others find it made): the batch is ``finalizing`` until its lines at
        work are done (their answers are kept, and charged, as OpenAI keeps work done),
        then ``expired`` with its files; should writing fail, the watch writes them again
        a minute later (and without waiting for lines left, after ``FORCE_SECONDS``).
        """
        changed = await self.store.change_batch(
            batch_id, {"status": "finalizing", "finalizing_at": int(time.time()),
                       "expiring": True}, when=("in_progress",))
        if changed is None:
            return
        await self.store.drop_lines(batch_id)  # (on Redis, workers drop them as read)
        log.info("batch %s expired", batch_id)
        await self.settle(batch_id)

    async def _expired_files(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        ids = await self.store.ids(batch["id"])
        if ids is None:  # (a batch begun before its ids were kept: its input's)
            content = await self.store.content(batch["input_file_id"]) or b""
            lines, _ = await asyncio.to_thread(check_input, content, batch["id"],
                                               batch["endpoint"], self._max_lines)
            ids = [x.custom_id for x in lines]
        files = await self._write_files(batch, ids)
        return await self.store.change_batch(batch["id"], {
            **files, "status": "expired", "expired_at": int(time.time()), "expiring": False},
            when=("finalizing",))

    async def expire_overdue(self, batches: list[dict[str, Any]]) -> None:
        """Expire those of ``batches`` whose window has run out (a batch whose lines all
        wait for a fleet that is down is expired here, not only when a line is tried), and
        finish a change left half made: files not written (the store failed meanwhile), a
        batch left validating (its process stopped before its lines were queued).
        """
        now = time.time()
        for batch in batches:
            status = batch["status"]
            stuck = now - (batch.get(f"{status}_at") or batch["created_at"]) > STUCK_SECONDS
            if status == "in_progress" and now >= batch["expires_at"]:
                await self.expire(batch["id"])
            elif not stuck:
                continue
            elif status == "in_progress" and batch.get("queued") is False and \
                    now - max(batch.get("in_progress_at") or 0,
                              batch.get("requeued_at") or 0) > REQUEUE_SECONDS:
                await self._requeue(batch)
            elif status == "finalizing" and batch.get("expiring") and \
                    now - (batch.get("finalizing_at") or now) > FORCE_SECONDS:
                await self._expired_files(batch)  # lines still counted, none at work
            elif status == "finalizing" and batch.get("expiring"):
                await self.settle(batch["id"])  # its files, once no line is at work
            elif status == "finalizing":
                await self._completed(batch)
            elif status == "cancelling":
                await self.settle(batch["id"])
            elif status == "validating":
                await self._abandoned(batch)

    async def settle(self, batch_id: str) -> dict[str, Any] | None:
        """When no line is left: completed (or cancelled, or expired) with its output and
        error files.
        """
        if await self.store.remaining(batch_id) > 0:  # (a count taken down twice, by a
            # line done twice, may go below 0)
            return None
        now = int(time.time())
        done = await self.store.change_batch(
            batch_id, {"status": "finalizing", "finalizing_at": now}, when=("in_progress",))
        if done is not None:
            return await self._completed(done)
        batch = await self.store.batch(batch_id)
        if batch is not None and batch["status"] == "finalizing" and batch.get("expiring"):
            return await self._expired_files(batch)
        if batch is None or batch["status"] != "cancelling":
            return None
        files = await self._write_files(batch)
        return await self.store.change_batch(
            batch_id, {**files, "status": "cancelled", "cancelled_at": int(time.time())},
            when=("cancelling",))

    async def _completed(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        files = await self._write_files(batch)
        return await self.store.change_batch(
            batch["id"], {**files, "status": "completed", "completed_at": int(time.time())},
            when=("finalizing",))

    async def _abandoned(self, batch: dict[str, Any]) -> None:
        changed = await self.store.change_batch(batch["id"], {
            "status": "failed", "failed_at": int(time.time()), "errors": {
                "object": "list", "data": [{
                    "code": "validation_interrupted", "param": None, "line": None,
                    "message": "The gateway stopped while it checked this batch's input; "
                               "create the batch again."}]}}, when=("validating",))
        if changed is not None:
            await self.store.drop_lines(batch["id"])
            log.warning("batch %s was left validating; failed", batch["id"])

    async def _write_files(self, batch: dict[str, Any], expected: list[str] | None = None,
                           why: str = "batch_expired") -> dict[str, Any]:
        """The output file (lines answered 200) and the error file (the rest, and those of
        ``expected`` not answered, for ``why``: an expired batch's), as OpenAI writes them:
        ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``
        a line.
        """
        results = await self.store.results(batch["id"])
        out = [orjson.dumps(r) for ok, r in results if ok]
        bad = [orjson.dumps(r) for ok, r in results if not ok]
        answered = {r["custom_id"] for _, r in results}
        bad += [orjson.dumps(_unanswered(custom_id, why)) for custom_id in expected or ()
                if custom_id not in answered]
        changes: dict[str, Any] = {}
        for field, lines in (("output_file_id", out), ("error_file_id", bad)):
            if lines:
                # Named after the batch: written again (by a watch that found the batch
                # stuck, by two at once), each file replaces itself, never adds a copy.
                file_id = f"file-{batch['id'].removeprefix('batch_')}-{field[:-8]}"
                content = b"\n".join(lines) + b"\n"
                await self.store.save_file(file_record(
                    file_id, batch["tenant"], f"{batch['id']}_{field[:-8]}.jsonl",
                    "batch_output", len(content)), content)
                changes[field] = file_id
        return changes


def result_line(custom_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """One line of an output or error file."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": new_id("req_"), "body": body},
            "error": None}


UNANSWERED = {
    "batch_expired": "This request was not answered before the batch's completion window "
                     "ran out.",
    "batch_interrupted": "This request was not answered: the gateway stopped while it queued "
                         "the batch's lines, and the batch's input file is gone."}


def _unanswered(custom_id: str, why: str) -> dict[str, Any]:
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None,
            "error": {"code": why, "message": UNANSWERED[why]}}
