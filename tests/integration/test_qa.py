"""Quality assurance: simulated models that answer empty, loop, break JSON, stop short or
refuse; the gateway takes the request to a stronger model, a bounded number of times, and
says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.sim import SimModel, create_ollama_app, create_openai_app
from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

SMALL, BIG, CLOUD = "small:1b", "big:70b", "gpt-4o-mini"
LOOP = "I will check the logs. " * 30
SCHEMA = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "population": {
        "type": "integer"}}, "required": ["name", "population"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def sims() -> Iterator[tuple[Sim, Sim]]:
    models = [SimModel(SMALL, parameter_size="1.2B"), SimModel(BIG, parameter_size="70.6B")]
    with ServerThread(lambda: create_ollama_app(models)) as local, \
            ServerThread(lambda: create_openai_app([SimModel(CLOUD)], flavor="openai")) as cloud:
        yield Sim(local, "ollama"), Sim(cloud, "openai")


@pytest.fixture
def local(sims: tuple[Sim, Sim]) -> Iterator[Sim]:
    for sim in sims:
        sim.clear()
    yield sims[0]
    for sim in sims:
        sim.clear()


@pytest.fixture
def cloud(sims: tuple[Sim, Sim], local: Sim) -> Sim:
    return sims[1]


def qa_gateway(local: Sim, cloud: Sim, max_escalations: int = 1, **options: Any
               ) -> ServerThread:
    return start_gateway(gateway_config(
        backend("local", "ollama", local.api_url),
        backend("cloud", "openai", cloud.api_url, tier="cloud", models=[CLOUD]),
        routing={"max_escalations": max_escalations},
        plugins=[{"name": "qa", "options": options}]))


@pytest.fixture
def gateway(local: Sim, cloud: Sim) -> Iterator[ServerThread]:
    server = qa_gateway(local, cloud)
    yield server
    server.stop()


def chat(server: ServerThread, content: str = "Hello", **extra: Any) -> tuple[Any, Any]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=extra.pop("model", SMALL), messages=[{"role": "user", "content": content}],
            **extra)
        return raw.parse(), raw.headers


def asked(sim: Sim) -> list[str]:
    path = "/api/chat" if sim.kind == "ollama" else "/v1/chat/completions"
    return [r["model"] for r in sim.requests(path)]


@pytest.mark.parametrize(("fault", "reason"), [
    ({"reply": ""}, "empty"),
    ({"reply": LOOP}, "repetition"),
    ({"finish": "length"}, "length"),
    ({"reply": "I'm sorry, but I can't help with that."}, "refusal"),
])
def test_a_poor_answer_is_taken_to_a_stronger_model(gateway: ServerThread, local: Sim,
                                                    fault: dict[str, Any], reason: str) -> None:
    local.fault(SMALL, **fault)
    body, headers = chat(gateway)
    assert body.model == BIG and headers["x-gateway-model"] == BIG
    assert body.choices[0].message.content and body.choices[0].finish_reason == "stop"
    assert headers["x-gateway-escalated"] == f"{SMALL} ({reason})"
    assert headers["x-gateway-qa"] == "pass"
    assert asked(local) == [SMALL, BIG]


def test_broken_json_is_taken_to_a_stronger_model(gateway: ServerThread, local: Sim) -> None:
    local.fault(SMALL, reply='{"name": "Oslo", "population": ')
    body, headers = chat(gateway, response_format={"type": "json_object"})
    assert body.model == BIG
    assert isinstance(json.loads(body.choices[0].message.content), dict)
    assert headers["x-gateway-escalated"] == f"{SMALL} (json (not valid JSON))"


def test_json_that_breaks_the_schema_is_taken_to_a_stronger_model(gateway: ServerThread,
                                                                  local: Sim) -> None:
    local.fault(SMALL, reply='{"name": "Oslo"}')
    body, headers = chat(gateway, response_format=SCHEMA)
    assert body.model == BIG
    answer = json.loads(body.choices[0].message.content)
    assert set(answer) == {"name", "population"}
    assert "population is missing" in headers["x-gateway-escalated"]


def test_a_good_answer_is_not_escalated(gateway: ServerThread, local: Sim) -> None:
    body, headers = chat(gateway, response_format=SCHEMA)
    assert body.model == SMALL and headers["x-gateway-qa"] == "pass"
    assert "x-gateway-escalated" not in headers
    # cut by the client's own limit: what it asked for
    body, headers = chat(gateway, max_tokens=2)
    assert body.choices[0].finish_reason == "length" and headers["x-gateway-qa"] == "pass"
    assert asked(local) == [SMALL, SMALL]


def test_an_escalated_request_spends_both_answers_of_the_keys_budget(local: Sim,
                                                                      cloud: Sim) -> None:
    """The answer found wanting was asked for and paid for too: the key's budget counts its
    tokens (it counted the stronger answer's alone, some 36 of the 100 here).
    """
    secret = "gw-test-escalating-key-0123456789"
    server = start_gateway(gateway_config(
        backend("local", "ollama", local.api_url),
        keys=[{"id": "k", "hash": hashlib.sha256(secret.encode()).hexdigest(),
               "budget": 100, "budget_period": "month"}],
        plugins=[{"name": "qa"}]))
    try:
        local.fault(SMALL, reply=LOOP)  # some 150 tokens, then the stronger model's 31
        with openai.OpenAI(base_url=server.url + "/v1", api_key=secret,
                           max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=SMALL, messages=[{"role": "user", "content": "Hello"}])
            assert raw.headers["x-gateway-escalated"] == f"{SMALL} (repetition)"
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(
                    model=SMALL, messages=[{"role": "user", "content": "Hello"}])
        assert caught.value.body["code"] == "budget_limit_exceeded"  # type: ignore[index]
    finally:
        server.stop()


def test_escalation_is_bounded(local: Sim, cloud: Sim) -> None:
    for sim, model in ((local, SMALL), (local, BIG), (cloud, CLOUD)):
        sim.fault(model, reply="")
    for limit, expected in ((1, [SMALL, BIG]), (2, [SMALL, BIG, CLOUD]),
                            (5, [SMALL, BIG, CLOUD])):
        server = qa_gateway(local, cloud, max_escalations=limit)
        try:
            body, headers = chat(server)
        finally:
            server.stop()
        assert asked(local) + asked(cloud) == expected
        assert body.model == expected[-1]  # the last answer stands, verdict and all
        assert headers["x-gateway-qa"] == "fail: empty"
        for sim in (local, cloud):
            sim._call("DELETE", "/_sim/requests")


def test_the_cloud_is_the_last_resort(gateway: ServerThread, local: Sim, cloud: Sim) -> None:
    local.fault(BIG, reply="")
    body, headers = chat(gateway, model=BIG)
    assert body.model == CLOUD
    assert headers["x-gateway-escalated"] == f"{BIG} (empty)"


def test_escalation_can_be_turned_off(local: Sim, cloud: Sim) -> None:
    local.fault(SMALL, reply="")
    server = qa_gateway(local, cloud, escalate=False)
    try:
        body, headers = chat(server)
    finally:
        server.stop()
    assert body.model == SMALL and headers["x-gateway-qa"] == "fail: empty"
    assert asked(local) == [SMALL]


def sse_lines(server: ServerThread, body: dict[str, Any]) -> tuple[list[str], Any]:
    """The lines of an event stream, blank ones left out."""
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [line for line in response.read().decode().splitlines() if line], \
            response.headers


def test_a_json_stream_is_buffered_checked_and_escalated(gateway: ServerThread,
                                                         local: Sim) -> None:
    local.fault(SMALL, reply='{"name": ')
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=SMALL, messages=[{"role": "user", "content": "A city, as JSON"}],
            response_format={"type": "json_object"}, stream=True)
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)  # the client never saw the broken JSON
    assert {c.model for c in chunks} == {BIG}
    assert raw.headers["x-gateway-escalated"] == f"{SMALL} (json (not valid JSON))"


def test_a_plain_stream_carries_its_verdict_in_a_comment_before_done(
        gateway: ServerThread, local: Sim) -> None:
    local.fault(SMALL, reply=LOOP)
    lines, _ = sse_lines(gateway, {"model": SMALL, "stream": True,
                                   "messages": [{"role": "user", "content": "Hi"}]})
    events = [json.loads(line[6:]) for line in lines
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == LOOP
    # Streamed as it came (too late to escalate); no event without choices was asked for.
    assert all(e["choices"] for e in events)
    assert lines[-2:] == [": x-gateway-qa: fail: repetition", "data: [DONE]"]
    assert asked(local) == [SMALL]


def test_verdicts_are_counted_per_deployment(gateway: ServerThread, local: Sim) -> None:
    local.fault(SMALL, reply="", remaining=1)
    chat(gateway)
    chat(gateway)
    with urllib.request.urlopen(gateway.url + "/health", timeout=5) as response:
        deployments = json.loads(response.read())["deployments"]
    assert deployments[f"local/{SMALL}"]["verdicts"] == {"pass": 1, "fail": 1, "empty": 1}
    assert deployments[f"local/{BIG}"]["verdicts"] == {"pass": 1}


def test_a_failing_answer_is_not_cached(local: Sim, cloud: Sim) -> None:
    local.fault(SMALL, reply="")
    server = start_gateway(gateway_config(
        backend("local", "ollama", local.api_url),
        routing={"max_escalations": 0},
        plugins=[{"name": "qa"}, {"name": "cache"}]))
    try:
        for _ in range(2):
            _, headers = chat(server, temperature=0)
            assert headers["x-gateway-cache"] == "miss"
        local.clear()
        chat(server, temperature=0)
        _, headers = chat(server, temperature=0)
        assert headers["x-gateway-cache"] == "hit"
    finally:
        server.stop()


def test_when_the_stronger_model_fails_the_first_answer_stands_and_says_so(
        gateway: ServerThread, local: Sim, cloud: Sim) -> None:
    local.fault(SMALL, reply="")
    local.fault(BIG, status=500)
    cloud.fault(CLOUD, status=500)
    body, headers = chat(gateway)
    assert body.model == SMALL and body.choices[0].message.content == ""
    assert headers["x-gateway-qa"] == "fail: empty"
    assert headers["x-gateway-escalated"].startswith(
        f"{SMALL} (empty); the stronger model failed (")
    assert asked(local)[:2] == [SMALL, BIG]


def test_identical_requests_waiting_on_an_escalated_one_get_the_stronger_answer(
        local: Sim, cloud: Sim) -> None:
    """Ten identical requests at once: one asks the small model, which answers empty; it is
    taken to the big one, and all ten get the big model's answer from that one call each.
    """
    local.fault(SMALL, reply="", latency=0.3)
    server = start_gateway(gateway_config(
        backend("local", "ollama", local.api_url),
        plugins=[{"name": "qa"}, {"name": "cache"}]))

    async def burst() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                      max_retries=0, timeout=30) as client:
            async def one() -> tuple[str, str]:
                answer = await client.chat.completions.create(
                    model=SMALL, temperature=0,
                    messages=[{"role": "user", "content": "Name a fjord"}])
                return answer.model, answer.choices[0].message.content or ""
            return await asyncio.gather(*(one() for _ in range(10)))

    try:
        answers = asyncio.run(burst())
    finally:
        server.stop()
    assert {model for model, _ in answers} == {BIG}
    assert len({text for _, text in answers}) == 1 and answers[0][1]
    assert asked(local) == [SMALL, BIG]


def test_an_escalated_alias_request_counts_one_pick(local: Sim, cloud: Sim) -> None:
    """``gateway_alias_picks_total`` says what each alias picked: the answer set aside for a
    stronger model's was the pick, the escalation is counted as such (it counted two)."""
    server = start_gateway(gateway_config(
        backend("local", "ollama", local.api_url),
        routing={"max_escalations": 1},
        aliases={"pick:small": {"priority": {"any": [SMALL, BIG]}}},
        plugins=[{"name": "qa"}]))
    try:
        local.fault(SMALL, reply="")
        body, headers = chat(server, model="pick:small")
        assert body.model == BIG and headers["x-gateway-escalated"] == f"{SMALL} (empty)"
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as scraped:
            text = scraped.read().decode()
    finally:
        server.stop()
    picks = {tuple(sorted(s.labels.items())): s.value
             for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == "gateway_alias_picks_total"}
    assert picks == {(("alias", "pick:small"), ("gen_ai_response_model", SMALL)): 1.0}, picks


def test_an_image_is_escalated_to_a_model_known_to_see_before_one_presumed_to() -> None:
    """The next larger model was asked first, one whose vision was only presumed (an
    OpenAI-compatible server says only names): a call to hear it could not, though a larger
    model known to see was there."""
    seeing = [SimModel("llava:7b", parameter_size="7.2B", capabilities=("completion", "vision")),
              SimModel("llava:120b", parameter_size="120B",
                       capabilities=("completion", "vision"))]
    pixel = "data:image/png;base64," + "iVBORw0KGgo="
    with ServerThread(lambda: create_ollama_app(seeing)) as ollama, \
            ServerThread(lambda: create_openai_app(
                [SimModel("text-only-70b", parameter_size="70B")], flavor="llamacpp")) as other:
        Sim(ollama, "ollama").fault("llava:7b", reply="")  # an empty answer: QA fails it
        server = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama.url),
            backend("other", "openai", other.url + "/v1"),
            models=[{"name": "text-only-70b", "deployments": [
                {"backend": "other", "model": "text-only-70b"}], "context_length": 8192}],
            plugins=[{"name": "qa", "options": {}}]))
        try:
            with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="llava:7b", messages=[{"role": "user", "content": [  # type: ignore[misc]
                        {"type": "text", "text": "What is it?"},
                        {"type": "image_url", "image_url": {"url": pixel}}]}])
                assert raw.parse().model == "llava:120b"
                assert "failed" not in raw.headers["x-gateway-escalated"]
            assert Sim(other, "openai").requests() == []  # (not asked, to say it cannot)
        finally:
            server.stop()
