"""The balancer's line for a backend's connections, which the deployments of its models
share."""

from __future__ import annotations

import asyncio
import collections

from gateway.errors import RateLimited


class Connections:
    """A backend's connections, which the deployments of its models share: at most
    ``limit`` requests on it at once (0: no limit), whichever model they ask; the rest wait
    here, first come first served, in the gateway's line. (Waiting for a connection in the
    backends' pool instead, a request would spend its first-token limit there, and a few
    such timeouts open the breaker of a backend that answers well.)
    """

    __slots__ = ("in_flight", "limit", "waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def has_room(self) -> bool:
        return not self.limit or (self.in_flight < self.limit and not self.waiters)

    async def take(self, deadline: float) -> None:
        """One of them, waiting until ``deadline`` (the loop's time) at most."""
        if self.has_room():
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter  # give_back() hands its connection over
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.give_back()  # it came just as this request gave up: pass it on
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise RateLimited("Waited too long for a connection to a busy backend.",
                                  retry_after=1) from None
            raise

    def give_back(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


NO_LIMIT = Connections(0)  # (a backend the config does not name: nothing to share)
