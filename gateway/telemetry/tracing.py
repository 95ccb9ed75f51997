"""The gateway's traces: a span per request, children for each plugin stage, the routing
and every upstream attempt, with OpenTelemetry's GenAI attributes; the client's W3C
``traceparent`` continued, and passed on to the backend.

Spans are recorded here as small objects (a span of OpenTelemetry's SDK costs about 25 µs to
open and close, several percent of a request each) and turned into the SDK's
``ReadableSpan`` away from the requests, in batches, for whichever span exporters are set
(OTLP when configured; tests read them from the SDK's in-memory exporter).

Sampling follows the client's decision when it sent a ``traceparent``, else the configured
ratio. With tracing off, the client's ``traceparent`` still goes upstream unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.runtime import end_loops

log = logging.getLogger(__name__)

BATCH = 512  # spans exported at once at most
KEPT = 8192  # spans waiting for export at most (past that, the oldest go)
EXPORT_SECONDS = 2.0
# The most a stop waits for the last spans and metrics to go out: a collector that is away
# (each batch retried for seconds) must not hold a stop past a service manager's patience.
CLOSE_SECONDS = 5.0

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

# The traceparent an upstream request carries: the attempt's span, or the client's own.
UPSTREAM: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent",
                                                                     default=None)


class Span:
    """One timed operation of a trace; ``end()`` it (once) to have it exported."""

    __slots__ = ("attributes", "end_ns", "error", "kind", "name", "parent_id", "remote",
                 "span_id", "start_ns", "trace_id", "tracer")

    def __init__(self, tracer: Tracer | None, name: str, trace_id: int, parent_id: int,
                 kind: str, attributes: dict[str, Any] | None, remote: bool = False) -> None:
        self.tracer = tracer
        self.name = name
        self.trace_id = trace_id
        self.span_id = random.getrandbits(64) or 1
        self.parent_id = parent_id
        self.remote = remote  # the parent is the client's
        self.kind = kind
        self.attributes = attributes if attributes is not None else {}
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error = ""

    @property
    def recording(self) -> bool:
        return True

    def set(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def fail(self, description: str, kind: str = "") -> None:
        """The operation failed: the span's status is an error (``error.type``: ``kind``)."""
        self.error = description or "error"
        if kind:
            self.attributes["error.type"] = kind

    def child(self, name: str, kind: str = "internal",
              attributes: dict[str, Any] | None = None) -> Span:
        return Span(self.tracer, name, self.trace_id, self.span_id, kind, attributes)

    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-01"

    def end(self) -> None:
        if not self.end_ns:
            self.end_ns = time.time_ns()
            if self.tracer is not None:
                self.tracer.finished(self)


class _NoSpan:
    """The span of a request that is not traced: every call does nothing."""

    __slots__ = ()
    recording = False

    def set(self, key: str, value: Any) -> None:
        return None

    def fail(self, description: str, kind: str = "") -> None:
        return None

    def child(self, name: str, kind: str = "internal",
              attributes: dict[str, Any] | None = None) -> _NoSpan:
        return self

    def end(self) -> None:
        return None


NO_SPAN = _NoSpan()
AnySpan = Span | _NoSpan


def parse_traceparent(header: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C ``traceparent``, else None."""
    if not header or len(header) != 55:
        return None
    match = _TRACEPARENT.fullmatch(header)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(match[3], 16) & 1)


class Tracer:
    """Starts request spans, and exports finished spans in the background."""

    def __init__(self, enabled: bool, sample_ratio: float = 1.0,
                 service_name: str = "hybrid-gateway",
                 readable: Callable[[list[Span], str], list[Any]] | None = None) -> None:
        self.enabled = enabled
        self._readable = readable  # finished spans as the SDK's, for its exporters
        self.sample_ratio = sample_ratio
        self.service_name = service_name
        self.exporters: list[Any] = []  # OpenTelemetry SDK SpanExporters
        self._finished: deque[Span] = deque(maxlen=KEPT)
        self._task: asyncio.Task[None] | None = None

    def request_span(self, name: str, traceparent: str | None,
                     attributes: dict[str, Any]) -> AnySpan:
        """The span of a request arriving (a child of the client's span, if it sent one);
        ``NO_SPAN`` when it is not sampled.
        """
        parent = parse_traceparent(traceparent)
        if parent is not None:
            if not parent[2]:
                return NO_SPAN  # the client decided: not sampled
            return Span(self, name, parent[0], parent[1], "server", attributes, remote=True)
        if self.sample_ratio < 1.0 and random.random() >= self.sample_ratio:
            return NO_SPAN
        return Span(self, name, random.getrandbits(128) or 1, 0, "server", attributes)

    def finished(self, span: Span) -> None:
        self._finished.append(span)

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._exporting())

    async def close(self) -> None:
        if self._task is not None:
            await end_loops([self._task])
            self._task = None
        with contextlib.suppress(TimeoutError):  # (what is left is said below)
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.flush()
        if self._finished and self.exporters:
            log.warning("traces: %d spans not exported: the collector did not take them",
                        len(self._finished))
        for exporter in self.exporters:
            with contextlib.suppress(Exception):
                exporter.shutdown()

    async def flush(self) -> None:
        """Export every finished span now; after a batch no exporter took (the collector
        away, each try retried for seconds), the rest wait for the next round.
        """
        while self._finished:
            if not await self._export_batch():
                return

    async def _exporting(self) -> None:
        while True:
            await asyncio.sleep(EXPORT_SECONDS)
            await self.flush()

    async def _export_batch(self) -> bool:
        """Export the oldest spans; whether an exporter took them (refused by every one,
        they are dropped: a batch a collector refuses for what it holds must not stop the
        spans behind it)."""
        batch = [self._finished.popleft() for _ in range(min(BATCH, len(self._finished)))]
        if not self.exporters or not batch or self._readable is None:
            return True
        spans = await asyncio.to_thread(self._readable, batch, self.service_name)
        taken = False
        for exporter in self.exporters:
            try:
                result = await asyncio.to_thread(exporter.export, spans)
            except Exception:
                log.exception("traces: exporter %s failed", type(exporter).__name__)
            else:
                taken = taken or getattr(result, "name", "SUCCESS") == "SUCCESS"
        return taken

