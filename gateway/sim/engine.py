"""What both simulated servers share: turning a request into a planned answer, the
request log tests read, the faults applied before and during a response, and the paced
stream driver. The protocol modules only frame bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from gateway.routing.features import kind_of
from gateway.sim.fleet import (
    THOUGHT,
    Faults,
    SimModel,
    continuation,
    count_tokens,
    json_reply,
    tokens,
    tool_arguments,
)

LOG_LIMIT = 10_000
CUT_SETTLE = 0.05  # seconds between the last token and the reset of a cut stream


@dataclass(slots=True)
class Ask:
    """A request, reduced to what decides the answer."""

    texts: list[str]  # every message's text (or the prompt)
    last_role: str = "user"
    prefill: str = ""  # text of a final assistant message
    images: int = 0
    tools: list[dict[str, Any]] | None = None
    last_tool_result: str | None = None
    json_format: bool = False
    schema: dict[str, Any] | None = None
    think: bool | None = None
    max_tokens: int | None = None
    suffix: str | None = None


@dataclass(slots=True)
class Plan:
    thinking: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish: str = "stop"
    prompt_tokens: int = 0
    refusal: bool = False  # the content is the model's refusal (OpenAI's own field for it)

    @property
    def completion_tokens(self) -> int:
        return len(self.thinking) + len(self.content) + len(self.tool_calls)

    def pieces(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = [("thinking", t) for t in self.thinking]
        out += [("refusal" if self.refusal else "content", t) for t in self.content]
        if self.tool_calls:
            out.append(("tool_calls", self.tool_calls))
        return out


class SimError(Exception):
    """An error answer: status, message and an OpenAI error code."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


async def pace_whole(model: SimModel, plan: Plan) -> None:
    """A whole (non-streamed) answer takes as long as its stream would have."""
    ttft, delay = model.pace()
    if ttft or delay:
        await asyncio.sleep(ttft + delay * max(0, len(plan.pieces()) - 1))


def poor_answer(model: SimModel, ask: Ask) -> str | None:
    """The answer QA rejects that a model gives to a kind of task it is not good at, with the
    chance its skill leaves (decided by the request's text, so the same request gets the same
    answer); None: a good answer.
    """
    if not model.skills or ask.prefill:
        return None
    text = "\n".join(ask.texts)
    json_asked = ask.json_format or '"json' in text.lower() or " json" in text.lower()
    skill = model.skills.get(kind_of(text, json_asked), 1.0)
    draw = zlib.crc32(f"{model.name}\n{text}".encode()) / 2**32
    if draw < skill:
        return None
    if json_asked:
        return '{"name": "'  # JSON cut short
    return "" if draw > (1 + skill) / 2 else "It is so. " * 20  # nothing, or a loop


def plan_answer(model: SimModel, ask: Ask, faults: Faults | None = None) -> Plan:
    """The answer a model gives (or the one a fault dictates); raises ``SimError`` for
    requests it refuses.
    """
    reply = faults.reply if faults else None
    if "embedding" in model.capabilities and "completion" not in model.capabilities:
        raise SimError(400, f'"{model.name}" does not support generate')
    if ask.images and "vision" not in model.capabilities:
        raise SimError(400, f"{model.name} does not support images")
    if ask.tools and "tools" not in model.capabilities:
        raise SimError(400, f"registry.ollama.ai/library/{model.name} does not support tools")
    prompt_tokens = sum(count_tokens(t) for t in ask.texts) + 4 * len(ask.texts)
    if prompt_tokens > model.context_length:
        raise SimError(400, f"This model's maximum context length is {model.context_length} "
                       f"tokens. However, your messages resulted in {prompt_tokens} tokens.",
                       "context_length_exceeded")
    plan = Plan(prompt_tokens=prompt_tokens)
    if model.thinking == "field" and ask.think is not False and not ask.prefill:
        plan.thinking = tokens(faults.thought if faults and faults.thought is not None
                               else THOUGHT)
    if faults and faults.refusal is not None:
        plan.content, plan.refusal = tokens(faults.refusal), True
        return plan
    if reply is not None:  # a fault: this text as it is (no tool call, no JSON shaping)
        text = reply
    elif ask.tools and ask.last_role != "tool":
        tool = ask.tools[0]
        plan.tool_calls = [{"name": tool["function"]["name"], "arguments": tool_arguments(tool)}]
        plan.finish = "tool_calls"
        return plan
    else:
        text = model.reply
        if ask.last_tool_result is not None:
            text = f"The tool said: {ask.last_tool_result}"
        if ask.suffix is not None:
            text = "return a + b"
        if ask.json_format:
            text = orjson.dumps(json_reply(text, ask.schema)).decode()
        poor = poor_answer(model, ask)
        if poor is not None:
            text = poor
        if model.thinking == "tags" and not ask.prefill:
            text = f"<think>{THOUGHT}</think>\n\n{text}"
    parts = tokens(continuation(text, ask.prefill))
    if ask.max_tokens is not None and len(parts) > ask.max_tokens:
        parts = parts[: ask.max_tokens]
        plan.finish = "length"
    plan.content = parts
    if faults and faults.finish:
        plan.finish = faults.finish
    return plan


