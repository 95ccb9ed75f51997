"""Key-value stores for what the gateway keeps (cached answers, stored responses): Redis,
shared by every gateway process, or memory, one process's, bounded. A store that cannot
answer in time raises ``StoreUnavailable``; its user then goes on without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, MovedError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

QUIET_SECONDS = 1.0  # after a failure, Redis is not asked again for this long
LEARN_SECONDS = 5.0  # the longest a cluster client may take to learn the nodes' slots
# The longest a part waits for Redis as the gateway starts (what it could not do then, it
# does once Redis answers): a Redis that takes connections and answers nothing held the
# start, and every request with it, for minutes.
START_WAIT = 5.0


def shown(url: str) -> str:
    """A Redis URL as logs and messages show it: host:port/db, never a password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{parts.hostname or '127.0.0.1'}:{port}{parts.path or ''}"


class StoreUnavailable(Exception):
    """The store did not answer (down, slow, or refusing)."""


class Store(Protocol):
    async def start(self) -> None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl: float) -> None: ...
    async def delete(self, key: str) -> bool: ...  # whether it was there


def open_store(kind: str, redis_url: str, *, max_entries: int, timeout: float,
               max_connections: int, label: str, max_bytes: int | None = None,
               owner: Callable[[str], str] | None = None) -> Store:
    """A Redis store (``kind`` "redis") or a memory one; ``label`` names it in the log;
    ``owner``: who a key is of, for a memory store to make room fairly (see MemoryStore).
    """
    if kind == "redis":
        return RedisStore(redis_url, timeout, max_connections, label)
    return MemoryStore(max_entries, max_bytes, owner)


