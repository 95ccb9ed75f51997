"""Metrics and traces after known traffic: ``/metrics`` read by Prometheus's own parser
(``prometheus-client``), spans read from OpenTelemetry's in-memory exporter, the client's
``traceparent`` continued and passed to the backend; and OTLP export to a collector's
address, decoded with OpenTelemetry's own protobuf messages.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import TELEMETRY
from plugins.base import BasePlugin, Count, RequestContext
from tests.integration.conftest import FAST, Fleet
from tests.support import ServerThread, backend, gateway_config, start_gateway

USER = [{"role": "user", "content": "Hello"}]
ADMIN = "gw-admin-key-of-the-telemetry-tests"


def config(fleet: Fleet, **sections: Any) -> Any:
    return gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        backend("secondary", "ollama", fleet.secondary.api_url, timeouts=FAST),
        models=[{"name": "qwq:32b", "fallbacks": ["qwen2.5-coder:32b"]}],
        routing={"retries": 1, "backoff_initial": 0.01, "backoff_max": 0.02,
                 "tier_fallback": False},
        plugins=[{"name": "qa"}, {"name": "cache", "options": {"backend": "memory"}}],
        **sections)


@pytest.fixture
def traced(fleet: Fleet) -> Iterator[tuple[ServerThread, InMemorySpanExporter]]:
    server = start_gateway(config(fleet, telemetry={"traces": True}))
    exporter = InMemorySpanExporter()
    server.app[TELEMETRY].tracer.exporters.append(exporter)
    yield server, exporter
    server.stop()


def scrape(server: ServerThread, key: str = "") -> dict[str, Any]:
    """Every sample, by name and labels: ``{(name, (("label", "value"), ...)): value}``."""
    request = urllib.request.Request(server.url + "/metrics",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[Any, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_a_known_burst(traced: tuple[ServerThread, InMemorySpanExporter],
                                     fleet: Fleet) -> None:
    server, _ = traced
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        for i in range(3):
            client.chat.completions.create(model="qwen2.5-coder:32b", messages=[
                {"role": "user", "content": f"question {i}"}], temperature=0)
        client.chat.completions.create(model="qwen2.5-coder:32b", messages=[
            {"role": "user", "content": "question 0"}], temperature=0)  # a cache hit
        list(client.chat.completions.create(model="auto", messages=USER, stream=True))
        fleet.primary.fault("qwq:32b", status=500)  # retried once, then its fallback
        reply = client.chat.completions.create(model="qwq:32b", messages=USER, temperature=0)
        assert reply.model == "qwen2.5-coder:32b"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=USER)
    samples = scrape(server)
    requests = "gateway_requests_total"
    assert value(samples, requests, door="openai", status="200", model="qwen2.5-coder:32b") == 5
    assert value(samples, requests, door="openai", status="404", model="") == 1
    failed = "gateway_attempts_total"
    assert value(samples, failed, gateway_backend="primary", gen_ai_request_model="qwq:32b",
                 outcome="upstream_error") == 2
    assert value(samples, "gateway_retries_total", gateway_backend="primary",
                 reason="upstream_error") == 1
    assert value(samples, "gateway_failovers_total", gateway_backend="primary",
                 reason="upstream_error") == 1
    assert value(samples, "gateway_cache_lookups_total", result="hit") == 1
    assert value(samples, "gateway_cache_lookups_total", result="miss") == 4
    assert value(samples, "gateway_qa_verdicts_total", verdict="pass") == 5
    picked = {k[1] for k in samples if k[0] == "gateway_alias_picks_total"}
    assert len(picked) == 1 and dict(next(iter(picked)))["alias"] == "auto"
    # The durations: one per answered generation, in cumulative buckets ending at +Inf.
    name = "gen_ai_client_operation_duration_seconds"
    labels = {"gen_ai_operation_name": "chat", "gen_ai_response_model": "qwen2.5-coder:32b",
              "door": "openai"}
    assert value(samples, name + "_count", **labels) == 5
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in samples.items()
                     if k[0] == name + "_bucket" and {**dict(k[1]), "le": ""} ==
                     {**labels, "le": ""})
    assert buckets[-1] == (float("inf"), 5)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    assert sum(v for k, v in samples.items() if k[0] == ttft) == 5  # each model answer
    tokens = "gen_ai_client_token_usage_count"
    assert value(samples, tokens, gen_ai_token_type="output",
                 gen_ai_response_model="qwen2.5-coder:32b") == 4  # (a hit asks no model)
    assert value(samples, "gateway_backend_up", gateway_backend="primary") in (0, 1)


def spans_of(server: ServerThread, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    server.wait(server.app[TELEMETRY].tracer.flush)
    return list(exporter.get_finished_spans())


def test_a_request_is_one_trace_continued_from_the_client_and_passed_upstream(
        traced: tuple[ServerThread, InMemorySpanExporter], fleet: Fleet) -> None:
    server, exporter = traced
    trace_id, client_span = random.getrandbits(128), random.getrandbits(64)
    traceparent = f"00-{trace_id:032x}-{client_span:016x}-01"
    fleet.primary.fault("qwq:32b", status=500, remaining=1)  # one failed attempt first
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        client.chat.completions.create(model="qwq:32b", messages=USER,
                                       extra_headers={"traceparent": traceparent})
    spans = [s for s in spans_of(server, exporter) if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in spans}
    root = by_name["POST /v1/chat/completions"]
    assert root.kind == SpanKind.SERVER and root.parent is not None
    assert root.parent.span_id == client_span and root.parent.is_remote
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "qwq:32b"
    assert root.attributes["gen_ai.response.model"] == "qwq:32b"
    assert root.attributes["http.response.status_code"] == 200
    stages = {s.name for s in spans if s.parent and s.parent.span_id == root.context.span_id}
    assert stages == {"qa on_request", "cache on_request", "route", "qa on_complete",
                      "cache on_complete"}
    route = by_name["route"]
    attempts = sorted((s for s in spans if s.parent and
                       s.parent.span_id == route.context.span_id),
                      key=lambda s: s.attributes["gateway.attempt"])
    assert [a.name for a in attempts] == ["chat qwq:32b", "chat qwq:32b"]
    failed, answered = attempts
    assert failed.kind == SpanKind.CLIENT and not failed.status.is_ok
    assert failed.attributes["error.type"] == "upstream_error"
    assert failed.attributes["gateway.disposition"] == "retry"
    assert answered.status.is_ok and answered.attributes["gen_ai.provider.name"] == "ollama"
    assert route.attributes["gen_ai.usage.output_tokens"] > 0
    # The backend got each attempt's own span as its parent, in the client's trace.
    sent = [r["traceparent"] for r in fleet.primary.requests("/api/chat")][-2:]
    assert sent == [f"00-{trace_id:032x}-{a.context.span_id:016x}-01" for a in attempts]


def test_a_client_that_does_not_sample_is_not_traced_and_its_traceparent_goes_on(
        traced: tuple[ServerThread, InMemorySpanExporter], fleet: Fleet) -> None:
    server, exporter = traced
    traceparent = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-00"
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        client.chat.completions.create(model="qwq:32b", messages=USER,
                                       extra_headers={"traceparent": traceparent})
    assert fleet.primary.requests("/api/chat")[-1]["traceparent"] == traceparent
    trace = int(traceparent[3:35], 16)
    assert not [s for s in spans_of(server, exporter) if s.context.trace_id == trace]


def test_without_tracing_the_clients_traceparent_goes_upstream_unchanged(
        fleet: Fleet) -> None:
    server = start_gateway(config(fleet))
    try:
        traceparent = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-01"
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            c.chat.completions.create(model="qwq:32b", messages=USER,
                                      extra_headers={"traceparent": traceparent})
            assert fleet.primary.requests("/api/chat")[-1]["traceparent"] == traceparent
            c.chat.completions.create(model="qwq:32b", messages=USER,
                                      extra_headers={"traceparent": "00-garbage-01"})
            assert fleet.primary.requests("/api/chat")[-1]["traceparent"] is None
    finally:
        server.stop()


def test_metrics_need_the_admin_key_when_the_gateway_has_keys(fleet: Fleet) -> None:
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    server = start_gateway(config(fleet, auth={"admin_key_hashes": [digest],
                                               "key_hashes": ["0" * 64]}))
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            scrape(server)
        caught.value.close()
        assert caught.value.code == 401
        assert any(k[0] == "gateway_requests_total" for k in scrape(server, ADMIN))
    finally:
        server.stop()
    off = start_gateway(config(fleet, telemetry={"metrics": False}))
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            scrape(off)
        caught.value.close()
        assert caught.value.code == 404
    finally:
        off.stop()


def test_metrics_and_spans_reach_an_otlp_collector(fleet: Fleet) -> None:
    """The OTLP/HTTP exporter (the ``otlp`` extra) sends to a collector's address; a
    receiver here decodes what arrives with OpenTelemetry's protobuf messages.
    """
    received: dict[str, list[bytes]] = {"/v1/metrics": [], "/v1/traces": []}

    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        received[request.path].append(body)
        return web.Response(status=200)

    def collector() -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/metrics", collect)
        app.router.add_post("/v1/traces", collect)
        return app

    with ServerThread(collector) as sink:
        server = start_gateway(config(fleet, telemetry={
            "traces": True, "otlp_endpoint": sink.url, "export_interval": 60.0,
            "service_name": "gateway-under-test"}))
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            c.chat.completions.create(model="qwq:32b", messages=USER)
        server.stop()  # what is left goes out as the gateway stops
    metrics = ExportMetricsServiceRequest.FromString(received["/v1/metrics"][-1])
    resource = metrics.resource_metrics[0]
    attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert attributes["service.name"] == "gateway-under-test"
    # each process its own instance (the workers of --workers N: one stream of counts each)
    assert attributes["service.instance.id"] == str(uuid.UUID(attributes["service.instance.id"]))
    other = subprocess.run([sys.executable, "-c", "from gateway.telemetry import sdk; "
                            "print(sdk.resource('x').attributes['service.instance.id'])"],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    assert other.strip() != attributes["service.instance.id"]
    names = {m.name: m for m in resource.scope_metrics[0].metrics}
    requests = names["gateway.requests"].sum
    assert requests.is_monotonic and sum(p.as_double for p in requests.data_points) >= 1
    assert names["gen_ai.client.operation.duration"].histogram.data_points[0].count == 1
    traces = [ExportTraceServiceRequest.FromString(b) for b in received["/v1/traces"]]
    spans = [s for t in traces for r in t.resource_spans for sc in r.scope_spans
             for s in sc.spans]
    assert {"POST /v1/chat/completions", "route", "chat qwq:32b"} <= {s.name for s in spans}


def test_a_whole_answer_says_its_time_to_first_token_and_speed_as_a_stream_does(
        fleet: Fleet, tmp_path: Any) -> None:
    """A whole answer (the SDKs' default) is collected from a stream: its first token is
    when the first piece came, not the whole answer (its speed was 100,000 tokens/s)."""
    log = tmp_path / "requests.jsonl"
    server = start_gateway(config(fleet, telemetry={"request_log": str(log)}))
    try:
        for host in (fleet.primary, fleet.secondary):  # (it is on both)
            host.fault("qwen2.5-coder:32b", ttft=0.3, tokens_per_s=40)
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            reply = client.chat.completions.create(model="qwen2.5-coder:32b", messages=USER)
        assert reply.usage is not None and reply.usage.completion_tokens > 5
        samples = scrape(server)
    finally:
        server.stop()
    line = json.loads(log.read_text().splitlines()[0])
    assert 250 <= line["ttft_ms"] <= 600 and line["ms"] - line["ttft_ms"] >= 100, line
    speed = [v for (name, _), v in samples.items()
             if name == "gateway_output_speed_tokens_per_second_sum"]
    assert speed and 20 <= sum(speed) <= 80, speed  # paced at 40 a second
    ttft = [v for (name, _), v in samples.items()
            if name == "gen_ai_server_time_to_first_token_seconds_sum"]
    assert ttft and 0.25 <= sum(ttft) <= 0.6, ttft


def test_a_rescued_stream_is_credited_to_the_model_that_took_it_over(
        traced: tuple[ServerThread, InMemorySpanExporter], fleet: Fleet) -> None:
    """The client had its answer from the fallback; the metrics, the request's trace and
    the dashboard's request list said the model that broke off."""
    server, exporter = traced
    fleet.primary.fault("qwq:32b", cut_after=8)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        chunks = list(client.chat.completions.create(model="qwq:32b", messages=USER,
                                                     stream=True))
    assert chunks[-1].model == "qwen2.5-coder:32b"
    samples = scrape(server)
    assert value(samples, "gateway_requests_total", door="openai", status="200",
                 model="qwen2.5-coder:32b") == 1
    assert value(samples, "gateway_requests_total", door="openai", status="200",
                 model="qwq:32b") == 0
    spans = spans_of(server, exporter)
    request = next(s for s in spans if s.kind == SpanKind.SERVER)
    assert request.attributes is not None
    assert request.attributes["gen_ai.response.model"] == "qwen2.5-coder:32b"
    [line] = server.app[TELEMETRY].recent
    assert line["served"] == "qwen2.5-coder:32b" and line["model"] == "qwq:32b"


class Counting(BasePlugin):
    """A plugin of the user's with a counter whose description runs over two lines."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.seen = 0

    async def on_request(self, ctx: RequestContext) -> None:
        self.seen += 1

    def counts(self) -> list[Count]:
        return [Count("acme.requests.seen", "Requests seen\nby the acme plugin \\o/", (),
                      {(): self.seen})]


def test_metrics_stay_readable_with_a_plugin_counting_twice_in_words_over_lines(
        fleet: Fleet) -> None:
    """Two copies of a user's plugin, each with the same counter, described over two lines:
    Prometheus refuses a whole scrape that names a metric twice or breaks a line of it.
    """
    plugin = {"name": "acme", "path": f"{__name__}:Counting"}
    server = start_gateway(gateway_config(backend("primary", "ollama", fleet.primary.api_url),
                                          plugins=[plugin, {**plugin, "name": "acme2"}]))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            client.chat.completions.create(model="qwq:32b", messages=USER)
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert text.count("# TYPE acme_requests_seen_total counter") == 1, text
    assert "# HELP acme_requests_seen_total Requests seen\\nby the acme plugin \\\\o/\n" in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["acme_requests_seen"].documentation == "Requests seen\nby the acme plugin \\o/"
    assert [s.value for s in families["acme_requests_seen"].samples] == [1.0]
