"""Details of what reaches the backends and what comes back, through the simulators."""

from __future__ import annotations

import re
from collections.abc import Iterator

import aiohttp
import openai
import pytest

from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def test_responses_name_the_backend_and_model_that_answered(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="qwq:32b", messages=USER)
    assert raw.headers["x-gateway-backend"] == "ollama"
    assert raw.headers["x-gateway-model"] == "qwq:32b"
    assert raw.headers["x-request-id"]
    raw = client.chat.completions.with_raw_response.create(
        model="command-r-plus:104b", messages=USER, stream=True)
    assert raw.headers["x-gateway-backend"] == "mlx"
    assert raw.headers["x-gateway-model"] == "command-r-plus:104b"


def test_a_client_request_id_is_kept(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="qwq:32b", messages=USER, extra_headers={"x-request-id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"


@pytest.mark.parametrize("supplied", ["a" * 129, "two words", "back\\\\slash", "x;y=1"])
def test_a_client_request_id_that_could_mislead_a_log_is_replaced(
        client: openai.OpenAI, supplied: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="qwq:32b", messages=USER, extra_headers={"x-request-id": supplied})
    kept = raw.headers["x-request-id"]
    assert kept != supplied and re.fullmatch(r"[0-9a-f]{22}", kept)  # the gateway's own


async def test_health_reports_each_backend_without_error_details(
    gateway: ServerThread, ollama_sim: Sim
) -> None:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/health") as response:
        health = await response.json()
    assert health["status"] == "ok"
    assert health["backends"]["ollama"]["ok"] is True
    assert health["backends"]["ollama"]["models"] == 5
    assert health["backends"]["mlx"]["models"] == 2
    assert "error" not in str(health)


def test_max_completion_tokens_null_does_not_hide_max_tokens(
    client: openai.OpenAI, mlx_sim: Sim
) -> None:
    reply = client.chat.completions.create(model="command-r-plus:104b", messages=USER,
                                           max_tokens=3, extra_body={"max_completion_tokens": None})
    assert reply.choices[0].finish_reason == "length"
    assert mlx_sim.requests()[-1]["payload"]["max_tokens"] == 3


def test_reasoning_effort_is_not_sent_to_a_model_that_cannot_think(
    client: openai.OpenAI, ollama_sim: Sim
) -> None:
    reply = client.chat.completions.create(model="phi3.5:3.8b", messages=USER,
                                           reasoning_effort="high")  # type: ignore[arg-type]
    assert reply.choices[0].message.content
    assert "think" not in ollama_sim.requests("/api/chat")[-1]["payload"]


def test_text_parts_reach_ollama_as_separate_lines(client: openai.OpenAI,
                                                   ollama_sim: Sim) -> None:
    """Ollama takes a message's text as one string: parts (a file's name, the next one's)
    are not run together.
    """
    client.chat.completions.create(model="phi3.5:3.8b", messages=[{"role": "user", "content": [
        {"type": "text", "text": "a.txt"}, {"type": "text", "text": "b.txt"}]}])
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["messages"] == [
        {"role": "user", "content": "a.txt\nb.txt"}]


def test_keep_alive_forever_is_sent_as_a_number(ollama_sim: Sim) -> None:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url, keep_alive="-1")))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            c.chat.completions.create(model="phi3.5:3.8b", messages=USER)
            c.embeddings.create(model="nomic-embed-text", input="x")
    finally:
        server.stop()
    assert [r["payload"]["keep_alive"] for r in ollama_sim.requests()] == [-1, -1]


@pytest.mark.parametrize(("sim_name", "model"), [("ollama_sim", "phi3.5:3.8b"),
                                                 ("mlx_sim", "command-r-plus:104b")])
def test_upstream_connections_are_reused_across_streams(
    client: openai.OpenAI, request: pytest.FixtureRequest, sim_name: str, model: str
) -> None:
    sim: Sim = request.getfixturevalue(sim_name)
    # The body's end arrives a moment after the last event, as over a real network: the
    # gateway must read it rather than drop a connection it could have reused.
    sim.fault(model, end_delay=0.05)
    for _ in range(12):
        assert list(client.chat.completions.create(model=model, messages=USER, stream=True,
                                                   stream_options={"include_usage": True}))
    # Discovery opened at most 7 connections (tags, ps, 5 x show, in parallel); without
    # reuse, 12 streams one after another would need 12.
    assert len({r["peer"] for r in sim.requests()}) <= 7


def test_mlx_flavoured_streams_come_out_as_openai_streams(client: openai.OpenAI) -> None:
    # The MLX simulator repeats the role in every delta and sends ": keepalive" comments.
    chunks = list(client.chat.completions.create(model="command-r-plus:104b", messages=USER,
                                                 stream=True))
    roles = [c.choices[0].delta.role for c in chunks if c.choices]
    assert roles[0] == "assistant" and set(roles[1:]) == {None}


def test_tool_calls_through_an_openai_compatible_backend(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
    reply = client.chat.completions.create(model="command-r-plus:104b", messages=USER,
                                           tools=[tool])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.arguments == '{"q":"Paris"}'
    stream = list(client.chat.completions.create(model="command-r-plus:104b", messages=USER,
                                                 tools=[tool], stream=True))
    deltas = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "lookup"
