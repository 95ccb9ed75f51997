"""Watches each backend with its cheap probe. A backend that stops answering has every
deployment behind it taken out of rotation at once (no request waits for a timeout to find
out); one that comes back gets its traffic back at once, and the healer is told (it
rediscovers the backend's models). An optional backend (a local server that may or may not
be there) that has not answered since the start is absent, not down: no alert, no warning.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.backends.base import Backend
from gateway.routing.balancer import Balancer

log = logging.getLogger(__name__)

UP_INTERVAL_FACTOR = 5  # a healthy backend is probed this many times less often


class HealthWatcher:
    def __init__(self, backends: list[Backend], balancer: Balancer, interval: float) -> None:
        self._backends = backends
        self._balancer = balancer
        self._interval = interval
        self.up: dict[str, bool | None] = {b.name: None for b in backends}  # None: not yet
        self._next: dict[str, float] = {b.name: 0.0 for b in backends}
        self._losses: dict[str, int] = {b.name: 0 for b in backends}  # lost() calls so far
        self.since: dict[str, float] = {b.name: time.time() for b in backends}  # last change
        self._optional = {b.name for b in backends if b.config.optional}
        self._seen: set[str] = set()  # the backends that have answered since the start
        self.on_recovered: list[Callable[[str], None]] = []
        self.on_lost: list[Callable[[str], None]] = []  # (when it goes down)

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            due = [b for b in self._backends if self._next[b.name] <= now]
            if due:
                await asyncio.gather(*(self._check_safely(b) for b in due))
            await asyncio.sleep(self._interval / 2)

    async def _check_safely(self, backend: Backend) -> None:
        try:
            await self.check(backend)
        except Exception:  # one odd backend must not stop the watch over all of them
            log.exception("health check of backend %s failed", backend.name)
            self.lost(backend.name, "its health check failed")

    async def check_now(self, name: str) -> None:
        """Probe one backend now (its tunnel just came up, say)."""
        backend = next(b for b in self._backends if b.name == name)
        await self._check_safely(backend)

    async def check(self, backend: Backend) -> None:
        losses = self._losses[backend.name]
        health = await backend.probe()
        if health.ok and self._losses[backend.name] != losses:
            return  # lost meanwhile (its tunnel dropped): an answer from before says nothing
        was = self.up[backend.name]
        factor = UP_INTERVAL_FACTOR if health.ok else 1
        self._next[backend.name] = time.monotonic() + self._interval * factor
        if health.ok:
            self.up[backend.name] = True
            self._seen.add(backend.name)
            if was is None:
                self.since[backend.name] = time.time()
            if was is False:
                log.info("backend %s is back (%s)", backend.name, health.detail)
                self.recovered(backend.name)
        else:
            self.lost(backend.name, health.detail)

    def lost(self, backend: str, reason: str = "connection refused") -> None:
        """Stop sending it traffic now, and watch for its return closely."""
        was = self.up.get(backend)
        if was is not False:
            if self.absent(backend):
                log.info("optional backend %s is not there (%s)", backend, reason)
            else:
                log.warning("backend %s is down (%s); its traffic goes elsewhere", backend,
                            reason)
            self.since[backend] = time.time()
        self.up[backend] = False
        self._losses[backend] = self._losses.get(backend, 0) + 1
        self._next[backend] = min(self._next.get(backend, 0.0),
                                  time.monotonic() + self._interval)
        self._balancer.mark_down(backend)
        if was is not False:
            for listener in self.on_lost:
                listener(backend)

    def recovered(self, backend: str) -> None:
        """Give it its traffic back now, and tell whoever listens (the healer)."""
        self.up[backend] = True
        self._seen.add(backend)
        self.since[backend] = time.time()
        self._balancer.mark_up(backend)
        for listener in self.on_recovered:
            listener(backend)

    def absent(self, backend: str) -> bool:
        """Whether it is an optional backend that has not answered since the start."""
        return backend in self._optional and backend not in self._seen

    def down_for(self, backend: str) -> float:
        """Seconds the backend has been down (0 when it is not known to be)."""
        return time.time() - self.since[backend] if self.up.get(backend) is False else 0.0
