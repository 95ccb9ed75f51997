"""What the gateway tells its operator: metrics, traces (and where they are exported)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """Metrics are kept by default (``/metrics``, in Prometheus's format); traces when asked.
    With ``otlp_endpoint`` (an OpenTelemetry collector's OTLP/HTTP address, such as
    ``http://127.0.0.1:4318``) both are also sent there, metrics every ``export_interval``
    seconds (this needs the package's ``otlp`` extra). ``request_log``: a JSON line per
    request (who, which door, model asked and served, backend, attempts, status, timings,
    tokens; never a prompt, an answer or a key) to a file, or "-" for standard output.
    """

    metrics: bool = True
    traces: bool = False
    sample_ratio: float = 1.0  # of requests whose client did not decide (traceparent)
    otlp_endpoint: str = ""
    export_interval: float = 15.0
    service_name: str = "hybrid-gateway"
    request_log: str = ""  # a JSON line per request: to this file, "-" standard output

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 0.0 <= self.sample_ratio <= 1.0:
            yield "sample_ratio", "expected a number from 0 to 1"
        if self.export_interval <= 0:
            yield "export_interval", "expected seconds > 0"
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            yield "otlp_endpoint", "expected an http:// or https:// URL"


AlertKind = Literal["tunnel_down", "backend_down", "error_rate", "latency_p95", "ttft_p95",
                    "redis_down", "no_route", "cloud_share"]
Severity = Literal["warning", "critical"]


@dataclass(frozen=True, slots=True)
class AlertRule:
    """A condition that, held for ``after`` seconds, is an alert until it ends.

    ``tunnel_down``, ``backend_down`` (optionally one ``target``), ``redis_down``: down that
    long. ``no_route``: no deployment of the ``target`` tier ("" any) can serve.
    ``error_rate`` (per backend, or one ``target``): the share of its attempts that failed
    in the last ``window`` seconds is over ``over`` (0.2: 20%), once it had ``min_requests``.
    ``latency_p95``, ``ttft_p95``: seconds, over the window. ``cloud_share``: the share of
    answers the cloud tier gave over the window (the workstation is not carrying its load).
    """

    kind: AlertKind
    name: str = ""  # defaults to the kind
    after: float = 0.0
    over: float = 0.0
    window: float = 300.0
    min_requests: int = 10
    target: str = ""
    severity: Severity = "warning"

    @property
    def id(self) -> str:
        return self.name or self.kind

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.after < 0:
            yield "after", "expected seconds >= 0"
        if not 0 < self.window <= LONGEST_WINDOW:
            yield "window", f"expected seconds > 0, at most {LONGEST_WINDOW:g}"
        if self.kind in RATED and self.over <= 0:
            yield "over", f"a {self.kind} rule needs a threshold > 0"
        if self.kind in ("error_rate", "cloud_share") and self.over > 1:
            yield "over", "expected a share from 0 to 1 (0.2 is 20%)"


LONGEST_WINDOW = 900.0  # the monitor keeps this much traffic history
RATED = ("error_rate", "latency_p95", "ttft_p95", "cloud_share")

SinkKind = Literal["log", "webhook", "telegram", "slack"]


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Where alerts go. ``webhook``: a JSON POST of each alert to ``url``; ``slack``: a
    Slack-compatible incoming webhook whose URL is in the environment variable ``url_env``
    (it is a secret); ``telegram``: a bot's sendMessage, its token and chat id in the
    environment (``token_env``, ``chat_id_env``; ``api_url_env`` may point at another Bot API
    server than api.telegram.org).
    """

    kind: SinkKind
    url: str = ""
    url_env: str = ""
    token_env: str = "TELEGRAM_BOT_TOKEN"
    chat_id_env: str = "TELEGRAM_CHAT_ID"
    api_url_env: str = "TELEGRAM_API_URL"
    timeout: float = 5.0

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.kind == "webhook" and not self.url.startswith(("http://", "https://")):
            yield "url", "a webhook sink needs an http:// or https:// url"
        if self.kind == "slack" and not self.url_env and not self.url:
            yield "url_env", "a slack sink needs url_env (the variable holding its URL)"
        if self.timeout <= 0:
            yield "timeout", "expected seconds > 0"


DEFAULT_RULES = (
    AlertRule("tunnel_down", after=600.0, severity="critical"),
    AlertRule("no_route", after=60.0, severity="critical"),
    AlertRule("backend_down", after=300.0),
    AlertRule("redis_down", after=60.0, severity="critical"),
    AlertRule("error_rate", over=0.5, window=300.0, min_requests=20),
)


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """The monitor: healing what it can, alerts, the request log.

    Every ``interval`` seconds it checks the rules and runs what healing is due. An alert is
    sent once when it starts and once when it ends; one that ends and starts again within
    ``min_interval`` seconds is not sent again; alerts starting within ``group_window``
    seconds of each other go out as one message.
    """

    interval: float = 5.0
    alerts: tuple[AlertRule, ...] = DEFAULT_RULES
    sinks: tuple[SinkConfig, ...] = (SinkConfig("log"),)
    min_interval: float = 300.0
    group_window: float = 5.0
    probe_breakers: bool = True  # try an open breaker's deployment without a client waiting
    keep_warm: tuple[str, ...] = ("auto",)  # keep the model these aliases pick loaded (Ollama)
    resolve_after: float = 30.0  # a condition has ended once it has been gone this long

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.interval <= 0:
            yield "interval", "expected seconds > 0"
        if self.min_interval < 0 or self.group_window < 0:
            yield "min_interval", "expected seconds >= 0"
        ids = [rule.id for rule in self.alerts]
        for i, rule_id in enumerate(ids):
            if rule_id in ids[:i]:
                yield f"alerts[{i}].name", f"two rules are named {rule_id!r}: name one"
