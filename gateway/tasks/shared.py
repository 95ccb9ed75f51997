"""The task store in Redis, for several gateway processes and ``gateway worker`` on any
host: files, batches and results in keys of their own, the lines in one stream read by a
consumer group. The URL may name any node of a Redis Cluster: the store finds out and goes
on through a cluster client (a batch's keys share a hash tag, as do the stream and the
lines put back for later, so each script runs on one node).

A worker claims lines with ``XREADGROUP`` (a blocking read: a line is picked up as soon as
it is queued, no polling) and lines a dead worker held with ``XAUTOCLAIM`` once they have
been idle for the visibility timeout. A result is written (``HSETNX``: once per
``custom_id``, however often the line is done) before the line is acknowledged, so a worker
that dies between the two only makes another do the line again, and its second result is
not kept. A line acknowledged is deleted from the stream too. A line put back for later
waits in a sorted set by when it is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, MovedError, RedisError, ResponseError

from gateway.store import START_WAIT, Client, shown
from gateway.tasks.records import TERMINAL, Line

log = logging.getLogger(__name__)

P = "gw:tasks:"
RECENT = 100  # the newest finished batches looked at (every few seconds): and every open one
OPEN = f"{P}open"  # the batches not yet finished, by when they were made
STREAM, LATER, GROUP = "gw:{tasks}:lines", "gw:{tasks}:later", "workers"
DOWN = (RedisError, OSError, TimeoutError)  # Redis is down, restarting or unreachable
# Seconds a command's answer may take: over the longest blocking read (a claim waits 5 s
# for lines, the worker's CLAIM_WAIT), far under what a request waits for its 503.
READ_TIMEOUT = 10.0

# Keys of one batch share a hash tag, so each script touches one cluster slot.
FINISH = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  redis.call('DECR', KEYS[3])
end
"""
DISCARD = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0
then redis.call('DECR', KEYS[3]) end
"""
# A batch's record replaced only if it is still as it was read (compare and set); done
# already counts as done (the script ran, and its answer was lost and the call tried again).
CHANGE = """
local now = redis.call('GET', KEYS[1])
if now == ARGV[2] then return 1 end
if now ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""
# A batch's count of lines left: of its lines, those with no result yet (a batch queued
# again, its process having stopped half way, counts the lines answered meanwhile once).
REMAINING = """
redis.call('SET', KEYS[2], tonumber(ARGV[1]) - redis.call('HLEN', KEYS[1]))
"""
DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
for _, line in ipairs(due) do
  redis.call('ZREM', KEYS[1], line)
  redis.call('XADD', KEYS[2], '*', 'line', line)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return next[2] or false
"""  # (when the next line put back is due, if one is: a claim waits for new lines until then)


def _counts_kept(record: dict[str, Any]) -> bool:
    """Whether the batch's lines are counted in its counts key (once it is under way)."""
    return record["status"] not in ("validating", "failed")


def _count(record: dict[str, Any], counts: dict[bytes, bytes]) -> None:
    record["request_counts"] = {**record["request_counts"],
                                "completed": int(counts.get(b"completed", 0)),
                                "failed": int(counts.get(b"failed", 0))}


def batch_keys(batch: str) -> tuple[str, str, str, str, str]:
    tag = f"{P}{{{batch}}}"
    return (f"{tag}:results", f"{tag}:counts", f"{tag}:remaining", f"{tag}:dropped",
            f"{tag}:ids")


