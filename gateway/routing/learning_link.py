"""Learned routing shared through Redis (``[routing.learned] redis_url``): every gateway
process learns from every process's outcomes, and they outlive a restart of all of them.

Each outcome to learn from goes into one stream (``gw:{router}:learned``), which every
process reads (a blocking read, no polling) and learns from, its own entries too: so what a
process has learned is exactly the stream up to the entry it last read, and a snapshot of
it with that entry's id (written every few seconds) lets a process that starts read only the
entries after it. While Redis is away, a process learns from its own outcomes alone. The
outcomes themselves go into another stream (``gw:{router}:outcomes``, for export; feedback
is added there as it comes), and what feedback needs of each, under its tenant and request
id, for an hour (feedback sent to any process finds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError, RedisError

from gateway.routing.learned import LearnedOrder, encode
from gateway.runtime import end_loops
from gateway.store import START_WAIT, connect

log = logging.getLogger(__name__)

LEARNED, OUTCOMES, STATE = "gw:{router}:learned", "gw:{router}:outcomes", "gw:{router}:state"
FEEDBACK_SECONDS = 3600  # how long an outcome can be rated through another process
FIRST_WORD_WAIT = 1.0  # seconds feedback waits for Redis to say whether it is the first
STREAM_LIMIT = 100_000  # entries kept in each stream (about)
BACKLOG = 10_000  # entries waiting to be sent while Redis is slow or away (then dropped)
RATED = ("id", "tenant", "alias", "chosen", "model", "x", "latency_ms", "candidates",
         "feedback")  # what feedback needs of an outcome
READ_WAIT_MS = 5000
DOWN = (RedisError, OSError, TimeoutError)
CLOSE_WAIT = 2.0  # seconds the reading and sending loops get to end, at shutdown
CONNECTIONS: dict[str, Any] = {"socket_connect_timeout": 5,
                               "socket_timeout": READ_WAIT_MS / 1000 + 10}


def _outcome_key(tenant: str, request_id: str) -> str:
    return f"gw:router:outcome:{tenant}:{request_id}"


def _rated_key(tenant: str, request_id: str) -> str:
    return f"gw:router:rated:{tenant}:{request_id}"


class LearningLink:
    def __init__(self, url: str, learned: LearnedOrder, outcomes: int) -> None:
        self._url = url
        # A plain Redis until start finds out whether it is a cluster's node.
        self._redis: Any = aioredis.from_url(url, **CONNECTIONS)
        self._learned = learned
        self._outcomes = outcomes
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._last = "0-0"  # the last entry of the learned stream applied here
        self._restored = False  # (until then, nothing is saved over the shared snapshot)
        self._sends: asyncio.Queue[tuple[str, dict[str, bytes]]] = asyncio.Queue(BACKLOG)
        self.dropped = 0  # entries not sent: the backlog was full
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._finding_out: asyncio.Lock | None = None

    async def start(self) -> None:
        """What every process learned so far, then keep reading and sending."""
        deadline = asyncio.get_running_loop().time() + START_WAIT  # (in all)
        plain, self._redis = self._redis, await connect(self._url, **CONNECTIONS)
        await plain.aclose()
        try:
            async with asyncio.timeout_at(deadline):  # (else: restored by the reading loop)
                await self._restore()
        except DOWN as exc:
            log.warning("learned routing: Redis is unavailable (%s); learning here alone "
                        "until it is back", type(exc).__name__)
        except Exception:  # a snapshot that cannot be read: from the stream alone
            log.exception("learned routing: the snapshot in Redis cannot be read")
            self._restored = True
        self._tasks = [asyncio.create_task(self._read(), name="learned routing: read"),
                       asyncio.create_task(self._send(), name="learned routing: send")]

    async def _moved(self) -> None:
        """Redis answered MOVED: the node is a cluster's after all (it did not answer at
        start): through a cluster client from now on.
        """
        self._finding_out = self._finding_out or asyncio.Lock()
        async with self._finding_out:
            if not isinstance(self._redis, RedisCluster):
                plain, self._redis = self._redis, await connect(self._url, **CONNECTIONS)
                await plain.aclose()

    async def close(self) -> None:
        self._closing = True
        await end_loops(self._tasks, CLOSE_WAIT)
        with contextlib.suppress(*DOWN):
            await self._flush()
            await self.save()
        await self._redis.aclose()

    # ---- what this process learned and saw, sent to the others

    def learned(self, alias: str, model: str, x: Sequence[float], reward: float,
                rank: int | None) -> None:
        self._send_later(LEARNED, {
            "by": self.name.encode(), "alias": alias.encode(), "model": model.encode(),
            "x": orjson.dumps(x), "reward": repr(reward).encode(),
            "rank": b"" if rank is None else str(rank).encode()})

    def outcome(self, record: dict[str, Any]) -> None:
        self._send_later(OUTCOMES, {"outcome": orjson.dumps(record)})

    def rated(self, record: dict[str, Any]) -> None:
        """An outcome's feedback, for every process (and the export) to see."""
        self._send_later(OUTCOMES, {"outcome": orjson.dumps(
            {"id": record.get("id"), "tenant": record.get("tenant"),
             "at": record.get("at"), "feedback": record.get("feedback")}),
            "rated": orjson.dumps(record)})

    def _send_later(self, stream: str, fields: dict[str, bytes]) -> None:
        try:
            self._sends.put_nowait((stream, fields))
        except asyncio.QueueFull:
            self.dropped += 1

    async def find(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        """What feedback needs of an outcome, whichever process kept it."""
        raw = await self._redis.get(_outcome_key(tenant, request_id))
        found: dict[str, Any] | None = orjson.loads(raw) if raw else None
        return found

    async def first_word(self, tenant: str, request_id: str) -> bool | None:
        """Whether this is the first word on an outcome said to any process (None: Redis
        cannot say now, within a second).
        """
        try:
            async with asyncio.timeout(FIRST_WORD_WAIT):
                return bool(await self._redis.set(_rated_key(tenant, request_id), b"1",
                                                  nx=True, ex=FEEDBACK_SECONDS))
        except DOWN:
            return None

    async def all(self) -> list[dict[str, Any]]:
        """The newest outcomes of every process, oldest first."""
        entries = await self._redis.xrevrange(OUTCOMES, count=self._outcomes)
        return [orjson.loads(fields[b"outcome"]) for _, fields in reversed(entries)]

    async def _send(self) -> None:
        while not self._closing:
            first = await self._sends.get()
            batch = [first]
            while not self._sends.empty() and len(batch) < 500:
                batch.append(self._sends.get_nowait())
            try:
                await self._write(batch)
            except DOWN as exc:  # learned from here alone; the others never hear of it
                log.warning("learned routing: could not share %d entries (%s)", len(batch),
                            type(exc).__name__)
                if isinstance(exc, MovedError):
                    with contextlib.suppress(*DOWN):
                        await self._moved()
                for stream, fields in batch:
                    if stream == LEARNED:
                        self._apply_one(fields)
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
                rated = fields.pop("rated", None)
                pipe.xadd(stream, fields, maxlen=STREAM_LIMIT, approximate=True)
                record = orjson.loads(rated or fields["outcome"]) if stream == OUTCOMES \
                    else None
                if record is not None and record.get("id"):
                    pipe.set(_outcome_key(record.get("tenant") or "", record["id"]),
                             orjson.dumps({k: record.get(k) for k in RATED}),
                             ex=FEEDBACK_SECONDS)
            await pipe.execute()

    # ---- what the others learned

    async def _read(self) -> None:
        failures = 0
        while not self._closing:
            try:
                if not self._restored:
                    await self._restore()
                found = await self._redis.xread({LEARNED: self._last}, count=500,
                                                block=READ_WAIT_MS)
                failures = 0
            except DOWN as exc:
                if self._closing:
                    return
                if not failures:
                    log.warning("learned routing: Redis is unavailable (%s)",
                                type(exc).__name__)
                if isinstance(exc, MovedError):
                    with contextlib.suppress(*DOWN):
                        await self._moved()
                failures += 1
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
                continue
            except Exception:  # the reader must outlive one bad read
                log.exception("learned routing: reading what was learned failed")
                await asyncio.sleep(1.0)
                continue
            for _, entries in found or []:
                self._apply(entries)

    def _apply(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for ref, fields in entries:
            self._last = ref.decode()
            self._apply_one(fields)

    def _apply_one(self, fields: dict[Any, bytes]) -> None:
        def field(name: str) -> bytes:
            value = fields.get(name, fields.get(name.encode(), b""))
            return value if isinstance(value, bytes) else str(value).encode()
        try:
            rank = field("rank")
            learned = self._learned.learn(
                field("alias").decode(), field("model").decode(),
                orjson.loads(field("x")), float(field("reward")),
                int(rank) if rank else None)
        except Exception as exc:  # one bad entry must not stop the rest
            learned = False
            log.debug("learned routing: an entry it cannot read (%s)", exc)
        if not learned:
            log.warning("learned routing: skipped an entry it cannot learn from")

    # ---- what was learned, kept in Redis

    async def save(self) -> None:
        """What this process has learned, and the stream's entry it covers up to (not
        before it has read the snapshot there: it would write over what others learned).
        """
        if not self._restored:
            return
        state = {"last": self._last, "learned": self._learned.dump()}
        await self._redis.set(STATE, encode(state))

    async def _restore(self) -> None:
        raw = await self._redis.get(STATE)
        if raw:
            try:
                state = orjson.loads(raw)
                self._learned.load(state["learned"])
                self._last = state["last"]
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("learned routing: the snapshot in Redis cannot be read (%s); "
                            "learning from the stream", exc)
        while True:  # the entries since: at once, not one blocking read at a time
            found = await self._redis.xread({LEARNED: self._last}, count=1000)
            if not found:
                break
            for _, entries in found:
                self._apply(entries)
        self._restored = True
