"""The Backend contract: what every upstream adapter offers routing.

Backends are stream-first: ``chat`` and ``complete`` yield ``Chunk`` objects; a non-streaming
answer is the collected stream. A backend knows one wire protocol and nothing of routing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import BackendConfig, Tier
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol.units import Chunk, EmbeddingResult, ModelInfo


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    detail: str = ""
    latency_ms: float = 0.0


class Backend(Protocol):
    name: str
    tier: Tier
    config: BackendConfig
    capacity: int  # requests it runs at once per model, as configured or told (0: unknown)

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def list_models(self) -> list[ModelInfo]: ...
    async def probe(self) -> Health: ...
    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]: ...
    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]: ...
    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult: ...
    async def keep_warm(self, model: str, within: float) -> str | None: ...
    async def load(self, model: str, keep_alive: Any, embeds: bool = False) -> str: ...
