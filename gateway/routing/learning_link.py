"""Learned routing shared through Redis (``[routing.learned] redis_url``): every gateway
process learns from every process's outcomes, and they outlive a restart of all of them.

Each outcome learned from goes into one stream (``gw:{router}:learned``), which every
process reads (a blocking read, no polling) and learns from in turn, skipping its own; the
outcomes themselves go into another (``gw:{router}:outcomes``, for export) and under their
request id (so feedback sent to any process finds them). Every few seconds a process writes
what it has learned, with the last entry of the stream it covers, so a process that starts
reads that and only the entries after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.routing.learned import LearnedOrder

log = logging.getLogger(__name__)

LEARNED, OUTCOMES, STATE = "gw:{router}:learned", "gw:{router}:outcomes", "gw:{router}:state"
OUTCOME_TTL = 7 * 24 * 3600  # seconds an outcome can still be rated by its request id
STREAM_LIMIT = 100_000  # entries kept in each stream (about)
READ_WAIT_MS = 5000
DOWN = (RedisError, OSError, TimeoutError)


def _outcome_key(request_id: str) -> str:
    return f"gw:router:outcome:{request_id}"


class LearningLink:
    def __init__(self, url: str, learned: LearnedOrder, outcomes: int) -> None:
        self._redis: Any = aioredis.from_url(url, socket_connect_timeout=5,
                                             socket_timeout=READ_WAIT_MS / 1000 + 10)
        self._learned = learned
        self._outcomes = outcomes
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._last = "0-0"  # the last entry of the learned stream applied here
        self._sends: asyncio.Queue[tuple[str, dict[str, bytes]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """What every process learned so far, then keep reading and sending."""
        try:
            await self._restore()
        except DOWN as exc:
            log.warning("learned routing: Redis is unavailable (%s); learning here alone "
                        "until it is back", type(exc).__name__)
        self._tasks = [asyncio.create_task(self._read(), name="learned routing: read"),
                       asyncio.create_task(self._send(), name="learned routing: send")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*DOWN):
            await self._flush()
            await self.save()
        await self._redis.aclose()

    # ---- what this process learned and saw, sent to the others

    def learned(self, alias: str, model: str, x: np.ndarray, reward: float) -> None:
        self._sends.put_nowait((LEARNED, {
            "by": self.name.encode(), "alias": alias.encode(), "model": model.encode(),
            "x": orjson.dumps(x.tolist()), "reward": repr(reward).encode()}))

    def outcome(self, record: dict[str, Any]) -> None:
        self._sends.put_nowait((OUTCOMES, {"outcome": orjson.dumps(record)}))

    async def find(self, request_id: str) -> dict[str, Any] | None:
        """An outcome by its request id, whichever process kept it."""
        raw = await self._redis.get(_outcome_key(request_id))
        found: dict[str, Any] | None = orjson.loads(raw) if raw else None
        return found

    async def rated(self, record: dict[str, Any]) -> None:
        """An outcome with the client's feedback, for every process to find."""
        if record.get("id"):
            await self._redis.set(_outcome_key(record["id"]), orjson.dumps(record),
                                  ex=OUTCOME_TTL)

    async def all(self) -> list[dict[str, Any]]:
        """The newest outcomes of every process, oldest first."""
        entries = await self._redis.xrevrange(OUTCOMES, count=self._outcomes)
        return [orjson.loads(fields[b"outcome"]) for _, fields in reversed(entries)]

    async def _send(self) -> None:
        while True:
            first = await self._sends.get()
            batch = [first]
            while not self._sends.empty() and len(batch) < 500:
                batch.append(self._sends.get_nowait())
            try:
                await self._write(batch)
            except DOWN as exc:  # lost for the others; learned here all the same
                log.warning("learned routing: could not share %d outcomes (%s)", len(batch),
                            type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _flush(self) -> None:
        batch = []
        while not self._sends.empty():
            batch.append(self._sends.get_nowait())
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[tuple[str, dict[str, bytes]]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, fields in batch:
                pipe.xadd(stream, fields, maxlen=STREAM_LIMIT, approximate=True)
                if stream == OUTCOMES:
                    record = orjson.loads(fields["outcome"])
                    if record.get("id"):
                        pipe.set(_outcome_key(record["id"]), fields["outcome"],
                                 ex=OUTCOME_TTL)
            await pipe.execute()

    # ---- what the others learned

    async def _read(self) -> None:
        failures = 0
        while True:
            try:
                found = await self._redis.xread({LEARNED: self._last}, count=500,
                                                block=READ_WAIT_MS)
                failures = 0
            except DOWN as exc:
                if not failures:
                    log.warning("learned routing: Redis is unavailable (%s)",
                                type(exc).__name__)
                failures += 1
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            for _, entries in found or []:
                self._apply(entries)

    def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for ref, fields in entries:
            self._last = ref.decode()
            if fields.get(b"by", b"").decode() == self.name:
                continue  # learned here already
            try:
                x = np.array(orjson.loads(fields[b"x"]), dtype=float)
                self._learned.learn(fields[b"alias"].decode(), fields[b"model"].decode(), x,
                                    float(fields[b"reward"]))
            except (KeyError, ValueError) as exc:
                log.warning("learned routing: skipped an entry it cannot read (%s)", exc)

    # ---- what was learned, kept in Redis

    async def save(self) -> None:
        """What this process has learned, and the stream's entry it covers up to."""
        state = {"last": self._last, "learned": self._learned.dump()}
        await self._redis.set(STATE, orjson.dumps(state))

    async def _restore(self) -> None:
        raw = await self._redis.get(STATE)
        if raw:
            state = orjson.loads(raw)
            try:
                self._learned.load(state["learned"])
                self._last = state["last"]
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("learned routing: the state in Redis cannot be read (%s); "
                            "learning from the stream", exc)
        while True:  # the entries since: at once, not one blocking read at a time
            found = await self._redis.xread({LEARNED: self._last}, count=1000)
            if not found:
                break
            for _, entries in found:
                self._apply(entries)
