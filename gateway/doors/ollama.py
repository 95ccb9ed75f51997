"""The Ollama door: Ollama's native API (``/api/*``) as the ``ollama`` client libraries,
Continue, Open WebUI, Twinny and Llama Coder speak it, answered from every model the gateway
can route, with the same routing, failover and plugins as every other door.

Errors come as Ollama sends them: ``{"error": "..."}`` with the status, and one such line
once a stream has begun. The gateway serves models but does not manage them: pulling,
creating, copying, pushing and deleting get a clear refusal.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.doors.ollama_answer import OllamaStream, Shape, loaded
from gateway.doors.ollama_context import turns_of
from gateway.doors.ollama_request import (
    bad,
    chat_request,
    generate_request,
    keep_alive_of,
    model_of,
    thinking_mode,
)
from gateway.errors import GatewayError, ModelNotFound, model_shown
from gateway.http.access import check_model, context, usage_sink, visible
from gateway.http.bodies import body_of
from gateway.http.middlewares import json_response
from gateway.http.stream import write_stream
from gateway.keys import CONFIG, PIPELINE
from gateway.pipeline import Listed, Whole
from gateway.protocol.ollama import parameter_size
from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    Kind,
    parse_embedding,
)
from gateway.protocol.times import rfc3339

API_VERSION = "0.12.6"  # the Ollama release whose API this door follows (clients check it)
NOT_MANAGED = ("this is an LLM gateway: it serves the models its backends have and does not "
               "pull, create, copy, push or delete models; do that on the Ollama server itself")
# Ollama's capability names (a backend that cannot tell gets none claimed for it).
CAPABILITIES = ("completion", "vision", "tools", "thinking", "embedding", "insert")


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": API_VERSION})


async def tags(request: web.Request) -> web.Response:
    models = visible(request, request.app[PIPELINE].models.all())
    return json_response({"models": [_entry(m) for m in models]})


async def running(request: web.Request) -> web.Response:
    """``/api/ps``: the models a backend says are loaded now."""
    models = [m for m in visible(request, request.app[PIPELINE].models.all())
              if m.info is not None and m.info.loaded]
    return json_response({"models": [
        {**_entry(m), "expires_at": None, "size_vram": 0,
         # (the window Ollama runs it with, where it said: often far short of the model's)
         "context_length": (m.info.running_context or m.info.context_length if m.info
                            else None) or 0}
        for m in models]})


async def show(request: web.Request) -> web.Response:
    name = model_of(await body_of(request))
    check_model(request, name)
    model = request.app[PIPELINE].models.one(name)
    info = model.info
    model_info: dict[str, Any] = {}
    if info is not None:
        family = info.family or "general"
        model_info["general.architecture"] = family
        if info.parameters:
            model_info["general.parameter_count"] = int(info.parameters)
        if info.context_length:
            model_info[f"{family}.context_length"] = info.context_length
    return json_response({"license": "", "modelfile": "", "parameters": "", "template": "",
                          "details": _details(model), "model_info": model_info,
                          "capabilities": _capabilities(model) or ["completion"],
                          "modified_at": rfc3339(model.created)})


async def chat(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body = await body_of(request)
    req = chat_request(body)
    if req is None:
        return await _load(request, body, "chat")
    return await _answer(request, "chat", req, body, started)


async def generate(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body = await body_of(request)
    req = generate_request(body)
    if req is None:
        return await _load(request, body, "generate")
    return await _answer(request, "generate", req, body, started)


async def _load(request: web.Request, body: dict[str, Any], shape: Shape) -> web.Response:
    """A request without a prompt: Ollama's load of the model, or with ``keep_alive`` 0 its
    unload, passed on to the backends that have it (``ollama stop``, Open WebUI's unload)."""
    model = model_of(body)
    check_model(request, model)
    name, reason = await request.app[PIPELINE].models.load(model, keep_alive_of(body))
    return json_response(loaded(name, shape, reason))


async def _answer(request: web.Request, shape: Shape, req: ChatRequest | CompletionRequest,
                  body: dict[str, Any], started: float) -> web.StreamResponse:
    kind: Kind = "chat" if isinstance(req, ChatRequest) else "text"
    # (a generate turn's conversation as the client sent it, for its answer's context)
    turns = turns_of(req.messages) if shape == "generate" and isinstance(req, ChatRequest) \
        else None
    answer = await request.app[PIPELINE].run(context(request, kind, req))
    mode = thinking_mode(body, request.app[CONFIG].server.reasoning)
    if isinstance(answer, Whole):
        encoder = OllamaStream(shape, answer.completion.model, mode, started, turns)
        return json_response(encoder.whole(answer.completion), answer.headers)
    return await write_stream(request, answer,
                              OllamaStream(shape, answer.model, mode, started, turns))


async def embed(request: web.Request) -> web.Response:
    started = time.perf_counter()
    body = await body_of(request)
    model, text = model_of(body), body.get("input")
    if text in ("", []):  # (Ollama's load of an embedding model)
        check_model(request, model)
        name, _ = await request.app[PIPELINE].models.load(model, keep_alive_of(body))
        return json_response({"model": name, "embeddings": []})
    if not isinstance(text, str) and not (isinstance(text, list) and
                                          all(isinstance(t, str) for t in text)):
        raise bad("invalid input type: input must be a string or an array of strings")
    ask = {"model": model, "input": text}
    if body.get("dimensions") is not None:
        ask["dimensions"] = body["dimensions"]
    req = parse_embedding(ask, most=None)
    if body.get("options") is not None and not isinstance(body["options"], dict):
        raise bad("options must be an object")
    req.ollama = {k: body[k] for k in EMBED_FIELDS if body.get(k) is not None} or None
    answer = await request.app[PIPELINE].embed(req, usage_sink(request, req.model))
    return json_response({"model": answer.model, "embeddings": answer.result.vectors,
                          "total_duration": int((time.perf_counter() - started) * 1e9),
                          "load_duration": 0, "prompt_eval_count": answer.result.prompt_tokens},
                         answer.headers)


# Fields of /api/embed Ollama itself acts on that OpenAI's embeddings do not have.
EMBED_FIELDS = ("options", "keep_alive", "truncate")


async def embeddings(request: web.Request) -> web.Response:
    """The older ``/api/embeddings``: one prompt, one vector."""
    body = await body_of(request)
    model, prompt = model_of(body), body.get("prompt")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise bad("prompt must be a string")
    if not prompt:  # (a load, as /api/embed's)
        check_model(request, model)
        await request.app[PIPELINE].models.load(model, keep_alive_of(body))
        return json_response({"embedding": []})
    answer = await request.app[PIPELINE].embed(
        parse_embedding({"model": model, "input": prompt}), usage_sink(request, model))
    return json_response({"embedding": answer.result.vectors[0]}, answer.headers)


async def not_managed(request: web.Request) -> web.Response:
    raise GatewayError(NOT_MANAGED, status=403, type="permission_error", code="not_managed")


def error_response(error: GatewayError) -> web.Response:
    """An error as Ollama sends one: ``{"error": "..."}`` (an unknown model in its words)."""
    message = f"model '{model_shown(error.model)}' not found" \
        if isinstance(error, ModelNotFound) \
        else error.message
    return web.Response(status=error.status, body=orjson.dumps({"error": message}),
                        content_type="application/json", headers=error.headers())


def _entry(model: Listed) -> dict[str, Any]:
    """A model as ``/api/tags`` lists it (both ``name`` and ``model``: clients read either)."""
    entry: dict[str, Any] = {
        "name": model.name, "model": model.name, "modified_at": rfc3339(model.created),
        "size": 0, "digest": hashlib.sha256(f"{model.owner}/{model.name}".encode()).hexdigest(),
        "details": _details(model)}
    capabilities = _capabilities(model)
    if capabilities:
        entry["capabilities"] = capabilities
    return entry


def _details(model: Listed) -> dict[str, Any]:
    info = model.info
    family = info.family if info is not None else ""
    return {"parent_model": "", "format": "", "family": family,
            "families": [family] if family else [],
            "parameter_size": parameter_size(info.parameters if info else None),
            "quantization_level": info.quantization if info else ""}


def _capabilities(model: Listed) -> list[str]:
    info = model.info
    if info is None or not info.known:
        return []
    return [c for c in CAPABILITIES if c in info.capabilities]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", running)
    app.router.add_post("/api/show", show)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", embeddings)
    for path in ("/api/pull", "/api/create", "/api/copy", "/api/push"):
        app.router.add_post(path, not_managed)
    app.router.add_delete("/api/delete", not_managed)
    app.router.add_route("*", "/api/blobs/{digest}", not_managed)