class RedisStore:
    def __init__(self, url: str, visibility_timeout: float, claims: bool = True) -> None:
        # A connection that went stale while Redis restarted fails once: tried again on a
        # new one (every command here may run twice: results are kept once per custom_id,
        # a batch's count of lines is set, not added to; a line queued twice is answered
        # twice and written once).
        # A command that timed out is not: a stalled Redis holds each call READ_TIMEOUT
        # once (a Files or Batches request waited 90 s for its 503). As many connections
        # as calls need, on a cluster too (whose client fails past its size, 100 a node by
        # default, where a plain client's pool grows).
        options: dict[str, Any] = {
            "socket_connect_timeout": 5, "socket_timeout": READ_TIMEOUT,
            "max_connections": 2**31,
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.1), 2,
                           supported_errors=(ConnectionError,)),
            "retry_on_error": [ConnectionError]}
        self._client = Client(url, "tasks", aioredis.from_url(url, **options), **options)
        self._timeout = visibility_timeout
        self._filled = False  # the set of open batches is known to be made
        self._opened: set[bytes] = set()  # the ids in it, as last read
        self.folder = shown(url)  # (what `gateway batches` says it read)
        plain = self._redis
        self._finish = plain.register_script(FINISH)
        self._discard = plain.register_script(DISCARD)
        self._due = plain.register_script(DUE)
        self._change = plain.register_script(CHANGE)
        self._remaining = plain.register_script(REMAINING)

    @property
    def _redis(self) -> Any:  # (loosely typed)
        return self._client.now

    async def start(self) -> None:
        # (START_WAIT in all: a Redis that does not answer holds each command 30 s, and
        # tries thrice)
        deadline = asyncio.get_running_loop().time() + START_WAIT
        await self._find_out()
        try:
            async with asyncio.timeout_at(deadline):
                await self._group()
        except DOWN as exc:  # a worker may start before its Redis: it waits for it
            log.warning("tasks: Redis is unavailable (%s); the queue is made when it is "
                        "back", type(exc).__name__)

    async def _find_out(self) -> None:
        """Whether Redis is a cluster's node, once it can be asked (at start, and then at
        each claim and look at the batches, every few seconds, until it could be).
        """
        await self._client.find_out(5.0)

    async def _group(self) -> None:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)

    async def close(self) -> None:
        await self._client.close()

    # ---- files

    # Records and the lists that index them live in different cluster slots, so they are
    # written in one round trip but not one transaction: should a write be cut short, a
    # list may name a record that is not there (every reader of a list skips those), or a
    # record be missing from a list (it is still found by its id).

    async def save_file(self, record: dict[str, Any], content: bytes) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(f"{P}file:{record['id']}",
                      mapping={"doc": orjson.dumps(record), "content": content})
            pipe.zadd(f"{P}files:{record['tenant']}", {record["id"]: record["created_at"]})
            await pipe.execute()

    async def file(self, file_id: str) -> dict[str, Any] | None:
        doc = await self._redis.hget(f"{P}file:{file_id}", "doc")
        return orjson.loads(doc) if doc else None

    async def files(self, tenant: str) -> list[dict[str, Any]]:
        ids = await self._redis.zrange(f"{P}files:{tenant}", 0, -1)
        return [orjson.loads(doc) for doc in await self._each(
            "hget", [f"{P}file:{i.decode()}" for i in ids], "doc") if doc]

    async def content(self, file_id: str) -> bytes | None:
        content: bytes | None = await self._redis.hget(f"{P}file:{file_id}", "content")
        return content

    async def delete_file(self, file_id: str) -> None:
        record = await self.file(file_id)
        if record is not None:
            await self._redis.zrem(f"{P}files:{record['tenant']}", file_id)
        await self._redis.delete(f"{P}file:{file_id}")

    # ---- batches

    async def put_batch(self, record: dict[str, Any]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(f"{P}batch:{record['id']}", orjson.dumps(record))
            pipe.zadd(f"{P}batches:{record['tenant']}", {record["id"]: time.time()})
            pipe.zadd(f"{P}batches", {record["id"]: time.time()})
            if record["status"] not in TERMINAL:
                pipe.zadd(OPEN, {record["id"]: time.time()})
            await pipe.execute()

    async def batch(self, batch_id: str) -> dict[str, Any] | None:
        doc = await self._redis.get(f"{P}batch:{batch_id}")
        return await self._counted(orjson.loads(doc)) if doc else None

    async def _counted(self, record: dict[str, Any]) -> dict[str, Any]:
        if _counts_kept(record):
            _count(record, await self._redis.hgetall(batch_keys(record["id"])[1]))
        return record

    async def batches(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's batches, newest first, in two round trips however many (one a
        batch took 1.2 s for 3,000)."""
        return await self._batches(await self._redis.zrevrange(f"{P}batches:{tenant}", 0, -1))

    async def _batches(self, ids: list[bytes]) -> list[dict[str, Any]]:
        """The batches of ``ids`` that are kept, counted: two round trips in all."""
        records = [orjson.loads(doc) for doc in await self._each(
            "get", [f"{P}batch:{i.decode()}" for i in ids]) if doc]
        counted = [r for r in records if _counts_kept(r)]
        for record, counts in zip(counted, await self._each(
                "hgetall", [batch_keys(r["id"])[1] for r in counted]), strict=True):
            _count(record, counts)
        return records

    async def _each(self, command: str, keys: list[str], *args: Any) -> list[Any]:
        """One command for each of ``keys``, in one round trip (a cluster's: one a node)."""
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                getattr(pipe, command)(key, *args)
            return list(await pipe.execute())

    async def recent_batches(self, finished: int = 10) -> list[dict[str, Any]]:
        """(Looked at every few seconds by every process: where a Redis that was away at
        start turns out to be a cluster.)
        """
        await self._find_out()
        try:
            ids = await self._recent_ids()
        except MovedError:  # a cluster after all (it could not be asked)
            self._client.moved()
            ids = await self._recent_ids()
        out, done = [], 0
        records = await self._batches(ids)
        closed = [r["id"] for r in records
                  if r["status"] in TERMINAL and r["id"].encode() in self._opened]
        if closed:
            await self._redis.zrem(OPEN, *closed)  # (left there by a change cut short)
        for record in sorted(records, key=lambda b: b["created_at"], reverse=True):
            if record["status"] in TERMINAL:
                done += 1
                if done > finished:
                    continue
            out.append(record)
        return out

    async def _recent_ids(self) -> list[bytes]:
        """Every open batch (however many newer ones there are: the watch must see each to
        expire it or finish a change left half made) and the newest finished ones.
        """
        if not self._filled:
            if not await self._redis.exists(f"{OPEN}:filled"):
                await self._fill_open()
                await self._redis.set(f"{OPEN}:filled", 1)  # (after: a fill cut short is
            self._filled = True  # made again, and adding twice is harmless)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrange(OPEN, 0, -1)
            pipe.zrevrange(f"{P}batches", 0, RECENT - 1)
            open_ids, newest = await pipe.execute()
        self._opened = set(open_ids)
        return list(dict.fromkeys([*open_ids, *newest]))

    async def _fill_open(self) -> None:
        """The set of open batches made from every batch, once (batches made before it was
        kept are in no set).
        """
        ids = await self._redis.zrange(f"{P}batches", 0, -1, withscores=True)
        for start in range(0, len(ids), 1000):
            part = ids[start:start + 1000]
            records = await self._each("get", [f"{P}batch:{i.decode()}" for i, _ in part])
            opened = {i: when for (i, when), doc in zip(part, records, strict=True)
                      if doc and orjson.loads(doc)["status"] not in TERMINAL}
            if opened:
                await self._redis.zadd(OPEN, opened)

    async def change_batch(self, batch_id: str, changes: dict[str, Any],
                           when: tuple[str, ...] = (), match: dict[str, Any] | None = None
                           ) -> dict[str, Any] | None:
        key = f"{P}batch:{batch_id}"
        while True:
            doc = await self._redis.get(key)
            if doc is None:
                return None
            record = orjson.loads(doc)
            if (when and record["status"] not in when) or \
                    any(record.get(k) != v for k, v in (match or {}).items()):
                return None
            record.update(changes)
            if await self._change(keys=[key], args=[doc, orjson.dumps(record)],
                                  client=self._redis):
                if record["status"] in TERMINAL:  # (should this fail, the watch's next
                    with contextlib.suppress(*DOWN):  # look takes it out)
                        await self._redis.zrem(OPEN, batch_id)
                return await self._counted(record)
            # changed meanwhile: look again

    # ---- the queue

    async def enqueue(self, lines: list[Line], total: int | None = None) -> None:
        """``lines`` queued; the batch's count of lines left made ``total`` (of all its
        lines: ``lines`` may be those not yet answered) less those answered.
        """
        if not lines:
            return
        results, _, remaining, *_ = batch_keys(lines[0].batch)
        # Set, not added to: a count set twice (a call tried again) counts once
        await self._remaining(keys=[results, remaining], args=[total or len(lines)],
                              client=self._redis)
        for start in range(0, len(lines), 500):
            async with self._redis.pipeline(transaction=False) as pipe:
                for line in lines[start:start + 500]:
                    pipe.xadd(STREAM, {"line": encoded(line)})
                await pipe.execute()

    async def claim(self, holder: str, count: int, wait: float) -> list[Line]:
        """Lines due again, lines a dead worker held, else new lines (waiting for some)."""
        await self._find_out()
        try:
            due = await self._due(keys=[LATER, STREAM], args=[time.time()],
                                  client=self._redis)
            if due is not None:
                wait = max(0.001, min(wait, float(due) - time.time()))
            _, entries, *_ = await self._redis.xautoclaim(
                STREAM, GROUP, holder, min_idle_time=int(self._timeout * 1000), count=count)
            lines = [_decoded(ref, fields) for ref, fields in entries if fields]
            if lines:
                return lines  # (at once: new lines are read at the next claim)
            read = await self._redis.xreadgroup(GROUP, holder, {STREAM: ">"}, count=count,
                                                block=max(1, int(wait * 1000)))
        except MovedError:  # a cluster after all (it could not be asked)
            self._client.moved()
            return []
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._group()  # (Redis started empty: the first claim makes the queue)
            return []
        return [_decoded(ref, fields) for _, got in read or [] for ref, fields in got]

    async def keep(self, line: Line, holder: str) -> None:
        """The claim on a line still at work renewed: its idle time starts again."""
        await self._redis.xclaim(STREAM, GROUP, holder, 0, [line.ref], justid=True)

    async def finish(self, line: Line, ok: bool, result: dict[str, Any]) -> None:
        results, counts, remaining, *_ = batch_keys(line.batch)
        await self._finish(keys=[results, counts, remaining],
                           args=[line.custom_id, orjson.dumps({"n": line.n, "ok": ok,
                                                                "line": result}),
                                 "completed" if ok else "failed"],
                           client=self._redis)
        await self._done_with(line)

    async def discard(self, line: Line) -> None:
        results, _, remaining, dropped, _ = batch_keys(line.batch)
        await self._discard(keys=[dropped, results, remaining], args=[line.custom_id],
                            client=self._redis)
        await self._done_with(line)

    async def put_back(self, line: Line, delay: float) -> None:
        await self._redis.zadd(LATER, {encoded(line): time.time() + delay})
        await self._done_with(line)  # (after: never lost between)

    async def _done_with(self, line: Line) -> None:
        """The line's entry acknowledged and taken out of the stream: an entry acknowledged
        alone stays, and the stream would keep every line ever queued.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, GROUP, line.ref)
            pipe.xdel(STREAM, line.ref)
            await pipe.execute()

    async def drop_lines(self, batch_id: str) -> None:
        """Lines in the stream cannot be taken out by batch: each worker that reads one of
        a batch no longer in progress drops it (``discard``), which is quick.
        """

    async def keep_ids(self, batch_id: str, ids: list[str]) -> None:
        await self._redis.set(batch_keys(batch_id)[4], orjson.dumps(ids))

    async def ids(self, batch_id: str) -> list[str] | None:
        ids = await self._redis.get(batch_keys(batch_id)[4])
        return orjson.loads(ids) if ids else None

    async def remaining(self, batch_id: str) -> int:
        return int(await self._redis.get(batch_keys(batch_id)[2]) or 0)

    async def results(self, batch_id: str) -> list[tuple[bool, dict[str, Any]]]:
        found = await self._redis.hgetall(batch_keys(batch_id)[0])
        rows = sorted((orjson.loads(v) for v in found.values()), key=lambda r: r["n"])
        return [(r["ok"], r["line"]) for r in rows]


def encoded(line: Line) -> bytes:
    data = {"batch": line.batch, "n": line.n, "custom_id": line.custom_id, "body": line.body}
    if line.tries:
        data.update(tries=line.tries, timeouts=line.timeouts)
    return orjson.dumps(data)


def _decoded(ref: bytes, fields: dict[bytes, bytes]) -> Line:
    data = orjson.loads(fields[b"line"])
    return Line(data["batch"], data["n"], data["custom_id"], data["body"], ref.decode(),
                int(data.get("tries", 0)), int(data.get("timeouts", 0)))
