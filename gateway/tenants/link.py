"""The tenants' Redis: one connection pool for keys and limits, every call bounded in time,
and, after a call fails, a quiet second in which Redis is not asked at all (requests then
never queue behind a Redis that is gone or stalled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger(__name__)

QUIET_SECONDS = 1.0  # after Redis failed, it is not asked again for this long
T = TypeVar("T")


class Away(Exception):
    """Redis did not answer in time (or is resting after it did not)."""


class Unasked(Away):
    """Redis was not asked: it is resting after it did not answer."""


class Link:
    def __init__(self, url: str, timeout: float, max_connections: int = 32) -> None:
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout,
            socket_timeout=timeout * 2, socket_connect_timeout=timeout * 2)
        self.client = redis.Redis(connection_pool=pool)
        self.timeout = timeout
        self.quiet_until = 0.0
        self._refusal_logged = 0.0

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
        await self.client.aclose()
