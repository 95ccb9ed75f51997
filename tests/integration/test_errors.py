"""Every error a client can meet arrives as OpenAI-shaped JSON with the right status, and
every upstream failure ends in a clean error rather than a hang or a truncated "success".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.sim import SimModel, create_openai_app
from tests.support import ServerThread, Sim, backend, free_port, gateway_config, start_gateway

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hello"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.fixture
def quick_gateway(ollama_sim: Sim, mlx_sim: Sim) -> Iterator[ServerThread]:
    """A gateway with short timeouts and a small body limit, before both simulators."""
    timeouts = {"headers": 1.0, "idle": 1.0, "total": 3.0}
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url, timeouts=timeouts),
        backend("mlx", "openai", mlx_sim.api_url, timeouts=timeouts),
        server={"max_body_bytes": 4096},
    )
    server = start_gateway(config)
    yield server
    server.stop()


@pytest.fixture
async def http(quick_gateway: ServerThread) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=quick_gateway.url) as session:
        yield session


def assert_error(status: int, body: bytes, expected_status: int, **fields: Any) -> dict[str, Any]:
    assert status == expected_status, body
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    for key, value in fields.items():
        assert error[key] == value, (key, error)
    return error  # type: ignore[no-any-return]


async def post(http: aiohttp.ClientSession, path: str, data: Any) -> tuple[int, bytes, Any]:
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    async with http.post(path, data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.read(), r.headers


async def stream_events(http: aiohttp.ClientSession, payload: dict[str, Any]) -> list[Any]:
    """The data payloads of a streamed answer, parsed ([DONE] kept as the string)."""
    async with http.post(CHAT, json={**payload, "stream": True}) as response:
        assert response.status == 200
        raw = (await response.read()).decode()
    events = [line[len("data: "):] for line in raw.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else orjson.loads(e) for e in events]


# --- malformed requests ------------------------------------------------------------------


async def test_malformed_json_is_a_400(http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, CHAT, b'{"model": "qwq:32b", "messages": [')
    error = assert_error(status, body, 400, type="invalid_request_error")
    assert "not valid JSON" in error["message"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ([1, 2], None),
        ({"messages": USER}, "model"),
        ({"model": "qwq:32b"}, "messages"),
        ({"model": "qwq:32b", "messages": []}, "messages"),
        ({"model": "qwq:32b", "messages": "hi"}, "messages"),
        ({"model": "qwq:32b", "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": "qwq:32b", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "qwq:32b", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "qwq:32b", "messages": USER, "temperature": 7}, "temperature"),
        ({"model": "qwq:32b", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "qwq:32b", "messages": USER, "stream": "yes"}, "stream"),
        ({"model": "qwq:32b", "messages": USER, "stop": [1]}, "stop"),
        ({"model": "qwq:32b", "messages": USER, "n": 3}, "n"),
        ({"model": "qwq:32b", "messages": USER, "tools": [{"type": "function"}]}, "tools[0]"),
        ({"model": "qwq:32b", "messages": [{"role": [], "content": "hi"}]}, "messages[0].role"),
        ({"model": "qwq:32b", "messages": [{"role": {}, "content": "hi"}]}, "messages[0].role"),
        # A JSON true is not a number, and numbers have bounds.
        ({"model": "qwq:32b", "messages": USER, "temperature": True}, "temperature"),
        ({"model": "qwq:32b", "messages": USER, "max_tokens": True}, "max_tokens"),
        ({"model": "qwq:32b", "messages": USER, "max_tokens": 10**12}, "max_tokens"),
        ({"model": "qwq:32b", "messages": USER, "seed": 2**63}, "seed"),  # past int64
        ({"model": "qwq:32b", "messages": USER, "top_logprobs": 99}, "top_logprobs"),
        ({"model": "qwq:32b", "messages": USER, "presence_penalty": 9}, "presence_penalty"),
        # A tool choice names one of the tools, and needs some (a backend offered them all).
        ({"model": "qwq:32b", "messages": USER, "tools": [TOOL], "tool_choice": {
            "type": "function", "function": {"name": "elsewhere"}}}, "tool_choice"),
        ({"model": "qwq:32b", "messages": USER, "tool_choice": "required"}, "tool_choice"),
        ({"model": "qwq:32b", "messages": USER, "tools": [TOOL], "tool_choice": "sometimes"},
         "tool_choice"),
    ],
)
async def test_missing_or_wrong_typed_fields_are_a_400_naming_the_field(
    http: aiohttp.ClientSession, payload: Any, param: str | None
) -> None:
    status, body, _ = await post(http, CHAT, payload)
    assert_error(status, body, 400, type="invalid_request_error", param=param)


async def test_other_endpoints_check_their_fields(http: aiohttp.ClientSession,
                                                  ollama_sim: Sim) -> None:
    status, body, _ = await post(http, "/v1/completions", {"model": "qwq:32b", "prompt": 5})
    assert_error(status, body, 400, param="prompt")
    # Ollama takes an empty prompt for a load of the model: no answer would come of it
    ollama_sim.clear()
    status, body, _ = await post(http, "/v1/completions", {"model": "qwq:32b", "prompt": ""})
    assert_error(status, body, 400, code="unsupported_by_backend")
    assert ollama_sim.requests("/api/generate") == []
    status, body, _ = await post(http, "/v1/embeddings", {"model": "nomic-embed-text"})
    assert_error(status, body, 400, param="input")
    status, body, _ = await post(http, "/v1/embeddings",
                                 {"model": "nomic-embed-text", "input": "x",
                                  "encoding_format": "hex"})
    assert_error(status, body, 400, param="encoding_format")
    for dimensions in (0, True, 10**7):
        status, body, _ = await post(http, "/v1/embeddings", {
            "model": "nomic-embed-text", "input": "x", "dimensions": dimensions})
        assert_error(status, body, 400, param="dimensions")
    # An explicit null is "not set", as wrappers send it.
    status, body, _ = await post(http, "/v1/embeddings", {
        "model": "nomic-embed-text", "input": "x", "encoding_format": None, "dimensions": None})
    assert status == 200 and isinstance(orjson.loads(body)["data"][0]["embedding"], list), body


async def test_an_integer_past_64_bits_is_said_to_be_too_large(
        http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, CHAT, b'{"model": "qwq:32b", "messages": [{"role": '
                                 b'"user", "content": "Hi"}], "max_tokens": 1' + b"0" * 25 + b"}")
    error = assert_error(status, body, 400, param="max_tokens")
    assert "too large" in error["message"]


async def test_a_body_that_begins_with_a_bom_is_read(http: aiohttp.ClientSession) -> None:
    """Windows PowerShell's UTF-8 (``Invoke-RestMethod -Body`` of a file it wrote) puts a
    byte order mark before the JSON: it was a 400 "not valid JSON"."""
    body = b"\xef\xbb\xbf" + orjson.dumps({"model": "qwq:32b", "messages": USER})
    async with http.post(CHAT, data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.read()
        assert (await r.json())["choices"][0]["message"]["content"]

async def test_unknown_model_is_a_404_model_not_found(http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, CHAT, {"model": "gpt-17", "messages": USER})
    error = assert_error(status, body, 404, code="model_not_found", param="model")
    assert "gpt-17" in error["message"]


async def test_body_over_the_limit_is_a_413(http: aiohttp.ClientSession) -> None:
    big = {"model": "qwq:32b", "messages": [{"role": "user", "content": "x" * 10_000}]}
    status, body, _ = await post(http, CHAT, big)
    assert_error(status, body, 413, code="request_too_large")


async def test_unknown_route_and_wrong_method_answer_in_json(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nothing-here") as response:
        assert_error(response.status, await response.read(), 404, code="unknown_url")
    async with http.get(CHAT) as response:
        assert_error(response.status, await response.read(), 405, code="method_not_allowed")
        assert response.headers["Allow"] == "POST"


# --- upstream failures before the answer starts ------------------------------------------


async def test_a_backend_known_to_be_down_is_a_503_with_retry_after() -> None:
    dead = backend("dead", "openai", f"http://127.0.0.1:{free_port()}/v1", models=["ghost"])
    server = start_gateway(gateway_config(dead))
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            status, body, headers = await post(http, CHAT, {"model": "ghost", "messages": USER})
    finally:
        server.stop()
    error = assert_error(status, body, 503)
    assert "ghost" in error["message"] and "down: dead" in error["message"]
    assert int(headers["Retry-After"]) >= 1


async def test_a_backend_that_just_went_away_is_a_502() -> None:
    fleet = [SimModel("solo:1b")]
    sim = ServerThread(lambda: create_openai_app(fleet, flavor="llamacpp")).start()
    server = start_gateway(gateway_config(backend("solo", "openai", sim.url + "/v1")))
    try:
        async with aiohttp.ClientSession(base_url=server.url) as http:
            assert (await post(http, CHAT, {"model": "solo:1b", "messages": USER}))[0] == 200
            sim.stop()  # the health watcher has not noticed yet: the request finds out
            status, body, _ = await post(http, CHAT, {"model": "solo:1b", "messages": USER})
    finally:
        server.stop()
    error = assert_error(status, body, 502, code="backend_unreachable")
    assert "solo" in error["message"] and "refused" in error["message"]
    # It names the backend, never where it is.
    assert "127.0.0.1" not in error["message"] and str(sim.port) not in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_503_with_retry_after_is_passed_on(
    http: aiohttp.ClientSession, ollama_sim: Sim, stream: bool
) -> None:
    ollama_sim.fault("qwq:32b", status=503, retry_after=7, message="server busy, please try "
                     "again.  maximum pending requests exceeded")
    status, body, headers = await post(http, CHAT, {"model": "qwq:32b", "messages": USER,
                                                    "stream": stream})
    error = assert_error(status, body, 503)
    assert "server busy" in error["message"]
    assert headers["Retry-After"] == "7"
    # Resting meanwhile, it is not asked again: the next request hears the same, as busy.
    status, body, headers = await post(http, CHAT, {"model": "qwq:32b", "messages": USER,
                                                    "stream": stream})
    assert assert_error(status, body, 503)["code"] == "backend_busy"
    assert 6 <= int(headers["Retry-After"]) <= 7
    assert len(ollama_sim.requests("/api/chat")) == 1


async def test_upstream_429_is_a_429_with_retry_after(
    http: aiohttp.ClientSession, mlx_sim: Sim
) -> None:
    mlx_sim.fault("command-r-plus:104b", status=429, retry_after=3)
    status, body, headers = await post(http, CHAT, {"model": "command-r-plus:104b",
                                                    "messages": USER})
    assert_error(status, body, 429, type="rate_limit_error")
    assert headers["Retry-After"] == "3"


async def test_upstream_500_is_a_502(http: aiohttp.ClientSession, ollama_sim: Sim) -> None:
    ollama_sim.fault("qwq:32b", status=500, message="llama runner process has terminated")
    status, body, _ = await post(http, CHAT, {"model": "qwq:32b", "messages": USER})
    error = assert_error(status, body, 502, type="api_error")
    assert "llama runner process has terminated" in error["message"]


async def test_connection_reset_before_headers_is_a_502(
    http: aiohttp.ClientSession, ollama_sim: Sim
) -> None:
    ollama_sim.fault("qwq:32b", reset=True)
    status, body, _ = await post(http, CHAT, {"model": "qwq:32b", "messages": USER})
    assert_error(status, body, 502, code="upstream_error")
    assert (await post(http, CHAT, {"model": "phi3.5:3.8b", "messages": USER}))[0] == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_silent_upstream_is_a_504_within_its_timeout(
    http: aiohttp.ClientSession, ollama_sim: Sim, stream: bool
) -> None:
    # Streamed or whole (a whole answer is a collected stream), an answer must start
    # within `headers`: a backend that accepts and then hangs is found out in a second,
    # not when `total` (3 s here, 600 s by default) runs out.
    limit = 1.0
    ollama_sim.fault("qwq:32b", no_response=True)
    started = time.monotonic()
    status, body, _ = await post(http, CHAT, {"model": "qwq:32b", "messages": USER,
                                              "stream": stream})
    assert_error(status, body, 504, code="upstream_timeout")
    assert limit <= time.monotonic() - started < limit + 1.5
    assert len(ollama_sim.requests("/api/chat")) == 1
    record = ollama_sim.hung_up("/api/chat", "qwq:32b")
    assert record["outcome"] == "no_response" and record["closed_by_client"]


async def test_a_whole_answer_may_take_longer_than_the_header_timeout(
    http: aiohttp.ClientSession, ollama_sim: Sim
) -> None:
    # A whole answer that keeps coming (the gateway reads it as a stream) may take longer
    # than `headers` (1 s here): only silence counts against it.
    ollama_sim.fault("phi3.5:3.8b", tokens_per_s=15)  # ~2 s for the answer
    started = time.monotonic()
    status, body, _ = await post(http, CHAT, {"model": "phi3.5:3.8b", "messages": USER})
    assert status == 200, body
    assert time.monotonic() - started > 1.5
    assert orjson.loads(body)["choices"][0]["finish_reason"] == "stop"


async def test_context_length_error_keeps_its_code(gateway: ServerThread) -> None:
    too_long = [{"role": "user", "content": "word " * 5000}]  # llava:7b holds 4096 tokens
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        status, body, _ = await post(http, CHAT, {"model": "llava:7b", "messages": too_long})
    error = assert_error(status, body, 400, code="context_length_exceeded")
    assert "maximum context length is 4096" in error["message"]


async def test_content_policy_rejection_keeps_its_code(
    http: aiohttp.ClientSession, mlx_sim: Sim
) -> None:
    mlx_sim.fault("command-r-plus:104b", content_policy=True)
    status, body, _ = await post(http, CHAT, {"model": "command-r-plus:104b", "messages": USER})
    assert_error(status, body, 400, code="content_policy_violation")


# --- upstream failures after the answer started -------------------------------------------


def assert_in_band_error(events: list[Any]) -> dict[str, Any]:
    assert "[DONE]" not in events, "a broken stream must not look finished"
    assert "error" in events[-1], events[-1]
    assert not any(e["choices"] and e["choices"][0]["finish_reason"] for e in events[:-1])
    return events[-1]["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("sim_name", ["ollama_sim", "mlx_sim"])
async def test_stream_cut_mid_answer_ends_with_an_in_band_error(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest, sim_name: str
) -> None:
    sim: Sim = request.getfixturevalue(sim_name)
    model = "qwq:32b" if sim_name == "ollama_sim" else "command-r-plus:104b"
    sim.fault(model, cut_after=3)
    events = await stream_events(http, {"model": model, "messages": USER})
    error = assert_in_band_error(events)
    assert error["type"] == "api_error"
    assert len([e for e in events if "choices" in e]) >= 3


async def test_stalled_stream_ends_with_an_in_band_timeout(
    http: aiohttp.ClientSession, ollama_sim: Sim
) -> None:
    ollama_sim.fault("phi3.5:3.8b", stall_after=4)
    started = time.monotonic()
    events = await stream_events(http, {"model": "phi3.5:3.8b", "messages": USER})
    assert time.monotonic() - started < 5
    assert assert_in_band_error(events)["code"] == "upstream_timeout"
    # The gateway hung up on the stalled upstream rather than leaving it open.
    assert ollama_sim.hung_up("/api/chat", "phi3.5:3.8b").get("closed_by_client") is True


@pytest.mark.parametrize("sim_name", ["ollama_sim", "mlx_sim"])
async def test_error_event_mid_stream_becomes_an_in_band_error(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest, sim_name: str
) -> None:
    sim: Sim = request.getfixturevalue(sim_name)
    model = "phi3.5:3.8b" if sim_name == "ollama_sim" else "command-r-plus:104b"
    sim.fault(model, error_after=2, message="CUDA error: out of memory")
    events = await stream_events(http, {"model": model, "messages": USER})
    assert "out of memory" in assert_in_band_error(events)["message"]


@pytest.mark.parametrize("sim_name", ["ollama_sim", "mlx_sim"])
async def test_malformed_event_is_skipped_and_the_answer_completes(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest, sim_name: str
) -> None:
    sim: Sim = request.getfixturevalue(sim_name)
    model = "phi3.5:3.8b" if sim_name == "ollama_sim" else "command-r-plus:104b"
    sim.fault(model, malformed_at=2)
    events = await stream_events(http, {"model": model, "messages": USER})
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text.startswith("The quick brown fox")
    assert text.endswith("when a machine fails.")


async def test_stream_without_done_is_finalised_with_usage(
    http: aiohttp.ClientSession, mlx_sim: Sim
) -> None:
    mlx_sim.fault("command-r-plus:104b", missing_done=True)
    events = await stream_events(http, {"model": "command-r-plus:104b", "messages": USER,
                                        "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] > 0
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


async def test_ollama_stream_that_ends_without_done_is_an_error_not_an_answer(
    http: aiohttp.ClientSession, ollama_sim: Sim
) -> None:
    ollama_sim.fault("phi3.5:3.8b", missing_done=True)
    events = await stream_events(http, {"model": "phi3.5:3.8b", "messages": USER})
    assert assert_in_band_error(events)["code"] == "upstream_truncated"


@pytest.mark.parametrize("sim_name", ["ollama_sim", "mlx_sim"])
async def test_event_of_the_wrong_shape_is_skipped(
    http: aiohttp.ClientSession, request: pytest.FixtureRequest, sim_name: str
) -> None:
    sim: Sim = request.getfixturevalue(sim_name)
    model = "phi3.5:3.8b" if sim_name == "ollama_sim" else "command-r-plus:104b"
    sim.fault(model, bad_shape_at=3)
    events = await stream_events(http, {"model": model, "messages": USER})
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text.endswith("when a machine fails.") and text.startswith("The quick")


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        (USER, {"response_format": {"type": "json_schema", "json_schema": "x"}},
         "response_format.json_schema"),
        ([*USER, {"role": "assistant", "content": None,
                  "tool_calls": [{"id": {"a": 1}, "function": {"name": "f"}}]}], {},
         "messages[1].tool_calls[0].id"),
        ([*USER, {"role": "tool", "tool_call_id": [1], "content": "x"}], {},
         "messages[1].tool_call_id"),
        (USER, {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
         "tools[0]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}], {},
         "messages[0].content[0].image_url"),
    ],
)
async def test_wrong_types_deep_in_the_body_are_a_400(
    http: aiohttp.ClientSession, messages: list[Any], extra: dict[str, Any], param: str
) -> None:
    status, body, _ = await post(http, CHAT, {"model": "qwq:32b", "messages": messages, **extra})
    assert_error(status, body, 400, param=param)


async def test_a_data_url_that_is_not_base64_is_a_400(http: aiohttp.ClientSession) -> None:
    status, body, _ = await post(http, CHAT, {"model": "llava:7b", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:abc"}}]}]})
    assert_error(status, body, 400, code="invalid_image_url")


async def test_embeddings_take_openais_most_inputs_at_once(gateway: ServerThread) -> None:
    """(Ollama's API has no most: its clients send every document in one request.)"""
    many = {"model": "nomic-embed-text", "input": ["x"] * 2049}
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        status, body, _ = await post(http, "/v1/embeddings", many)
        assert_error(status, body, 400, param="input")
        status, body, _ = await post(http, "/api/embed", many)
        assert status == 200 and len(orjson.loads(body)["embeddings"]) == 2049


async def test_a_model_name_of_many_prefixes_is_a_plain_404(gateway: ServerThread) -> None:
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        status, body, _ = await post(http, CHAT, {"model": "ollama/" * 36 + "x",
                                                  "messages": USER})
        assert_error(status, body, 404, code="model_not_found")
        # A name past any model's is refused, and not repeated (in the error, the log line,
        # the dashboard's records: a megabyte each, and fifty of them kept)
        for path, shape in ((CHAT, "error"), ("/api/chat", "error")):
            status, body, _ = await post(http, path, {"model": "x" * 100_000,
                                                      "messages": USER})
            assert status == 400 and len(body) < 300, body[:300]
            assert "at most 256 characters" in str(orjson.loads(body)[shape])


async def test_an_absurd_retry_after_is_not_passed_on(
    http: aiohttp.ClientSession, ollama_sim: Sim
) -> None:
    ollama_sim.fault("phi3.5:3.8b", status=429, retry_after=float("inf"))
    status, body, headers = await post(http, CHAT, {"model": "phi3.5:3.8b", "messages": USER})
    assert_error(status, body, 429)
    assert headers["Retry-After"] == "1"
