"""The worker: claims batch lines from the queue (a blocking wait, no polling), answers
each through the pipeline, and writes its result before the line leaves the queue — so a
worker that dies loses nothing (its lines are claimed again after the visibility timeout)
and a line done twice is written once (results are kept per ``custom_id``).

A line no backend can answer now (the whole fleet down, every deployment busy) is put back
and tried again with backoff, until the batch's window runs out: it is not failed. So is,
for ten minutes, one whose model is not found while a backend cannot be listed. A store
that goes away (Redis restarting) stops nothing either: the worker waits for it, and the
lines it held come back to the queue after the visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Any

from gateway.backoff import backoff
from gateway.config import ReasoningMode, TasksConfig
from gateway.errors import GatewayError, Unavailable
from gateway.pipeline import Pipeline
from gateway.runtime import end_loops
from gateway.tasks.answer import Who, answer
from gateway.tasks.batches import Batches, StoreDown, result_line
from gateway.tasks.records import Line
from gateway.tasks.spending import Spending
from gateway.tenants import Tally

log = logging.getLogger(__name__)

# Answers that say "not now" rather than "no": the line waits and is tried again.
NOT_NOW = frozenset({429, 502, 503, 504})
# Save a timeout (504), which may be the line's own doing (a model that stalls on it, an
# answer longer than the total limit): after this many it is the line's answer, where it
# would take a slot at each try until its batch expired.
TIMEOUT_TRIES = 3
# A model not found while a backend cannot be listed may be that backend's (a gateway
# started while the workstation reboots): its lines wait this long before the 404 is theirs.
MISSING_SECONDS = 600.0
CLAIM_WAIT = 5.0  # seconds a claim waits for lines before looking again
NOT_YET = 0.05  # seconds before a line of a batch still being started is tried again
PUT_BACK_SECONDS = 2.0  # the most a stop waits to put the lines at work back


class Worker:
    def __init__(self, batches: Batches, pipeline: Pipeline, config: TasksConfig,
                 reasoning: ReasoningMode, spending: Spending) -> None:
        self._spending = spending
        self._batches = batches
        self._store = batches.store
        self._pipeline = pipeline
        self._config = config
        self._reasoning = reasoning
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self._running: dict[asyncio.Task[None], Line] = {}  # the lines at work
        self._written: set[tuple[str, int]] = set()  # ... whose results are written
        self._closing = False
        # Lines put back, and how often (and of those for a timeout), as counted here: the
        # local queue keeps no count; a shared one's lines carry theirs (Line.tries).
        self._tries: dict[tuple[str, int], int] = {}
        self._timeouts: dict[tuple[str, int], int] = {}
        # A line being put back, as it goes (its counts with it): should the store fail
        # meanwhile, it is this line that is put back, not one of another encoding (a
        # shared queue would then hold both, and answer it twice).
        self._going_back: dict[tuple[str, int], Line] = {}
        # ... and since when its model was not found, a backend unlisted (monotonic)
        self._missing: dict[tuple[str, int], float] = {}
        self.answered = 0
        self._down = 0  # claims in a row that found the store unavailable

    async def run(self) -> None:
        room = asyncio.Event()
        room.set()
        while True:
            free = self._config.concurrency - len(self._running)
            if free <= 0:
                room.clear()
                await room.wait()
                continue
            def ended(task: asyncio.Task[None]) -> None:
                line = self._running.pop(task, None)
                if line is not None and not self._closing:  # (close() looks at it)
                    self._written.discard((line.batch, line.n))
                room.set()

            lines = await self._claim(free)
            for line in lines:
                task = asyncio.create_task(self._safely(line))
                self._running[task] = line
                task.add_done_callback(ended)

    async def _claim(self, count: int) -> list[Line]:
        """Lines to answer; while the store is down, none (after a pause: no busy loop)."""
        try:
            lines = await self._store.claim(self.name, count, CLAIM_WAIT)
        except StoreDown as exc:
            if not self._down:
                log.warning("batch worker: the task store is unavailable (%s); waiting for "
                            "it", type(exc).__name__)
            await asyncio.sleep(backoff(self._down, 0.2, 5.0))
            self._down += 1
            return []
        if self._down:
            log.info("batch worker: the task store is back")
            self._down = 0
        return lines

    async def close(self) -> None:
        """Stop claiming; lines in flight go back to the queue at once (another worker, or
        this one started again, takes them), not after their claims' visibility timeout.
        """
        self._closing = True
        at_work = dict(self._running)
        await end_loops(at_work)
        back = [line for task, line in at_work.items() if task.cancelled()
                and (line.batch, line.n) not in self._written]  # (written: answered once)
        with contextlib.suppress(TimeoutError, *StoreDown):  # (else: after the timeout)
            async with asyncio.timeout(PUT_BACK_SECONDS):
                for line in back:
                    await self._store.put_back(self._as_it_goes_back(line), 0)

    async def _safely(self, line: Line) -> None:
        keeping = asyncio.create_task(self._keep(line, asyncio.current_task()))
        try:
            await self._do(line)
        except asyncio.CancelledError:
            raise
        except StoreDown as exc:  # (its result, if it was written, is kept once)
            log.warning("batch %s: line %d is left for later: the task store is "
                        "unavailable (%s)", line.batch, line.n, type(exc).__name__)
            await self._put_back_once_up(self._as_it_goes_back(line))
        except Exception:  # one odd line must not stop the worker; it is tried again
            log.exception("batch %s: line %d failed in the worker", line.batch, line.n)
            with contextlib.suppress(*StoreDown):
                await self._store.put_back(self._as_it_goes_back(line), self._config.retry_max)
        finally:
            keeping.cancel()

    def _as_it_goes_back(self, line: Line) -> Line:
        """The line as it was being put back, if it was (its counts with it), else as it was
        claimed: one line, one encoding in the queue."""
        return self._going_back.pop((line.batch, line.n), line)

    async def _put_back_once_up(self, line: Line) -> None:
        """Put the line back as soon as the store answers again (a cluster's node
        restarting), trying with backoff for a visibility timeout at most: after that it
        comes back by itself, its claim lapsed.
        """
        until = time.monotonic() + self._config.visibility_timeout
        tries = 0
        while time.monotonic() < until:
            await asyncio.sleep(backoff(tries, self._config.retry_initial,
                                        self._config.retry_max))
            try:
                await self._store.put_back(line, 0)
                return
            except StoreDown:
                tries += 1

    async def _keep(self, line: Line, at_work: asyncio.Task[Any] | None) -> None:
        """Renew the claim on the line while it is at work (``at_work``): one that takes
        longer than the visibility timeout (a long answer, a wait for a slot, retries) would
        otherwise be taken for a dead worker's, and answered (and charged) twice.
        """
        while True:
            await asyncio.sleep(self._config.visibility_timeout / 3)
            if at_work is None or at_work.done():  # (and its cancellation lost: see end_loops)
                return
            with contextlib.suppress(*StoreDown):
                await self._store.keep(line, self.name)

    async def _do(self, line: Line) -> None:
        batch = await self._store.batch(line.batch)
        if batch is not None and batch["status"] == "validating":
            # Queued a moment before the batch says it is in progress: not yet.
            await self._store.put_back(line, NOT_YET)
            return
        if batch is None or batch["status"] != "in_progress":
            self._forget(line)
            await self._store.discard(line)  # cancelled (or gone) meanwhile
            if batch is not None:
                await self._batches.settle(line.batch)
            return
        if time.time() >= batch["expires_at"]:
            await self._store.put_back(line, 0)
            await self._batches.expire(line.batch)
            return
        try:
            spend, key = await self._spending.admit(batch["tenant"])
        except Unavailable:  # the keys' store is away: later
            await self._later(line)
            return
        except GatewayError as refused:  # the key revoked or expired, its budget spent
            await self._finish(line, refused.status, refused.payload())
            return
        who = Who(batch["tenant"], key.models, key.cache) if key is not None else \
            Who(batch["tenant"], tuple(batch.get("models") or ()), batch.get("cache_scope") or "")
        used = Tally()
        status, body = await answer(self._pipeline, batch["endpoint"], line.body, who,
                                    self._reasoning, used)
        await self._spending.settle(spend, used, line.body, batch["endpoint"], status == 200)
        if (status in NOT_NOW and not (status == 504 and self._timed_out(line))) or \
                (status == 404 and self._maybe_unlisted(line, body)):
            await self._later(line)
        else:
            await self._finish(line, status, body)

    def _maybe_unlisted(self, line: Line, body: dict[str, Any]) -> bool:
        """Whether a line's model not found may be a backend's that could not be listed,
        for ``MISSING_SECONDS`` from the first time.
        """
        if body["error"].get("code") != "model_not_found" or \
                not self._pipeline.router.catalog.unreachable():
            return False
        since = self._missing.setdefault((line.batch, line.n), time.monotonic())
        return time.monotonic() - since < MISSING_SECONDS

    def _timed_out(self, line: Line) -> bool:
        """Whether the line has timed out ``TIMEOUT_TRIES`` times, this one counted."""
        key = (line.batch, line.n)
        self._timeouts[key] = max(self._timeouts.get(key, 0), line.timeouts) + 1
        return self._timeouts[key] >= TIMEOUT_TRIES

    async def _later(self, line: Line) -> None:
        """Put the line back, to be tried again after a backoff."""
        key = (line.batch, line.n)
        tries = max(self._tries.get(key, 0), line.tries) + 1
        timeouts = max(self._timeouts.get(key, 0), line.timeouts)
        if line.ref:  # a shared queue's: it carries its counts, to whoever claims it next
            self._tries.pop(key, None)
            self._timeouts.pop(key, None)
        else:
            self._tries[key] = tries
        carried = self._going_back[key] = dataclasses.replace(line, tries=tries,
                                                              timeouts=timeouts)
        await self._store.put_back(carried, backoff(tries - 1, self._config.retry_initial,
                                                    self._config.retry_max))
        del self._going_back[key]

    def _forget(self, line: Line) -> None:
        self._tries.pop((line.batch, line.n), None)
        self._timeouts.pop((line.batch, line.n), None)
        self._missing.pop((line.batch, line.n), None)

    async def _finish(self, line: Line, status: int, body: dict[str, Any]) -> None:
        self._forget(line)
        await self._store.finish(line, status == 200, result_line(line.custom_id, status,
                                                                  body))
        self._written.add((line.batch, line.n))
        self.answered += 1
        await self._batches.settle(line.batch)
