"""What a key may still do now: requests and tokens per minute (token buckets refilled
continuously), requests at once (leases), and a token budget per day or month.

A request is admitted with an estimate of its tokens, every limit checked at once and
charged only if all allow it; it is settled when its answer is whole (the estimate
corrected to the tokens used, the budget charged, its lease given back). Counted in this
process's memory, or in Redis by one Lua script per step, atomically: every gateway process
together then allows exactly the configured rate, on Redis's clock. When Redis does not
answer within its bound, counting goes on in this process alone ("open") or requests are
refused ("closed"), and Redis is asked again a second later.
"""

from __future__ import annotations

import calendar
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.config import KeyConfig
from gateway.errors import Unavailable
from gateway.tenants.link import Away, Link

LEASE_SECONDS = 900.0  # a request that never says it ended frees its slot after this
Reason = Literal["", "requests", "tokens", "concurrency", "budget"]


@dataclass(slots=True)
class Admission:
    """What ``admit`` decided, and what the answer's ``x-ratelimit-*`` headers say."""

    reason: Reason = ""  # the limit that refused the request ("": admitted)
    retry_after: float = 0.0
    requests_left: float | None = None  # None: no such limit
    requests_reset: float = 0.0  # seconds until the bucket is full again
    tokens_left: float | None = None
    tokens_reset: float = 0.0
    lease: str = ""
    local: bool = False  # counted in this process (Redis was away, or is not used)

    def headers(self, key: KeyConfig) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, limit, left, reset in (("requests", key.rpm, self.requests_left,
                                          self.requests_reset),
                                         ("tokens", key.tpm, self.tokens_left,
                                          self.tokens_reset)):
            if limit and left is not None:
                out[f"x-ratelimit-limit-{name}"] = str(limit)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(left)))
                out[f"x-ratelimit-reset-{name}"] = duration(reset)
        return out


class Tally:
    """The tokens one request's answers used, as the pipeline reports them."""

    __slots__ = ("reported", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.reported = False  # nothing said: the answer was cut off, or came without usage

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.reported = True


class Limits(Protocol):
    async def admit(self, key: KeyConfig, tokens: int) -> Admission: ...
    async def settle(self, key: KeyConfig, admission: Admission, estimate: int,
                     used: int) -> None: ...


def duration(seconds: float) -> str:
    """As OpenAI writes a reset time: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, whole = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{whole}s" if minutes else f"{whole}s"


def period(key: KeyConfig, now: float) -> tuple[str, float]:
    """The budget's current period (a label) and the seconds until it ends (UTC)."""
    day = time.gmtime(now)
    if key.budget_period == "month":
        year, month = (day.tm_year + 1, 1) if day.tm_mon == 12 else (day.tm_year, day.tm_mon + 1)
        end = calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))
        return f"{day.tm_year}-{day.tm_mon:02d}", max(1.0, end - now)
    return time.strftime("%Y-%m-%d", day), max(1.0, 86400 - now % 86400)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class MemoryLimits:
    """The limits of this process alone."""

    buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)
    leases: dict[str, dict[str, float]] = field(default_factory=dict)  # key → lease → until
    budgets: dict[tuple[str, str], int] = field(default_factory=dict)  # (key, period) → used
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def admit(self, key: KeyConfig, tokens: int) -> Admission:
        now = time.monotonic()
        waits: list[tuple[Reason, float]] = []
        costs: dict[str, tuple[_Bucket, int, int]] = {}  # bucket, its limit, the cost
        for name, limit, cost in (("requests", key.rpm, 1), ("tokens", key.tpm, tokens)):
            if limit:
                bucket = self._bucket(key.id, name, limit, now)
                costs[name] = (bucket, limit, min(cost, limit))
                if costs[name][2] > bucket.tokens:
                    waits.append((name, (costs[name][2] - bucket.tokens) * 60 / limit))  # type: ignore[arg-type]
        leases = {k: v for k, v in self.leases.get(key.id, {}).items() if v > now}
        self.leases[key.id] = leases
        if key.concurrency and len(leases) >= key.concurrency:
            waits.append(("concurrency", 1.0))
        label, ends = period(key, time.time())
        if key.budget and self.budgets.get((key.id, label), 0) >= key.budget:
            waits.append(("budget", ends))
        admission = Admission(local=True)
        if waits:
            admission.reason, admission.retry_after = waits[0][0], max(w for _, w in waits)
        else:
            for bucket, _, cost in costs.values():
                bucket.tokens -= cost
            if key.concurrency:
                admission.lease = str(next(self._ids))
                leases[admission.lease] = now + LEASE_SECONDS
        for name, (bucket, limit, _) in costs.items():
            reset = (limit - bucket.tokens) * 60 / limit
            if name == "requests":
                admission.requests_left, admission.requests_reset = bucket.tokens, reset
            else:
                admission.tokens_left, admission.tokens_reset = bucket.tokens, reset
        return admission

    async def settle(self, key: KeyConfig, admission: Admission, estimate: int,
                     used: int) -> None:
        now = time.monotonic()
        if key.tpm and used != estimate:
            bucket = self._bucket(key.id, "tokens", key.tpm, now)
            bucket.tokens = max(-key.tpm, bucket.tokens - (used - estimate))
        if admission.lease:
            self.leases.get(key.id, {}).pop(admission.lease, None)
        if key.budget and used:
            label = period(key, time.time())[0]
            self.budgets[(key.id, label)] = self.budgets.get((key.id, label), 0) + used

    def _bucket(self, key_id: str, name: str, limit: int, now: float) -> _Bucket:
        bucket = self.buckets.get((key_id, name))
        if bucket is None:
            bucket = self.buckets[(key_id, name)] = _Bucket(float(limit), now)
        bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.at) * limit / 60.0)
        bucket.at = now
        return bucket


