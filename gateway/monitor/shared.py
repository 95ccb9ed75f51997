"""Health shared through Redis (``[routing] redis_url``): a deployment's breaker that one
gateway process opens, or a backend that one finds down, is avoided by every process on that
Redis (the workers of ``gateway serve --workers N``, other hosts) at once, not after each
has sent it traffic of its own to fail.

Each change goes out on one channel (``gw:{health}:events``, published and heard by every
process) and into one hash (``gw:{health}:state``), from which a process that starts reads
what is open or down now. What a process hears it applies as its own, but checks itself:
a breaker opened elsewhere has its cool-down here, then one trial; a backend found down
elsewhere is probed here until it answers; a backend back elsewhere is probed here at once.
While Redis is away, each process goes by what it sees alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.monitor.health import HealthWatcher
from gateway.routing.balancer import Balancer
from gateway.runtime import end_loops

log = logging.getLogger(__name__)

EVENTS, STATE = "gw:{health}:events", "gw:{health}:state"  # (one hash tag: one slot)
DOWN = (RedisError, OSError, TimeoutError)
BACKLOG = 1000  # changes waiting to be sent while Redis is slow or away (then dropped)
CLOSE_WAIT = 2.0  # seconds the loops get to end, at shutdown


class SharedHealth:
    def __init__(self, url: str, balancer: Balancer, watcher: HealthWatcher,
                 cooldown: float) -> None:
        self._redis: Any = aioredis.from_url(url, socket_connect_timeout=5)
        self._balancer = balancer
        self._watcher = watcher
        self._cooldown = cooldown
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._sends: asyncio.Queue[dict[str, Any]] = asyncio.Queue(BACKLOG)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._hearing = False  # (applying what another process said: not said again)
        self.heard = 0  # changes applied from other processes
        self._checks: set[asyncio.Task[None]] = set()  # probes of a backend back elsewhere

    async def start(self) -> None:
        self._balancer.on_breaker = self._breaker_changed
        self._watcher.on_lost.append(lambda backend: self._backend_changed(backend, False))
        self._watcher.on_recovered.append(lambda backend: self._backend_changed(backend, True))
        self._tasks = [asyncio.create_task(self._listen(), name="shared health: listen"),
                       asyncio.create_task(self._send(), name="shared health: send")]

    async def close(self) -> None:
        self._closing = True
        await end_loops(self._tasks, CLOSE_WAIT)
        with contextlib.suppress(*DOWN):
            await self._redis.aclose()

    # ---- what this process saw, said to the others

    def _breaker_changed(self, key: tuple[str, str], opened: bool) -> None:
        if not self._hearing:
            self._say({"deployment": list(key), "open": opened,
                       "until": time.time() + self._cooldown})

    def _backend_changed(self, backend: str, up: bool) -> None:
        if not self._hearing:
            self._say({"backend": backend, "up": up})

    def _say(self, change: dict[str, Any]) -> None:
        change["by"] = self.name
        with contextlib.suppress(asyncio.QueueFull):
            self._sends.put_nowait(change)

    async def _send(self) -> None:
        while not self._closing:
            change = await self._sends.get()
            try:
                await self._write(change)
            except DOWN as exc:  # the others find out for themselves
                log.warning("shared health: could not tell the other processes (%s)",
                            type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _write(self, change: dict[str, Any]) -> None:
        if "deployment" in change:
            field, gone = "deployment:" + "/".join(change["deployment"]), not change["open"]
        else:
            field, gone = f"backend:{change['backend']}", change["up"]
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.publish(EVENTS, orjson.dumps(change))
            if gone:
                pipe.hdel(STATE, field)
            else:
                pipe.hset(STATE, field, orjson.dumps(change))
            await pipe.execute()

    # ---- what the others saw

    async def _listen(self) -> None:
        failures = 0
        while not self._closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(EVENTS)
                await self._catch_up()  # (after subscribing: nothing falls between)
                failures = 0
                async for message in pubsub.listen():
                    self._hear(message.get("data"))
            except DOWN as exc:
                if self._closing:
                    return
                if not failures:
                    log.warning("shared health: Redis is unavailable (%s); going by what "
                                "this process sees", type(exc).__name__)
                failures += 1
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
            finally:
                with contextlib.suppress(*DOWN):
                    await pubsub.aclose()

    async def _catch_up(self) -> None:
        """What is open or down now, as the others left it in the hash."""
        for raw in (await self._redis.hgetall(STATE)).values():
            self._hear(raw)

    def _hear(self, raw: Any) -> None:
        try:
            change = orjson.loads(raw)
            if change.get("by") == self.name:
                return
            self._hearing = True
            try:
                self._apply(change)
            finally:
                self._hearing = False
        except Exception as exc:  # one odd message must not stop the rest
            log.warning("shared health: a change it cannot read (%s)", exc)

    def _apply(self, change: dict[str, Any]) -> None:
        if "deployment" in change:
            backend, model = change["deployment"]
            breaker = self._balancer.state_at((str(backend), str(model))).breaker
            if not change["open"]:
                breaker.closed_elsewhere()
            elif float(change["until"]) > time.time():
                breaker.opened_elsewhere()
            else:
                return
        else:
            backend = str(change["backend"])
            if backend not in self._watcher.up:
                return
            if not change["up"]:
                if self._watcher.up[backend] is not False:
                    self._watcher.lost(backend, "another gateway process found it down")
            elif self._watcher.up[backend] is False:  # back: seen here first, then used
                check = asyncio.get_running_loop().create_task(self._watcher.check_now(backend))
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)
            else:
                return
        self.heard += 1
