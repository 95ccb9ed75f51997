"""Auto-selection: the seed system's priority lists on simulated hosts, and what a request
needs (images, tools, a long prompt) deciding among them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.keys import CATALOG
from gateway.sim import SimModel, create_ollama_app, create_openai_app, seed_fleet
from gateway.sim.engine import SIM_STATE
from tests.integration.conftest import Fleet
from tests.support import (
    ServerThread,
    Sim,
    backend,
    free_port,
    gateway_config,
    start_gateway,
    wait_until,
)

USER = [{"role": "user", "content": "Hello"}]
PIXEL = "data:image/png;base64," + base64.b64encode(b"\x89PNG pixel").decode()


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def picked(client: openai.OpenAI, model: str, **extra: object) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=extra.pop("messages", USER), **extra)  # type: ignore[arg-type]
    body = raw.parse()
    assert raw.headers["x-gateway-model"] == body.model
    return body.model, raw.headers["x-gateway-route"]


@pytest.mark.parametrize(("alias", "model", "route"), [
    ("auto", "qwq:32b", "auto: ollama priority #1"),
    ("auto:code", "qwen2.5-coder:32b", "auto:code: ollama priority #1"),
    ("auto:fast", "phi3.5:3.8b", "auto:fast: ollama priority #1"),
    ("auto:vision", "llava:7b", "auto:vision: available model"),
    ("auto:reasoning", "qwq:32b", "auto:reasoning: ollama priority #1"),
])
def test_aliases_pick_by_the_seed_priority_lists(
    client: openai.OpenAI, alias: str, model: str, route: str
) -> None:
    assert picked(client, alias) == (model, route)


def test_the_other_familys_best_is_next_when_the_first_pick_fails(
    client: openai.OpenAI, ollama_sim: Sim
) -> None:
    ollama_sim.fault("qwq:32b", status=500)
    assert picked(client, "auto") == ("command-r-plus:104b", "auto: mlx priority #1")


def test_without_ollama_auto_picks_from_the_mlx_list(mlx_sim: Sim) -> None:
    gateway = start_gateway(gateway_config(
        backend("ollama", "ollama", f"http://127.0.0.1:{free_port()}", optional=True),
        backend("mlx", "openai", mlx_sim.api_url)))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
            assert picked(c, "auto") == ("command-r-plus:104b", "auto: mlx priority #1")
    finally:
        gateway.stop()


def test_an_image_goes_to_a_vision_model(client: openai.OpenAI, ollama_sim: Sim) -> None:
    image = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                          {"type": "image_url", "image_url": {"url": PIXEL}}]}]
    assert picked(client, "auto", messages=image)[0] == "llava:7b"
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["messages"][0]["images"]


def test_tools_go_to_a_model_that_can_call_them(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    # auto:fast prefers phi3.5, which cannot call tools: the smallest model that can answers.
    model, _ = picked(client, "auto:fast", tools=[tool])
    assert model in ("qwen2.5-coder:32b", "qwq:32b")


def test_fill_in_the_middle_goes_to_a_model_that_can_insert(client: openai.OpenAI,
                                                           ollama_sim: Sim) -> None:
    """A suffix was no need of the request's: auto:fast tried phi3.5 first, then others
    that cannot insert either, and answered 400 "does not support insert" once its
    attempts ran out, while qwen2.5-coder, which can, was up.
    """
    raw = client.completions.with_raw_response.create(
        model="auto:fast", prompt="def add(a, b):", suffix="\nprint(add(1, 2))",
        max_tokens=20)
    assert raw.parse().model == "qwen2.5-coder:32b"
    assert raw.headers["x-gateway-attempts"] == "1"
    assert ollama_sim.requests("/api/generate")[-1]["payload"]["suffix"]


def test_an_ollama_that_does_not_say_what_models_can_do_is_asked_all_the_same() -> None:
    """An Ollama older than capabilities (before 0.6.4) says none in /api/show: its models
    are taken to generate, and picked by aliases for that alone; but a model its client names
    is asked whatever the request needs (tools were refused by the gateway, unasked).
    """
    def old_ollama() -> web.Application:
        app = create_ollama_app([SimModel("llama3.1:8b", capabilities=("completion", "tools"))])

        @web.middleware
        async def unsaid(request: web.Request, handler: Any) -> web.StreamResponse:
            response = await handler(request)
            if request.path == "/api/show":
                shown = json.loads(response.body)  # type: ignore[attr-defined]
                shown.pop("capabilities", None)
                return web.json_response(shown)
            return response  # type: ignore[no-any-return]

        app.middlewares.append(unsaid)
        return app

    with ServerThread(old_ollama) as peer:
        server = start_gateway(gateway_config(backend("old", "ollama", peer.url)))
        try:
            with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
                reply = c.chat.completions.create(model="llama3.1:8b", messages=USER, tools=[{
                    "type": "function", "function": {"name": "weather", "parameters": {
                        "type": "object", "properties": {}}}}])  # type: ignore[list-item]
            assert reply.choices[0].finish_reason in ("stop", "tool_calls")
        finally:
            server.stop()


def test_a_long_prompt_goes_to_a_model_whose_window_fits(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "word " * 35_000}]  # ~44k tokens: past qwq's 32k
    assert picked(client, "auto", messages=long) == ("phi3.5:3.8b",
                                                    "auto: ollama priority #3")


def test_the_first_long_prompt_after_a_scan_does_not_decide_for_the_next(
        client: openai.OpenAI, gateway: ServerThread) -> None:
    """An alias's picks are remembered until the models are scanned again, but not the
    length of the request that found them: every short request after a long first one
    went to the model the long one needed, until the next scan."""
    assert gateway.app is not None
    asyncio.run_coroutine_threadsafe(gateway.app[CATALOG].refresh(), gateway.loop).result(10)
    long = [{"role": "user", "content": "word " * 35_000}]
    assert picked(client, "auto", messages=long)[0] == "phi3.5:3.8b"
    assert picked(client, "auto") == ("qwq:32b", "auto: ollama priority #1")


def test_the_tools_an_agent_sends_count_in_the_length(client: openai.OpenAI) -> None:
    """An agent's tool definitions run to thousands of tokens; only the messages were
    counted, and a model whose window the whole request did not fit was picked (a real
    Ollama then cuts the prompt without a word)."""
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": "word " * 3_500,
        "parameters": {"type": "object"}}} for i in range(8)]  # ~35k tokens in all
    model, _ = picked(client, "auto", tools=tools)
    assert model == "command-r-plus:104b"  # the only model with tools and a window of 131k


def test_a_completion_limit_is_a_ceiling_not_a_need(client: openai.OpenAI) -> None:
    # An agent's standing max_tokens, far past every window, does not pass over the alias's
    # best model (nor send the request to a model whose window is not known, as if it fitted).
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert picked(client, "auto:code", tools=[tool], max_tokens=500_000) == (
        "qwen2.5-coder:32b", "auto:code: ollama priority #1")
    # The start of the answer must fit: a prompt that fills qwq's 32k window but for a few
    # hundred tokens goes to a larger one, whatever the limit says.
    near = [{"role": "user", "content": "word " * 25_900}]  # ~32.4k tokens
    assert picked(client, "auto", messages=near, max_tokens=500_000)[0] != "qwq:32b"
    assert picked(client, "auto", messages=near, max_tokens=100) == (
        "qwq:32b", "auto: ollama priority #1")


def test_aliases_are_listed_as_models(client: openai.OpenAI) -> None:
    ids = {m.id: m.owned_by for m in client.models.list()}
    assert ids["auto"] == ids["auto:code"] == "gateway"
    assert ids["qwq:32b"] == "ollama"


async def test_when_nothing_can_take_the_request_the_error_says_why(fleet: Fleet) -> None:
    gateway = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url),
        backend("secondary", "ollama", fleet.secondary.api_url)))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c, \
                pytest.raises(openai.BadRequestError) as caught:
            c.chat.completions.create(model="auto:vision", messages=USER)
    finally:
        gateway.stop()
    assert caught.value.code == "no_capable_model"
    assert "images" in caught.value.message


async def test_an_alias_or_a_model_not_served_now_is_a_503_that_says_so(fleet: Fleet) -> None:
    """An alias whose models were not listed (yet) was a 400 "no model can take this
    request", which clients do not retry; a configured model not listed was a 503 "No
    deployment of  can answer right now (their circuit breakers are open)".
    """
    gateway = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url),
        aliases={"auto:later": {"priority": {"ollama": ["llama4:400b"]}, "others": "none"}},
        models=[{"name": "coder", "deployments": [
            {"backend": "primary", "model": "not-pulled:7b"}]}]))
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
            for model, said in (("auto:later", "'auto:later'"), ("coder", "coder")):
                with pytest.raises(openai.InternalServerError) as caught:
                    c.chat.completions.create(model=model, messages=USER)
                assert caught.value.status_code == 503
                assert caught.value.response.headers["retry-after"]
                assert said in caught.value.message and "breaker" not in caught.value.message
    finally:
        gateway.stop()


def test_a_backend_with_a_strange_health_answer_does_not_stop_the_watch(fleet: Fleet) -> None:
    async def odd(request: web.Request) -> web.Response:
        return web.json_response(["not", "what", "ollama", "says"])

    def make_odd() -> web.Application:
        app = web.Application()
        app.router.add_get("/{path:.*}", odd)
        return app

    odd_server = ServerThread(make_odd).start()
    config = gateway_config(
        backend("odd", "ollama", odd_server.url),
        backend("secondary", "ollama", fleet.secondary.api_url),
        routing={"health_interval": 0.3})
    gateway = start_gateway(config)
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
            assert picked(c, "qwen2.5-coder:32b")[0] == "qwen2.5-coder:32b"
            fleet.threads["secondary"].stop()
            time.sleep(2.0)  # the watcher, still alive, notices the secondary is gone
            with urllib.request.urlopen(gateway.url + "/health") as response:
                health = json.loads(response.read())
            assert health["backends"]["secondary"]["ok"] is False
            assert health["backends"]["odd"]["ok"] is False
    finally:
        gateway.stop()
        odd_server.stop()


def test_names_in_the_config_find_the_models_ollama_lists_as_latest() -> None:
    """Ollama lists ``llama3.2:latest``; a config says ``llama3.2``, as clients do. A
    priority list, a ``[[models]]`` deployment, a model's own name with fallbacks, and a
    fallback, each written without ``:latest``, were never matched: the list's next model,
    the other deployment or the fallback answered, or a 502."""
    models = [SimModel("llama3.2:latest", parameter_size="3.2B"),
              SimModel("qwen2.5:0.5b", parameter_size="0.5B"),
              SimModel("mistral:latest", parameter_size="7.2B")]
    with ServerThread(lambda: create_ollama_app(models)) as ollama:
        gateway = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama.url),
            aliases={"mine": {"priority": {"ollama": ["llama3.2", "qwen2.5:0.5b"]}}},
            models=[{"name": "local", "deployments": [
                        {"backend": "ollama", "model": "llama3.2"}]},
                    {"name": "llama3.2", "fallbacks": ["qwen2.5:0.5b"],
                     "capabilities": ["completion", "vision"]},
                    {"name": "qwen2.5:0.5b", "fallbacks": ["mistral"]}]))
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x",
                               max_retries=0) as c:
                assert picked(c, "mine") == ("llama3.2:latest", "mine: ollama priority #1")
                assert picked(c, "local")[0] == "llama3.2:latest"
                assert picked(c, "llama3.2")[0] == "llama3.2:latest"
                with urllib.request.urlopen(gateway.url + "/admin/status") as response:
                    status = json.load(response)
                assert status["models"]["local"] == ["ollama/llama3.2:latest"]
                assert not status["warnings"]
                # The entry's settings are the listed model's, asked for by either name.
                shown = urllib.request.Request(gateway.url + "/api/show",
                                               data=json.dumps({"model": "llama3.2"}).encode())
                with urllib.request.urlopen(shown) as response:
                    assert "vision" in json.load(response)["capabilities"]
                Sim(ollama, "ollama").fault("llama3.2:latest", status=500)
                assert picked(c, "llama3.2:latest")[0] == "qwen2.5:0.5b"
                Sim(ollama, "ollama").fault("qwen2.5:0.5b", status=500)
                assert picked(c, "qwen2.5:0.5b")[0] == "mistral:latest"
        finally:
            gateway.stop()


def test_an_embedding_model_an_openai_compatible_server_lists_is_not_picked_to_chat() -> None:
    """An OpenAI-compatible server (LM Studio, vLLM) says only names; one listed first whose
    name says it embeds was presumed to chat, and every ``auto`` request went to it and
    came back a 400."""
    models = [SimModel("text-embedding-nomic-embed-text-v1.5", capabilities=("embedding",),
                       embedding_length=8),
              SimModel("qwen2.5-7b-instruct", context_length=32768)]
    with ServerThread(lambda: create_openai_app(models, flavor="openai")) as server:
        gateway = start_gateway(gateway_config(backend("lmstudio", "openai", server.url + "/v1")))
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x",
                               max_retries=0) as c:
                for alias in ("auto", "auto:fast", "auto:code"):
                    assert picked(c, alias)[0] == "qwen2.5-7b-instruct"
                assert c.embeddings.create(model="text-embedding-nomic-embed-text-v1.5",
                                           input="hi").data[0].embedding
        finally:
            gateway.stop()


def test_a_model_ollama_could_not_describe_is_presumed_not_known_to_lack(
        ollama_sim: Sim) -> None:
    """``/api/show`` failing during a scan (a busy Ollama) made each model a known chat-only
    model: ``auto:fast`` (smallest first) picked the embedding model and got a 400, and
    ``auto:vision`` refused though a vision model was there."""
    @web.middleware
    async def busy_show(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/api/show":
            return web.json_response({"error": "timed out"}, status=500)
        return await handler(request)  # type: ignore[no-any-return]

    def make() -> web.Application:
        app = create_ollama_app(seed_fleet()["ollama"])
        app.middlewares.append(busy_show)
        return app

    with ServerThread(make) as ollama:
        gateway = start_gateway(gateway_config(backend("ollama", "ollama", ollama.url)))
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x",
                               max_retries=0) as c:
                Sim(ollama, "ollama").fault("phi3.5:3.8b", status=500)  # (auto:fast's #1)
                assert picked(c, "auto:fast")[0] not in ("nomic-embed-text:latest",
                                                         "phi3.5:3.8b")
                # Every model is presumed able to see now: those that cannot say so, and
                # the next is asked, until the one that can answers.
                image = [{"role": "user", "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": PIXEL}}]}]
                assert picked(c, "auto:vision", messages=image)[0] == "llava:7b"
        finally:
            gateway.stop()


def test_a_model_the_client_named_that_cannot_do_what_was_asked_is_its_400(
        client: openai.OpenAI) -> None:
    """(An alias's pick that cannot is passed over; the model the client named is not.)"""
    image = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                          {"type": "image_url", "image_url": {"url": PIXEL}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="command-r-plus:104b", messages=image)  # type: ignore[arg-type]
    assert "does not support" in caught.value.message


def test_learned_routing_orders_the_models_known_to_see_before_those_presumed_to(
        ollama_sim: Sim, mlx_sim: Sim) -> None:
    """The learned order put an MLX model (whose capabilities nobody says) before the
    vision model Ollama describes, and every image request to ``auto`` went to it first."""
    gateway = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url), backend("mlx", "openai", mlx_sim.api_url),
        routing={"policy": "learned"}))
    image = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                          {"type": "image_url", "image_url": {"url": PIXEL}}]}]
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
            picked(c, "auto")
            for _ in range(5):
                raw = c.chat.completions.with_raw_response.create(
                    model="auto", messages=image)  # type: ignore[arg-type]
                assert raw.parse().model == "llava:7b"
                assert raw.headers["x-gateway-attempts"] == "1"
        assert not [r for r in mlx_sim.requests() if r["path"].endswith("/completions")]
    finally:
        gateway.stop()