class Framer(Protocol):
    """The wire format of one response (NDJSON or SSE)."""

    def piece(self, kind: str, value: Any) -> bytes: ...
    def malformed(self) -> bytes: ...
    def bad_shape(self) -> bytes: ...
    def error(self, message: str, code: str | int | None) -> bytes: ...
    def keepalive(self) -> bytes: ...
    def end(self, plan: Plan, terminate: bool) -> bytes:
        """The closing bytes; without ``terminate``, the end-of-stream marker is left out."""
        ...


class SimState:
    """The models a simulated server has and the log of what it was asked."""

    def __init__(self, models: Sequence[SimModel]) -> None:
        self.models = {m.name: m for m in models}
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_LIMIT)
        self._count = 0
        self._turns: dict[str, asyncio.Semaphore] = {}

    def turn(self, model: SimModel) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held while a request is answered: a model runs ``parallel`` at once."""
        if not model.parallel:
            return contextlib.nullcontext()
        turns = self._turns.get(model.name)
        if turns is None:
            turns = self._turns[model.name] = asyncio.Semaphore(model.parallel)
        return turns

    def record(self, request: web.Request, model: str, payload: dict[str, Any],
               stream: bool, prefill: bool) -> dict[str, Any]:
        self._count += 1
        entry = {
            "n": self._count, "t": time.time(), "path": request.path, "model": model,
            "stream": stream, "prefill": prefill, "payload": payload,
            "authorization": request.headers.get("Authorization"),
            "traceparent": request.headers.get("traceparent"),
            "peer": (request.transport.get_extra_info("peername") or (None, None))[1]
            if request.transport else None,
            "outcome": "pending", "tokens": 0,
        }
        self.log.append(entry)
        return entry


async def apply_faults(request: web.Request, faults: Faults, ask: Ask,
                       record: dict[str, Any]) -> None:
    """The faults that strike before any response byte is sent."""
    if faults.latency:
        await asyncio.sleep(faults.latency)
    if faults.reset:
        record["outcome"] = "reset"
        await reset(request)
    if faults.no_response:
        record["outcome"] = "no_response"
        await hold()
    if faults.status:
        record["outcome"] = f"status {faults.status}"
        if faults.cut_body:  # the head, and the body broken off after a few bytes
            response = web.StreamResponse(status=faults.status, headers={
                "Content-Type": "application/json", "Content-Length": "200",
                **({"Retry-After": f"{faults.retry_after:g}"} if faults.retry_after else {})})
            await response.prepare(request)
            await response.write(b'{"error": {"mess')
            await asyncio.sleep(CUT_SETTLE)
            await reset(request)
        raise SimError(faults.status, faults.message or f"simulated HTTP {faults.status}",
                       retry_after=faults.retry_after)
    if faults.content_policy:
        record["outcome"] = "content_policy"
        raise SimError(400, faults.message or "Your request was rejected as a result of our "
                       "safety system.", "content_policy_violation")
    if faults.reject_prefill and ask.prefill:
        record["outcome"] = "prefill_rejected"
        raise SimError(400, "This model does not support assistant message prefill; the "
                       "final message must be from the user.", "prefill_not_supported")


async def reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset, as a crashed server would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    await asyncio.sleep(60)  # the handler is cancelled as the connection is lost
    raise asyncio.CancelledError


async def hold() -> None:
    """Keep the connection open and say nothing until the client gives up."""
    await asyncio.sleep(3600)
    raise asyncio.CancelledError


@contextlib.contextmanager
def watch(record: dict[str, Any]) -> Iterator[None]:
    """Note in the log when the client (the gateway) hangs up on this request."""
    try:
        yield
    except (ConnectionResetError, asyncio.CancelledError):
        record["closed_by_client"] = True
        if record["outcome"] == "pending":
            record["outcome"] = "client_closed"
        raise


class _AtOnce(web.StreamResponse):
    """A stream whose every event is ready when it starts: its head goes out with them, in
    one write, as aiohttp's ``Response`` sends its own (by the class attribute ``Response``
    sets; an aiohttp without it sends the head first, which is only slower).
    """

    _send_headers_immediately = False


async def stream_plan(request: web.Request, headers: dict[str, str], model: SimModel,
                      faults: Faults, plan: Plan, framer: Framer,
                      record: dict[str, Any]) -> web.StreamResponse:
    """Send a planned answer at the model's pace, with the in-stream faults. Unpaced and
    without faults, the head and the events go out together, in one write: a model that
    answers at once has the whole answer ready (a write an event, or one for the head, would
    cost the simulator as much as the proxy it feeds, on the cores a benchmark shares
    between them).
    """
    ttft, delay = model.pace()
    pieces = plan.pieces()
    if not (ttft or delay or faults.in_stream() or faults.end_delay):
        response: web.StreamResponse = _AtOnce(headers=headers)
        await response.prepare(request)
        events = [framer.piece(kind, value) for kind, value in pieces]
        events.append(framer.end(plan, terminate=not faults.missing_done))
        record["tokens"] += len(pieces)
        await response.write_eof(b"".join(events))
        record["outcome"] = "completed"
        return response
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    if ttft:
        await response.write(framer.keepalive())
        await asyncio.sleep(ttft)
    ready: list[bytes] = []  # events not yet written (unpaced, and no fault at hand)
    for i, (kind, value) in enumerate(pieces):
        if faults.at(i):
            await _write(response, ready)
        if faults.cut_after is not None and i >= faults.cut_after:
            record["outcome"] = "cut"
            # Let what was sent arrive first: a reset discards what the peer has not read,
            # and "cut after N tokens" means N tokens reached the other side.
            await asyncio.sleep(CUT_SETTLE)
            await reset(request)
        if faults.stall_after is not None and i >= faults.stall_after:
            record["outcome"] = "stalled"
            await hold()
        if faults.error_after is not None and i >= faults.error_after:
            record["outcome"] = "error_event"
            await response.write(framer.error(faults.message or "simulated failure",
                                              faults.error_code))
            await response.write_eof()
            return response
        if faults.malformed_at == i:
            await response.write(framer.malformed())
        if faults.bad_shape_at == i:
            await response.write(framer.bad_shape())
        if i and delay:
            await asyncio.sleep(delay)
        ready.append(framer.piece(kind, value))
        if delay:
            await _write(response, ready)
        record["tokens"] += 1
    end = framer.end(plan, terminate=not faults.missing_done)
    if faults.cut_at_end:  # the end's first event alone: the finish
        finish, between, _ = end.partition(b"\n\n")
        ready.append(finish + between)
        await _write(response, ready)
        record["outcome"] = "cut"
        await asyncio.sleep(CUT_SETTLE)
        await reset(request)
    ready.append(end)
    await _write(response, ready)
    if faults.end_delay:
        await asyncio.sleep(faults.end_delay)
    await response.write_eof()
    if record["outcome"] == "pending":
        record["outcome"] = "completed"
    return response


async def _write(response: web.StreamResponse, ready: list[bytes]) -> None:
    if ready:
        await response.write(b"".join(ready))
        ready.clear()


SIM_STATE = web.AppKey("sim_state", SimState)


def control_routes(state: SimState) -> list[web.RouteDef]:
    """``/_sim/*``: set faults per model, read and clear the request log."""

    async def set_faults(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in state.models:
            return web.json_response({"error": f"no model {name!r}"}, status=404)
        try:
            state.models[name].faults = Faults.from_dict(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def set_skills(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in state.models:
            return web.json_response({"error": f"no model {name!r}"}, status=404)
        skills = await request.json()
        if not isinstance(skills, dict) or not all(
                isinstance(v, int | float) and 0 <= v <= 1 for v in skills.values()):
            return web.json_response({"error": "expected {kind: chance 0..1}"}, status=400)
        state.models[name].skills = {str(k): float(v) for k, v in skills.items()}
        return web.json_response({"ok": True})

    async def clear_faults(request: web.Request) -> web.Response:
        for model in state.models.values():
            model.faults = Faults()
        return web.json_response({"ok": True})

    async def read_log(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(list(state.log)), content_type="application/json")

    async def clear_log(request: web.Request) -> web.Response:
        state.log.clear()
        return web.json_response({"ok": True})

    return [
        web.put("/_sim/faults/{model:.+}", set_faults),
        web.put("/_sim/skills/{model:.+}", set_skills),
        web.delete("/_sim/faults", clear_faults),
        web.get("/_sim/requests", read_log),
        web.delete("/_sim/requests", clear_log),
    ]
