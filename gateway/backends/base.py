"""The Backend contract and the normalized units every stage of a request speaks.

Backends are stream-first: ``chat`` and ``complete`` yield ``Chunk`` objects; a non-streaming
answer is the collected stream. A backend knows one wire protocol and nothing of routing.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import BackendConfig, Tier
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True)
class Chunk:
    """One piece of an answer: text, reasoning, tool-call deltas, the finish, the usage."""

    content: str = ""
    reasoning: str = ""
    # OpenAI tool-call deltas: {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


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
    # OpenAI-compatible server tells only names): a guess never rules a model out.
    known: bool = False
    loaded: bool = False

    def can(self, capability: str) -> bool:
        return capability in self.capabilities or not self.known


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str = ""
    latency_ms: float = 0.0


@dataclass(slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int = 0


class Backend(Protocol):
    name: str
    tier: Tier
    config: BackendConfig

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def list_models(self) -> list[ModelInfo]: ...
    async def probe(self) -> Health: ...
    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]: ...
    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]: ...
    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult: ...


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