class MemoryStore:
    """An LRU of at most ``max_entries`` values (and ``max_bytes`` of them, when given),
    each kept until its time is up. With ``owner`` (who a key is of: a tenant), room is made
    at the expense of whoever holds the most: one tenant storing much evicts its own oldest,
    never another's.
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None,
                 owner: Callable[[str], str] | None = None) -> None:
        self._held: dict[str, _Held] = {}  # by owner ("" without ``owner``)
        self._owner = owner or (lambda _: "")
        self._max = max_entries
        self._max_bytes = max_bytes
        self._count = 0
        self._bytes = 0

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._held.clear()
        self._count = self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        held = self._held.get(self._owner(key))
        entry = None if held is None else held.entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            self._drop(key)
            return None
        held.entries.move_to_end(key)  # type: ignore[union-attr]
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._drop(key)
        held = self._held.setdefault(self._owner(key), _Held())
        held.entries[key] = (time.monotonic() + ttl, value)
        held.bytes += len(value)
        self._count += 1
        self._bytes += len(value)
        while self._count > self._max:
            self._drop_oldest(key, lambda h: len(h.entries))
        while self._max_bytes is not None and self._bytes > self._max_bytes:
            self._drop_oldest(key, lambda h: h.bytes)

    async def delete(self, key: str) -> bool:
        return self._drop(key)

    def _drop_oldest(self, kept: str, weight: Callable[[_Held], int]) -> None:
        """The least recently used value of whoever holds the most (by ``weight``), never
        ``kept`` (the value just set: its setter holding the most loses its own older
        ones, else the next one's) while anything else can go.
        """
        if self._drop_older(max(self._held.values(), key=weight), kept):
            return
        for held in sorted(self._held.values(), key=weight, reverse=True):  # (seldom)
            if self._drop_older(held, kept):
                return
        self._drop(kept)  # alone, and still too much

    def _drop_older(self, held: _Held, kept: str) -> bool:
        key = next((key for key in held.entries if key != kept), None)
        return key is not None and self._drop(key)

    def _drop(self, key: str) -> bool:
        owner = self._owner(key)
        held = self._held.get(owner)
        entry = None if held is None else held.entries.pop(key, None)
        if entry is None:
            return False
        assert held is not None
        held.bytes -= len(entry[1])
        self._count -= 1
        self._bytes -= len(entry[1])
        if not held.entries:
            del self._held[owner]
        return True


@dataclass(slots=True)
class _Held:
    """One owner's values, least recently used first, and their size."""

    entries: collections.OrderedDict[str, tuple[float, bytes]] = field(
        default_factory=collections.OrderedDict)
    bytes: int = 0


class RedisStore:
    """Redis through a blocking pool (the default pool fails past its size instead of
    waiting); every call bounded by ``timeout``. After a failure it keeps quiet for a
    moment, so an outage costs requests nothing rather than a timeout each. The URL may name
    any node of a Redis Cluster (``Client``).
    """

    def __init__(self, url: str, timeout: float, max_connections: int,
                 label: str = "store") -> None:
        self._url = url
        self._label = label
        self._timeout = timeout
        self._max_connections = max_connections
        self._client: Client | None = None
        self._quiet_until = 0.0

    async def start(self) -> None:
        pool = pooled(self._url, self._max_connections, self._timeout, self._timeout)
        self._client = Client(self._url, self._label, redis.Redis(connection_pool=pool),
                              max_connections=self._max_connections,
                              socket_timeout=self._timeout,
                              socket_connect_timeout=self._timeout)
        await self._client.find_out(self._timeout * 2)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> None:
        await self._call(lambda client: client.ping())

    async def get(self, key: str) -> bytes | None:
        value = await self._call(lambda client: client.get(key))
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(lambda client: client.set(key, value, px=int(ttl * 1000)))

    async def delete(self, key: str) -> bool:
        return bool(await self._call(lambda client: client.delete(key)))

    async def _call(self, operation: object) -> object:
        client = self._client
        if client is None or time.monotonic() < self._quiet_until:
            raise StoreUnavailable
        try:
            async with asyncio.timeout(self._timeout * 2):
                await client.find_out(self._timeout)  # (when Redis was away until now)
                async with client.slot():
                    return await operation(client.now)  # type: ignore[operator]
        except MovedError:  # a cluster after all
            client.moved()
            raise StoreUnavailable from None
        except (RedisError, OSError, TimeoutError) as exc:
            client.failed()
            if time.monotonic() >= self._quiet_until:
                log.warning("%s: Redis unavailable (%s); going on without it", self._label,
                            type(exc).__name__)
            self._quiet_until = time.monotonic() + QUIET_SECONDS
            raise StoreUnavailable from None


class Client:
    """A Redis client for a URL that may name any node of a Redis Cluster. It starts as a
    plain client (``plain``); once the node says it is a cluster's (asked with ``CLUSTER
    INFO`` until that could be asked, or told by a ``MOVED`` answer) it goes on through
    redis-py's cluster client (``cluster_options``: its connections' sizes and timeouts),
    which sends each key to the node that holds its slot. The client it replaces is closed
    at the end only: calls may still be running on it.

    The cluster client does not wait for a free connection as a blocking pool does (it
    fails at once past ``max_connections`` a node): ``slot()`` makes calls wait their turn.

    It learns the nodes' slots in a task of its own, which a call that stops waiting for it
    does not end: redis-py's cluster client, cancelled while it learns them, drops what it
    learned, so where learning takes longer than a call may wait (a loaded machine, a
    farther Redis) a call-bound learning would never end.
    """

    def __init__(self, url: str, label: str, plain: redis.Redis, **cluster_options: Any
                 ) -> None:
        self.url, self.label = url, label
        self.now: redis.Redis | RedisCluster = plain
        self.cluster: bool | None = None  # None: not known yet
        self._options = cluster_options
        self._retired: list[redis.Redis] = []
        self._slots = asyncio.Semaphore(cluster_options.get("max_connections") or 32)
        self._learning: asyncio.Future[None] | None = None
        self._learned = False

    async def find_out(self, within: float) -> None:
        """Ask the node whether it is a cluster's, unless that is known; on a cluster, wait
        until the cluster client knows the nodes' slots (``LEARN_SECONDS`` at most: should
        it fail, the call's own command tries again).
        """
        if self.cluster is None:
            said = await on_cluster(self.now, within)
            if said:
                self.moved()
            elif said is False:
                self.cluster = False
        if self.cluster and not self._learned:
            if self._learning is None or self._learning.done():
                self._learning = asyncio.ensure_future(self._learn())
                self._learning.add_done_callback(_retrieved)
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.shield(self._learning)

    def failed(self) -> None:
        """A call failed: on a cluster, the client may have dropped the nodes' slots (it
        does on a lost connection), to be learned again in a task of their own.
        """
        if self.cluster:
            self._learned = False

    async def _learn(self) -> None:
        async with asyncio.timeout(LEARN_SECONDS):
            await self.now.initialize()
        self._learned = True

    def moved(self) -> None:
        """The node is a cluster's: the cluster client from now on."""
        if self.cluster or isinstance(self.now, RedisCluster):
            return
        self._retired.append(self.now)
        self.now = RedisCluster.from_url(self.url, **self._options)
        self.cluster = True
        log.info("%s: Redis at %s is a cluster", self.label, shown(self.url))

    def slot(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._slots if self.cluster else contextlib.nullcontext()

    async def close(self) -> None:
        if self._learning is not None:
            self._learning.cancel()
        for client in [self.now, *self._retired]:
            await _close(client)
        self._retired.clear()


def _retrieved(task: asyncio.Future[None]) -> None:
    """(A learning's failure is its callers' to see; with none left waiting, it is let go.)"""
    if not task.cancelled():
        task.exception()


async def on_cluster(client: redis.Redis | RedisCluster, within: float) -> bool | None:
    """Whether the node ``client`` talks to is one of a Redis Cluster (``CLUSTER INFO``:
    refused by a plain Redis); None when it does not answer ``within`` seconds.
    """
    try:
        async with asyncio.timeout(within):
            await client.execute_command("CLUSTER", "INFO")
            return True
    except ResponseError:
        return False
    except (RedisError, OSError, TimeoutError):
        return None


def pooled(url: str, max_connections: int, wait: float, timeout: float
           ) -> redis.BlockingConnectionPool:
    """Connections to a plain Redis, ``max_connections`` at most (a call waits ``wait``
    seconds for one), each command given ``timeout``. A command that finds its connection
    closed is sent once more on a new one: Redis closes idle connections (its ``timeout``,
    set on most managed ones) and all of them when it restarts, and without that the first
    call after either failed, and the caller took Redis for down. A timeout is not tried
    again (a stalled Redis would cost each call twice its bound). (A connection cut after
    Redis ran the command and before its answer came makes it run twice: a key's limits
    then count one request twice.)
    """
    return redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=wait, socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError])