def test_a_model_removed_or_pulled_is_known_at_the_next_request_not_the_next_scan() -> None:
    """``ollama rm`` and ``ollama pull`` while the gateway runs: the removed model's requests
    went to Ollama's 404 until its breaker opened (then 503s saying to retry), and a model
    just pulled was a 404, until the next scan of the models (30 s)."""
    models = seed_fleet()["ollama"]
    with ServerThread(lambda: create_ollama_app(models)) as ollama:
        gateway = start_gateway(gateway_config(backend("ollama", "ollama", ollama.url),
                                               server={"discovery_interval": 300}))
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x",
                               max_retries=0) as c:
                assert picked(c, "qwq:32b")[0] == "qwq:32b"
                assert ollama.app is not None
                state, gemma = ollama.app[SIM_STATE], SimModel("gemma3:4b", parameter_size="4.3B")
                del state.models["qwq:32b"]  # ollama rm qwq:32b
                state.models[gemma.name] = gemma  # ollama pull gemma3:4b
                models[:] = [*(m for m in models if m.name != "qwq:32b"), gemma]  # (its list)
                with pytest.raises(openai.NotFoundError):
                    c.chat.completions.create(model="qwq:32b", messages=USER)  # type: ignore[arg-type]
                # A name not listed has the backend's models looked at again: a 404 now,
                # unless the look the removed model's 404 set off has found it already
                with contextlib.suppress(openai.NotFoundError):
                    c.chat.completions.create(model="gemma3:4b", messages=USER)  # type: ignore[arg-type]
                wait_until(lambda: "qwq:32b" not in {m.id for m in c.models.list()}, 5,
                           "the removed model to be gone from the list")
                assert "gemma3:4b" in {m.id for m in c.models.list()}
                assert picked(c, "gemma3:4b")[0] == "gemma3:4b"
                for _ in range(4):  # the model's own 404, not a breaker's 503
                    with pytest.raises(openai.NotFoundError) as caught:
                        c.chat.completions.create(model="qwq:32b", messages=USER)  # type: ignore[arg-type]
                    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        finally:
            gateway.stop()