# Every limit of one key checked, and charged only if all allow it, on Redis's clock.
# KEYS: requests bucket, tokens bucket, leases, budget counter (one hash slot: {key id}).
# ARGV: rpm, tpm, concurrency, budget, tokens, lease id, lease ms.
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
local cost = math.min(tonumber(ARGV[5]), tpm)
local reason, wait = '', 0
local requests, tokens = -1, -1
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < 1 then reason = 'requests'; wait = (1 - requests) * 60000 / rpm end
end
if tpm > 0 then
  tokens = level(KEYS[2], tpm)
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
end
if reason == '' then
  if rpm > 0 then
    requests = requests - 1
    redis.call('HSET', KEYS[1], 'tokens', requests, 'ts', now)
    redis.call('PEXPIRE', KEYS[1], 120000)
  end
  if tpm > 0 then
    tokens = tokens - cost
    redis.call('HSET', KEYS[2], 'tokens', tokens, 'ts', now)
    redis.call('PEXPIRE', KEYS[2], 120000)
  end
  if concurrency > 0 then
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[7]), ARGV[6])
    redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[7]))
  end
end
return {reason, tostring(wait), tostring(requests), tostring(tokens)}
"""

# The answer is whole: the tokens estimated corrected to those used, the budget charged,
# the lease given back. KEYS: tokens bucket, leases, budget counter. ARGV: tpm, used minus
# estimate, lease id, used, budget seconds left.
SETTLE = """
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or tpm
  local ts = tonumber(b[2]) or now
  tokens = math.min(tpm, tokens + math.max(0, now - ts) * tpm / 60000)
  tokens = math.max(-tpm, tokens - delta)
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
if tonumber(ARGV[4]) > 0 and tonumber(ARGV[5]) > 0 then
  redis.call('INCRBY', KEYS[3], ARGV[4])
  redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[5])) + 3600)
end
return 1
"""


class RedisLimits:
    """The limits of every gateway process together, in Redis."""

    def __init__(self, link: Link, on_down: Literal["open", "closed"]) -> None:
        self.link = link
        self._admit = link.client.register_script(ADMIT)
        self._settle = link.client.register_script(SETTLE)
        self._on_down = on_down
        self._local = MemoryLimits()  # while Redis is away ("open")
        self._leases = itertools.count()
        self._prefix = f"{time.time_ns():x}"  # lease ids unique across processes

    async def admit(self, key: KeyConfig, tokens: int) -> Admission:
        if not (key.rpm or key.tpm or key.concurrency or key.budget):
            return Admission()
        lease = f"{self._prefix}-{next(self._leases)}" if key.concurrency else ""
        label, ends = period(key, time.time())
        args: list[str | int | float] = [key.rpm, key.tpm, key.concurrency, key.budget,
                                         tokens, lease, int(LEASE_SECONDS * 1000)]
        try:
            said, wait, requests, left = await self.link.call(
                lambda: self._admit(keys=_keys(key, label), args=args))
        except Away:
            return await self._without_redis(key, tokens)
        reason: Reason = said.decode()
        admission = Admission(reason=reason, lease=lease if not reason else "")
        admission.retry_after = ends if reason == "budget" else float(wait) / 1000
        if key.rpm:
            admission.requests_left = float(requests)
            admission.requests_reset = (key.rpm - float(requests)) * 60 / key.rpm
        if key.tpm:
            admission.tokens_left = float(left)
            admission.tokens_reset = (key.tpm - float(left)) * 60 / key.tpm
        return admission

    async def settle(self, key: KeyConfig, admission: Admission, estimate: int,
                     used: int) -> None:
        if admission.local:
            await self._local.settle(key, admission, estimate, used)
            return
        if not (key.tpm or admission.lease or key.budget):
            return
        label, ends = period(key, time.time())
        keys = _keys(key, label)[1:]
        args: list[str | int | float] = [key.tpm, used - estimate, admission.lease,
                                         used if key.budget else 0, ends]
        with contextlib.suppress(Away):  # the lease lapses on its own; these tokens go
            await self.link.call(lambda: self._settle(keys=keys, args=args))  # uncounted

    async def _without_redis(self, key: KeyConfig, tokens: int) -> Admission:
        if self._on_down == "closed":
            raise Unavailable("Limits cannot be checked right now (their store does not "
                              "answer); retry shortly.", retry_after=1, code="limits_unavailable")
        return await self._local.admit(key, tokens)

def _keys(key: KeyConfig, label: str) -> list[str]:
    tag = "{" + key.id + "}"  # one hash slot, for Redis Cluster
    return [f"gw:rl:{tag}:requests", f"gw:rl:{tag}:tokens", f"gw:rl:{tag}:leases",
            f"gw:rl:{tag}:budget:{label}"]
