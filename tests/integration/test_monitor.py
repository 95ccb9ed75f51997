"""The monitor against the simulated fleet: /ready for load balancers, /admin/status, the
healing actions (rediscovery, breaker probes, keeping the picked model loaded, configured
models their backend does not list), alerts delivered once to a webhook, Slack and Telegram
receivers of the test's own (one failing at first), Redis watched, and the request log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim import SimModel, create_ollama_app, create_openai_app
from tests.integration.conftest import FAST, Fleet, host_models
from tests.redis_peer import RedisServer
from tests.support import (
    ServerThread,
    backend,
    free_port,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

USER = [{"role": "user", "content": "Hello"}]
ADMIN = "gw-admin-key-of-the-monitor-tests"
KEY = "gw-client-key-of-the-monitor-tests"
QUICK = {"interval": 0.2, "resolve_after": 0.5, "group_window": 0.0, "min_interval": 0.0}


def get(url: str, key: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"}
                                     if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(server: ServerThread, model: str = "auto", key: str = "x") -> Any:
    client = openai_client(server.url, key)
    return client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]


def one_ollama(fleet: Fleet, routing: dict[str, Any] | None = None, **sections: Any) -> Any:
    return gateway_config(backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
                          routing={"health_interval": 0.2, "retries": 0,
                                   "breaker": {"failures": 2, "cooldown": 0.5},
                                   "tier_fallback": False, **(routing or {})},
                          **sections)


class Receiver:
    """An alert receiver: records every POST (path and JSON); fails the first ``failing``."""

    def __init__(self, failing: int = 0) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.failing = failing
        self.server = ServerThread(self._app).start()

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._post)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        if self.failing:
            self.failing -= 1
            return web.Response(status=503)
        self.posts.append((request.path, await request.json()))
        return web.json_response({"ok": True})

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.server.stop()


def test_ready_says_whether_any_route_can_serve(fleet: Fleet) -> None:
    server = start_gateway(one_ollama(fleet))
    try:
        status, body = get(server.url + "/ready")
        assert (status, body["status"]) == (200, "ready")
        assert body["deployments"] == len(host_models())
        fleet.threads["primary"].stop()
        wait_until(lambda: get(server.url + "/ready")[0] == 503, 10, "ready → 503")
        status, body = get(server.url + "/ready")
        assert body["status"] == "not_ready" and "no backend can serve" in body["reason"]
        fleet.restart("primary", lambda: create_ollama_app(host_models()))
        wait_until(lambda: get(server.url + "/ready")[0] == 200, 10, "ready again")
    finally:
        server.stop()


def test_breakers_close_when_their_backend_is_back_without_traffic(fleet: Fleet) -> None:
    """A backend found down opens its deployments' breakers; back, they close, not left
    half-open for a trial no request makes (shown degraded for good). (The monitor's probes
    off: a probe is traffic.)"""
    server = start_gateway(one_ollama(fleet, monitor={"probe_breakers": False}))
    try:
        chat(server, "qwq:32b")

        def breaker() -> str:
            return str(get(server.url + "/health")[1]["deployments"]["primary/qwq:32b"]["breaker"])

        fleet.threads["primary"].stop()
        wait_until(lambda: breaker() == "open", 10, "the breaker open with its backend down")
        fleet.restart("primary", lambda: create_ollama_app(host_models()))
        wait_until(lambda: breaker() == "closed", 10, "the breaker closed, with no request")
    finally:
        server.stop()


def test_the_request_rate_counts_requests_to_models_not_model_lists(fleet: Fleet) -> None:
    """IDE plugins poll /v1/models and /api/tags: the dashboard's requests a second (and the
    error-rate base) counted every poll as a request."""
    server = start_gateway(one_ollama(fleet))
    try:
        def counted() -> Any:
            traffic = get(server.url + "/admin/status")[1]["traffic"]
            return traffic["requests"] if traffic else None

        wait_until(lambda: counted() == 0, 10, "the traffic window under way")
        for _ in range(3):
            chat(server)
        for path in ("/v1/models", "/api/tags", "/api/version") * 7:
            assert get(server.url + path)[0] == 200
        for path in ("/v1/no/such/route", "/v1/models/no-such-model") * 7:  # (and refusals)
            assert get(server.url + path)[0] == 404
        wait_until(lambda: counted() == 3, 10, "the three chats counted")
        time.sleep(1.5)  # (the next samples)
        assert counted() == 3
    finally:
        server.stop()


def test_admin_status_shows_the_fleet_and_needs_the_admin_key_when_keyed(fleet: Fleet) -> None:
    digest = hashlib.sha256
    server = start_gateway(one_ollama(
        fleet, auth={"key_hashes": [digest(KEY.encode()).hexdigest()],
                     "admin_key_hashes": [digest(ADMIN.encode()).hexdigest()]}))
    try:
        chat(server, key=KEY)
        assert get(server.url + "/admin/status")[0] == 401
        assert get(server.url + "/admin/status", KEY)[0] == 401  # a client's key is not enough
        status, body = get(server.url + "/admin/status", ADMIN)
        assert status == 200
        assert body["ready"] is True and body["uptime_s"] >= 0 and body["version"]
        assert body["backends"]["primary"]["up"] is True
        assert set(body["backends"]["primary"]["models"]) == {m.name for m in host_models()}
        assert body["aliases"]["auto"]["model"] == "qwq:32b"
        assert body["aliases"]["auto"]["backend"] == "primary"
        assert body["aliases"]["auto:vision"] is None  # nothing here can see
        assert body["deployments"]["primary/qwq:32b"]["breaker"] == "closed"
        assert body["recent"][0]["served"] == "qwq:32b" and body["recent"][0]["model"] == "auto"
        assert get(server.url + "/ready")[0] == 200  # /ready needs no key
    finally:
        server.stop()


def test_a_configured_model_its_backend_does_not_list_is_warned_of(fleet: Fleet) -> None:
    server = start_gateway(one_ollama(fleet, models=[{
        "name": "coder", "deployments": [{"backend": "primary", "model": "qwen2.5-coder:32bb"}],
        "fallbacks": ["qwq:32b"]}]))
    try:
        _, body = get(server.url + "/admin/status")
        assert body["warnings"] == ["[[models]] 'coder': backend 'primary' does not list the "
                                    "model 'qwen2.5-coder:32bb' (did you mean "
                                    "'qwen2.5-coder:32b'?); requests for it go to the "
                                    "fallbacks"]
    finally:
        server.stop()


def healing(server: ServerThread, action: str) -> list[dict[str, Any]]:
    return [a for a in get(server.url + "/admin/status")[1]["healing"] if a["action"] == action]


def test_a_backend_that_returns_is_rediscovered(fleet: Fleet) -> None:
    server = start_gateway(one_ollama(fleet, monitor=QUICK))
    try:
        fleet.threads["primary"].stop()
        wait_until(lambda: get(server.url + "/ready")[0] == 503, 10, "the backend seen down")
        fleet.restart("primary", lambda: create_ollama_app(
            [*host_models(), SimModel("llama3.3:70b", parameter_size="70.6B")]))
        wait_until(lambda: healing(server, "rediscover"), 10, "rediscovery")
        assert healing(server, "rediscover")[0]["outcome"] == "ok"
        assert chat(server, "llama3.3:70b").model == "llama3.3:70b"  # the new model serves
    finally:
        server.stop()


def test_an_open_breaker_is_probed_and_closed_without_a_client_waiting(fleet: Fleet) -> None:
    server = start_gateway(one_ollama(fleet, monitor=QUICK))
    try:
        fleet.primary.fault("qwq:32b", status=500)
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                chat(server, "qwq:32b")
        breaker = lambda: get(server.url + "/admin/status")[1][  # noqa: E731
            "deployments"]["primary/qwq:32b"]["breaker"]
        assert breaker() == "open"
        wait_until(lambda: [a for a in healing(server, "probe_breaker")
                            if a["outcome"] == "failed"], 10, "a probe that fails")
        assert breaker() == "open"  # still failing: it stays open
        fleet.primary.clear()
        wait_until(lambda: breaker() == "closed", 10, "the probe closing the breaker")
        probes = [r for r in fleet.primary.requests("/api/chat")
                  if r["payload"].get("options", {}).get("num_predict") == 1]
        assert probes, "the probe asked for one token"
        assert chat(server, "qwq:32b").model == "qwq:32b"
    finally:
        server.stop()


def test_the_model_auto_picks_is_kept_loaded_on_ollama(fleet: Fleet) -> None:
    server = start_gateway(one_ollama(fleet, monitor=QUICK))
    ps = fleet.primary.api_url.removesuffix("/v1") + "/api/ps"

    def loaded() -> list[str]:
        with urllib.request.urlopen(ps, timeout=5) as response:
            return [m["name"] for m in json.loads(response.read())["models"]]

    try:
        wait_until(lambda: "qwq:32b" in loaded(), 10, "auto's pick loaded")
        # Ollama unloads it (its keep_alive ran out): it is loaded again.
        request = urllib.request.Request(
            fleet.primary.api_url.removesuffix("/v1") + "/api/generate",
            data=json.dumps({"model": "qwq:32b", "keep_alive": 0}).encode(), method="POST")
        urllib.request.urlopen(request, timeout=5).read()
        assert "qwq:32b" not in loaded()
        wait_until(lambda: "qwq:32b" in loaded(), 10, "auto's pick loaded again")
        warmed = healing(server, "keep_warm")
        assert all(a["outcome"] == "ok" for a in warmed) and len(warmed) >= 2
        assert "unloaded meanwhile" in warmed[0]["detail"]  # so it backs off from now on
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as response:
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(response.read().decode())
                       for s in family.samples}
        assert samples[("gateway_healing_actions_total",
                        (("action", "keep_warm"), ("outcome", "ok")))] >= 2
    finally:
        server.stop()


def test_alerts_fire_once_and_resolve_once_in_every_sink(
    fleet: Fleet, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = Receiver(failing=2)  # the webhook fails twice: retried with backoff
    monkeypatch.setenv("GW_TEST_SLACK_URL", receiver.url + "/slack")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:secret-token")
    monkeypatch.setenv("TELEGRAM_CHAT_ID", "42")
    monkeypatch.setenv("TELEGRAM_API_URL", receiver.url + "/telegram")
    server = start_gateway(one_ollama(fleet, monitor={
        **QUICK, "alerts": [{"kind": "backend_down", "after": 0.3}],
        "sinks": [{"kind": "log"}, {"kind": "webhook", "url": flaky.url + "/hook"},
                  {"kind": "slack", "url_env": "GW_TEST_SLACK_URL"}, {"kind": "telegram"}]}))
    try:
        fleet.threads["primary"].stop()
        wait_until(lambda: len(receiver.posts) >= 2 and flaky.posts, 20, "the alert sent")
        # Requests meanwhile are answered at once (an error: nothing can serve them).
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError):
            chat(server, "qwq:32b")
        assert time.monotonic() - started < 2
        fleet.restart("primary", lambda: create_ollama_app(host_models()))
        wait_until(lambda: len(receiver.posts) >= 4 and len(flaky.posts) >= 2, 20,
                   "the alert resolved")
        time.sleep(1.0)  # nothing more comes
    finally:
        server.stop()
        flaky.server.stop()
    hooks = [body for _, body in flaky.posts]
    assert [[a["status"] for a in h["alerts"]] for h in hooks] == [["firing"], ["resolved"]]
    assert hooks[0]["alerts"][0]["kind"] == "backend_down"
    assert hooks[0]["alerts"][0]["target"] == "primary"
    slack = [body["text"] for path, body in receiver.posts if path == "/slack"]
    telegram = [(path, body) for path, body in receiver.posts if path.startswith("/telegram")]
    assert len(slack) == 2 and "backend primary has been down" in slack[0]
    assert "RESOLVED" in slack[1]
    assert [p for p, _ in telegram] == ["/telegram/bot123:secret-token/sendMessage"] * 2
    assert telegram[0][1]["chat_id"] == "42"


@pytest.mark.parametrize("use", ["cache", "routing", "tasks"])
def test_redis_that_stops_answering_is_an_alert(receiver: Receiver, fleet: Fleet,
                                                use: str) -> None:
    """Whatever the gateway uses it for (the shared routing state's and the task queue's
    went unwatched)."""
    with RedisServer() as redis:
        uses: dict[str, Any] = {
            "cache": {"plugins": [{"name": "cache", "options": {"backend": "redis",
                                                                "redis_url": redis.url}}]},
            "routing": {"routing": {"redis_url": redis.url}},
            "tasks": {"tasks": {"queue": "redis", "redis_url": redis.url}}}[use]
        server = start_gateway(one_ollama(
            fleet, monitor={**QUICK, "alerts": [{"kind": "redis_down", "after": 0.2}],
                            "sinks": [{"kind": "webhook", "url": receiver.url + "/hook"}]},
            **uses))
        try:
            time.sleep(0.5)
            assert receiver.posts == []
            redis.kill()
            wait_until(lambda: receiver.posts, 15, "the Redis alert")
            alert = receiver.posts[0][1]["alerts"][0]
            assert alert["kind"] == "redis_down" and alert["status"] == "firing"
            assert f"127.0.0.1:{redis.port}/0" in alert["summary"]
            assert chat(server).model == "qwq:32b"  # answers go on, uncached
            redis.start()
            # (its end was lost where notices are claimed in that Redis: it never knew)
            wait_until(lambda: len(receiver.posts) >= 2, 15, "the Redis alert ended")
            assert receiver.posts[1][1]["alerts"][0]["status"] == "resolved"
        finally:
            server.stop()


def alerted(receiver: Receiver) -> list[tuple[str, str]]:
    return [(a["status"], a["target"]) for _, body in receiver.posts for a in body["alerts"]]


def test_an_optional_backend_that_is_not_there_is_absent_not_down(
        fleet: Fleet, receiver: Receiver) -> None:
    """The shipped config's local servers, either of which may be missing: it raised a
    backend_down alert that never ended, and /health said "degraded" for good. Once it has
    answered, its going away is an alert as any backend's.
    """
    late = free_port()
    mlx = backend("mlx", "openai", f"http://127.0.0.1:{late}/v1", optional=True, timeouts=FAST)
    routing = {"health_interval": 0.2, "retries": 0}
    monitor = {**QUICK, "alerts": [{"kind": "backend_down", "after": 0.3}],
               "sinks": [{"kind": "webhook", "url": receiver.url + "/hook"}]}
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST), mlx,
        routing=routing, monitor=monitor))
    try:
        wait_until(lambda: get(server.url + "/admin/status")[1]["backends"]["mlx"]["probe"]
                   is False, 10, "the missing server probed")
        assert get(server.url + "/health")[1]["status"] == "ok"
        time.sleep(1.0)
        assert receiver.posts == []
        assert get(server.url + "/admin/status")[1]["backends"]["mlx"]["absent"]
        with ServerThread(lambda: create_openai_app([SimModel("smol:135m")]), port=late):
            wait_until(lambda: get(server.url + "/admin/status")[1]["backends"]["mlx"]["up"],
                       10, "the optional server seen once it is there")
        wait_until(lambda: ("firing", "mlx") in alerted(receiver), 10, "its going away alerted")
        status = get(server.url + "/admin/status")[1]["backends"]["mlx"]
        assert (status["up"], status["absent"]) == (False, False)
        assert get(server.url + "/health")[1]["status"] == "degraded"
    finally:
        server.stop()
    # A backend that must be there is down all the same.
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        backend("spare", "ollama", f"http://127.0.0.1:{free_port()}", timeouts=FAST),
        routing=routing, monitor=monitor))
    try:
        wait_until(lambda: ("firing", "spare") in alerted(receiver), 10, "the spare alerted")
        assert get(server.url + "/health")[1]["status"] == "degraded"
    finally:
        server.stop()


def test_two_sinks_of_one_kind_are_told_apart(fleet: Fleet, receiver: Receiver) -> None:
    server = start_gateway(one_ollama(fleet, monitor={
        **QUICK, "alerts": [{"kind": "backend_down", "after": 0.3}],
        "sinks": [{"kind": "webhook", "url": receiver.url + "/hook"},
                  {"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/hook"}]}))
    try:
        fleet.threads["primary"].stop()
        wait_until(lambda: get(server.url + "/admin/status")[1]["alerts"]["sinks"]["failed"]
                   .get("webhook 2"), 15, "the dead webhook tried")
        sinks = get(server.url + "/admin/status")[1]["alerts"]["sinks"]
        assert sinks["sent"] == {"webhook": 1, "webhook 2": 0}
        assert sinks["failed"]["webhook"] == 0
    finally:
        server.stop()


def test_a_notice_waiting_for_its_group_goes_out_as_the_gateway_stops(
        fleet: Fleet, receiver: Receiver) -> None:
    server = start_gateway(one_ollama(fleet, monitor={
        **QUICK, "group_window": 60, "alerts": [{"kind": "backend_down", "after": 0.3}],
        "sinks": [{"kind": "webhook", "url": receiver.url + "/hook"}]}))
    try:
        fleet.threads["primary"].stop()
        wait_until(lambda: get(server.url + "/admin/status")[1]["alerts"]["firing"], 10,
                   "the alert")
        assert receiver.posts == []  # (waiting for the others of its group)
    finally:
        server.stop()
    assert alerted(receiver) == [("firing", "primary")]


def test_rules_on_traffic_without_metrics_are_said_to_be_blind(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    server = start_gateway(one_ollama(fleet, telemetry={"metrics": False}, monitor={
        **QUICK, "alerts": [{"kind": "error_rate", "over": 0.5}, {"kind": "backend_down"}]}))
    server.stop()
    assert "error_rate judge the traffic, which is not counted with [telemetry] metrics = " \
        "false: they never fire" in caplog.text


def test_every_request_is_one_line_in_the_request_log(fleet: Fleet, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    server = start_gateway(one_ollama(
        fleet, telemetry={"request_log": str(log)}, plugins=[{"name": "safety"}, {"name": "qa"}],
        keys=[{"id": "ide", "hash": digest, "name": "ide"}]))
    try:
        client = openai_client(server.url, KEY)
        client.chat.completions.create(model="auto", messages=[  # type: ignore[arg-type]
            {"role": "user", "content": "Hello, my key is sk-proj-Ab3dEf9hIjKl2mNoPqRs7tUvWx"}])
        list(client.chat.completions.create(model="qwq:32b", messages=USER, stream=True))
        with pytest.raises(openai.NotFoundError):
            chat(server, "no-such-model", key=KEY)
        get(server.url + "/health")  # not a model request: not logged
    finally:
        server.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["model"], r["served"], r["status"], r["stream"]) for r in lines] == [
        ("auto", "qwq:32b", 200, False), ("qwq:32b", "qwq:32b", 200, True),
        ("no-such-model", "", 404, False)]
    first = lines[0]
    assert first["tenant"] == "ide" and first["door"] == "openai"
    assert first["backend"] == "primary" and first["attempts"] == 1
    assert first["output_tokens"] > 0 and first["ttft_ms"] >= 0 and first["ms"] > 0
    assert first["qa"] == lines[1]["qa"] == "pass"  # the stream's late verdict too
    assert first["safety"] == "redacted=api_key" and "safety" not in lines[1]  # (the request's)
    assert lines[2]["error"] == "model_not_found"
    text = log.read_text()
    assert KEY not in text and "Hello" not in text  # never a key or a prompt
    assert "Ab3dEf9h" not in text


def test_a_stream_that_broke_off_or_that_its_client_left_is_recorded_as_such(
        fleet: Fleet, tmp_path: Path) -> None:
    """Their status went out as 200 before the answer; the records say how they ended: the
    in-band error's status, or 499 for the client that left. (Both were a 200 in the
    metrics and the log, or nowhere at all, and the attempt that broke off counted as an
    answer and a failure both, so an error-rate alert saw half the failures.)
    """
    log = tmp_path / "requests.jsonl"
    server = start_gateway(one_ollama(fleet, telemetry={"request_log": str(log)}))
    try:
        fleet.primary.fault("qwq:32b", cut_after=3)
        client = openai_client(server.url, "x")
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(model="qwq:32b", messages=USER, stream=True))
        fleet.primary.fault("qwq:32b", tokens_per_s=5)  # long enough to leave in the middle
        with urllib.request.urlopen(urllib.request.Request(
                server.url + "/v1/chat/completions", method="POST",
                headers={"Content-Type": "application/json"},
                data=json.dumps({"model": "qwq:32b", "messages": USER,
                                 "stream": True}).encode()), timeout=10) as response:
            assert response.readline().startswith(b"data: ")
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 2, 10,
                   "both requests in the log")
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as scraped:
            text = scraped.read().decode()
    finally:
        server.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["status"], r["error"], r["served"]) for r in lines] == [
        (502, "upstream_error", "qwq:32b"), (499, "client_closed", "qwq:32b")]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def counted(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    requests = "gateway_requests_total"
    assert counted(requests, door="openai", status="502", model="qwq:32b") == 1
    assert counted(requests, door="openai", status="499", model="qwq:32b") == 1
    assert counted(requests, door="openai", status="200", model="qwq:32b") == 0
    attempts = {dict(labels)["outcome"]: n for (name, labels), n in samples.items()
                if name == "gateway_attempts_total"}
    assert attempts == {"upstream_error": 1, "client_closed": 1}  # one outcome an attempt


def test_a_sink_that_never_answers_holds_nothing_up(fleet: Fleet) -> None:
    hang = web.Application()

    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    hang.router.add_post("/", never)
    silent = ServerThread(lambda: hang).start()
    server = start_gateway(one_ollama(fleet, monitor={
        **QUICK, "alerts": [{"kind": "backend_down", "after": 0.0}],
        "sinks": [{"kind": "webhook", "url": silent.url + "/", "timeout": 30}]}))
    try:
        fleet.threads["primary"].stop()
        wait_until(lambda: get(server.url + "/admin/status")[1]["alerts"]["firing"], 10,
                   "the alert firing (its delivery hangs)")
        fleet.restart("primary", lambda: create_ollama_app(host_models()))
        wait_until(lambda: get(server.url + "/ready")[0] == 200, 10, "the backend back")
        started = time.monotonic()
        for _ in range(5):
            assert chat(server).model == "qwq:32b"
        assert time.monotonic() - started < 5
    finally:
        stopping = time.monotonic()
        server.stop()
        assert time.monotonic() - stopping < 8  # shutdown does not wait on the sink
        silent.stop()


def test_error_rate_counts_the_backends_faults_not_refused_requests(
    fleet: Fleet, receiver: Receiver
) -> None:
    server = start_gateway(one_ollama(fleet, monitor={
        **QUICK, "alerts": [{"kind": "error_rate", "over": 0.2, "window": 30.0,
                             "min_requests": 4}],
        "sinks": [{"kind": "webhook", "url": receiver.url + "/hook"}]}))
    try:
        fleet.primary.fault("qwq:32b", content_policy=True)  # the request's fault
        for _ in range(5):
            with pytest.raises(openai.BadRequestError):
                chat(server, "qwq:32b")
        time.sleep(2.5)  # a few samples and rounds
        assert receiver.posts == []
        fleet.primary.fault("qwen2.5-coder:32b", status=500)  # the backend's
        for _ in range(5):
            with pytest.raises(openai.InternalServerError):
                chat(server, "qwen2.5-coder:32b")
        wait_until(lambda: receiver.posts, 10, "the error-rate alert")
        alert = receiver.posts[0][1]["alerts"][0]
        assert alert["kind"] == "error_rate" and alert["target"] == "primary"
        assert "attempts failed" in alert["summary"]
    finally:
        server.stop()
