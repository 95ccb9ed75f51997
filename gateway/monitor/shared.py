"""Health shared through Redis (``[routing] redis_url``): a deployment's breaker that one
gateway process opens, one whose upstream asked for a rest (a 429's ``Retry-After``), or a
backend that one finds down, is avoided by every process on that Redis (the workers of
``gateway serve --workers N``, other hosts) at once, not after each has sent it traffic of
its own to fail.

Each change goes out on one channel (``gw:{health}:events``, published and heard by every
process) and into one hash (``gw:{health}:state``), from which a process that starts reads
what is open or down now (a rest, a minute at most, only goes out). What a process hears it
applies as its own, but checks itself: a breaker opened elsewhere has its cool-down here,
then one trial; a backend found down elsewhere is probed here until it answers; a backend
back elsewhere is probed here at once. While Redis is away, each process goes by what it
sees alone.
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
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError, RedisError, ResponseError

from gateway.monitor.health import HealthWatcher
from gateway.routing.balancer import Balancer
from gateway.runtime import end_loops
from gateway.store import connect

log = logging.getLogger(__name__)

EVENTS, STATE = "gw:{health}:events", "gw:{health}:state"  # (one hash tag: one slot)
DOWN = (RedisError, OSError, TimeoutError)
CLOSE_WAIT = 2.0  # seconds the loops get to end, at shutdown
PING_EVERY = 5.0  # seconds between pings on the subscription...
SILENT_LIMIT = 15.0  # ...and how long it may stay silent before it is taken for dead
STALE = 60.0  # seconds after which a backend's change, sent late, is not applied


class SharedHealth:
    def __init__(self, url: str, balancer: Balancer, watcher: HealthWatcher,
                 cooldown: float) -> None:
        self._url = url
        self._redis: Any = None  # (a plain Redis, or a cluster's nodes: known at start)
        self._balancer = balancer
        self._watcher = watcher
        self._cooldown = cooldown
        self.name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # What is still to be said, the latest change of each deployment or backend only
        # (what Redis missed while away is said once it is back, not replayed).
        self._unsaid: dict[str, dict[str, Any]] = {}
        self._something_unsaid = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._hearing = False  # (applying what another process said: not said again)
        self.heard = 0  # changes applied from other processes
        # Redis's clock less this host's, as last measured: every change is stamped, and
        # its age worked out, on Redis's clock, so that a host whose own is some seconds
        # off neither ignores what others said nor keeps it too long.
        self._offset = 0.0
        self._checks: set[asyncio.Task[None]] = set()  # probes of a backend back elsewhere

    async def start(self) -> None:
        self._redis = await self._connect()
        self._balancer.on_breaker = self._breaker_changed
        self._balancer.on_rest = self._rested
        self._watcher.on_lost.append(lambda backend: self._backend_changed(backend, False))
        self._watcher.on_recovered.append(lambda backend: self._backend_changed(backend, True))
        self._tasks = [asyncio.create_task(self._listen(), name="shared health: listen"),
                       asyncio.create_task(self._send(), name="shared health: send")]

    async def _connect(self) -> Any:
        return await connect(self._url, socket_connect_timeout=5, socket_timeout=5,
                             socket_keepalive=True)

    async def close(self) -> None:
        self._closing = True
        self._balancer.on_breaker = None
        self._balancer.on_rest = None
        await end_loops([*self._tasks, *self._checks], CLOSE_WAIT)
        with contextlib.suppress(*DOWN):
            await self._redis.aclose()

    # ---- what this process saw, said to the others

    def _breaker_changed(self, key: tuple[str, str], opened: bool) -> None:
        if not self._hearing and not self._closing:
            self._say("deployment:" + "/".join(key), {
                "deployment": list(key), "open": opened, "for": self._cooldown})

    def _rested(self, key: tuple[str, str], seconds: float, busy: bool) -> None:
        if not self._hearing and not self._closing:
            field = "rest:" + "/".join(key)
            unsaid = self._unsaid.get(field)
            if unsaid is not None and unsaid["rest"] - (self._now() - unsaid["at"]) > seconds:
                return  # (a longer rest is still to be said: a shorter one must not replace it)
            self._say(field, {"deployment": list(key), "rest": seconds, "busy": busy})

    def _backend_changed(self, backend: str, up: bool) -> None:
        if not self._hearing and not self._closing:
            self._say(f"backend:{backend}", {"backend": backend, "up": up})

    def _now(self) -> float:
        return time.time() + self._offset

    async def _measure(self) -> None:
        """How far this host's clock is from Redis's (the node of the shared keys)."""
        before = time.time()
        try:
            if isinstance(self._redis, RedisCluster):
                said = await self._redis.execute_command(
                    "TIME", target_nodes=self._redis.get_node_from_key(STATE))
            else:
                said = await self._redis.time()
        except ResponseError as exc:  # (a user without TIME: its own clock, as before)
            log.warning("shared health: Redis will not say its time (%s); going by this "
                        "host's clock", exc)
            return
        after = time.time()
        if isinstance(said, dict):  # (a cluster's answer, by node)
            said = next(iter(said.values()))
        self._offset = float(said[0]) + float(said[1]) / 1e6 - (before + after) / 2

    def _say(self, field: str, change: dict[str, Any]) -> None:
        change.update(by=self.name, at=self._now())
        self._unsaid[field] = change
        self._something_unsaid.set()

    async def _send(self) -> None:
        while not self._closing:
            await self._something_unsaid.wait()
            self._something_unsaid.clear()
            changes, self._unsaid = self._unsaid, {}
            try:
                await self._write(changes)
            except DOWN as exc:  # said again once Redis answers, unless changed since
                log.warning("shared health: could not tell the other processes (%s)",
                            type(exc).__name__)
                await self._cluster_after_all(exc)
                self._unsaid = {**changes, **{f: c for f, c in self._unsaid.items()
                                              if not _outlasted(changes.get(f), c)}}
                self._something_unsaid.set()
                await asyncio.sleep(1.0)

    async def _write(self, changes: dict[str, dict[str, Any]]) -> None:
        # (one command at a time: changes are few, and a cluster takes no pipeline of a
        # keyless PUBLISH with its keyed writes)
        for field, change in changes.items():
            raw = orjson.dumps(change)
            await self._redis.publish(EVENTS, raw)
            if "rest" in change:
                continue  # (heard now or not at all: it is over in a minute at most)
            if change.get("open") is False or change.get("up") is True:
                await self._redis.hdel(STATE, field)
            else:
                await self._redis.hset(STATE, field, raw)

    async def _cluster_after_all(self, exc: BaseException) -> None:
        """A node answered that a key lives on another: Redis was away at start, and is a
        cluster (then the client becomes a cluster's).
        """
        if isinstance(exc, MovedError) and not isinstance(self._redis, RedisCluster):
            old, self._redis = self._redis, await self._connect()
            with contextlib.suppress(*DOWN):
                await old.aclose()

    # ---- what the others saw

    async def _listen(self) -> None:
        failures = 0
        while not self._closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if isinstance(self._redis, RedisCluster):
                    await self._redis.initialize()  # (done once: what the nodes hold)
                await pubsub.subscribe(EVENTS)
                await self._measure()
                await self._catch_up()  # (after subscribing: nothing falls between)
                failures = 0
                await self._hear_all(pubsub)
            except DOWN as exc:
                if self._closing:
                    return
                await self._cluster_after_all(exc)
                if not failures:
                    log.warning("shared health: Redis is unavailable (%s); going by what "
                                "this process sees", type(exc).__name__)
                failures += 1
                await asyncio.sleep(min(5.0, 0.2 * 2 ** failures))
            except Exception:  # the listener must outlive one bad turn
                log.exception("shared health: listening failed")
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(*DOWN):
                    await pubsub.aclose()

    async def _hear_all(self, pubsub: Any) -> None:
        """Each change as it is published; the subscription pinged when quiet, and taken
        for dead (a connection dropped without a word) when not even a ping is answered.
        """
        heard_at = pinged_at = time.monotonic()
        while not self._closing:
            message = await pubsub.get_message(timeout=PING_EVERY)
            now = time.monotonic()
            if message is not None:
                heard_at = now
                if message.get("type") == "message":
                    self._hear(message.get("data"))
            if now - heard_at > SILENT_LIMIT:
                raise TimeoutError("the subscription went silent")
            if now - pinged_at >= PING_EVERY:
                await pubsub.ping()
                pinged_at = now

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
        age = self._now() - float(change["at"])
        if "deployment" in change:
            backend, model = (str(part) for part in change["deployment"])
            if (backend, model) not in dict(self._balancer.states()) and \
                    backend not in self._watcher.up:
                return  # (not one of this process's)
            state = self._balancer.state_at((backend, model))
            breaker = state.breaker
            if "rest" in change:
                left = float(change["rest"]) - max(0.0, age)
                if left <= 0:
                    return
                state.rest(left, bool(change.get("busy")))
            elif not change["open"]:
                breaker.closed_elsewhere()
            elif age < float(change["for"]):
                breaker.opened_elsewhere(float(change["for"]) - max(0.0, age))
            else:
                return
        else:
            backend = str(change["backend"])
            if backend not in self._watcher.up:
                return
            if not change["up"]:
                if self._watcher.up[backend] is False or age > STALE:
                    return
                self._watcher.lost(backend, "another gateway process found it down")
            elif self._watcher.up[backend] is False:  # back: seen here first, then used
                check = asyncio.get_running_loop().create_task(self._watcher.check_now(backend))
                self._checks.add(check)
                check.add_done_callback(self._checks.discard)
            else:
                return
        self.heard += 1


def _outlasted(earlier: dict[str, Any] | None, later: dict[str, Any]) -> bool:
    """Whether a rest still to be said ends before an earlier one that was not said."""
    return earlier is not None and "rest" in earlier and "rest" in later and \
        earlier["at"] + earlier["rest"] > later["at"] + later["rest"]
