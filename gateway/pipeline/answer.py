"""What the pipeline hands a door: an answer, whole or streamed, with the headers that say
who gave it. A door encodes it in its own wire format and knows nothing of how it was made.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from gateway.protocol.units import Chunk, Completion, EmbeddingResult, ModelInfo


def route_headers(backend: str, model: str, attempts: int, route: str) -> dict[str, str]:
    """The headers of every answer that say who gave it and why (built here only)."""
    return {
        "x-gateway-backend": backend,
        "x-gateway-model": model,
        "x-gateway-attempts": str(attempts),
        "x-gateway-route": route,
    }


@dataclass(slots=True)
class Whole:
    """A whole answer: ``completion.model`` names the model that gave it."""

    completion: Completion
    headers: dict[str, str]


class Streamed:
    """A streamed answer whose first chunk is in hand (so the headers can go out): send
    ``first``, then ``rest``; ``finish()`` once the answer is whole gives the verdicts that
    came after the headers (QA's), to carry in-band; ``close(ok)`` always, however the stream
    ended: it frees the upstream connection and tells the plugins the request is over.
    """

    __slots__ = ("_close", "_finish", "first", "headers", "model", "on_switch", "rest")

    def __init__(self, first: Chunk, rest: AsyncIterator[Chunk], headers: dict[str, str],
                 model: str, finish: Callable[[], Awaitable[dict[str, str]]],
                 close: Callable[[bool], Awaitable[None]]) -> None:
        self.first = first
        self.rest = rest
        self.headers = headers
        self.model = model  # the model answering; a rescued stream goes on from another
        self._finish = finish
        self._close: Callable[[bool], Awaitable[None]] | None = close
        # Told when a rescue moves the stream to another model (the door names it after).
        self.on_switch: Callable[[str, str], None] = _ignore  # (the model, its backend)

    def switched(self, model: str, backend: str) -> None:
        self.model = model
        self.on_switch(model, backend)

    async def finish(self) -> dict[str, str]:
        return await self._finish()

    async def close(self, ok: bool) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close(ok)


Answer = Whole | Streamed


@dataclass(slots=True)
class Embeddings:
    result: EmbeddingResult
    model: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Listed:
    """A model a client can ask for: one the backends serve (``info`` from discovery), or an
    alias that picks one (``info`` None). ``created``: when the gateway first saw it.
    """

    name: str
    owner: str  # the backend serving it, or "gateway" for an alias
    info: ModelInfo | None
    created: int


def _ignore(model: str, backend: str) -> None:
    return None
