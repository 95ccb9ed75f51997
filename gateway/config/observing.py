"""What the gateway tells its operator: metrics, traces (and where they are exported)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Metrics are kept by default (``/metrics``, in Prometheus's format); traces when asked.
    With ``otlp_endpoint`` (an OpenTelemetry collector's OTLP/HTTP address, such as
    ``http://127.0.0.1:4318``) both are also sent there, metrics every ``export_interval``
    seconds (this needs the package's ``otlp`` extra).
    """

    metrics: bool = True
    traces: bool = False
    sample_ratio: float = 1.0  # of requests whose client did not decide (traceparent)
    otlp_endpoint: str = ""
    export_interval: float = 15.0
    service_name: str = "hybrid-gateway"

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.sample_ratio <= 1.0:
            yield "sample_ratio", "expected a number from 0 to 1"
        if self.export_interval <= 0:
            yield "export_interval", "expected seconds > 0"
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            yield "otlp_endpoint", "expected an http:// or https:// URL"