def test_a_prompt_goes_to_a_model_whose_running_window_holds_it_when_one_can() -> None:
    """Ollama runs a model with its own context length (4,096 tokens by default on a
    small machine), whatever the model was trained for, and cuts a longer prompt short
    without a word: a model trained for 32k, loaded with 4k, was given a 10k-token prompt
    another model could hold. (With no other, it still answers, as Ollama would.)
    """
    models = [SimModel("first:7b", context_length=32768, loaded=True, runs_with=4096),
              SimModel("second:7b", context_length=32768)]
    with ServerThread(lambda: create_ollama_app(models)) as ollama:
        gateway = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama.url),
            aliases={"auto:pair": {"priority": {"ollama": ["first:7b", "second:7b"]}},
                     "auto:learning": {"priority": {"ollama": ["first:7b", "second:7b"]},
                                       "policy": "learned"},
                     "auto:first": {"priority": {"ollama": ["first:7b"]},
                                    "others": "none"}}))
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x",
                               max_retries=0) as c:
                long = [{"role": "user", "content": "word " * 8_000}]  # ~10k tokens
                for alias in ("auto:pair", "auto:learning"):
                    assert picked(c, alias)[0] == "first:7b"
                    assert picked(c, alias, messages=long)[0] == "second:7b"
                assert picked(c, "auto:first", messages=long)[0] == "first:7b"
        finally:
            gateway.stop()


def test_a_long_prompt_goes_to_the_host_whose_window_holds_it() -> None:
    """(One model on two hosts: the one that runs it with a window too short is passed
    over for the other, not only another model for this one.)"""
    def coder(**loaded: Any) -> list[SimModel]:
        return [SimModel("coder:7b", context_length=32768, **loaded)]
    with ServerThread(lambda: create_ollama_app(coder(loaded=True, runs_with=4096))) as short, \
            ServerThread(lambda: create_ollama_app(coder())) as full:
        gateway = start_gateway(gateway_config(
            backend("short", "ollama", short.url), backend("full", "ollama", full.url),
            aliases={"auto:coder": {"priority": {"ollama": ["coder:7b"]}}}))
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x",
                               max_retries=0) as c:
                long = [{"role": "user", "content": "word " * 8_000}]
                assert {c.chat.completions.with_raw_response.create(
                    model="auto:coder", messages=long).headers["x-gateway-backend"]
                    for _ in range(6)} == {"full"}
        finally:
            gateway.stop()
