"""OpenAI response builders: stream chunks from normalized ``Chunk`` objects, and the
aggregate bodies of non-streaming answers (which are collected streams).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from gateway.backends.base import Chunk, Usage
from gateway.config import ReasoningMode

Kind = Literal["chat", "text"]


# Ids are unique, not secret: a per-process random part and a counter (no syscall per id).
_PROCESS_ID = secrets.token_hex(6)
_COUNTER = itertools.count()


def unique_id() -> str:
    return f"{_PROCESS_ID}{next(_COUNTER):010x}"


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + unique_id()


class StreamEncoder:
    """Turns one response's chunks into OpenAI stream events (JSON text for ``data:``).

    Every event shares the id and created time; the first chat delta carries the role;
    with ``include_usage`` each event has ``usage: null`` and the usage comes last, alone.
    """

    __slots__ = ("_base", "_include_usage", "_kind", "_reasoning", "_started", "_thinking")

    def __init__(
        self, kind: Kind, model: str, *, include_usage: bool, reasoning: ReasoningMode
    ) -> None:
        self._kind = kind
        self._include_usage = include_usage
        self._reasoning = reasoning
        self._started = False
        self._thinking = False  # inline mode: inside an open <think> tag
        self._base: dict[str, Any] = {
            "id": new_id(kind),
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }

    def switch_model(self, model: str) -> None:
        """A rescued stream goes on from another model: later events name it."""
        self._base["model"] = model

    def encode(self, chunk: Chunk) -> str | None:
        """The event for a chunk, or None when nothing in it reaches this client."""
        if self._kind == "text":
            text = self._visible_text(chunk)
            if not text and chunk.finish_reason is None:
                return None
            choice: dict[str, Any] = {
                "index": 0, "text": text, "logprobs": None, "finish_reason": chunk.finish_reason,
            }
            return self._event(choice)
        delta: dict[str, Any] = {}
        if not self._started:
            delta["role"] = "assistant"
        if chunk.reasoning and self._reasoning == "separate":
            delta["reasoning_content"] = chunk.reasoning
        text = self._visible_text(chunk)
        if text:
            delta["content"] = text
        if chunk.tool_calls:
            delta["tool_calls"] = chunk.tool_calls
        if not delta and chunk.finish_reason is None:
            return None
        if not self._started:
            delta.setdefault("content", "")
            self._started = True
        choice = {"index": 0, "delta": delta, "logprobs": None,
                  "finish_reason": chunk.finish_reason}
        return self._event(choice)

    def encode_final(self, usage: Usage | None, extra: dict[str, Any]) -> str | None:
        """The last event before ``[DONE]``: the usage (when asked for) and ``extra``
        fields (the gateway's verdicts, named ``x_gateway_*``); None when there is neither.
        """
        if not self._include_usage and not extra:
            return None
        event: dict[str, Any] = {**self._base, "choices": [], **extra}
        if self._include_usage:
            event["usage"] = (usage or Usage()).as_dict()
        return orjson.dumps(event).decode()

    def _event(self, choice: dict[str, Any]) -> str:
        event = {**self._base, "choices": [choice]}
        if self._include_usage:
            event["usage"] = None
        return orjson.dumps(event).decode()

    def _visible_text(self, chunk: Chunk) -> str:
        if self._reasoning != "inline":
            return chunk.content
        text = ""
        if chunk.reasoning:
            text = chunk.reasoning if self._thinking else "<think>" + chunk.reasoning
            self._thinking = True
        if self._thinking and (chunk.content or chunk.finish_reason or chunk.tool_calls):
            text += "</think>"
            self._thinking = False
        return text + chunk.content


@dataclass(slots=True)
class Completion:
    """A whole answer: what a non-streaming response reports."""

    model: str = ""  # the model that gave it
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.content:
            self.content += chunk.content
        if chunk.reasoning:
            self.reasoning += chunk.reasoning
        if chunk.tool_calls:
            for delta in chunk.tool_calls:
                self._merge_tool_call(delta)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage

    def _merge_tool_call(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", len(self.tool_calls))
        while len(self.tool_calls) <= index:
            self.tool_calls.append(
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call = self.tool_calls[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def text(self, reasoning: ReasoningMode) -> str:
        """The content as the client sees it (with the reasoning inline when so configured)."""
        if self.reasoning and reasoning == "inline":
            return f"<think>{self.reasoning}</think>{self.content}"
        return self.content

    def message(self, reasoning: ReasoningMode) -> dict[str, Any]:
        content = self.text(reasoning)
        message: dict[str, Any] = {"role": "assistant"}
        if self.reasoning and reasoning == "separate":
            message["reasoning_content"] = self.reasoning
        message["content"] = content if content or not self.tool_calls else None
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message


    def chunks(self) -> list[Chunk]:
        """The answer as a stream again (a cached or checked answer, replayed)."""
        calls = [{**call, "index": i} for i, call in enumerate(self.tool_calls)]
        return [Chunk(content=self.content, reasoning=self.reasoning, tool_calls=calls or None),
                Chunk(finish_reason=self.finish_reason, usage=self.usage)]


async def collect(chunks: AsyncIterator[Chunk], first: Chunk | None = None) -> Completion:
    """The aggregate of a chunk stream (``first`` being one already taken from it)."""
    completion = Completion()
    if first is not None:
        completion.add(first)
    async for chunk in chunks:
        completion.add(chunk)
    return completion


def completion_body(
    kind: Kind, completion: Completion, model: str, reasoning: ReasoningMode
) -> dict[str, Any]:
    """The non-streaming response for a chat or text completion."""
    choice: dict[str, Any]
    if kind == "chat":
        choice = {"index": 0, "message": completion.message(reasoning), "logprobs": None,
                  "finish_reason": completion.finish_reason}
    else:
        choice = {"index": 0, "text": completion.text(reasoning), "logprobs": None,
                  "finish_reason": completion.finish_reason}
    return {
        "id": new_id(kind),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": (completion.usage or Usage()).as_dict(),
    }


def model_entry(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}
