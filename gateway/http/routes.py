"""The OpenAI-compatible endpoints. Thin: parse, pick the deployment, run the stream,
encode. Chat and text completions share one path; only the parser and the call differ.
"""

from __future__ import annotations

import base64
import time
from array import array
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.backends.base import Chunk
from gateway.errors import UpstreamError
from gateway.http.middlewares import json_response
from gateway.http.sse import write_stream
from gateway.keys import CATALOG, CONFIG
from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    parse_body,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from gateway.protocol.responses import (
    Kind,
    StreamEncoder,
    collect,
    completion_body,
    model_entry,
)
from gateway.routing.catalog import Deployment


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat(parse_body(await request.read()))
    return await _generate(request, "chat", req)


async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(parse_body(await request.read()))
    return await _generate(request, "text", req)


async def _generate(
    request: web.Request, kind: Kind, req: ChatRequest | CompletionRequest
) -> web.StreamResponse:
    deployment = _pick(request, req.model)
    backend, model = deployment.backend, deployment.model.name
    if isinstance(req, ChatRequest):
        upstream = backend.chat(req, model)
    else:
        upstream = backend.complete(req, model)
    reasoning = request.app[CONFIG].server.reasoning
    headers = {"x-gateway-backend": backend.name, "x-gateway-model": model}
    try:
        first = await _first(upstream, backend.name)
        if req.stream:
            encoder = StreamEncoder(kind, model, include_usage=req.include_usage,
                                    reasoning=reasoning)
            return await write_stream(request, first, upstream, encoder, headers)
        completion = await collect(upstream, first)
    finally:
        await upstream.aclose()  # drops the upstream connection the moment the client goes
    return json_response(completion_body(kind, completion, model, reasoning), headers)


async def _first(chunks: AsyncIterator[Chunk], backend: str) -> Chunk:
    """The first chunk that says something: until then, a failure is still an HTTP error
    (and, for routing, still a failover rather than a broken stream).
    """
    async for chunk in chunks:
        if chunk.content or chunk.reasoning or chunk.tool_calls or chunk.finish_reason:
            return chunk
    raise UpstreamError(f"{backend} sent an empty answer", backend=backend)


async def embeddings(request: web.Request) -> web.Response:
    req = parse_embedding(parse_body(await request.read()))
    deployment = _pick(request, req.model)
    backend, model = deployment.backend, deployment.model.name
    result = await backend.embed(req, model)
    rows: list[dict[str, Any]] = []
    for i, vector in enumerate(result.vectors):
        embedding: Any = vector
        if req.encoding_format == "base64":
            embedding = base64.b64encode(array("f", vector).tobytes()).decode()
        rows.append({"object": "embedding", "index": i, "embedding": embedding})
    body = {
        "object": "list",
        "data": rows,
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return json_response(body, {"x-gateway-backend": backend.name, "x-gateway-model": model})


async def list_models(request: web.Request) -> web.Response:
    entries = [model_entry(d.model, d.backend.name) for d in request.app[CATALOG].models()]
    return json_response({"object": "list", "data": entries})


async def get_model(request: web.Request) -> web.Response:
    deployment = request.app[CATALOG].resolve(request.match_info["model"])[0]
    return json_response(model_entry(deployment.model, deployment.backend.name))


async def health(request: web.Request) -> web.Response:
    statuses = request.app[CATALOG].status()
    # No error text here: /health needs no key, and errors name internal hosts and ports.
    backends = {
        name: {"ok": s.ok, "models": s.models, "checked_at": int(s.refreshed_at) or None}
        for name, s in statuses.items()
    }
    up = sum(s.ok for s in statuses.values())
    status = "ok" if up == len(statuses) else "degraded" if up else "no_backends"
    return json_response({"status": status, "time": int(time.time()), "backends": backends})


def _pick(request: web.Request, model: str) -> Deployment:
    return request.app[CATALOG].resolve(model)[0]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/health", health)
