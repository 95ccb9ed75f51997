"""The Ollama door's answers: Ollama's NDJSON lines, or its one JSON object when not
streamed. An answer carries a ``context`` to send back for the next turn, as Ollama's does
(``gateway.doors.ollama_context``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from gateway.config import ReasoningMode
from gateway.doors.ollama_context import context_of
from gateway.errors import GatewayError
from gateway.http.stream import NDJSON, ndjson_line
from gateway.protocol.openai import arguments_object
from gateway.protocol.reasoning import ReasoningView
from gateway.protocol.times import rfc3339
from gateway.protocol.units import Chunk, Completion, Usage
from gateway.telemetry import ANSWER_BEGAN

Shape = Literal["chat", "generate"]  # which endpoint's lines: message or response


class OllamaStream:
    """One answer as Ollama's NDJSON lines, and as its one object when not streamed.

    Tool calls go out whole, their arguments as objects (as Ollama sends them), on a line of
    their own before the last; the last line says ``done`` with Ollama's counts and
    durations as the gateway saw them (nanoseconds, from when the request arrived).
    """

    media_type = NDJSON
    __slots__ = ("_calls", "_first_at", "_model", "_reason", "_said", "_shape", "_started",
                 "_turns", "_usage", "_view")

    def __init__(self, shape: Shape, model: str, reasoning: ReasoningMode,
                 started: float, turns: list[dict[str, str]] | None = None) -> None:
        """``turns``: a generate answer's conversation up to its question, for the
        ``context`` of its last line."""
        self._shape = shape
        self._turns = turns
        self._said: list[str] = []  # (the answer's text, for that context)
        self._model = model
        self._view = ReasoningView(reasoning)
        self._started = started  # time.perf_counter() when the request arrived
        self._first_at: float | None = None
        self._calls: Completion | None = None  # tool-call deltas, merged (when there are)
        self._usage: Usage | None = None
        self._reason = "stop"

    def switch_model(self, model: str) -> None:
        self._model = model

    def begin(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        if self._first_at is None:
            self._first_at = time.perf_counter()
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._reason = "length" if chunk.finish_reason == "length" else "stop"
        if chunk.tool_calls:
            self._calls = self._calls or Completion()
            self._calls.add(Chunk(tool_calls=chunk.tool_calls))
        thought, text = self._view.split(chunk)
        text += chunk.refusal  # (Ollama has no field for a refusal: it is said as text)
        if not text and not thought:
            return b""
        if self._turns is not None and (chunk.content or chunk.refusal):
            self._said.append(chunk.content + chunk.refusal)
        return ndjson_line(self._line(text, thought, done=False))

    def end(self, trailers: dict[str, str]) -> bytes:
        """The tool calls, whole, then the last line (with the gateway's late verdicts as
        ``x_gateway_*`` fields, which clients ignore).
        """
        out = b""
        if self._calls is not None and self._shape == "chat":
            line = self._line("", "", done=False)
            line["message"]["tool_calls"] = tool_calls(self._calls)
            out = ndjson_line(line)
        last = {**self._line("", "", done=True), **self._counts()}
        if self._turns is not None:
            last["context"] = self._context("".join(self._said))
        last.update({name.replace("-", "_"): value for name, value in trailers.items()})
        return out + ndjson_line(last)

    def _context(self, answer: str) -> list[int]:
        assert self._turns is not None
        return context_of([*self._turns, {"role": "assistant", "content": answer}])

    def error(self, error: GatewayError) -> bytes:
        return ndjson_line({"error": error.message})

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The answer as one object, as Ollama sends it with ``stream: false``."""
        self._usage = completion.usage
        began = ANSWER_BEGAN.get()  # (when its first piece came: the prompt's time before)
        if self._first_at is None and began:
            self._first_at = time.perf_counter() - max(0.0, time.monotonic() - began)
        self._reason = "length" if completion.finish_reason == "length" else "stop"
        thought, text = self._view.whole(completion)
        text += completion.refusal
        body = {**self._line(text, thought, done=True), **self._counts()}
        if self._turns is not None:
            body["context"] = self._context(completion.content + completion.refusal)
        if completion.tool_calls and self._shape == "chat":
            body["message"]["tool_calls"] = tool_calls(completion)
        return body

    def _line(self, text: str, thought: str, *, done: bool) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self._model, "created_at": rfc3339(time.time())}
        if self._shape == "chat":
            message = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            line["message"] = message
        else:
            line["response"] = text
            if thought:
                line["thinking"] = thought
        line["done"] = done
        return line

    def _counts(self) -> dict[str, Any]:
        """Ollama's counts and durations (nanoseconds; none 0 where tokens were counted:
        clients divide by them for tokens a second)."""
        now = time.perf_counter()
        first = self._first_at or self._started
        usage = self._usage or Usage()
        return {"done_reason": self._reason,
                "total_duration": max(1, int((now - self._started) * 1e9)),
                "load_duration": 0,
                "prompt_eval_count": usage.prompt_tokens,
                "prompt_eval_duration": max(1, int((first - self._started) * 1e9)),
                "eval_count": usage.completion_tokens,
                "eval_duration": max(1, int((now - first) * 1e9))}


def tool_calls(completion: Completion) -> list[dict[str, Any]]:
    """Whole tool calls as Ollama's: arguments as an object."""
    return [{"id": call["id"], "function": {
        "index": i, "name": call["function"]["name"],
        "arguments": arguments_object(call["function"]["arguments"])}}
        for i, call in enumerate(completion.tool_calls)]


def loaded(model: str, shape: Shape, reason: str = "load") -> dict[str, Any]:
    """What Ollama answers to a request without a prompt: the model is ready ("load"), or
    gone ("unload", asked with ``keep_alive`` 0)."""
    line: dict[str, Any] = {"model": model, "created_at": rfc3339(time.time())}
    if shape == "chat":
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    return {**line, "done": True, "done_reason": reason}
