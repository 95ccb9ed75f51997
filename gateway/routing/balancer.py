"""Load balancing among the deployments of one model: power of two choices on requests in
flight weighted by an EWMA of latency, under a per-deployment concurrency cap with a
bounded queue.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Callable, Sequence

from gateway.config import TIERS, RoutingConfig
from gateway.errors import RateLimited
from gateway.routing.breaker import CircuitBreaker
from gateway.routing.catalog import Deployment
from gateway.routing.connections import NO_LIMIT, Connections

TIER_RANK = {tier: rank for rank, tier in enumerate(TIERS)}
EWMA_WEIGHT = 0.3  # share of the newest latency sample
# A latency older than this says little about now: the deployment is tried again (a slow
# host that recovered must be able to show it).
STALE_SECONDS = 15.0
# How long a deployment rests after its upstream's 429 without a Retry-After, and the most
# any Retry-After rests it (a quota's "come back tomorrow" is checked again each minute).
REST_SECONDS = 1.0
REST_MAX = 60.0


class DeploymentState:
    """What the gateway knows of one deployment from the traffic it sent there."""

    __slots__ = ("batch_in_flight", "batch_waiters", "batch_woken", "breaker", "connections",
                 "in_flight", "latency", "limit", "max_queue", "observed_at", "on_rest",
                 "rest_busy", "rest_until", "verdicts", "waiters")

    def __init__(self, limit: int, max_queue: int, breaker: CircuitBreaker,
                 connections: Connections = NO_LIMIT) -> None:
        self.breaker = breaker
        self.connections = connections  # its backend's, shared with its other models
        self.limit = limit  # 0: unlimited
        self.max_queue = max_queue
        self.in_flight = 0
        self.batch_in_flight = 0  # of in_flight: queued work's (batch lines)
        self.latency: float | None = None  # None: never answered, so worth a try
        self.observed_at = 0.0
        self.rest_until = 0.0  # (monotonic) its upstream asked for no requests until then
        self.rest_busy = False  # ... as its queue was full (Ollama's 503), not a rate limit
        self.on_rest: Callable[[float, bool], None] | None = None  # told of each rest
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Batch lines waiting for their share; woken to look again as slots free up.
        self.batch_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.batch_woken = 0  # of them, woken and yet to look
        # How its answers were judged (quality assurance): "pass", "fail" and each reason.
        self.verdicts = collections.Counter[str]()

    def rest(self, seconds: float | None, busy: bool = False) -> None:
        """Its upstream is rate-limiting (a 429, or Ollama's full queue): no new request
        goes there for ``seconds``, its ``Retry-After``. Not a failure: its breaker is not
        told, and a request already waiting it out may try it again.
        """
        seconds = REST_SECONDS if seconds is None else min(seconds, REST_MAX)
        self.rest_until = max(self.rest_until, time.monotonic() + seconds)
        self.rest_busy = busy
        if self.on_rest is not None:
            self.on_rest(seconds, busy)

    def score(self, now: float) -> float:
        """The wait a new request may expect here, relatively: those ahead of it (answering
        or in line) times how long each takes (lowest wins)."""
        ahead = self.in_flight + len(self.waiters)
        if self.latency is None or now - self.observed_at > STALE_SECONDS:
            return float(ahead)  # unknown or stale: explore
        return (ahead + 1) * self.latency

    def has_room(self) -> bool:
        return not self.limit or self.in_flight < self.limit

    def free(self) -> bool:
        """A request would go at once: a slot here and a connection to its backend."""
        return self.has_room() and not self.waiters and self.connections.has_room()

    def can_queue(self) -> bool:
        return self.has_room() or len(self.waiters) < self.max_queue

    async def acquire(self, patience: float) -> None:
        """A slot and a connection to its backend, waiting in line (at most ``patience``
        seconds in all) when the deployment, or the backend, is full.
        """
        connections = self.connections
        if self.has_room() and not self.waiters and connections.has_room():  # (most often)
            self.in_flight += 1
            if connections.limit:
                connections.in_flight += 1
            return
        deadline = asyncio.get_running_loop().time() + patience
        await self._slot(patience)
        await self._connection(deadline, batch=False)

    async def _connection(self, deadline: float, batch: bool) -> None:
        connections = self.connections
        if connections.limit:
            try:
                await connections.take(deadline)
            except BaseException:
                self._free_slot(batch)
                raise

    async def _slot(self, patience: float) -> None:
        if self.has_room() and not self.waiters:
            self.in_flight += 1
            return
        if len(self.waiters) >= self.max_queue:
            raise RateLimited("All deployments of this model are busy.", retry_after=1)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(patience):
                await waiter  # release() hands its slot over: in_flight stays counted
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._free_slot(False)  # the slot came just as this request gave up
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise RateLimited("Waited too long for a free slot on a busy deployment.",
                                  retry_after=max(1.0, self.latency or 0.0)) from None
            raise

    def resize(self, limit: int) -> None:
        """A new limit (the backend told how many it runs at once); those waiting in line
        that now fit go at once.
        """
        self.limit = limit
        while self.waiters and self.has_room():
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
        for _ in range(len(self.batch_waiters)):
            self._wake_batch()

    async def acquire_batch(self, share: float, patience: float) -> None:
        """A slot for a batch line. Batch lines take at most ``share`` of the deployment's
        slots, and only what interactive requests leave: none while one waits in line. A
        line waits for that (at most ``patience`` seconds), behind the interactive requests.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        woken = False  # once woken, a line still kept waiting goes back to the front
        # A newcomer goes behind the lines waiting, and those woken that have yet to look.
        while self.batch_waits(share) or \
                (not woken and (self.batch_waiters or self.batch_woken)):
            waiter = loop.create_future()
            if woken:
                self.batch_waiters.appendleft(waiter)
            else:
                self.batch_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self.batch_woken -= 1
                    self._wake_batch()  # woken as it gave up: the next looks instead
                elif waiter in self.batch_waiters:
                    self.batch_waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise RateLimited("This deployment's share for queued work is in use.",
                                      retry_after=1) from None
                raise
            self.batch_woken -= 1
            woken = True
        self.in_flight += 1
        self.batch_in_flight += 1
        await self._connection(deadline, batch=True)

    def batch_waits(self, share: float) -> bool:
        """Whether a batch line must wait: an interactive request is waiting, or the
        batch lines' share or every slot is taken.
        """
        if self.waiters:
            return True
        cap = max(1, int(self.limit * share)) if self.limit else 0
        return bool(cap) and (self.batch_in_flight >= cap or self.in_flight >= self.limit)

    def _wake_batch(self) -> None:
        while self.batch_waiters:
            waiter = self.batch_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.batch_woken += 1
                return

    def release(self, batch: bool = False) -> None:
        """A slot given back (``batch``: a batch line's): to the next in line, else free,
        and a batch line waiting looks whether it may take it.
        """
        if self.connections.limit:
            self.connections.give_back()
        self._free_slot(batch)

    def _free_slot(self, batch: bool) -> None:
        if batch:
            self.batch_in_flight -= 1
        if self.limit and self.in_flight > self.limit:  # the limit was lowered: shrink first
            self.in_flight -= 1
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next in line
                return
        self.in_flight -= 1
        if self.batch_waiters:
            self._wake_batch()

    def judged(self, ok: bool, reasons: Sequence[str]) -> None:
        self.verdicts["pass" if ok else "fail"] += 1
        self.verdicts.update(reason.split(" (")[0] for reason in reasons)

    def observe(self, seconds: float) -> None:
        if self.latency is None:
            self.latency = seconds
        else:
            self.latency += EWMA_WEIGHT * (seconds - self.latency)
        self.observed_at = time.monotonic()


class Balancer:
    """Every deployment's state, kept across catalog refreshes, and the choice among them."""

    def __init__(self, config: RoutingConfig,
                 limits: Callable[[str], tuple[int, int]] = lambda backend: (0, 64),
                 connections: Callable[[str], int] = lambda backend: 0) -> None:
        self._config = config
        self._limits = limits  # backend → (requests at once per model, longest line)
        self._connections_of = connections  # backend → its connections (0: no limit)
        self._connections: dict[str, Connections] = {}
        self._states: dict[tuple[str, str], DeploymentState] = {}
        self._down: set[str] = set()  # backends known to be unreachable right now
        # Told when a deployment's breaker opens (True) or closes (False) on its own, and
        # when it rests (seconds, its queue full rather than rate-limited).
        self.on_breaker: Callable[[tuple[str, str], bool], None] | None = None
        self.on_rest: Callable[[tuple[str, str], float, bool], None] | None = None

    def state(self, deployment: Deployment) -> DeploymentState:
        key = (deployment.backend.name, deployment.model.name)
        state = self._states.get(key)
        return state if state is not None else self.state_at(key)

    def state_at(self, key: tuple[str, str]) -> DeploymentState:
        """The state of the deployment (backend, model)."""
        state = self._states.get(key)
        if state is None:
            limit, queue = self._limits(key[0])
            breaker = CircuitBreaker(self._config.breaker.failures, self._config.breaker.cooldown)
            breaker.on_change = lambda opened: self._breaker_changed(key, opened)
            connections = self._connections.get(key[0])
            if connections is None:
                connections = self._connections[key[0]] = \
                    Connections(self._connections_of(key[0]))
            state = self._states[key] = DeploymentState(limit, queue, breaker, connections)
            state.on_rest = lambda seconds, busy: self._rested(key, seconds, busy)
        return state

    def _rested(self, key: tuple[str, str], seconds: float, busy: bool) -> None:
        if self.on_rest is not None:
            self.on_rest(key, seconds, busy)

    def _breaker_changed(self, key: tuple[str, str], opened: bool) -> None:
        if self.on_breaker is not None:
            self.on_breaker(key, opened)

    def relimit(self) -> None:
        """Every deployment's limit as its backend's is now (after a discovery round)."""
        for (backend, _), state in self._states.items():
            limit = self._limits(backend)[0]
            if limit != state.limit:
                state.resize(limit)

    def report(self) -> dict[str, dict[str, object]]:
        """Every deployment that has seen traffic: breaker, load, latency, and how long it
        still rests when its upstream is rate-limiting it.
        """
        now = time.monotonic()
        return {
            f"{backend}/{model}": {
                "breaker": s.breaker.state, "in_flight": s.in_flight, "queued": len(s.waiters),
                "latency_ms": round(s.latency * 1000, 1) if s.latency is not None else None,
                **({"verdicts": dict(s.verdicts)} if s.verdicts else {}),
                **({"rate_limited_s": math.ceil(s.rest_until - now)}
                   if s.rest_until > now else {}),
            }
            for (backend, model), s in sorted(self._states.items())
        }

    def at_work(self) -> int:
        """Requests the deployments are answering or have queued, all told."""
        return sum(s.in_flight + len(s.waiters) for s in self._states.values())

    def states(self) -> list[tuple[tuple[str, str], DeploymentState]]:
        """(backend, model) and state of every deployment that has seen traffic."""
        return list(self._states.items())

    def states_of(self, backend: str) -> list[DeploymentState]:
        return [s for (name, _), s in self._states.items() if name == backend]

    def mark_down(self, backend: str) -> None:
        """Take every deployment of a backend out of rotation."""
        self._down.add(backend)
        for state in self.states_of(backend):
            state.breaker.trip()

    def mark_up(self, backend: str) -> None:
        """A backend is back: every deployment of it may be tried at once."""
        self._down.discard(backend)
        for state in self.states_of(backend):
            state.breaker.retry_now()

    def is_down(self, backend: str) -> bool:
        return backend in self._down

    def usable(self, deployment: Deployment, now: float) -> bool:
        """Its backend is up and its breaker lets a request through."""
        return deployment.backend.name not in self._down and \
            self.state(deployment).breaker.available(now)

    def takes(self, deployment: Deployment, now: float) -> bool:
        """Usable, and not resting after its upstream's rate limit: a new request may go
        there now.
        """
        if deployment.backend.name in self._down:
            return False
        state = self.state(deployment)
        return state.rest_until <= now and state.breaker.available(now)

    def choose(self, deployments: Sequence[Deployment]) -> Deployment | None:
        """Power of two choices among the deployments that take requests now (``takes``)
        and can take one more: of the best tier with a free slot, else of the best tier that
        can queue it.
        """
        now = time.monotonic()
        if len(deployments) == 1:  # the common case: nothing to balance
            only = deployments[0]
            return only if self.takes(only, now) and self.state(only).can_queue() else None
        # The best tier's with a free slot; else (every one full) the best tier's that can
        # queue it: the cloud answers what the workstation cannot take now, not a share of
        # what it can. (One pass, each state looked up once: this runs for every request.)
        down, states = self._down, self._states
        best_free = best_queued = len(TIER_RANK)
        free: list[tuple[Deployment, DeploymentState]] = []
        queued: list[tuple[Deployment, DeploymentState]] = []
        for d in deployments:
            backend = d.backend
            if backend.name in down:
                continue
            state = states.get((backend.name, d.model.name)) or self.state(d)
            if state.rest_until > now or not state.breaker.available(now):
                continue
            rank = TIER_RANK[backend.tier]
            if state.free():
                if rank < best_free:
                    best_free, free = rank, [(d, state)]
                elif rank == best_free:
                    free.append((d, state))
            elif not free and state.can_queue():
                if rank < best_queued:
                    best_queued, queued = rank, [(d, state)]
                elif rank == best_queued:
                    queued.append((d, state))
        open_ = free or queued
        n = len(open_)
        if n <= 1:
            return open_[0][0] if open_ else None
        i = int(random.random() * n)  # two of them at random (random.sample costs more)
        j = int(random.random() * (n - 1))
        first, second = open_[i], open_[j + (j >= i)]
        return first[0] if first[1].score(now) <= second[1].score(now) else second[0]
