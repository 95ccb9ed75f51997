"""The bridge to OpenTelemetry's SDK: the gateway's spans and metrics in the SDK's data
model, for its exporters (OTLP over HTTP when configured, the package's optional ``otlp``
extra; any other SpanExporter or MetricExporter a deployment adds).

Imported only when something is exported: a gateway that exports nothing never loads the SDK.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import Span
from gateway.typed_toml import ConfigError

SCOPE = InstrumentationScope("hybrid-gateway")
KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# This process, as OpenTelemetry's semantic conventions name an instance: each worker of
# ``gateway serve --workers N`` exports its own cumulative counts, which a collector must not
# take for one stream of them.
INSTANCE = str(uuid.uuid4())
_resources: dict[str, Resource] = {}


def resource(service_name: str) -> Resource:
    found = _resources.get(service_name)
    if found is None:
        found = _resources[service_name] = Resource.create(
            {"service.name": service_name, "service.instance.id": INSTANCE})
    return found


def readable_spans(spans: Sequence[Span], service_name: str) -> list[ReadableSpan]:
    where = resource(service_name)
    out = []
    for span in spans:
        parent = SpanContext(span.trace_id, span.parent_id, is_remote=span.remote,
                             trace_flags=SAMPLED) if span.parent_id else None
        out.append(ReadableSpan(
            name=span.name,
            context=SpanContext(span.trace_id, span.span_id, is_remote=False,
                                trace_flags=SAMPLED),
            parent=parent, resource=where, attributes=span.attributes,
            kind=KINDS[span.kind],
            status=Status(StatusCode.ERROR, span.error) if span.error else Status(),
            start_time=span.start_ns, end_time=span.end_ns, instrumentation_scope=SCOPE))
    return out


def metrics_data(metrics: Metrics, service_name: str) -> MetricsData:
    """Every metric now, cumulative since the gateway started."""
    now = time.time_ns()
    start = int(metrics.started * 1e9)
    out: list[Metric] = []
    for kind, instrument, values in metrics.collect():
        names = instrument.labels
        data: Any
        if kind == "counter":
            data = Sum([NumberDataPoint(dict(zip(names, k, strict=True)), start, now, v)
                        for k, v in values], AggregationTemporality.CUMULATIVE, True)
        elif kind == "histogram":
            data = Histogram([HistogramDataPoint(
                dict(zip(names, k, strict=True)), start, now, count=count, sum=total,
                bucket_counts=buckets, explicit_bounds=instrument.bounds, min=low, max=high)
                for k, (buckets, total, count, low, high) in values],
                AggregationTemporality.CUMULATIVE)
        else:
            data = Gauge([NumberDataPoint(dict(zip(names, k, strict=True)), start, now, v)
                          for k, v in values])
        out.append(Metric(instrument.name, instrument.description, instrument.unit, data))
    return MetricsData([ResourceMetrics(resource(service_name), [
        ScopeMetrics(SCOPE, out, "")], "")])


def otlp_exporters(endpoint: str, traces: bool) -> tuple[Any, Any]:
    """The OTLP/HTTP exporters for metrics and (``traces``) spans, sending to ``endpoint``
    (``http://collector:4318``)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError("[telemetry] otlp_endpoint needs the OTLP exporter, which is not "
                          "installed: .venv/bin/pip install -e '.[otlp]' (or pip install "
                          "'hybrid-gateway[otlp]')") from None
    base = endpoint.rstrip("/")
    spans = OTLPSpanExporter(endpoint=base + "/v1/traces") if traces else None
    return OTLPMetricExporter(endpoint=base + "/v1/metrics"), spans
