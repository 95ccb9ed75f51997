"""The plugins around every chat and text completion, in the configured order, around the
one call to routing. The one place that knows the order of plugins.

    on_request  (safety in, QA decides buffering, cache lookup — a hit answers at once)
    routing     (the answer, streamed or whole)
    on_stream   (safety out, QA observing, cache tee: innermost first)
    on_complete (QA's verdict, then the cache stores what passed) — a failing verdict on a
                whole (or buffered) answer asks routing for a stronger model, a bounded
                number of times
    on_finish   (however it ended: the cache releases requests waiting on this one)
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.backends.base import Chunk
from gateway.config import GatewayConfig, PluginConfig, ReasoningMode
from gateway.errors import GatewayError
from gateway.http.middlewares import json_response
from gateway.http.sse import write_stream
from gateway.keys import REQUEST_ID, TENANT
from gateway.protocol.openai import ChatRequest, CompletionRequest
from gateway.protocol.responses import Completion, Kind, StreamEncoder, completion_body
from gateway.routing.catalog import Deployment
from gateway.routing.failover import RoutedAnswer
from gateway.routing.router import Router
from gateway.typed_toml import ConfigError, build
from plugins.base import Plugin, RequestContext, Verdict

log = logging.getLogger(__name__)

ESCALATED = "x-gateway-escalated"  # the models whose answers were found wanting, and why
BUILTIN = {"safety": "plugins.safety:SafetyPlugin", "cache": "plugins.cache:CachePlugin",
           "qa": "plugins.qa:QualityPlugin"}


def load_plugins(config: GatewayConfig) -> list[Plugin]:
    """The configured plugins, each built from its own checked options."""
    plugins = [_load(spec, config.source, f"plugins[{i}]")
               for i, spec in enumerate(config.plugins)]
    _check_order(config)
    return plugins


def _check_order(config: GatewayConfig) -> None:
    """The cache keeps what the plugins before it let through: it must come after the safety
    checker (whose redacted request it keys, and whose blocks a hit would skip) and after
    quality assurance (whose rejected answers it must not keep).
    """
    paths = [spec.path or BUILTIN.get(spec.name) for spec in config.plugins]
    if BUILTIN["cache"] not in paths:
        return
    cache = paths.index(BUILTIN["cache"])
    for name in ("safety", "qa"):
        if BUILTIN[name] in paths[cache:]:
            raise ConfigError(f"{config.source}: plugins: {name} must come before cache "
                              f"(the cache keeps only what {name} let through)")


def _load(spec: PluginConfig, source: str, where: str) -> Plugin:
    path = spec.path or BUILTIN.get(spec.name)
    if path is None:
        raise ConfigError(f"{source}: {where}.name: no built-in plugin {spec.name!r} "
                          f"(built-in: {', '.join(BUILTIN)}; others need a path)")
    module, _, attribute = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{source}: {where}.path: cannot load {path}: {exc}") from None
    options_type = getattr(cls, "Options", None)
    options = build(options_type, spec.options, source, f"{where}.options") \
        if options_type is not None else spec.options
    plugin: Plugin = cls(options)
    plugin.name = spec.name
    return plugin


class Pipeline:
    def __init__(self, plugins: list[Plugin], router: Router, reasoning: ReasoningMode,
                 max_escalations: int = 1) -> None:
        self.plugins = plugins
        self.router = router
        self.reasoning = reasoning
        self.max_escalations = max_escalations

    async def run(self, request: web.Request, kind: Kind,
                  req: ChatRequest | CompletionRequest) -> web.StreamResponse:
        ctx = RequestContext(kind=kind, req=req, tenant=request.get(TENANT, ""),
                             client_headers=request.headers)
        try:
            for plugin in self.plugins:
                hit = await plugin.on_request(ctx)
                if hit is not None:  # answered without asking a model (a cache hit)
                    ctx.model = hit.model
                    return await self._respond(request, ctx, hit, {
                        "x-gateway-backend": plugin.name, "x-gateway-model": hit.model,
                        "x-gateway-attempts": "0", "x-gateway-route": f"answered by {plugin.name}"})
            if ctx.req.stream and not ctx.buffered:
                return await self._stream(request, ctx)
            completion, headers = await self._whole(ctx)
            return await self._respond(request, ctx, completion, headers)
        finally:
            for plugin in reversed(self.plugins):
                try:
                    plugin.on_finish(ctx)
                except Exception:  # one plugin's bug must not keep the others from cleaning up
                    log.exception("plugin %s: on_finish failed", plugin.name)

    async def _stream(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        routed = self.router.answer(ctx.req)
        first = await routed.start()
        taken = Completion()
        try:
            ctx.model = routed.deployment.model.name
            chunks = _taking(taken, self._wrap(ctx, _chain(first, routed.chunks())))
            first_out = await anext(chunks)
            encoder = StreamEncoder(ctx.kind, ctx.model, include_usage=ctx.req.include_usage,
                                    reasoning=self.reasoning)
            routed.on_switch = encoder.switch_model

            async def finished() -> dict[str, Any]:
                taken.model = routed.deployment.model.name
                ctx.model = taken.model
                await self._judge(ctx, taken, routed.deployment)
                qa = ctx.headers.get("x-gateway-qa")
                return {"x_gateway_qa": qa} if qa else {}

            headers = {**_route_headers(request, routed), **ctx.headers}
            response, ok = await write_stream(request, first_out, chunks, encoder, headers,
                                              finished)
            ctx.failed = not ok
            return response
        finally:
            await routed.close()

    async def _whole(self, ctx: RequestContext) -> tuple[Completion, dict[str, str]]:
        """The answer, checked, escalated to stronger models while it fails (bounded)."""
        completion, headers, deployment = await self._collect(ctx, self.router.answer(ctx.req))
        escalated: list[str] = []
        for _ in range(self.max_escalations):
            verdict = await self._judge(ctx, completion, deployment)
            if verdict is None or not verdict.escalate:
                return completion, headers
            routed = self.router.escalate(ctx.req, deployment, verdict.describe())
            if routed is None:
                break
            try:
                stronger, stronger_headers, stronger_deployment = await self._collect(ctx,
                                                                                      routed)
            except GatewayError as exc:
                # The stronger model failed: the answer stands, verdict and all, and the
                # header says that a stronger one was asked.
                escalated.append(f"{deployment.model.name} ({', '.join(verdict.reasons)}); "
                                 f"the stronger model failed ({exc.code or exc.status})")
                ctx.headers[ESCALATED] = "; ".join(escalated)
                break
            escalated.append(f"{deployment.model.name} ({', '.join(verdict.reasons)})")
            ctx.headers[ESCALATED] = "; ".join(escalated)
            completion, headers, deployment = stronger, stronger_headers, stronger_deployment
        else:
            await self._judge(ctx, completion, deployment)
        return completion, headers

    async def _collect(self, ctx: RequestContext, routed: RoutedAnswer
                       ) -> tuple[Completion, dict[str, str], Deployment]:
        first = await routed.start()
        try:
            completion = Completion()
            async for chunk in _taking(completion, self._wrap(ctx, _chain(first,
                                                                          routed.chunks()))):
                del chunk  # taken into the completion on the way
            completion.model = ctx.model = routed.deployment.model.name
        finally:
            await routed.close()
        return completion, _route_headers_of(routed), routed.deployment

    async def _judge(self, ctx: RequestContext, completion: Completion,
                     deployment: Deployment) -> Verdict | None:
        """Every plugin's on_complete, in order; the first failing verdict that asks for a
        stronger model (QA's), if any. Verdicts are counted for the deployment that answered.
        """
        escalate: Verdict | None = None
        judged = False
        ctx.rejected = None
        for plugin in self.plugins:
            verdict = await plugin.on_complete(ctx, completion)
            if verdict is None:
                continue
            judged = True
            if not verdict.ok:
                ctx.rejected = ctx.rejected or verdict  # later plugins (the cache) see it
                if verdict.escalate and escalate is None:
                    escalate = verdict
        if judged:
            reasons = ctx.rejected.reasons if ctx.rejected else ()
            self.router.balancer.state(deployment).judged(ctx.rejected is None, reasons)
        return escalate

    def _wrap(self, ctx: RequestContext, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        for plugin in self.plugins:
            chunks = plugin.on_stream(ctx, chunks)
        return chunks

    async def _respond(self, request: web.Request, ctx: RequestContext, completion: Completion,
                       route: dict[str, str]) -> web.StreamResponse:
        headers = {**route, **ctx.headers, "x-request-id": request[REQUEST_ID]}
        if not ctx.req.stream:
            body = completion_body(ctx.kind, completion, completion.model, self.reasoning)
            return json_response(body, headers)
        encoder = StreamEncoder(ctx.kind, completion.model, include_usage=ctx.req.include_usage,
                                reasoning=self.reasoning)
        first, *rest = completion.chunks()

        async def replay() -> AsyncIterator[Chunk]:
            for chunk in rest:
                yield chunk

        async def verdicts() -> dict[str, Any]:
            qa = ctx.headers.get("x-gateway-qa")
            return {"x_gateway_qa": qa} if qa else {}

        response, _ = await write_stream(request, first, replay(), encoder, headers, verdicts)
        return response

    async def start(self) -> None:
        for plugin in self.plugins:
            await plugin.start()

    async def close(self) -> None:
        for plugin in reversed(self.plugins):
            await plugin.close()

    def report(self) -> dict[str, Any]:
        return {plugin.name: plugin.report() for plugin in self.plugins}


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in rest:
        yield chunk


async def _taking(completion: Completion, chunks: AsyncIterator[Chunk]
                  ) -> AsyncIterator[Chunk]:
    """The chunks, added to ``completion`` as they go out: the answer as the client has it,
    which is what the plugins judge and the cache keeps.
    """
    async for chunk in chunks:
        completion.add(chunk)
        yield chunk


def _route_headers(request: web.Request, routed: RoutedAnswer) -> dict[str, str]:
    return {**_route_headers_of(routed), "x-request-id": request[REQUEST_ID]}


def _route_headers_of(routed: RoutedAnswer) -> dict[str, str]:
    deployment = routed.deployment
    return {
        "x-gateway-backend": deployment.backend.name,
        "x-gateway-model": deployment.model.name,
        "x-gateway-attempts": str(routed.attempts),
        "x-gateway-route": routed.route,
    }
