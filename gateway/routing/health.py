"""Watches each backend with its cheap probe. A backend that stops answering has every
breaker behind it opened at once (no request waits for a timeout to find out); one that
comes back is rediscovered and gets its traffic back right away.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.backends.base import Backend
from gateway.routing.balancer import Balancer
from gateway.routing.catalog import ModelCatalog

log = logging.getLogger(__name__)

UP_INTERVAL_FACTOR = 5  # a healthy backend is probed this many times less often


class HealthWatcher:
    def __init__(self, backends: list[Backend], catalog: ModelCatalog, balancer: Balancer,
                 interval: float) -> None:
        self._backends = backends
        self._catalog = catalog
        self._balancer = balancer
        self._interval = interval
        self.up: dict[str, bool | None] = {b.name: None for b in backends}  # None: not yet
        self._next: dict[str, float] = {b.name: 0.0 for b in backends}

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            due = [b for b in self._backends if self._next[b.name] <= now]
            if due:
                await asyncio.gather(*(self.check(b) for b in due))
            await asyncio.sleep(self._interval / 2)

    async def check(self, backend: Backend) -> bool:
        health = await backend.probe()
        was = self.up[backend.name]
        self.up[backend.name] = health.ok
        factor = UP_INTERVAL_FACTOR if health.ok else 1
        self._next[backend.name] = time.monotonic() + self._interval * factor
        if health.ok and was is False:
            log.info("backend %s is back (%s)", backend.name, health.detail)
            await self.recovered(backend.name)
        elif not health.ok:
            self.lost(backend.name, health.detail)
        return health.ok

    def lost(self, backend: str, reason: str = "connection refused") -> None:
        """Stop sending it traffic now, and watch for its return closely."""
        if self.up.get(backend) is not False:
            log.warning("backend %s is down (%s); its traffic goes elsewhere", backend, reason)
        self.up[backend] = False
        self._next[backend] = time.monotonic() + self._interval
        self._balancer.down.add(backend)
        for state in self._balancer.states_of(backend):
            state.breaker.trip()

    async def recovered(self, backend: str) -> None:
        """Learn what it serves now and let traffic try it at once."""
        self.up[backend] = True
        await self._catalog.refresh()
        self._balancer.down.discard(backend)
        for state in self._balancer.states_of(backend):
            state.breaker.retry_now()
