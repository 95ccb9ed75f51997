"""Response cache: an exact-match key over what decides the answer, scoped to the tenant.

Only deterministic requests are cached by default (temperature 0, or a seed); the header
``x-gateway-cache: bypass | refresh | force`` overrides that per request. Redis when
configured, else an in-memory LRU. Identical misses in flight at once share one upstream
call. A Redis that is down or slow costs a bounded wait and a counted miss, never a failure.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.config import redis_url_problem
from gateway.protocol.ids import unique_id
from gateway.protocol.units import Completion, Usage
from gateway.store import Store, StoreUnavailable, open_store, shown
from plugins.base import BasePlugin, Count, RequestContext, Verdict

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
        if self.backend == "redis" and (problem := redis_url_problem(self.redis_url)):
            yield "redis_url", problem
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
        self.store: Store = open_store(options.backend, options.redis_url,
                                       max_entries=options.max_entries,
                                       timeout=options.timeout,
                                       max_connections=options.max_connections, label="cache")
        self._inflight: dict[str, asyncio.Future[Completion | None]] = {}
        self.stats = collections.Counter[str]()

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    def report(self) -> dict[str, Any]:
        return {"backend": self.options.backend, **self.stats}

    def counts(self) -> list[Count]:
        stats = self.stats
        return [Count("gateway.cache.lookups", "Cache lookups: answered from the cache (hit), "
                      "by waiting for the same request in flight (coalesced), or not (miss)",
                      ("result",), {("hit",): stats["hits"], ("miss",): stats["misses"],
                                    ("coalesced",): stats["coalesced"]}),
                Count("gateway.cache.store_errors", "Cache reads and writes its store failed",
                      (), {(): stats["store_errors"]})]

    async def check(self) -> str | None:
        """What is wrong with the store, for ``gateway check`` (None: nothing)."""
        try:
            await self.store.ping()
        except StoreUnavailable:
            return (f"Redis at {shown(self.options.redis_url)} does not answer: answers are not "
                    f"cached until it does (start redis-server, or set backend = \"memory\")")
        return None

    async def on_request(self, ctx: RequestContext) -> Completion | None:
        directive = ctx.client_headers.get(HEADER, "").strip().lower()
        if ctx.cache_scope == "off":  # the caller's key keeps out of the cache
            directive = "bypass"
        deterministic = _deterministic(ctx)
        if directive == "bypass" or (not deterministic and directive != "force"
                                     and self.options.deterministic_only):
            ctx.headers[HEADER] = "bypass" if directive == "bypass" else "skip"
            return None
        key = self._key(ctx)
        ctx.state[self.name] = key
        if directive != "refresh":
            if key in self._inflight and (not ctx.req.stream or ctx.buffered):
                hit = await self._follow(key)  # the same request is being answered: wait
            elif key in self._inflight:  # ... but a stream would get nothing until the
                # other's answer is whole: what is stored, else the model, streamed as it comes
                ctx.state[self.name + ".beside"] = True  # (the other stores the answer)
                hit = await self._get(key)
            else:
                hit = await self._lookup(ctx, key)
            if hit is not None:
                self.stats["hits"] += 1
                ctx.headers[HEADER] = "hit"
                return _own_calls(hit)
        self.stats["misses"] += 1
        ctx.headers[HEADER] = "refresh" if directive == "refresh" else "miss"
        if directive != "refresh" and self.name + ".future" not in ctx.state and \
                key not in self._inflight:
            ctx.state.pop(self.name + ".beside", None)  # (the other is done: this one leads)
            self._lead(ctx, key)  # (a refresh leads no one: others may take the stored answer)
        return None

    async def _lookup(self, ctx: RequestContext, key: str) -> Completion | None:
        """The stored answer. Identical requests that arrive while the store is asked wait
        for this one, and then for its model's answer if nothing was stored.
        """
        self._lead(ctx, key)
        hit = await self._get(key)
        if hit is not None:
            self._release(ctx, hit)
        return hit

    def _lead(self, ctx: RequestContext, key: str) -> None:
        future = asyncio.get_running_loop().create_future()
        ctx.state[self.name + ".future"] = self._inflight[key] = future

    def _release(self, ctx: RequestContext, result: Completion | None) -> None:
        """Those waiting on this request get its answer (None: each then asks on its own)."""
        future = ctx.state.pop(self.name + ".future", None)
        if future is None:
            return
        if self._inflight.get(ctx.state[self.name]) is future:
            del self._inflight[ctx.state[self.name]]
        if not future.done():
            future.set_result(result)

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        key = ctx.state.get(self.name)
        if key is None:
            return None
        if ctx.rejected is not None:
            return None  # a stronger model may be asked: those waiting wait for its answer
        # A cut answer is kept only when the client's own limit cut it: that is its answer.
        whole = result.finish_reason in ("stop", "tool_calls") or (
            result.finish_reason == "length" and ctx.req.sampling.max_tokens is not None)
        keep = whole and not ctx.failed and not result.overtime
        # (a stream answered beside the same request stores its answer only once that one is
        # no longer in flight: it failed, or left it to this one)
        if keep and not (ctx.state.get(self.name + ".beside") and key in self._inflight):
            await self._put(key, result)
        self._release(ctx, result if keep else None)
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        """However the request ended, those still waiting on it are released."""
        self._release(ctx, None)

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
        """A digest of everything in the request body (as the models will see it: after
        redaction) but the fields that cannot change the answer, with the kind and tenant.
        A field the gateway does not know yet changes the key: two requests share an
        answer only when nothing that may decide it differs. What is said two ways is keyed
        one way: a fraction written whole (``temperature: 0`` is ``0.0``), the limit's two
        names, ``n: 1``, and the tool calls' ids (each its order in the conversation: an
        agent run again holds other ids for the same calls, a cloud's or the cache's own).
        """
        body = ctx.req.body
        same = _SAME if "max_tokens" not in body else {}
        what = {same.get(name, name): float(value) if name in _FLOATS and
                value.__class__ is int else value
                for name, value in body.items() if name not in _NOT_KEYED}
        if what.get("n") == 1:
            del what["n"]
        messages = what.get("messages")
        if isinstance(messages, list) and any(
                isinstance(m, dict) and ("tool_calls" in m or "tool_call_id" in m)
                for m in messages):
            what["messages"] = _calls_in_order(messages)
        what[" kind"] = ctx.kind
        shared = self.options.shared if not ctx.cache_scope else ctx.cache_scope == "shared"
        what[" tenant"] = "" if shared else ctx.tenant
        if shared and ctx.models:  # (an answer another key's models gave is not this one's)
            what[" models"] = sorted(ctx.models)
        if ctx.req.ollama:  # an Ollama client's options beyond OpenAI's (num_ctx, ...)
            what[" ollama"] = {k: v for k, v in ctx.req.ollama.items() if k != "keep_alive"}
        canonical = orjson.dumps(what, option=orjson.OPT_SORT_KEYS)  # (bodies are at most 128 deep)
        return "gw:cache:" + hashlib.sha256(canonical).hexdigest()


# What a request may say that does not change its answer: how it is delivered, and notes
# about the caller.
_NOT_KEYED = frozenset({"stream", "stream_options", "user", "metadata", "store"})
_SAME = {"max_completion_tokens": "max_tokens"}  # (one limit, by its two names)
# Fields that are fractions (an integer there is the same value: any other, such as a seed
# past 2**53, is not a float's)
_FLOATS = frozenset({"temperature", "top_p", "frequency_penalty", "presence_penalty", "min_p",
                     "repetition_penalty"})


def _deterministic(ctx: RequestContext) -> bool:
    sampling = ctx.req.sampling
    return sampling.temperature == 0 or sampling.seed is not None


def _encode(result: Completion) -> bytes:
    return orjson.dumps({
        "model": result.model, "content": result.content, "reasoning": result.reasoning,
        "tool_calls": result.tool_calls, "finish_reason": result.finish_reason,
        "usage": dataclasses.astuple(result.usage) if result.usage else None,
        "logprobs": result.logprobs, "fingerprint": result.fingerprint, "at": time.time(),
        **({"refusal": result.refusal} if result.refusal else {}),
    })


def _calls_in_order(messages: list[Any]) -> list[Any]:
    """The messages, each tool call's id (and each tool result's ``tool_call_id``) replaced
    by the call's order of first appearance."""
    order: dict[str, str] = {}

    def numbered(call_id: str) -> str:
        return order.setdefault(call_id, f"call {len(order)}")

    out = []
    for message in messages:
        if isinstance(message, dict) and ("tool_calls" in message or
                                          "tool_call_id" in message):
            message = dict(message)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                message["tool_calls"] = [
                    {**call, "id": numbered(call["id"])}
                    if isinstance(call, dict) and isinstance(call.get("id"), str) else call
                    for call in calls]
            if isinstance(message.get("tool_call_id"), str):
                message["tool_call_id"] = numbered(message["tool_call_id"])
        out.append(message)
    return out


def _own_calls(answer: Completion) -> Completion:
    """A stored (or shared) answer whose tool calls have ids of their own: an agent that asks
    again would otherwise hold two calls of one id, the second answered with the first's
    result (and an answer shared with those who waited for it stays theirs as it was).
    """
    calls = answer.tool_calls
    if not calls:
        return answer
    return Completion(answer.model, answer.content, answer.reasoning,
                      [{**call, "id": "call_" + unique_id()} for call in calls],
                      answer.finish_reason, answer.usage, answer.logprobs, answer.fingerprint,
                      answer.refusal)


def _decode(raw: bytes) -> Completion | None:
    try:
        data = orjson.loads(raw)
        usage = data.get("usage")
        return Completion(model=data["model"], content=data["content"],
                          reasoning=data["reasoning"], tool_calls=data["tool_calls"],
                          finish_reason=data["finish_reason"],
                          usage=Usage(*usage) if usage else None,
                          logprobs=data.get("logprobs"), fingerprint=data.get("fingerprint"),
                          refusal=data.get("refusal") or "")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.warning("cache: skipped an entry that cannot be read")
        return None
