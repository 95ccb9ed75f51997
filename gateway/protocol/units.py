"""The units every layer speaks: backends produce ``Chunk`` objects, plugins read and
rewrite them, the doors encode them; a ``Completion`` is a whole answer (a collected stream);
``ModelInfo`` is what discovery learns of a model; ``EmbeddingResult`` is a set of vectors.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy

from gateway.errors import InvalidRequest


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Details a backend may report (None: it did not): prompt tokens served from its cache,
    # and the share of the completion spent reasoning.
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning_tokens is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


@dataclass(slots=True)
class Chunk:
    """One piece of an answer: text, reasoning, tool-call deltas, the finish, the usage."""

    content: str = ""
    reasoning: str = ""
    # OpenAI tool-call deltas: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    # Token log probabilities, as an OpenAI-compatible server sends them for this piece:
    # {"content": [...]} for chat, {"tokens": [...], "token_logprobs": [...], ...} for text.
    logprobs: dict[str, Any] | None = None
    fingerprint: str | None = None  # the backend's system_fingerprint, when it sends one
    # The model's refusal, in place of the content (OpenAI's ``refusal``: a model that will
    # not answer, or not in the structured output asked for, says why there)
    refusal: str = ""
    # It ends the answer because the answer's time ran out (``total``), not its length: the
    # finish says ``length``, but nothing asked for that (no cache keeps it, no QA faults it)
    overtime: bool = False

    def says_something(self) -> bool:
        """Whether it carries anything of the answer (not only its usage)."""
        return bool(self.content or self.reasoning or self.tool_calls or self.finish_reason
                    or self.refusal)


CHARS_PER_TOKEN = 4  # a rough, deliberately generous estimate of a token's characters


class Completion:
    """A whole answer: what a non-streaming response reports. Built by ``add`` from a
    stream's pieces, whose texts are kept in lists and joined when read: adding to a
    string held in an attribute copies it whole each time, which a long answer (tens of
    thousands of pieces) turns into seconds. (Reading them after every piece would copy as
    much again: read once it is whole.)
    """

    __slots__ = ("_arguments", "_calls", "_content", "_reasoning", "_refusal", "fingerprint",
                 "finish_reason", "logprobs", "model", "overtime", "usage")

    def __init__(self, model: str = "", content: str = "", reasoning: str = "",
                 tool_calls: list[dict[str, Any]] | None = None, finish_reason: str = "stop",
                 usage: Usage | None = None, logprobs: dict[str, Any] | None = None,
                 fingerprint: str | None = None, refusal: str = "") -> None:
        self.model = model  # the model that gave it
        self._content = [content] if content else []
        self._reasoning = [reasoning] if reasoning else []
        self._refusal = [refusal] if refusal else []
        self._calls = tool_calls if tool_calls is not None else []
        self._arguments: dict[int, list[str]] = {}  # tool calls' argument pieces, not joined
        self.finish_reason = finish_reason
        self.usage = usage
        self.logprobs = logprobs
        self.fingerprint = fingerprint
        self.overtime = False  # (see Chunk.overtime)

    @property
    def content(self) -> str:
        return _joined(self._content)

    @content.setter
    def content(self, text: str) -> None:
        self._content = [text] if text else []

    @property
    def reasoning(self) -> str:
        return _joined(self._reasoning)

    @reasoning.setter
    def reasoning(self, text: str) -> None:
        self._reasoning = [text] if text else []

    @property
    def refusal(self) -> str:
        return _joined(self._refusal)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        for index, pieces in self._arguments.items():
            self._calls[index]["function"]["arguments"] += "".join(pieces)
        self._arguments.clear()
        return self._calls

    def __repr__(self) -> str:
        return (f"Completion(model={self.model!r}, content={self.content!r}, "
                f"reasoning={self.reasoning!r}, tool_calls={self.tool_calls!r}, "
                f"refusal={self.refusal!r}, finish_reason={self.finish_reason!r}, "
                f"usage={self.usage!r})")

    def add(self, chunk: Chunk) -> None:
        if chunk.content:
            self._content.append(chunk.content)
        if chunk.reasoning:
            self._reasoning.append(chunk.reasoning)
        if chunk.tool_calls:
            for delta in chunk.tool_calls:
                self._merge_tool_call(delta)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.logprobs:
            self.logprobs = merge_logprobs(self.logprobs, chunk.logprobs)
        if chunk.fingerprint:
            self.fingerprint = chunk.fingerprint
        if chunk.refusal:
            self._refusal.append(chunk.refusal)
        if chunk.overtime:
            self.overtime = True

    def _merge_tool_call(self, delta: dict[str, Any]) -> None:
        calls = self._calls
        index = delta.get("index", len(calls))
        while len(calls) <= index:
            calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call = calls[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["function"]["name"] = function["name"]
        if function.get("arguments"):
            self._arguments.setdefault(index, []).append(function["arguments"])

    def rough_tokens(self) -> int:
        """Its tokens as estimated from its characters (what an answer that does not say
        its usage, or was cut off, is charged at least)."""
        chars = sum(map(len, self._content)) + sum(map(len, self._reasoning)) + \
            sum(map(len, self._refusal)) + sum(
            len(call["function"]["name"]) + len(call["function"]["arguments"])
            for call in self.tool_calls)
        return -(-chars // CHARS_PER_TOKEN)

    def chunks(self) -> list[Chunk]:
        """The answer as a stream again (a cached or checked answer, replayed)."""
        calls = [{**call, "index": i} for i, call in enumerate(self.tool_calls)]
        return [Chunk(content=self.content, reasoning=self.reasoning, tool_calls=calls or None,
                      logprobs=self.logprobs, fingerprint=self.fingerprint,
                      refusal=self.refusal),
                Chunk(finish_reason=self.finish_reason, usage=self.usage,
                      overtime=self.overtime)]


def _joined(pieces: list[str]) -> str:
    """The pieces as one text, kept joined for the next read."""
    if len(pieces) > 1:
        pieces[:] = ["".join(pieces)]
    return pieces[0] if pieces else ""


def merge_logprobs(whole: dict[str, Any] | None, piece: dict[str, Any]) -> dict[str, Any]:
    """Log probabilities of a stream's pieces as one answer's: each list grows by the
    piece's (``content`` for chat; ``tokens``, ``token_logprobs``... for text).
    """
    if whole is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in piece.items()}
    for key, value in piece.items():
        if isinstance(value, list) and isinstance(whole.get(key), list):
            whole[key].extend(value)
        elif whole.get(key) is None:
            whole[key] = list(value) if isinstance(value, list) else value
    return whole


async def collect(chunks: AsyncIterator[Chunk], first: Chunk | None = None) -> Completion:
    """The aggregate of a chunk stream (``first`` being one already taken from it)."""
    completion = Completion()
    if first is not None:
        completion.add(first)
    async for chunk in chunks:
        completion.add(chunk)
    return completion


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    backend: str
    family: str = ""
    parameters: float | None = None  # parameter count, parsed from "7.6B" / "135M"
    quantization: str = ""
    context_length: int | None = None
    capabilities: frozenset[str] = frozenset({"completion", "chat"})
    # Whether the capabilities come from the backend (Ollama) or are a guess (an
    # OpenAI-compatible server tells only names): a guess never rules a model out (but see
    # ``presumed``).
    known: bool = False
    # Whether they were said, not inferred (an Ollama older than capabilities says none:
    # ``known``, as a model that generates): only a capability said to be missing refuses a
    # model its client named.
    reported: bool = False
    loaded: bool = False
    # The window it runs with now, where its backend says so (Ollama loads a model with
    # its own context length, often far short of the model's, and cuts a longer prompt
    # short without a word; a request's num_ctx, or a load when it is not loaded, changes it)
    running_context: int | None = None
    created: int | None = None  # when the backend says the model was made (Unix seconds)
    prefill: bool | None = None  # continues a final assistant message (None: as its backend)

    def can(self, capability: str) -> bool:
        return capability in self.capabilities or not self.known


def presumed(name: str, family: str = "") -> tuple[frozenset[str], bool]:
    """What a model nobody described can do, and whether that is as good as known: one
    whose name says it embeds (``text-embedding-3-small``, ``nomic-embed-text``,
    ``mxbai-embed-large``) or of a BERT family only embeds, and is never asked to chat (an
    ``auto`` pick that answers every chat with a 400); any other may do anything.
    """
    if "embed" in name.lower() or family.lower().endswith("bert"):
        return frozenset({"embedding"}), True
    return frozenset({"completion", "chat"}), False


@dataclass(slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int = 0

    def shortened(self, dimensions: int | None, model: str) -> None:
        """The vectors cut to ``dimensions`` and scaled back to unit length, as OpenAI
        shortens its own, where the backend ignored the field (llama.cpp, vLLM for most
        models); more than the model makes is the client's mistake.
        """
        if dimensions is None or not self.vectors or len(self.vectors[0]) == dimensions:
            return
        made = len(self.vectors[0])
        if made < dimensions:
            raise InvalidRequest(f"{model} makes embeddings of {made} dimensions; "
                                 f"'dimensions' must be at most {made}.", param="dimensions")
        cut = numpy.asarray(self.vectors, dtype=numpy.float64)[:, :dimensions]
        norms = numpy.linalg.norm(cut, axis=1, keepdims=True)
        self.vectors = (cut / numpy.where(norms == 0, 1.0, norms)).tolist()


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_parameter_size(text: str | None) -> float | None:
    """``"7.6B"`` → 7.6e9, ``"135M"`` → 1.35e8; anything else → None."""
    if not text:
        return None
    match = _SIZE.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _SCALE[match.group(2).upper()]
