"""What OpenAI-compatible servers send back — stream chunks or a whole completion — as
normalized chunks. Servers differ (MLX repeats the role in every delta, llama.cpp puts the
usage in the finish chunk, vLLM calls reasoning ``reasoning``); all end up the same.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import stream_error
from gateway.protocol.ids import unique_id
from gateway.protocol.reasoning import ThinkTagSplitter
from gateway.protocol.sse import MalformedEvent, text_field
from gateway.protocol.units import Chunk, Usage

# Tool calls in one answer, at most: a higher index is a broken server's (the calls up to it
# would be made, empty, to merge it).
MAX_TOOL_CALLS = 1024


class OpenAITranslator:
    """Every tool call it passes on has an id (one made up when the server gave none, so
    the client can answer it), and an answer that called tools finishes with
    ``tool_calls`` whatever the server said (agents loop on that).
    """

    __slots__ = ("_backend", "_calls", "_think", "complete", "finished")

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self._think = ThinkTagSplitter()
        self._calls: set[int] = set()  # the indexes of the tool calls begun
        self.finished = self.complete = False

    def chunk(self, obj: Any) -> Chunk:
        if not isinstance(obj, dict):
            raise MalformedEvent("not an object")
        if obj.get("error"):
            raise stream_error(self._backend, obj["error"])
        try:
            chunk = self._choice(obj.get("choices"))
            usage = obj.get("usage")
            if usage is not None:
                chunk.usage = usage_of(usage)
            fingerprint = obj.get("system_fingerprint")
            if isinstance(fingerprint, str) and fingerprint:
                chunk.fingerprint = fingerprint
        except (AttributeError, LookupError, TypeError, ValueError) as exc:
            raise MalformedEvent(str(exc)) from None
        if chunk.finish_reason is not None:
            self.finished = True
        if self.finished and chunk.usage is not None:
            self.complete = True
        return self._think.feed(chunk)

    def _choice(self, choices: Any) -> Chunk:
        if not choices:
            return Chunk()
        choice = choices[0]
        delta = choice.get("delta") or choice.get("message") or {}
        # (text_field only for what is not text, and the chunk made positionally: this runs
        # for every event.)
        content = delta.get("content") or choice.get("text")
        if content.__class__ is not str:
            content = "" if content is None else text_field(content)
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning.__class__ is not str:
            reasoning = "" if reasoning is None else text_field(reasoning)
        chunk = Chunk(content, reasoning, None, choice.get("finish_reason"))
        refusal = delta.get("refusal")
        if refusal and refusal.__class__ is str:
            chunk.refusal = refusal
        logprobs = choice.get("logprobs")
        if logprobs and isinstance(logprobs, dict):
            chunk.logprobs = logprobs
        calls = delta.get("tool_calls")
        if calls:
            chunk.tool_calls = [self._call(call, i) for i, call in enumerate(calls)]
        if chunk.finish_reason == "stop" and self._calls:
            chunk.finish_reason = "tool_calls"
        return chunk

    def _call(self, call: dict[str, Any], position: int) -> dict[str, Any]:
        index = call.get("index", position)
        if index.__class__ is not int or not 0 <= index < MAX_TOOL_CALLS:
            raise MalformedEvent(f"a tool call's index is {index!r}")
        text_field(call.get("id"))
        out = {**call, "index": index}
        function = call.get("function")
        if function is not None:
            if not isinstance(function, dict):
                raise MalformedEvent("a tool call's function is not an object")
            text_field(function.get("name"))
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # the arguments themselves, not their JSON
                out["function"] = {**function, "arguments": orjson.dumps(arguments).decode()}
            else:
                text_field(arguments)
        if index not in self._calls:
            self._calls.add(index)
            if not call.get("id"):
                out["id"] = "call_" + unique_id()
        return out


def usage_of(usage: dict[str, Any]) -> Usage:
    """OpenAI's usage object, with the cache and reasoning details when it has them."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                 cached_tokens=cached if isinstance(cached, int) else None,
                 reasoning_tokens=reasoning if isinstance(reasoning, int) else None)