async def redis_problem(url: str, within: float = 3.0) -> str | None:
    """What is wrong with the Redis at ``url``, in words for an operator (None: it answers):
    one that refuses the URL's password is not one that does not answer.
    """
    client = redis.Redis.from_url(url, socket_timeout=within, socket_connect_timeout=within)
    try:
        await client.ping()
    except AuthenticationError:  # (a wrong password, or none where one is wanted)
        return (f"Redis at {shown(url)} refuses to let the gateway in: check the user and "
                "password in the URL (redis://user:password@host:port/db)")
    except ResponseError as exc:
        return f"Redis at {shown(url)} answers with an error: {str(exc)[:200]}"
    except (RedisError, OSError, TimeoutError) as exc:
        return f"Redis at {shown(url)} does not answer ({type(exc).__name__})"
    finally:
        await client.aclose(close_connection_pool=True)
    return None


async def connect(url: str, **options: Any) -> redis.Redis | RedisCluster:
    """A client for ``url``, through a cluster client when the node there is one of a Redis
    Cluster (``options``: the connections' timeouts and such; a node that does not answer
    is taken for a plain Redis).
    """
    client = redis.Redis.from_url(url, **options)
    if not await on_cluster(client, options.get("socket_connect_timeout") or 5.0):
        return client
    await client.aclose()
    cluster = RedisCluster.from_url(url, **options)
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        await cluster.initialize()  # (the nodes' slots: a subscription needs them at once)
    return cluster


async def _close(client: redis.Redis | RedisCluster) -> None:
    """A client closed with its connections (a plain one's pool was given to it, so its
    own ``aclose`` would leave the pool open).
    """
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)
