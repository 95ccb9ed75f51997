"""OpenAI's wire format, exactly, as real clients found it: the tutorial loops work with the
shipped plugins on, tool-call deltas carry null content, models say when they were made,
404s are typed as OpenAI types them, token ids can be embedded, and browsers may call in
when the config allows their origin.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.sim import SimModel, create_openai_app
from gateway.sim.fleet import DEFAULT_REPLY
from tests.support import ServerThread, Sim, backend, gateway_config, run_node, start_gateway

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PLUGINS = tomllib.loads((ROOT / "configs" / "gateway.toml").read_text())["plugins"]
USER = [{"role": "user", "content": "Hello there"}]
EMBEDDER = "text-embedding-3-small"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


@pytest.fixture
def shipped(ollama_sim: Sim, mlx_sim: Sim) -> Iterator[ServerThread]:
    """The gateway with the plugins configs/gateway.toml ships (safety, QA, cache)."""
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                          backend("mlx", "openai", mlx_sim.api_url),
                                          plugins=SHIPPED_PLUGINS))
    yield server
    server.stop()


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("model", ["qwen2.5-coder:32b", "command-r-plus:104b"])
def test_the_python_tutorial_loop_works_with_the_shipped_plugins(shipped: ServerThread,
                                                                 model: str) -> None:
    with openai.OpenAI(base_url=shipped.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(model=model, messages=USER, stream=True)
        text = ""
        for chunk in stream:  # as OpenAI's tutorials write it: every chunk has a choice
            text += chunk.choices[0].delta.content or ""
    assert text == DEFAULT_REPLY


def test_the_node_tutorial_loop_works_with_the_shipped_plugins(shipped: ServerThread) -> None:
    assert run_node("openai_loop.mjs", shipped.url + "/v1", "qwen2.5-coder:32b") == \
        DEFAULT_REPLY


async def test_the_verdict_rides_in_a_comment_and_usage_only_when_asked(
        shipped: ServerThread) -> None:
    body = {"model": "phi3.5:3.8b", "messages": USER, "stream": True}
    async with aiohttp.ClientSession() as http, \
            http.post(shipped.url + "/v1/chat/completions", json=body) as response:
        lines = [line for line in (await response.text()).splitlines() if line]
    events = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
    assert all(e["choices"] for e in events)
    assert lines[-2:] == [": x-gateway-qa: pass", "data: [DONE]"]


async def test_tool_call_deltas_carry_null_content(gateway: ServerThread) -> None:
    body = {"model": "qwen2.5-coder:32b", "stream": True, "tools": [WEATHER_TOOL],
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    async with aiohttp.ClientSession() as http, \
            http.post(gateway.url + "/v1/chat/completions", json=body) as response:
        text = await response.text()
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in text.splitlines()
              if line.startswith("data: {")]
    calls = [d for d in deltas if d.get("tool_calls")]
    assert calls, "the simulator answers a tool request with a tool call"
    assert all("content" in d and d["content"] is None for d in calls)


def test_models_say_when_they_were_made(client: openai.OpenAI, ollama_sim: Sim) -> None:
    made = {m["name"]: m["modified_at"] for m in ollama_sim._call("GET", "/api/tags")["models"]}
    models = {m.id: m for m in client.models.list()}
    stamp = made["qwq:32b"]  # "2026-10-01T12:00:00.000000000Z"
    assert models["qwq:32b"].created == calendar.timegm(time.strptime(stamp[:19],
                                                                      "%Y-%m-%dT%H:%M:%S"))
    assert 0 < models["auto"].created <= time.time()
    assert 0 < models["command-r-plus:104b"].created <= time.time()  # MLX says "now"


def test_a_models_time_holds_from_one_scan_to_the_next_and_each_id_is_listed_once(
        ollama_sim: Sim, mlx_sim: Sim) -> None:
    """mlx_lm's server says "now" as every model's time: the MLX models' ``created`` moved
    on at each scan. An alias named as a model was listed twice (the model, the alias),
    and the name asks the alias.
    """
    gateway = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url),
        server={"discovery_interval": 0.5},
        aliases={"qwq:32b": {"priority": {"ollama": ["phi3.5:3.8b"]}}}))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
            first = {m.id: m.created for m in c.models.list()}
            time.sleep(2.1)  # scans, a second or two later
            listed = list(c.models.list())
        assert {m.id: m.created for m in listed} == first
        assert len([m.id for m in listed]) == len(first)
        assert [m.owned_by for m in listed if m.id == "qwq:32b"] == ["gateway"]
    finally:
        gateway.stop()


def test_an_unknown_model_is_an_invalid_request_with_model_not_found(
        client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert caught.value.type == "invalid_request_error"
    assert caught.value.code == "model_not_found"


@pytest.fixture(scope="module")
def embedder() -> Iterator[ServerThread]:
    model = SimModel(EMBEDDER, capabilities=("embedding",), embedding_length=8)
    with ServerThread(lambda: create_openai_app([model], flavor="openai")) as server:
        yield server


@pytest.fixture
def embedding_client(embedder: ServerThread, ollama_sim: Sim) -> Iterator[openai.OpenAI]:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("cloud", "openai", embedder.url + "/v1", tier="cloud", models=[EMBEDDER])))
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c
    server.stop()


def test_token_ids_are_embedded_by_a_backend_that_takes_them(
        embedding_client: openai.OpenAI) -> None:
    one = embedding_client.embeddings.create(model=EMBEDDER, input=[1, 2, 3])
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8
    assert one.usage.prompt_tokens == 3
    two = embedding_client.embeddings.create(model=EMBEDDER, input=[[1, 2], [3, 4, 5]])
    assert [d.index for d in two.data] == [0, 1]
    assert two.data[0].embedding != two.data[1].embedding


def test_token_ids_to_a_text_only_backend_are_a_clear_400(
        embedding_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        embedding_client.embeddings.create(model="nomic-embed-text", input=[[1, 2]])
    assert "embeds text only" in caught.value.message
    assert caught.value.param == "input"


@pytest.mark.parametrize("bad", [[], [1, "two"], [True, False], [-1], [[]], [[1], "x"], 3])
def test_inputs_that_are_neither_texts_nor_token_ids_are_a_400(
        embedding_client: openai.OpenAI, bad: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        embedding_client.embeddings.create(model=EMBEDDER, input=bad)
    assert caught.value.param == "input"


PREFLIGHT = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


async def test_cors_is_off_unless_configured(gateway: ServerThread) -> None:
    async with aiohttp.ClientSession() as http, \
            http.options(gateway.url + "/v1/chat/completions", headers=PREFLIGHT) as response:
        assert response.status == 405
        assert "Access-Control-Allow-Origin" not in response.headers


@pytest.fixture
def browser_gateway(ollama_sim: Sim) -> Iterator[ServerThread]:
    key = "sk-browser-app"
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        server={"cors_origins": ["http://localhost:5173"]},
        auth={"key_hashes": [hashlib.sha256(key.encode()).hexdigest()]}))
    yield server
    server.stop()


async def test_an_allowed_origin_gets_its_preflight_and_its_answers(
        browser_gateway: ServerThread) -> None:
    url = browser_gateway.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        async with http.options(url, headers=PREFLIGHT) as preflight:  # no key: browsers
            assert preflight.status == 204                          # send none here
            assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
            # (PATCH: a page's admin changing a key, /admin/keys/{id})
            assert {"POST", "PATCH", "DELETE"} <= set(
                preflight.headers["Access-Control-Allow-Methods"].split(", "))
            assert preflight.headers["Access-Control-Allow-Headers"] == \
                "authorization, content-type"
        headers = {"Origin": "http://localhost:5173", "Authorization": "Bearer sk-browser-app"}
        for stream in (False, True):
            body = {"model": "phi3.5:3.8b", "messages": USER, "stream": stream}
            async with http.post(url, json=body, headers=headers) as response:
                await response.read()
                assert response.status == 200
                assert response.headers["Access-Control-Allow-Origin"] == \
                    "http://localhost:5173"
                exposed = response.headers["Access-Control-Expose-Headers"].split(", ")
                assert {"x-gateway-model", "x-request-id", "request-id", "retry-after",
                        "x-ratelimit-remaining-tokens", "x-gateway-worker"} <= set(exposed)
        async with http.post(url, json={"model": "x", "messages": USER},
                             headers={"Origin": "http://localhost:5173"}) as refused:
            assert refused.status == 401  # errors reach the page too, readable
            assert refused.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


async def test_another_origin_gets_no_cors_headers(browser_gateway: ServerThread) -> None:
    headers = {**PREFLIGHT, "Origin": "https://evil.example"}
    async with aiohttp.ClientSession() as http, \
            http.options(browser_gateway.url + "/v1/chat/completions",
                         headers=headers) as preflight:
        assert "Access-Control-Allow-Origin" not in preflight.headers


async def test_a_web_page_elsewhere_cannot_make_a_keyless_gateway_generate(
        gateway: ServerThread, ollama_sim: Sim) -> None:
    # A form on any site can POST text/plain without a preflight; the gateway refuses it.
    form = json.dumps({"model": "phi3.5:3.8b", "messages": USER})
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions", data=form,
            headers={"Origin": "https://evil.example", "Content-Type": "text/plain"}) as refused:
        assert refused.status == 403
        assert (await refused.json())["error"]["code"] == "origin_not_allowed"
    assert ollama_sim.requests("/api/chat") == []
    for origin in ("http://localhost:5173", "vscode-webview://1a2b3c"):  # this machine's
        async with aiohttp.ClientSession() as http, http.post(
                gateway.url + "/v1/chat/completions", data=form,
                headers={"Origin": origin}) as allowed:
            assert allowed.status == 200


async def test_a_keyless_gateway_on_loopback_answers_only_loopback_names(
        gateway: ServerThread) -> None:
    # A page that rebinds its own name to 127.0.0.1 sends its own name as the Host.
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/api/tags",
                            headers={"Host": "attacker.example:4000"}) as rebound:
            assert rebound.status == 403
            assert "localhost" in (await rebound.json())["error"]
        async with http.get(gateway.url + "/api/tags",
                            headers={"Host": "localhost:4000"}) as local:
            assert local.status == 200


async def test_a_gateway_with_keys_takes_any_host(browser_gateway: ServerThread) -> None:
    async with aiohttp.ClientSession() as http, http.get(
            browser_gateway.url + "/v1/models",
            headers={"Host": "gateway.internal", "Authorization": "Bearer sk-browser-app"}
    ) as response:
        assert response.status == 200  # the key protects it; a proxy may rename it
