"""The tenants' Redis: one connection pool for keys and limits, every call bounded in time,
and, after a call fails, a quiet second in which Redis is not asked at all (requests then
never queue behind a Redis that is gone or stalled).

The URL may name any node of a Redis Cluster: the link finds out (at start, or when a node
answers that a key lives elsewhere) and goes on through a cluster client. Every script
touches the keys of one hash tag only (one key's limits, the key book), so each runs on one
node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError, RedisError, ResponseError

from gateway.store import on_cluster

log = logging.getLogger(__name__)

QUIET_SECONDS = 1.0  # after Redis failed, it is not asked again for this long
T = TypeVar("T")
Script = Callable[[Sequence[str], Sequence[Any]], Awaitable[Any]]


class Away(Exception):
    """Redis did not answer in time (or is resting after it did not)."""


class Unasked(Away):
    """Redis was not asked: it is resting after it did not answer."""


class Link:
    def __init__(self, url: str, timeout: float, max_connections: int = 32) -> None:
        self.url = url
        self.timeout = timeout
        self.max_connections = max_connections
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout,
            socket_timeout=timeout * 2, socket_connect_timeout=timeout * 2)
        self.client: redis.Redis | RedisCluster = redis.Redis(connection_pool=pool)
        self.cluster = False
        self.quiet_until = 0.0
        self._refusal_logged = 0.0

    async def start(self) -> None:
        """Find out whether Redis is a cluster's node (a Redis away now: later, from MOVED)."""
        if isinstance(self.client, redis.Redis) and \
                await on_cluster(self.client, self.timeout * 2):
            await self._as_cluster()

    async def _as_cluster(self) -> None:
        await self.close()
        self.client = RedisCluster.from_url(
            self.url, max_connections=self.max_connections,
            socket_timeout=self.timeout * 2, socket_connect_timeout=self.timeout * 2)
        self.cluster = True
        log.info("tenants: Redis at %s is a cluster", self.url)

    def script(self, source: str) -> Script:
        """A Lua script, called with ``(keys, args)`` on whichever client is current."""
        registered = self.client.register_script(source)
        return lambda keys, args: registered(keys=keys, args=args, client=self.client)

    async def call(self, make: Callable[[], Awaitable[T]], patient: bool = False) -> T:
        """What ``make()`` gives, within the bound; ``Away`` when Redis cannot say.
        ``patient``: asked even in the quiet second, and a failure does not start one (work
        in the background, which no request waits for).
        """
        if not patient and time.monotonic() < self.quiet_until:
            raise Unasked
        try:
            async with asyncio.timeout(self.timeout):
                return await make()
        except MovedError:
            if not self.cluster:  # a cluster after all (it was away when the link started)
                await self._as_cluster()
            raise Away from None
        except ResponseError as exc:  # Redis is there, and refused this one command
            if time.monotonic() - self._refusal_logged >= QUIET_SECONDS:
                self._refusal_logged = time.monotonic()
                log.warning("tenants: Redis refused a command: %s", exc)
            raise Away from None
        except (RedisError, OSError, TimeoutError) as exc:
            if patient:
                raise Away from None
            if time.monotonic() >= self.quiet_until:
                log.warning("tenants: Redis does not answer (%s); asking again in %.0fs",
                            type(exc).__name__, QUIET_SECONDS)
            self.quiet_until = time.monotonic() + QUIET_SECONDS
            raise Away from None

    async def close(self) -> None:
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)
