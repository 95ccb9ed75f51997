"""Response cache: an exact-match key over what decides the answer, scoped to the tenant.

Only deterministic requests are cached by default (temperature 0, or a seed); the header
``x-gateway-cache: bypass | refresh | force`` overrides that per request. Redis when
configured, else an in-memory LRU. Identical misses in flight at once share one upstream
call. A Redis that is down or slow costs a bounded wait and a counted miss, never a failure.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.backends.base import Usage
from gateway.protocol.openai import ChatRequest
from gateway.protocol.responses import Completion
from plugins.base import BasePlugin, RequestContext, Verdict
from plugins.cache_store import MemoryStore, RedisStore, Store, StoreUnavailable

log = logging.getLogger(__name__)

HEADER = "x-gateway-cache"
FOLLOWER_PATIENCE = 120.0  # the longest a request waits for an identical one in flight


@dataclass(frozen=True, slots=True)
class CacheOptions:
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    ttl: float = 3600.0  # seconds an answer is kept
    max_entries: int = 10_000  # memory backend
    shared: bool = False  # one cache for all tenants (else each API key has its own)
    deterministic_only: bool = True  # only temperature 0 or seeded requests
    timeout: float = 0.05  # the longest Redis may make a request wait
    max_connections: int = 32

    def problems(self) -> Any:
        for key in ("ttl", "timeout"):
            if getattr(self, key) <= 0:
                yield key, "expected seconds > 0"
        for key in ("max_entries", "max_connections"):
            if getattr(self, key) < 1:
                yield key, "expected an integer >= 1"


class CachePlugin(BasePlugin):
    Options = CacheOptions
    name = "cache"

    def __init__(self, options: CacheOptions) -> None:
        self.options = options
        self.store: Store = RedisStore(options.redis_url, options.timeout,
                                       options.max_connections) \
            if options.backend == "redis" else MemoryStore(options.max_entries)
        self._inflight: dict[str, asyncio.Future[Completion | None]] = {}
        self.stats = collections.Counter[str]()

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    def report(self) -> dict[str, Any]:
        return {"backend": self.options.backend, **self.stats}

    async def check(self) -> str | None:
        """What is wrong with the store, for ``gateway check`` (None: nothing)."""
        try:
            await self.store.ping()
        except StoreUnavailable:
            return (f"Redis at {self.options.redis_url} does not answer: answers are not "
                    f"cached until it does (start redis-server, or set backend = \"memory\")")
        return None

    async def on_request(self, ctx: RequestContext) -> Completion | None:
        directive = ctx.client_headers.get(HEADER, "").strip().lower()
        deterministic = _deterministic(ctx)
        if directive == "bypass" or (not deterministic and directive != "force"
                                     and self.options.deterministic_only):
            ctx.headers[HEADER] = "bypass" if directive == "bypass" else "skip"
            return None
        key = self._key(ctx)
        ctx.state[self.name] = key
        if directive != "refresh":
            hit = await self._get(key)
            if hit is None and key in self._inflight:  # the same request is being answered
                hit = await self._follow(key)
            if hit is not None:
                self.stats["hits"] += 1
                ctx.headers[HEADER] = "hit"
                return hit
        self.stats["misses"] += 1
        ctx.headers[HEADER] = "refresh" if directive == "refresh" else "miss"
        self._inflight.setdefault(key, asyncio.get_running_loop().create_future())
        ctx.state[self.name + ".leader"] = True
        return None

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        key = ctx.state.get(self.name)
        if key is None or not ctx.state.get(self.name + ".leader"):
            return None
        # A cut answer is kept only when the client's own limit cut it: that is its answer.
        whole = result.finish_reason in ("stop", "tool_calls") or (
            result.finish_reason == "length" and ctx.req.sampling.max_tokens is not None)
        keep = whole and not ctx.failed and ctx.rejected is None
        if keep:
            await self._put(key, result)
        self._settle(key, result if keep else None)
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        """However the request ended, those waiting on it are released (with nothing, if
        nothing was kept: each then asks on its own).
        """
        if ctx.state.get(self.name + ".leader"):
            self._settle(ctx.state.get(self.name), None)

    def _settle(self, key: str | None, result: Completion | None) -> None:
        future = self._inflight.pop(key, None) if key else None
        if future is not None and not future.done():
            future.set_result(result)

    async def _follow(self, key: str) -> Completion | None:
        self.stats["coalesced"] += 1
        try:
            async with asyncio.timeout(FOLLOWER_PATIENCE):
                return await asyncio.shield(self._inflight[key])
        except (TimeoutError, KeyError):
            return None

    async def _get(self, key: str) -> Completion | None:
        try:
            raw = await self.store.get(key)
        except StoreUnavailable:
            self.stats["store_errors"] += 1
            return None
        return _decode(raw) if raw is not None else None

    async def _put(self, key: str, result: Completion) -> None:
        try:
            await self.store.set(key, _encode(result), self.options.ttl)
            self.stats["stored"] += 1
        except StoreUnavailable:
            self.stats["store_errors"] += 1

    def _key(self, ctx: RequestContext) -> str:
        req = ctx.req
        sampling = req.sampling
        what: dict[str, Any] = {
            "kind": ctx.kind, "model": req.model, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stop": sampling.stop, "seed": sampling.seed,
            "tenant": "" if self.options.shared else ctx.tenant,
        }
        if isinstance(req, ChatRequest):
            what.update(messages=req.messages, tools=req.tools, tool_choice=req.tool_choice,
                        response_format=req.response_format, effort=req.reasoning_effort)
        else:
            what.update(prompt=req.prompt, suffix=req.suffix)
        canonical = orjson.dumps(what, option=orjson.OPT_SORT_KEYS)
        return "gw:cache:" + hashlib.sha256(canonical).hexdigest()


def _deterministic(ctx: RequestContext) -> bool:
    sampling = ctx.req.sampling
    return sampling.temperature == 0 or sampling.seed is not None


def _encode(result: Completion) -> bytes:
    return orjson.dumps({
        "model": result.model, "content": result.content, "reasoning": result.reasoning,
        "tool_calls": result.tool_calls, "finish_reason": result.finish_reason,
        "usage": [result.usage.prompt_tokens, result.usage.completion_tokens]
        if result.usage else None, "at": time.time(),
    })


def _decode(raw: bytes) -> Completion | None:
    try:
        data = orjson.loads(raw)
        usage = data.get("usage")
        return Completion(model=data["model"], content=data["content"],
                          reasoning=data["reasoning"], tool_calls=data["tool_calls"],
                          finish_reason=data["finish_reason"],
                          usage=Usage(*usage) if usage else None)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.warning("cache: skipped an entry that cannot be read")
        return None
