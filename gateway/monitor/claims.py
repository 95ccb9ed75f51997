"""Alert claims among the processes that watch one fleet through one Redis (the workers of
``gateway serve --workers``, hosts): which of them sends each notice, so that each reaches
the sinks once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from typing import Any

from gateway.monitor.shared import DOWN
from gateway.monitor.sinks import Notice
from gateway.store import connect

# An alert's keys: its watchers (the processes that see it now, each until its last word)
# and whether it was announced; one hash tag, one slot.
ALERT = "gw:{{alert:{service}:{rule}:{target}}}:"
# How long a process counts as seeing an alert without saying so again: it says so every
# monitor round; one that stopped (killed) drops out after this.
WATCH_SECONDS = 120
# (KEYS: the watchers, the announcement; ARGV: now, until, the process)
STARTS = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local ttl = math.ceil(ARGV[2] - ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl)
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ttl) then return 1 end
return 0
"""
# (every watcher knows it was announced: a Redis that lost the keys, restarted, has them back)
KEEPS = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local ttl = math.ceil(ARGV[2] - ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], '1', 'EX', ttl)
return 0
"""
# (1: the last watcher, and the announcement ended; 0: the last, nothing announced; -1: others
# watch still, and the announcement is kept for the one asking again)
ENDS = """
redis.call('ZREM', KEYS[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then return redis.call('DEL', KEYS[2]) end
redis.call('EXPIRE', KEYS[2], math.ceil(ARGV[2] - ARGV[1]))
return -1
"""
LEAVES = """
redis.call('ZREM', KEYS[1], ARGV[3])
return 0
"""
LEAVE_WAIT = 2.0  # seconds a stopping process gives Redis to hear that it watches no more


class AlertClaims:
    """Which of the processes that watch one fleet through one Redis (the workers of
    ``serve --workers``, hosts) sends a notice. Each judges the rules on what it sees itself
    (its own tunnels, its host's traffic), so each alert keeps its watchers in Redis, the
    processes that see it now (each says so every round): the first to announce it sends
    "firing"; the last that sees it end sends "resolved" (one that sees it end while others
    still watch asks again every round, so that a watcher that stopped without a word, once
    it drops out, holds back no end). A process that stops leaves the alerts it watches.
    While Redis is away, each sends its own: a notice twice rather than none.
    """

    def __init__(self, url: str, service: str) -> None:
        self._url = url
        self._service = service
        self._me = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._watching: set[tuple[str, str]] = set()  # (rule, target): firing here, claimed
        self._unclaimed: set[tuple[str, str]] = set()  # ... of those, sent with Redis away
        self._ending: dict[tuple[str, str], Notice] = {}  # ended here, others watching still

    def _keys(self, rule: str, target: str) -> list[str]:
        prefix = ALERT.format(service=self._service, rule=rule, target=target)
        return [prefix + "watchers", prefix + "announced"]

    async def __call__(self, notice: Notice) -> bool:
        """Whether this process sends ``notice``."""
        alert = (notice.rule, notice.target)
        firing = notice.status == "firing"
        if firing:
            self._watching.add(alert)
            self._ending.pop(alert, None)
        else:
            self._watching.discard(alert)
        try:
            said = await self._run(STARTS if firing else ENDS, self._keys(*alert))
        except DOWN:
            await self._forget()
            if firing:
                self._unclaimed.add(alert)
            return True
        if firing:
            return bool(said)
        unclaimed = alert in self._unclaimed
        self._unclaimed.discard(alert)
        if said == -1:
            self._ending[alert] = notice
            return False
        # (what this process announced while Redis was away, Redis never knew of)
        return said == 1 or unclaimed

    async def keep(self, alerts: list[tuple[str, str]]) -> list[Notice]:
        """Say again that this process sees these alerts (``(rule, target)``), every round;
        the ends it saw while others watched that are now its to send.
        """
        due = []
        try:
            for alert in alerts:
                if alert in self._watching:  # (one not claimed yet is announced first)
                    await self._run(KEEPS, self._keys(*alert))
            for alert, notice in list(self._ending.items()):
                said = await self._run(ENDS, self._keys(*alert))
                if said != -1:
                    del self._ending[alert]
                    if said == 1:
                        due.append(notice)
        except DOWN:
            await self._forget()
        return due

    async def _run(self, script: str, keys: list[str]) -> Any:
        if self._redis is None:
            self._redis = await connect(self._url, socket_connect_timeout=2, socket_timeout=2)
            self._scripts = {}
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self._redis.register_script(script)
        now = time.time()
        return await registered(keys=keys, args=[now, now + WATCH_SECONDS, self._me])

    async def _forget(self) -> None:
        """(A client found out while a node was away may be the wrong kind, a plain one for
        a cluster: the next call connects again.)"""
        client, self._redis = self._redis, None
        if client is not None:
            with contextlib.suppress(*DOWN):
                await client.aclose()

    async def close(self) -> None:
        """Leave the alerts this process watches: the others' ends are theirs to send."""
        if self._watching:
            with contextlib.suppress(*DOWN):
                async with asyncio.timeout(LEAVE_WAIT):
                    for alert in self._watching:
                        await self._run(LEAVES, self._keys(*alert))
        await self._forget()
