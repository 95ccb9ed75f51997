"""A simulated Ollama server: the native ``/api/*`` surface as Ollama documents it, with
NDJSON streams and ``{"error": "..."}`` errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

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

VERSION = "0.12.6"
NDJSON = "application/x-ndjson"


def create_ollama_app(models: Sequence[SimModel]) -> web.Application:
    state = SimState(models)
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_errors])
    app[SIM_STATE] = state
    app.add_routes([
        web.get("/", _answer_with(lambda: "Ollama is running")),
        web.get("/api/version", _answer_with(lambda: {"version": VERSION})),
        web.get("/api/tags", _answer_with(lambda: {"models": [_entry(m) for m in models]})),
        web.get("/api/ps", _answer_with(
            lambda: {"models": [_running(m) for m in models if m.loaded]})),
        web.post("/api/show", _with_model(state, _show)),
        web.post("/api/chat", _with_model(state, _chat, queued=True)),
        web.post("/api/generate", _with_model(state, _generate, queued=True)),
        web.post("/api/embed", _with_model(state, _embed)),
        *control_routes(state),
    ])
    return app


Handler = Callable[[web.Request, SimState, SimModel, dict[str, Any]], Awaitable[web.StreamResponse]]


def _with_model(state: SimState, handler: Handler, queued: bool = False
                ) -> Callable[[web.Request], Any]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            raise SimError(400, f"invalid character in request body: {exc}") from None
        if not isinstance(payload, dict) or not payload.get("model"):
            raise SimError(400, "model is required")
        model = state.models.get(payload["model"]) or state.models.get(payload["model"] + ":latest")
        if model is None:
            raise SimError(404, f"model '{payload['model']}' not found")
        if queued:  # (a generation waits its turn at the model's runner)
            async with state.turn(model):
                return await handler(request, state, model, payload)
        return await handler(request, state, model, payload)

    return wrapped


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Any]) -> Any:
    try:
        return await handler(request)
    except SimError as exc:
        headers = {"Retry-After": f"{exc.retry_after:g}"} if exc.retry_after is not None else None
        return web.Response(status=exc.status, body=orjson.dumps({"error": exc.message}),
                            content_type="application/json", headers=headers)


async def _show(request: web.Request, state: SimState, model: SimModel,
                payload: dict[str, Any]) -> web.Response:
    arch = model.family
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": int(parse_parameter_size(model.parameter_size) or 0),
        f"{arch}.context_length": model.context_length,
    }
    if model.embedding_length:
        info[f"{arch}.embedding_length"] = model.embedding_length
    return _json({
        "modelfile": f"FROM {model.name}\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": _details(model),
        "model_info": info,
        "capabilities": list(model.capabilities),
        "modified_at": _now(),
    })


async def _chat(request: web.Request, state: SimState, model: SimModel,
                payload: dict[str, Any]) -> web.StreamResponse:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise SimError(400, "messages must be an array")
    last = messages[-1] if messages else {}
    ask = Ask(
        texts=[str(m.get("content") or "") for m in messages],
        last_role=last.get("role", "user"),
        prefill=last.get("content", "") if last.get("role") == "assistant" else "",
        images=sum(len(m.get("images") or []) for m in messages),
        tools=payload.get("tools") or None,
        last_tool_result=last.get("content") if last.get("role") == "tool" else None,
        json_format=bool(payload.get("format")),
        schema=payload["format"] if isinstance(payload.get("format"), dict) else None,
        think=payload.get("think"),
        max_tokens=(payload.get("options") or {}).get("num_predict"),
    )
    return await _answer(request, state, model, payload, ask, chat=True)


async def _generate(request: web.Request, state: SimState, model: SimModel,
                    payload: dict[str, Any]) -> web.StreamResponse:
    if not payload.get("prompt") and not payload.get("images") and "suffix" not in payload:
        return await _load(request, state, model, payload)
    ask = Ask(
        texts=[str(payload.get("prompt") or "")],
        suffix=payload.get("suffix"),
        json_format=bool(payload.get("format")),
        think=payload.get("think"),
        max_tokens=(payload.get("options") or {}).get("num_predict"),
    )
    return await _answer(request, state, model, payload, ask, chat=False)


async def _load(request: web.Request, state: SimState, model: SimModel,
                payload: dict[str, Any]) -> web.Response:
    """A generate without a prompt loads the model (``keep_alive`` 0: unloads it), and
    answers with one object whatever ``stream`` says, as Ollama does.
    """
    unload = payload.get("keep_alive") in (0, "0", "0s", "0m")
    if not unload and "completion" not in model.capabilities:  # (as Ollama: an unload is
        raise SimError(400, f'"{model.name}" does not support generate')  # let through first)
    record = state.record(request, model.name, payload, False, False)
    record["outcome"] = "unloaded" if unload else "loaded"
    if not unload:
        await _loaded(model)
    model.loaded = not unload
    return web.json_response({
        "model": model.name, "created_at": _now(), "response": "", "done": True,
        "done_reason": "unload" if unload else "load"})


async def _answer(request: web.Request, state: SimState, model: SimModel,
                  payload: dict[str, Any], ask: Ask, *, chat: bool) -> web.StreamResponse:
    stream = payload.get("stream", True) is not False
    record = state.record(request, model.name, payload, stream, bool(ask.prefill))
    faults = model.take_faults()
    with watch(record):
        await apply_faults(request, faults, ask, record)
        _check_options(model, payload)
        plan = plan_answer(model, ask, faults)
        await _loaded(model)
        framer = _Framer(model.name, chat)
        if not stream:
            await pace_whole(model, plan)
            record["outcome"] = "completed"
            record["tokens"] = plan.completion_tokens
            return web.Response(body=framer.whole(plan), content_type="application/json")
        return await stream_plan(request, {"Content-Type": NDJSON}, model, faults, plan,
                                 framer, record)


_DURATION = re.compile(r"-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")


def _check_options(model: SimModel, payload: dict[str, Any]) -> None:
    """What real Ollama refuses: think for a model that cannot think, suffix for a model
    without fill-in-the-middle, a keep_alive that is not a number or a Go duration.
    """
    if payload.get("think") is not None and "thinking" not in model.capabilities:
        raise SimError(400, f'"{model.name}" does not support thinking')
    if payload.get("suffix") and "insert" not in model.capabilities:
        raise SimError(400, f"registry.ollama.ai/library/{model.name} does not support insert")
    keep_alive = payload.get("keep_alive")
    if isinstance(keep_alive, str) and not _DURATION.fullmatch(keep_alive):
        raise SimError(400, f'time: missing unit in duration "{keep_alive}"')


async def _embed(request: web.Request, state: SimState, model: SimModel,
                 payload: dict[str, Any]) -> web.Response:
    raw = payload.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list):
        raise SimError(400, "invalid input type")
    record = state.record(request, model.name, payload, False, False)
    await apply_faults(request, model.take_faults(), Ask(texts=inputs), record)
    if "embedding" not in model.capabilities:
        raise SimError(400, f'"{model.name}" does not support embeddings')
    dims = payload.get("dimensions") or model.embedding_length
    record["outcome"] = "completed"
    return _json({
        "model": model.name,
        "embeddings": [embedding(str(text), dims) for text in inputs],
        "total_duration": 14_143_917,
        "load_duration": 1_019_500,
        "prompt_eval_count": sum(count_tokens(str(t)) for t in inputs),
    })


class _Framer:
    """NDJSON lines of ``/api/chat`` or ``/api/generate``."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.started = time.perf_counter_ns()

    def _line(self, fields: dict[str, Any]) -> bytes:
        return orjson.dumps({"model": self.model, "created_at": _now(), **fields}) + b"\n"

    def _delta(self, kind: str, value: Any) -> dict[str, Any]:
        if not self.chat:
            return {"thinking": value, "response": ""} if kind == "thinking" else \
                {"response": value}
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if kind in ("content", "refusal"):
            message["content"] = value
        elif kind == "thinking":
            message["thinking"] = value
        else:
            message["tool_calls"] = [
                {"id": f"call_{i}", "function": {"index": i, "name": c["name"],
                                                  "arguments": c["arguments"]}}
                for i, c in enumerate(value)
            ]
        return {"message": message}

    def piece(self, kind: str, value: Any) -> bytes:
        return self._line({**self._delta(kind, value), "done": False})

    def malformed(self) -> bytes:
        return b'{"model": "' + self.model.encode() + b'", "message": {"role": "assis\n'

    def bad_shape(self) -> bytes:
        return b'["not", "an", "object"]\n'

    def error(self, message: str, code: str | int | None) -> bytes:
        return orjson.dumps({"error": message}) + b"\n"  # (Ollama's carry no code)

    def keepalive(self) -> bytes:
        return b""

    def end(self, plan: Plan, terminate: bool) -> bytes:
        # Ollama's final line (done: true) is its end-of-stream marker.
        return self._line({**self._delta("content", ""), **self._closing(plan)}) if terminate \
            else b""

    def _closing(self, plan: Plan) -> dict[str, Any]:
        elapsed = time.perf_counter_ns() - self.started
        fields: dict[str, Any] = {
            "done": True,
            "done_reason": "length" if plan.finish == "length" else "stop",
            "total_duration": elapsed + 1_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": plan.prompt_tokens,
            "prompt_eval_duration": 500_000,
            "eval_count": plan.completion_tokens,
            "eval_duration": max(elapsed, 1),
        }
        if not self.chat:
            fields["context"] = [1, 2, 3]
        return fields

    def whole(self, plan: Plan) -> bytes:
        """The non-streaming answer: one object, the final line with everything in it."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.content)}
            if plan.thinking:
                message["thinking"] = "".join(plan.thinking)
            if plan.tool_calls:
                message["tool_calls"] = self._delta("tool_calls", plan.tool_calls)["message"][
                    "tool_calls"]
            body: dict[str, Any] = {"message": message}
        else:
            body = {"response": "".join(plan.content)}
            if plan.thinking:
                body["thinking"] = "".join(plan.thinking)
        return orjson.dumps({"model": self.model, "created_at": _now(), **body,
                             **self._closing(plan)})


def _entry(model: SimModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": "2026-10-01T12:00:00.000000000Z",
        "size": int((parse_parameter_size(model.parameter_size) or 1e9) * 0.6),
        "digest": hashlib.sha256(model.name.encode()).hexdigest(),
        "details": _details(model),
    }


def _running(model: SimModel) -> dict[str, Any]:
    entry = _entry(model)
    del entry["modified_at"]
    entry.update(expires_at="2099-01-01T00:00:00Z", size_vram=entry["size"],
                 context_length=model.runs_with or model.context_length)
    return entry


def _details(model: SimModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": model.family,
        "families": [model.family],
        "parameter_size": model.parameter_size,
        "quantization_level": model.quantization,
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _answer_with(make: Callable[[], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A GET handler answering with text or JSON made fresh on each call."""

    async def handler(request: web.Request) -> web.Response:
        data = make()
        return web.Response(text=data) if isinstance(data, str) else _json(data)

    return handler


async def _loaded(model: SimModel) -> None:
    """Load the model if it is not: as Ollama does, before it answers (no headers meanwhile)."""
    if not model.loaded and model.load_s:
        await asyncio.sleep(model.load_s)
    model.loaded = True
