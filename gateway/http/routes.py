"""The OpenAI-compatible endpoints. Thin: parse, pick the deployment, run the stream,
encode. Chat and text completions share one path; only the parser and the call differ.
"""

from __future__ import annotations

import base64
import time
from array import array
from typing import Any

from aiohttp import web

from gateway.http.middlewares import json_response
from gateway.keys import CATALOG, PIPELINE, REQUEST_ID, ROUTER, TUNNELS
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
    return await request.app[PIPELINE].run(request, kind, req)


def _route_headers(request: web.Request, deployment: Deployment, attempts: int,
                   route: str) -> dict[str, str]:
    return {
        "x-gateway-backend": deployment.backend.name,
        "x-gateway-model": deployment.model.name,
        "x-gateway-attempts": str(attempts),
        "x-gateway-route": route,
        "x-request-id": request[REQUEST_ID],
    }


async def embeddings(request: web.Request) -> web.Response:
    req = parse_embedding(parse_body(await request.read()))
    result, deployment, attempts = await request.app[ROUTER].embed(req)
    model = deployment.model.name
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
    return json_response(body, _route_headers(request, deployment, attempts, "requested"))


async def list_models(request: web.Request) -> web.Response:
    entries = [model_entry(name, d.backend.name) for name, d in request.app[CATALOG].models()]
    entries += [model_entry(alias, "gateway") for alias in request.app[ROUTER].selector.aliases()]
    return json_response({"object": "list", "data": entries})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    selector = request.app[ROUTER].selector
    if selector.is_alias(name) and name in selector.aliases():
        return json_response(model_entry(name, "gateway"))
    deployment = request.app[CATALOG].resolve(name)[0]
    return json_response(model_entry(name, deployment.backend.name))


async def health(request: web.Request) -> web.Response:
    """Alive, and how each backend and deployment is doing. No error text: /health needs no
    key, and upstream errors name internal hosts and ports.
    """
    statuses = request.app[CATALOG].status()
    balancer = request.app[ROUTER].balancer
    ok = {name: s.ok and not balancer.is_down(name) for name, s in statuses.items()}
    backends = {
        name: {"ok": ok[name], "models": s.models, "checked_at": int(s.refreshed_at) or None}
        for name, s in statuses.items()
    }
    up = sum(ok.values())
    status = "ok" if up == len(backends) else "degraded" if up else "no_backends"
    return json_response({"status": status, "time": int(time.time()), "backends": backends,
                          "tunnels": request.app[TUNNELS].report(),
                          "deployments": balancer.report(),
                          "plugins": request.app[PIPELINE].report()})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_get("/health", health)
