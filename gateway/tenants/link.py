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

from gateway.store import Client, pooled

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
        pool = pooled(url, max_connections, timeout, timeout * 2)
        self._client = Client(url, "tenants", redis.Redis(connection_pool=pool),
                              max_connections=max_connections, socket_timeout=timeout * 2,
                              socket_connect_timeout=timeout * 2)
        self.quiet_until = 0.0
        self._refusal_logged = 0.0

    @property
    def client(self) -> redis.Redis | RedisCluster:
        return self._client.now

    @property
    def cluster(self) -> bool | None:
        """Whether Redis is a cluster's node (None: not known yet)."""
        return self._client.cluster

    async def start(self) -> None:
        """Find out whether Redis is a cluster's node (a Redis away now: at the first call
        it answers).
        """
        await self._client.find_out(self.timeout * 2)

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
                await self._client.find_out(self.timeout)  # (when Redis was away until now)
                async with self._client.slot():
                    return await make()
        except MovedError:  # a cluster after all (it could not be asked at start)
            self._client.moved()
            raise Away from None
        except ResponseError as exc:  # Redis is there, and refused this one command
            if time.monotonic() - self._refusal_logged >= QUIET_SECONDS:
                self._refusal_logged = time.monotonic()
                log.warning("tenants: Redis refused a command: %s", exc)
            raise Away from None
        except (RedisError, OSError, TimeoutError) as exc:
            self._client.failed()
            if patient:
                raise Away from None
            if time.monotonic() >= self.quiet_until:
                log.warning("tenants: Redis does not answer (%s); asking again in %.0fs",
                            type(exc).__name__, QUIET_SECONDS)
            self.quiet_until = time.monotonic() + QUIET_SECONDS
            raise Away from None

    async def close(self) -> None:
        await self._client.close()
