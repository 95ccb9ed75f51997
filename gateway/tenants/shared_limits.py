"""The limits of ``gateway.tenants.limits``, counted in Redis for every gateway process
together: one Lua script per step, atomically, on Redis's clock, so N processes allow a
key's rate once, not N times. When Redis does not answer within its bound, counting goes on
in this process alone ("open") or requests are refused ("closed").

Leases (requests at once) last ``LEASE_SECONDS`` and are renewed while their requests run,
so a process that dies frees its slots within that time; one that Redis could not be told
to give back (it was away) is given back once it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Literal

from gateway.config import KeyConfig
from gateway.errors import Unavailable
from gateway.runtime import end_loops
from gateway.tenants.limits import Admission, MemoryLimits, Reason, period
from gateway.tenants.link import Away, Link, Unasked

LEASE_SECONDS = 30.0  # a slot not renewed by its process (it died) frees after this
RENEW_SECONDS = 10.0  # how often a process renews the slots of its requests in flight
GIVE_BACK_AT_ONCE = 1000  # leases given back in one command

# Every limit of one key checked, and charged only if all allow it, on Redis's clock.
# KEYS: requests bucket, tokens bucket, leases, budget counter (one hash slot: {key id}).
# ARGV: rpm, tpm, concurrency, budget, tokens, lease id, lease ms, the budget period's
# seconds left, "1" for a look only (nothing checked or charged). Returns the refusal (""
# when admitted), the wait in ms, the requests and tokens left, the tokens charged.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or cap
  local ts = tonumber(b[2]) or now
  return math.min(cap, tokens + math.max(0, now - ts) * cap / 60000)
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local concurrency, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local estimate = tonumber(ARGV[5])
local cost = math.min(estimate, tpm)
local reason, wait = '', 0
local requests, tokens = -1, -1
if rpm > 0 then requests = level(KEYS[1], rpm) end
if tpm > 0 then tokens = level(KEYS[2], tpm) end
if ARGV[9] == '1' then return {'', '0', tostring(requests), tostring(tokens), '0'} end
if rpm > 0 and requests < 1 then reason = 'requests'; wait = (1 - requests) * 60000 / rpm end
if tpm > 0 then
  if cost > tokens then
    if reason == '' then reason = 'tokens' end
    wait = math.max(wait, (cost - tokens) * 60000 / tpm)
  end
end
if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= concurrency then
    if reason == '' then reason = 'concurrency' end
    wait = math.max(wait, 1000)
  end
end
if budget > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= budget then
  if reason == '' then reason = 'budget' end
  wait = math.max(wait, tonumber(ARGV[8]) * 1000)
end
if reason ~= '' then return {reason, tostring(wait), tostring(requests), tostring(tokens), '0'} end
if rpm > 0 then
  requests = requests - 1
  redis.call('HSET', KEYS[1], 'tokens', requests, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  tokens = tokens - cost
  redis.call('HSET', KEYS[2], 'tokens', tokens, 'ts', now)
  redis.call('PEXPIRE', KEYS[2], 60000 * (1 + math.ceil(math.max(0, -tokens) / tpm)) + 60000)
else
  cost = 0
end
if concurrency > 0 then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), ARGV[6])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[7]) * 2)
end
return {'', '0', tostring(requests), tostring(tokens), tostring(cost)}
"""

# The answer is whole: the tokens charged corrected to those used (the bucket may owe up to
# an hour's), the tokens used added to the budget, the lease given back. KEYS: tokens
# bucket, leases, budget counter (of the period it was admitted in). ARGV: tpm, used minus
# charged, lease id, tokens used (0: no budget), seconds the counter is kept.
SETTLE = """
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or tpm
  local ts = tonumber(b[2]) or now
  tokens = math.min(tpm, tokens + math.max(0, now - ts) * tpm / 60000)
  tokens = math.min(tpm, math.max(-60 * tpm, tokens - delta))  -- (DEBT_MINUTES)
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 60000 * (1 + math.ceil(math.max(0, -tokens) / tpm)) + 60000)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
if tonumber(ARGV[4]) > 0 then
  redis.call('INCRBY', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[5])))
end
return 1
"""

# The slots of requests still running, renewed. KEYS: leases. ARGV: lease ms, lease ids.
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""


