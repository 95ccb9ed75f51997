"""The plugin contract: what runs around every chat and text completion.

``on_request`` sees the request before routing (it may answer it — a cache hit — or refuse
it by raising ``Denied``); ``on_stream`` wraps the answer's chunks on their way out;
``on_complete`` sees the whole answer once it is done (and may ask for a stronger model);
``on_finish`` is told the request is over, however it ended (answered, failed, or the client
gone); ``on_embed`` sees what is to be embedded (and may rewrite it, or refuse it, and say
what it did in ``req.headers``, the answer's). The
one place that knows the order is ``gateway.pipeline``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import InvalidRequest
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest, Kind
from gateway.protocol.units import Chunk, Completion


class Denied(InvalidRequest):
    """A request a plugin refuses: 400 ``content_policy_violation``, naming the rule."""

    code = "content_policy_violation"

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} (rule: {rule})", param="messages")
        self.rule = rule


@dataclass(slots=True)
class RequestContext:
    """One request's state, as plugins see and shape it."""

    kind: Kind
    req: ChatRequest | CompletionRequest
    tenant: str  # a digest of the API key ("" when keys are not required)
    client_headers: Mapping[str, str]
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    # A streamed request the client gets only once it is whole (and checked): JSON formats.
    buffered: bool = False
    model: str = ""  # the model that answered, once known
    failed: bool = False  # the answer ended in an error: nothing of it is kept
    rejected: Verdict | None = None  # a plugin found the answer wanting: nothing of it is kept
    state: dict[str, Any] = field(default_factory=dict)  # each plugin's own, by its name
    # Told the tokens an answer from a model used, once it is whole (a key's limits count).
    on_usage: Callable[[int], None] | None = None
    # Whose cached answers the caller may get: its key's setting ("key", "shared", "off"),
    # or "" for the cache's own.
    cache_scope: str = ""
    # The models (and aliases) the caller may use, fallbacks and escalations too (none: all).
    models: tuple[str, ...] = ()
    # A batch line's: it takes only its share of each deployment ([tasks] share), so
    # interactive requests always find room.
    batch: bool = False
    request_id: str = ""  # as the client sees it (x-request-id): feedback names it
    # Told, of an answer that did not say its usage (cut off, or from a backend that does
    # not count), the tokens of it that came, estimated: a key's limits charge at least those.
    on_output: Callable[[int], None] | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A judgement of a finished answer; ``escalate`` asks for a stronger model."""

    ok: bool
    reasons: tuple[str, ...] = ()
    escalate: bool = False

    def describe(self) -> str:
        return "pass" if self.ok else "fail: " + ", ".join(self.reasons)

    def checks(self) -> str:
        """The verdict by check names only (a reason's detail may quote the answer)."""
        return "pass" if self.ok else "fail: " + ", ".join(
            reason.split(" (")[0] for reason in self.reasons)


@dataclass(frozen=True, slots=True)
class Count:
    """A counter a plugin keeps, as a metric: its OpenTelemetry name, what it counts, its
    labels, and each label set's total now.
    """

    name: str
    description: str
    labels: tuple[str, ...]
    values: dict[tuple[str, ...], float]


class Plugin(Protocol):
    name: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def on_request(self, ctx: RequestContext) -> Completion | None: ...
    def on_stream(self, ctx: RequestContext,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]: ...
    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None: ...
    def on_finish(self, ctx: RequestContext) -> None: ...
    async def on_embed(self, req: EmbeddingRequest) -> EmbeddingRequest: ...
    def report(self) -> dict[str, Any]: ...
    def counts(self) -> list[Count]: ...


class BasePlugin:
    """Does nothing at every step: a plugin overrides only what it needs (its options, the
    config's ``options`` table, as its ``Options`` dataclass when it has one, are given to
    its constructor: ``self.options``)."""

    name = "plugin"

    def __init__(self, options: Any = None) -> None:
        super().__init__()  # (a mixin's too)
        if options is not None or not hasattr(self, "options"):  # (a subclass may have set
            self.options = options  # them, and then call this without)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def on_request(self, ctx: RequestContext) -> Completion | None:
        return None

    def on_stream(self, ctx: RequestContext,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        return chunks

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        return None

    async def on_embed(self, req: EmbeddingRequest) -> EmbeddingRequest:
        return req

    def report(self) -> dict[str, Any]:
        return {}

    def counts(self) -> list[Count]:
        """Its counters as metrics (read when they are collected, never per request)."""
        return []
