"""Anthropic's Messages API answers: a Message, or its stream of events (``message_start``
… ``message_stop``), as the ``anthropic`` SDK's types define them, and its errors. A
reasoning model's thoughts come out as thinking blocks, signed by the gateway (clients need
a signature to send them back).
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.config import ReasoningMode
from gateway.errors import GatewayError
from gateway.http.stream import SSE, sse_comments, sse_event
from gateway.protocol.ids import unique_id
from gateway.protocol.openai import arguments_object
from gateway.protocol.reasoning import ReasoningView
from gateway.protocol.units import Chunk, Completion, Usage

SIGNATURE = "hybrid-gateway"  # thinking blocks the gateway made: clients send them back as is
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "content_filter": "refusal"}
# Anthropic's error types, by the HTTP status the gateway answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_type(error: GatewayError) -> str:
    return ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500
                           else "api_error")


def error_body(error: GatewayError) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type(error),
                                                    "message": error.message}})


def message_body(completion: Completion, reasoning: ReasoningMode) -> dict[str, Any]:
    """A whole answer as a Message (a model's refusal, as text, stopped for ``refusal``)."""
    thought, text = ReasoningView(reasoning).whole(completion)
    text += completion.refusal
    content: list[dict[str, Any]] = []
    if thought:
        content.append({"type": "thinking", "thinking": thought, "signature": SIGNATURE})
    if text or not completion.tool_calls:
        content.append({"type": "text", "text": text})
    for call in completion.tool_calls:
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                        "input": arguments_object(call["function"]["arguments"])})
    return {"id": "msg_" + unique_id(), "type": "message", "role": "assistant",
            "model": completion.model, "content": content,
            "stop_reason": "refusal" if completion.refusal
            else STOP_REASONS.get(completion.finish_reason, "end_turn"),
            "stop_sequence": None, "usage": _usage(completion.usage or Usage())}


def _usage(usage: Usage) -> dict[str, Any]:
    """Usage as Anthropic counts it: its ``input_tokens`` leave out the tokens read from the
    prompt cache (clients add the two up), where OpenAI's ``prompt_tokens`` include them.
    """
    cached = usage.cached_tokens or 0
    return {"input_tokens": max(usage.prompt_tokens - cached, 0),
            "output_tokens": usage.completion_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached}


class MessageStream:
    """One answer as Anthropic's stream events: a block per kind of content, in order (the
    thinking, the text, each tool use), each started, written and stopped in turn.

    A tool use goes out whole once the answer is, its input one JSON object: the SDK parses
    the input after every delta and refuses a model's broken JSON outright.
    """

    media_type = SSE
    __slots__ = ("_block", "_calls", "_index", "_message", "_reason", "_refused", "_usage",
                 "_view")

    def __init__(self, model: str, reasoning: ReasoningMode) -> None:
        self._view = ReasoningView(reasoning)
        self._message: dict[str, Any] = {
            "id": "msg_" + unique_id(), "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}
        self._block: str | None = None  # the kind of the block being written
        self._index = -1  # ... and its index
        self._calls = Completion()  # the tool-call deltas, merged
        self._usage: Usage | None = None
        self._reason = "end_turn"
        self._refused = False  # the model said a refusal (as text: stopped for ``refusal``)

    def switch_model(self, model: str) -> None:
        self._message["model"] = model

    def begin(self) -> bytes:
        return _event("message_start", message=self._message) + _event("ping")

    def chunk(self, chunk: Chunk) -> bytes:
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._reason = STOP_REASONS.get(chunk.finish_reason, "end_turn")
        thought, text = self._view.split(chunk)
        if chunk.refusal:
            text += chunk.refusal
            self._refused = True
        out = b""
        if thought:
            out += self._open("thinking", {"type": "thinking", "thinking": "",
                                           "signature": ""}) + \
                self._delta({"type": "thinking_delta", "thinking": thought})
        if text:
            out += self._open("text", {"type": "text", "text": ""}) + \
                self._delta({"type": "text_delta", "text": text})
        if chunk.tool_calls:
            self._calls.add(Chunk(tool_calls=chunk.tool_calls))
        return out

    def end(self, trailers: dict[str, str]) -> bytes:
        out = self._close()
        for call in self._calls.tool_calls:
            out += self._open("tool_use", {"type": "tool_use", "id": call["id"],
                                           "name": call["function"]["name"], "input": {}})
            arguments = arguments_object(call["function"]["arguments"])
            out += self._delta({"type": "input_json_delta",
                                "partial_json": orjson.dumps(arguments).decode()}) + \
                self._close()
        if self._calls.tool_calls and self._reason != "max_tokens":
            self._reason = "tool_use"
        if self._refused:
            self._reason = "refusal"
        return out + sse_comments(trailers) + _event(
            "message_delta", delta={"stop_reason": self._reason, "stop_sequence": None},
            usage=_usage(self._usage or Usage())) + _event("message_stop")

    def error(self, error: GatewayError) -> bytes:
        return sse_event(error_body(error), event="error")

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        if self._block == kind and kind != "tool_use":
            return b""
        out = self._close()
        self._block, self._index = kind, self._index + 1
        return out + _event("content_block_start", index=self._index, content_block=block)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", index=self._index, delta=delta)

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        out = b""
        if self._block == "thinking":
            out = self._delta({"type": "signature_delta", "signature": SIGNATURE})
        self._block = None
        return out + _event("content_block_stop", index=self._index)


def _event(kind: str, **fields: Any) -> bytes:
    return sse_event(orjson.dumps({"type": kind, **fields}), event=kind)
