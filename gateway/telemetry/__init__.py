"""Telemetry: the gateway's metrics and traces (``Telemetry``, one per app), every
instrument named here once, and the request's span for whoever adds to its trace.

The lowest layer but config: routing, backends, the pipeline and HTTP all record here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from typing import Any

from gateway.config import TelemetryConfig
from gateway.runtime import end_loops
from gateway.telemetry.metrics import RATES, TOKENS, Counter, Histogram, Metrics
from gateway.telemetry.requests import RequestLog
from gateway.telemetry.tracing import (
    CLOSE_SECONDS,
    NO_SPAN,
    UPSTREAM,
    AnySpan,
    Span,
    Tracer,
    parse_traceparent,
)

log = logging.getLogger(__name__)

RECENT = 50  # requests kept for the dashboard

__all__ = ["ANSWER_BEGAN", "NOTES", "NO_SPAN", "UPSTREAM", "AnySpan", "Instruments", "Metrics",
           "Span", "Telemetry", "Tracer", "current_span"]

# The span of the request being answered (NO_SPAN when it is not traced).
CURRENT: contextvars.ContextVar[AnySpan] = contextvars.ContextVar("span", default=NO_SPAN)


def current_span() -> AnySpan:
    return CURRENT.get()


# What routing learns of the request being answered (time to first token, tokens), for its
# line in the request log; None when nobody keeps requests.
NOTES: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "notes", default=None)

# When the first piece of an answer a backend collects whole arrived (``time.monotonic()``;
# 0: none yet): its time to first token, which the one whole chunk it gives cannot say.
ANSWER_BEGAN: contextvars.ContextVar[float] = contextvars.ContextVar("answer_began",
                                                                    default=0.0)


class Instruments:
    """The metrics every part of the gateway records, by OpenTelemetry's names (the GenAI
    semantic conventions' where they have one).
    """

    def __init__(self, metrics: Metrics) -> None:
        m = metrics
        self.enabled = metrics.enabled  # (off: every instrument's update does nothing)
        self.requests: Counter = m.counter(
            "gateway.requests", "Requests answered, by front door, status and the model that "
            "answered", ("door", "status", "model"), unit="{request}")
        self.duration: Histogram = m.histogram(
            "gen_ai.client.operation.duration", "Time to answer a request, whole",
            ("gen_ai.operation.name", "gen_ai.response.model", "door"))
        self.ttft: Histogram = m.histogram(
            "gen_ai.server.time_to_first_token", "Time from sending a request to a backend to "
            "its first token", ("gen_ai.response.model", "gateway.backend"))
        self.tokens: Histogram = m.histogram(
            "gen_ai.client.token.usage", "Tokens of each answer, prompt (input) and answer "
            "(output)", ("gen_ai.token.type", "gen_ai.response.model"), unit="{token}",
            bounds=TOKENS)
        self.speed: Histogram = m.histogram(
            "gateway.output.speed", "Output tokens a second, from the first token to the last",
            ("gen_ai.response.model",), unit="{token}/s", bounds=RATES)
        self.attempts: Counter = m.counter(
            "gateway.attempts", "Attempts on a backend's model, and how each went ('ok', or "
            "the error's code)", ("gateway.backend", "gen_ai.request.model", "outcome"))
        self.faults: Counter = m.counter(
            "gateway.backend.faults", "Attempts that failed by the backend's fault (what its "
            "breakers count: not a request it rightly refused)", ("gateway.backend",))
        self.retries: Counter = m.counter(
            "gateway.retries", "Attempts made again on the same deployment, by reason",
            ("gateway.backend", "reason"))
        self.failovers: Counter = m.counter(
            "gateway.failovers", "Deployments given up for the next, by reason",
            ("gateway.backend", "reason"))
        self.rescues: Counter = m.counter(
            "gateway.rescues", "Streams that broke mid-answer, and how they ended "
            "('continued', 'restarted', 'failed')", ("outcome",))
        self.escalations: Counter = m.counter(
            "gateway.escalations", "Answers found wanting and asked of a stronger model",
            ("reason",))
        self.picks: Counter = m.counter(
            "gateway.alias.picks", "The model each alias (auto, auto:code, ...) had answer "
            "(an answer QA then took to a stronger model: that escalation is counted apart)",
            ("alias", "gen_ai.response.model"))


class Telemetry:
    """Metrics, traces and their exporters, for one gateway."""

    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self.metrics = Metrics(enabled=config.metrics)
        self.instruments = Instruments(self.metrics)
        self.tracer = Tracer(config.traces, config.sample_ratio, config.service_name,
                             readable=_readable_spans)
        self.metric_exporters: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        # The last requests answered, as the request log writes them (kept with the metrics).
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.requests_log = RequestLog(config.request_log)
        self.keeps_requests = config.metrics or bool(config.request_log)

    def answered(self, record: dict[str, Any]) -> None:
        """A request answered: among the recent ones, and in the request log."""
        if self.metrics.enabled:
            self.recent.append(record)
        self.requests_log.write(record)

    def request_span(self, name: str, traceparent: str | None,
                     attributes: dict[str, Any]) -> AnySpan:
        """The span of a request arriving (tracing is on), made current; the client's
        ``traceparent`` is what requests to backends carry until an attempt has its own.
        """
        span = self.tracer.request_span(name, traceparent, attributes)
        CURRENT.set(span)
        self.untraced(traceparent)
        return span

    @staticmethod
    def untraced(traceparent: str | None) -> AnySpan:
        """A request this gateway does not trace: the client's trace, if it has one, still
        goes on to the backends.
        """
        UPSTREAM.set(traceparent if traceparent is None or parse_traceparent(traceparent)
                     else None)
        return NO_SPAN

    async def start(self) -> None:
        if self.config.otlp_endpoint:
            from gateway.telemetry.sdk import otlp_exporters

            metrics, spans = otlp_exporters(self.config.otlp_endpoint, self.config.traces)
            if self.config.metrics:
                self.metric_exporters.append(metrics)
            if spans is not None:
                self.tracer.exporters.append(spans)
        self.tracer.start()
        self.requests_log.open()
        if self.metric_exporters:
            self._task = asyncio.create_task(self._exporting_metrics(), name="metrics export")

    async def close(self) -> None:
        if self._task is not None:
            await end_loops([self._task])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.export_metrics()
        for exporter in self.metric_exporters:
            with contextlib.suppress(Exception):
                exporter.shutdown()
        await self.tracer.close()
        self.requests_log.close()

    async def export_metrics(self) -> None:
        if not self.metric_exporters:
            return
        from gateway.telemetry.sdk import metrics_data

        data = metrics_data(self.metrics, self.config.service_name)
        for exporter in self.metric_exporters:
            try:
                await asyncio.to_thread(exporter.export, data)
            except Exception:
                log.exception("metrics: exporter %s failed", type(exporter).__name__)

    async def _exporting_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.config.export_interval)
            await self.export_metrics()


def _readable_spans(spans: list[Span], service_name: str) -> list[Any]:
    from gateway.telemetry.sdk import readable_spans  # the SDK, once spans are exported

    return readable_spans(spans, service_name)
