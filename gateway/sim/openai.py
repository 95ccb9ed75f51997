"""A simulated OpenAI-compatible server, in the flavour of mlx_lm.server (role repeated in
every delta, ``: keepalive`` comments while "processing the prompt", no ``owned_by``),
llama.cpp (its error shape), or a cloud API.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson
from aiohttp import web

from gateway.protocol.units import parse_parameter_size
from gateway.sim.engine import (
    SIM_STATE,
    Ask,
    Plan,
    SimError,
    SimState,
    apply_faults,
    control_routes,
    pace_whole,
    plan_answer,
    stream_plan,
    watch,
)
from gateway.sim.fleet import SimModel, count_tokens, embedding

Flavor = Literal["mlx", "llamacpp", "openai"]


_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
LLAMACPP_SLOTS = 4  # llama.cpp's server: --parallel's default


def create_openai_app(models: Sequence[SimModel], flavor: Flavor = "mlx",
                      slots: int = LLAMACPP_SLOTS) -> web.Application:
    """``slots`` (llamacpp only): requests answered at once, as ``/props`` says; the rest wait
    their turn inside the server, as llama.cpp's do (their wait counts in their time to first
    token).
    """
    state = SimState(models)
    turns = asyncio.Semaphore(slots) if flavor == "llamacpp" else None
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_errors(flavor)])
    app[SIM_STATE] = state

    async def chat(request: web.Request) -> web.StreamResponse:
        body, model = await _parse(request, state)
        if turns is None:
            return await _answer(request, state, model, body, _chat_ask(body), flavor,
                                 chat=True)
        async with turns:
            return await _answer(request, state, model, body, _chat_ask(body), flavor,
                                 chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        body, model = await _parse(request, state)
        ask = Ask(texts=[str(body.get("prompt") or "")], suffix=body.get("suffix"),
                  max_tokens=_max_tokens(body))
        if turns is None:
            return await _answer(request, state, model, body, ask, flavor, chat=False)
        async with turns:
            return await _answer(request, state, model, body, ask, flavor, chat=False)

    async def embeddings(request: web.Request) -> web.Response:
        body, model = await _parse(request, state)
        inputs = body.get("input")
        # A string, strings, one array of token ids, or arrays of them (OpenAI's forms).
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                       and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        inputs = inputs or []
        record = state.record(request, model.name, body, False, False)
        faults = model.take_faults()
        await apply_faults(request, faults, Ask(texts=inputs), record)
        if "embedding" not in model.capabilities:
            raise SimError(400, f"{model.name} does not support embeddings")
        dims = body.get("dimensions") or model.embedding_length
        record["outcome"] = "completed"
        tokens = sum(len(t) if isinstance(t, list) else count_tokens(str(t)) for t in inputs)
        answer: dict[str, Any] = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": embedding(str(t), dims)}
                     for i, t in enumerate(inputs)],
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        if faults.no_usage:
            del answer["usage"]
        return _json(answer)

    async def list_models(request: web.Request) -> web.Response:
        created = int(time.time())
        data = []
        for model in models:
            entry: dict[str, Any] = {"id": model.name, "object": "model", "created": created}
            if flavor != "mlx":
                entry["owned_by"] = "llamacpp" if flavor == "llamacpp" else "system"
            size = parse_parameter_size(model.parameter_size)
            if flavor == "llamacpp" and size:  # (llama.cpp describes the model it has loaded)
                entry["meta"] = {"n_params": int(size), "n_ctx_train": model.context_length}
            data.append(entry)
        return _json({"object": "list", "data": data})

    async def health(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def props(request: web.Request) -> web.Response:  # llama.cpp's server only
        window = models[0].context_length if models else 0
        return _json({"total_slots": slots, "default_generation_settings": {"n_ctx": window}})

    app.add_routes([
        web.get("/health", health),
        *([web.get("/props", props)] if flavor == "llamacpp" else []),
        web.get("/v1/models", list_models),
        web.post("/v1/chat/completions", chat),
        web.post("/v1/completions", completions),
        web.post("/v1/embeddings", embeddings),
        *control_routes(state),
    ])
    return app


async def _parse(request: web.Request, state: SimState) -> tuple[dict[str, Any], SimModel]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise SimError(400, "Invalid JSON in request body") from None
    if not isinstance(body, dict):
        raise SimError(400, "Request body must be a JSON object")
    model = state.models.get(str(body.get("model")))
    if model is None:
        raise SimError(404, f"The model `{body.get('model')}` does not exist.", "model_not_found")
    return body, model


def _max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    return value if isinstance(value, int) else None


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def _chat_ask(body: dict[str, Any]) -> Ask:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "messages must be a non-empty array")
    last = messages[-1]
    fmt = body.get("response_format") or {}
    images = sum(
        1 for m in messages if isinstance(m.get("content"), list)
        for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url"
    )
    return Ask(
        texts=[_text(m.get("content")) for m in messages],
        last_role=last.get("role", "user"),
        prefill=_text(last.get("content")) if last.get("role") == "assistant" else "",
        images=images,
        tools=body.get("tools") or None,
        last_tool_result=_text(last.get("content")) if last.get("role") == "tool" else None,
        json_format=fmt.get("type") in ("json_object", "json_schema"),
        schema=(fmt.get("json_schema") or {}).get("schema"),
        think=None if body.get("reasoning_effort") is None
        else body.get("reasoning_effort") != "none",
        max_tokens=_max_tokens(body),
    )


async def _answer(request: web.Request, state: SimState, model: SimModel, body: dict[str, Any],
                  ask: Ask, flavor: Flavor, *, chat: bool) -> web.StreamResponse:
    stream = bool(body.get("stream"))
    record = state.record(request, model.name, body, stream, bool(ask.prefill))
    faults = model.take_faults()
    with watch(record):
        await apply_faults(request, faults, ask, record)
        plan = plan_answer(model, ask, faults)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and \
            not faults.no_usage
        framer = _Framer(model.name, flavor, chat, include_usage)
        if not stream or faults.ignore_stream:
            await pace_whole(model, plan)
            record["outcome"] = "completed"
            record["tokens"] = plan.completion_tokens
            return _json(framer.whole(plan))
        return await stream_plan(request, _SSE_HEADERS, model, faults, plan, framer, record)


class _Framer:
    def __init__(self, model: str, flavor: Flavor, chat: bool, include_usage: bool) -> None:
        self.flavor = flavor
        self.chat = chat
        self.include_usage = include_usage
        self.first = True
        # A text piece's bytes before and after its text, by whether its delta has the role.
        self._frames: dict[bool, tuple[bytes, bytes]] = {}
        self.base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{random.getrandbits(64):016x}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": f"fp_{flavor}",
        }

    def _event(self, data: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def _choice(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": delta.get("content", ""), "logprobs": None,
                    "finish_reason": finish}
        if self.first or self.flavor == "mlx":
            delta = {"role": "assistant", **delta}
        self.first = False
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def piece(self, kind: str, value: Any) -> bytes:
        if kind == "content" and isinstance(value, str):
            return self._text_piece(value)
        if kind == "content":
            delta: dict[str, Any] = {"content": value}
        elif kind == "refusal":  # (as OpenAI's: the first has content null and refusal "")
            delta = {"refusal": value} if not self.first else {"content": None, "refusal": value}
        elif kind == "thinking":
            delta = {"reasoning_content": value}
        else:
            delta = {"tool_calls": _tool_calls(value)}
        return self._event({**self.base, "choices": [self._choice(delta, None)]})

    def _text_piece(self, text: str) -> bytes:
        """A text token's event: the bytes the whole event would be, made once an answer
        and then only the text encoded (a server frames its tokens at a cost next to
        nothing beside making them; here, where no token costs anything to make, the
        framing must not either).
        """
        role = self.chat and (self.first or self.flavor == "mlx")
        frame = self._frames.get(role)
        if frame is None:
            event = self._event({**self.base, "choices": [self._choice({"content": "\0"},
                                                                        None)]})
            before, after = event.split(b'"\\u0000"')
            frame = self._frames[role] = (before, after)
        self.first = False
        return frame[0] + orjson.dumps(text) + frame[1]

    def malformed(self) -> bytes:
        return b'data: {"id": "chatcmpl-broken", "choices": [{"delta": \n\n'

    def bad_shape(self) -> bytes:
        return self._event({**self.base, "choices": ["not", "a", "choice"]})

    def error(self, message: str, code: str | int | None) -> bytes:
        client = code == "context_length_exceeded" or (isinstance(code, int) and code < 500)
        return self._event({"error": {"message": message, "param": None, "code": code,
                                      "type": "invalid_request_error" if client
                                      else "server_error"}})

    def keepalive(self) -> bytes:
        return b": keepalive 1/1\n\n" if self.flavor == "mlx" else b""

    def end(self, plan: Plan, terminate: bool) -> bytes:
        out = self._event({**self.base, "choices": [self._choice({}, plan.finish)]})
        if self.include_usage:
            usage_object = "chat.completion" if self.flavor == "mlx" else self.base["object"]
            out += self._event({**self.base, "object": usage_object, "choices": [],
                                "usage": _usage(plan)})
        return out + (b"data: [DONE]\n\n" if terminate else b"")

    def whole(self, plan: Plan) -> dict[str, Any]:
        text = "".join(plan.content)
        choice: dict[str, Any]
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if plan.refusal:
                message.update(content=None, refusal=text)
            if plan.thinking:
                message["reasoning_content"] = "".join(plan.thinking)
            if plan.tool_calls:
                message["tool_calls"] = _tool_calls(plan.tool_calls)
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": plan.finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": plan.finish}
        return {**self.base, "object": "chat.completion" if self.chat else "text_completion",
                "choices": [choice], "usage": _usage(plan)}


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"index": i, "id": f"call_{secrets.token_hex(6)}", "type": "function",
         "function": {"name": c["name"], "arguments": orjson.dumps(c["arguments"]).decode()}}
        for i, c in enumerate(calls)
    ]


def _usage(plan: Plan) -> dict[str, int]:
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": plan.completion_tokens,
            "total_tokens": plan.prompt_tokens + plan.completion_tokens}


def _errors(flavor: Flavor) -> Callable[..., Any]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Any]) -> Any:
        try:
            return await handler(request)
        except SimError as exc:
            error: dict[str, Any] = {"message": exc.message}
            if flavor == "llamacpp":
                kind = "exceed_context_size_error" if exc.code == "context_length_exceeded" \
                    else "invalid_request_error"
                error.update(code=exc.status, type=kind)
            else:
                kind = "invalid_request_error" if exc.status < 500 else "server_error"
                error.update(type=kind, param=None, code=exc.code)
            headers = {"Retry-After": f"{exc.retry_after:g}"} if exc.retry_after is not None \
                else None
            return web.Response(status=exc.status, body=orjson.dumps({"error": error}),
                                content_type="application/json", headers=headers)

    return middleware


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")