class RedisLimits:
    """The limits of every gateway process together, in Redis."""

    def __init__(self, link: Link, on_down: Literal["open", "closed"]) -> None:
        self.link = link
        self._admit = link.script(ADMIT)
        self._settle = link.script(SETTLE)
        self._renew = link.script(RENEW)
        self._on_down = on_down
        self._local = MemoryLimits()  # while Redis is away ("open")
        self._leases = itertools.count()
        self._prefix = f"{time.time_ns():x}"  # lease ids unique across processes
        self._held: dict[str, set[str]] = {}  # leases key → the leases of requests running
        # leases key → lease → until when to try giving it back (Redis drops it after)
        self._orphans: dict[str, dict[str, float]] = {}
        self._tending: asyncio.Task[None] | None = None

    async def admit(self, key: KeyConfig, tokens: int) -> Admission:
        if not (key.rpm or key.tpm or key.concurrency or key.budget):
            return Admission()
        return await self._ask(key, tokens, look=False)

    async def look(self, key: KeyConfig) -> Admission:
        if not (key.rpm or key.tpm):
            return Admission()
        return await self._ask(key, 0, look=True)

    async def _ask(self, key: KeyConfig, tokens: int, look: bool) -> Admission:
        lease = f"{self._prefix}-{next(self._leases)}" if key.concurrency and not look else ""
        label, ends = period(key, time.time())
        keys = _keys(key, label)
        args: list[str | int | float] = [key.rpm, key.tpm, key.concurrency, key.budget,
                                         tokens, lease, int(LEASE_SECONDS * 1000), ends,
                                         "1" if look else "0"]
        try:
            said, wait, requests, left, charged = await self.link.call(
                lambda: self._admit(keys, args))
        except Away as away:
            if lease and not isinstance(away, Unasked):  # (the script may have run before
                self._orphan(keys[2], lease)             # the answer was given up on)
            if look:
                return await self._local.look(key)
            return await self._without_redis(key, tokens)
        reason: Reason = said.decode()
        admission = Admission(reason=reason, retry_after=float(wait) / 1000)
        if not reason:
            admission.lease, admission.charged = lease, int(charged)
            admission.period = label
            if lease:
                self._held.setdefault(keys[2], set()).add(lease)
                self._tend()
        if key.rpm:
            admission.requests_left = float(requests)
            admission.requests_reset = (key.rpm - float(requests)) * 60 / key.rpm
        if key.tpm:
            admission.tokens_left = float(left)
            admission.tokens_reset = (key.tpm - float(left)) * 60 / key.tpm
        return admission

    async def settle(self, key: KeyConfig, admission: Admission, used: int) -> None:
        if admission.local:
            await self._local.settle(key, admission, used)
            return
        if not (key.tpm or admission.lease or key.budget):
            return
        keys = _keys(key, admission.period)  # (the budget of the period it was admitted in)
        if admission.lease:
            self._held.get(keys[2], set()).discard(admission.lease)
        args: list[str | int | float] = [key.tpm, used - admission.charged, admission.lease,
                                         used if key.budget else 0,
                                         period(key, time.time())[1] + 3600]
        try:
            await self.link.call(lambda: self._settle(keys[1:], args))
        except Away:  # the tokens go uncounted; the lease is given back later
            if admission.lease:
                self._orphan(keys[2], admission.lease)

    async def _without_redis(self, key: KeyConfig, tokens: int) -> Admission:
        if self._on_down == "closed":
            raise Unavailable("Limits cannot be checked right now (their store does not "
                              "answer); retry shortly.", retry_after=1, code="limits_unavailable")
        return await self._local.admit(key, tokens)

    def _orphan(self, leases_key: str, lease: str) -> None:
        self._orphans.setdefault(leases_key, {})[lease] = time.monotonic() + LEASE_SECONDS
        self._tend()

    def _tend(self) -> None:
        if self._tending is None or self._tending.done():
            self._tending = asyncio.get_running_loop().create_task(self._tend_leases())

    async def _tend_leases(self) -> None:
        """Renew the leases of requests running; give back those Redis missed."""
        renewed = time.monotonic()
        while any(self._held.values()) or self._orphans:
            await asyncio.sleep(1.0 if self._orphans else RENEW_SECONDS / 5)
            for leases_key in list(self._orphans):
                await self._give_back(leases_key)
            if time.monotonic() - renewed >= RENEW_SECONDS:
                renewed = time.monotonic()
                for leases_key in list(self._held):
                    await self._renew_held(leases_key)

    async def _give_back(self, leases_key: str) -> None:
        now = time.monotonic()
        orphans = self._orphans[leases_key]
        for lease in [lease for lease, until in orphans.items() if until < now]:
            del orphans[lease]  # Redis has dropped it by now
        leases = list(orphans)[:GIVE_BACK_AT_ONCE]
        if leases:
            with contextlib.suppress(Away):
                await self.link.call(lambda: self.link.client.zrem(leases_key, *leases),
                                     patient=True)
                for lease in leases:
                    orphans.pop(lease, None)
        if not orphans:
            del self._orphans[leases_key]

    async def _renew_held(self, leases_key: str) -> None:
        held = self._held[leases_key]
        if not held:
            del self._held[leases_key]
            return
        args: list[str | int | float] = [int(LEASE_SECONDS * 1000), *held]
        with contextlib.suppress(Away):
            await self.link.call(lambda: self._renew([leases_key], args),
                                 patient=True)

    async def close(self) -> None:
        if self._tending is not None:
            await end_loops([self._tending])


def _keys(key: KeyConfig, label: str) -> list[str]:
    tag = "{" + key.id + "}"  # one hash slot, for Redis Cluster
    return [f"gw:rl:{tag}:requests", f"gw:rl:{tag}:tokens", f"gw:rl:{tag}:leases",
            f"gw:rl:{tag}:budget:{label}"]
