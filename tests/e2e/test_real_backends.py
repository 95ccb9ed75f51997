"""The OpenAI SDK through the gateway to real servers: mlx_lm.server and llama.cpp.

At temperature 0 both are deterministic, so what the gateway returns must be exactly what
the server returns to a direct call: the translation loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy
import ollama
import openai
import pytest

from gateway.keys import BACKENDS, CATALOG, ROUTER
from tests import peers
from tests.e2e.conftest import RealServer
from tests.support import ServerThread, backend, gateway_config, start_gateway

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway_to_real(real_mlx: RealServer, real_llamacpp: RealServer) -> Iterator[ServerThread]:
    config = gateway_config(
        backend("mlx", "openai", real_mlx.url),
        backend("llamacpp", "openai", real_llamacpp.url),
    )
    server = start_gateway(config)
    yield server
    server.stop()


@pytest.fixture(params=["mlx", "llamacpp"])
def real(request: pytest.FixtureRequest) -> RealServer:
    server: RealServer = request.getfixturevalue(f"real_{request.param}")
    return server


@pytest.fixture
def via_gateway(gateway_to_real: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway_to_real.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
def direct(real: RealServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=real.url, api_key="x", max_retries=0) as c:
        yield c


def test_models_discovered_from_both_servers(via_gateway: openai.OpenAI, real: RealServer) -> None:
    assert real.model in [m.id for m in via_gateway.models.list()]


def test_chat_matches_a_direct_call(
    via_gateway: openai.OpenAI, direct: openai.OpenAI, real: RealServer
) -> None:
    ask = {"model": real.model, "messages": QUESTION, "temperature": 0, "max_tokens": 12}
    expected = direct.chat.completions.create(**ask)  # type: ignore[call-overload]
    got = via_gateway.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert got.choices[0].message.content == expected.choices[0].message.content
    assert got.choices[0].message.content  # real text, not an empty answer
    assert got.choices[0].finish_reason == expected.choices[0].finish_reason
    assert got.usage.completion_tokens == expected.usage.completion_tokens
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens
    assert got.model == real.model


def test_streamed_chat_matches_the_whole_answer(
    via_gateway: openai.OpenAI, real: RealServer
) -> None:
    ask = {"model": real.model, "messages": QUESTION, "temperature": 0, "max_tokens": 12}
    whole = via_gateway.chat.completions.create(**ask)  # type: ignore[call-overload]
    chunks = list(via_gateway.chat.completions.create(
        **ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_matches_a_direct_call(
    via_gateway: openai.OpenAI, direct: openai.OpenAI, real: RealServer
) -> None:
    ask = {"model": real.model, "prompt": "The capital of France is", "temperature": 0,
           "max_tokens": 8}
    expected = direct.completions.create(**ask)  # type: ignore[call-overload]
    got = via_gateway.completions.create(**ask)  # type: ignore[call-overload]
    assert got.choices[0].text == expected.choices[0].text != ""
    streamed = via_gateway.completions.create(**ask, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in streamed if c.choices) == got.choices[0].text


async def test_async_client_against_real_servers(
    gateway_to_real: ServerThread, real: RealServer
) -> None:
    async with openai.AsyncOpenAI(base_url=gateway_to_real.url + "/v1", api_key="x",
                                  max_retries=0) as client:
        reply = await client.chat.completions.create(
            model=real.model, messages=QUESTION, temperature=0, max_tokens=6)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model=real.model, messages=QUESTION, temperature=0, max_tokens=6,  # type: ignore[arg-type]
            stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == reply.choices[0].message.content != ""


def test_llamacpp_real_answer_at_temperature_zero(via_gateway: openai.OpenAI) -> None:
    reply = via_gateway.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Say hello."}],
        temperature=0, max_tokens=20)
    text = reply.choices[0].message.content or ""
    assert len(text.split()) >= 3  # SmolLM2 answers in words
    assert any(ch.isalpha() for ch in text)


def test_llamacpp_embeddings(via_gateway: openai.OpenAI, real_llamacpp: RealServer) -> None:
    result = via_gateway.embeddings.create(model="smollm2-135m", input=["hello", "world"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 576
    assert result.data[0].embedding != result.data[1].embedding
    with openai.OpenAI(base_url=real_llamacpp.url, api_key="x") as direct:
        expected = direct.embeddings.create(model="smollm2-135m", input="hello",
                                            encoding_format="float")
    assert result.data[0].embedding == pytest.approx(expected.data[0].embedding, abs=1e-6)


def test_llamacpp_embeddings_are_shortened_to_the_dimensions_asked_for(
    via_gateway: openai.OpenAI, real_llamacpp: RealServer
) -> None:
    """llama.cpp ignores ``dimensions`` and answers 576; a vector store made for 64 then
    refuses the insert. They are cut and scaled to unit length, as OpenAI shortens its own.
    """
    full = via_gateway.embeddings.create(model="smollm2-135m", input=["hello", "world"])
    short = via_gateway.embeddings.create(model="smollm2-135m", input=["hello", "world"],
                                          dimensions=64)  # (base64, the SDK's default)
    for whole, cut in zip(full.data, short.data, strict=True):
        assert len(cut.embedding) == 64
        expected = numpy.array(whole.embedding[:64])
        assert cut.embedding == pytest.approx(list(expected / numpy.linalg.norm(expected)),
                                              abs=1e-6)
    with pytest.raises(openai.BadRequestError) as refused:
        via_gateway.embeddings.create(model="smollm2-135m", input="hello", dimensions=1024)
    assert refused.value.param == "dimensions" and "at most 576" in refused.value.message


def test_llamacpp_request_with_tools_passes_through_unchanged(
    via_gateway: openai.OpenAI, real_llamacpp: RealServer
) -> None:
    # SmolLM2's template cannot call tools: llama.cpp answers in text, and the gateway must
    # hand over exactly what a direct call gets.
    tool = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
    ask = {"model": "smollm2-135m", "messages": QUESTION, "tools": [tool], "temperature": 0,
           "max_tokens": 8}
    reply = via_gateway.chat.completions.create(**ask)  # type: ignore[call-overload]
    with openai.OpenAI(base_url=real_llamacpp.url, api_key="x") as direct:
        expected = direct.chat.completions.create(**ask)  # type: ignore[call-overload]
    assert reply.choices[0].message.content == expected.choices[0].message.content != ""


def test_llamacpp_context_overflow_is_a_400_context_length_exceeded(
    via_gateway: openai.OpenAI,
) -> None:
    huge = [{"role": "user", "content": "hello world " * 1500}]
    with pytest.raises(openai.BadRequestError) as caught:
        via_gateway.chat.completions.create(model="smollm2-135m", messages=huge, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    assert "context" in caught.value.message


def test_llamacpp_logprobs_fingerprint_and_usage_details_reach_the_client(
    via_gateway: openai.OpenAI, real_llamacpp: RealServer
) -> None:
    ask = {"model": "smollm2-135m", "messages": QUESTION, "temperature": 0, "max_tokens": 5,
           "logprobs": True, "top_logprobs": 2}
    with openai.OpenAI(base_url=real_llamacpp.url, api_key="x") as direct:
        expected = direct.chat.completions.create(**ask)  # type: ignore[call-overload]
    got = via_gateway.chat.completions.create(**ask)  # type: ignore[call-overload]
    want = expected.choices[0].logprobs.content
    assert want, "llama.cpp sends logprobs when asked"
    have = got.choices[0].logprobs.content
    assert [(t.token, len(t.top_logprobs)) for t in have] == \
        [(t.token, len(t.top_logprobs)) for t in want]
    assert [t.logprob for t in have] == pytest.approx([t.logprob for t in want], abs=1e-4)
    assert got.system_fingerprint == expected.system_fingerprint
    assert got.usage is not None and expected.usage is not None
    # The gateway asked second, for the same prompt: llama.cpp served it from its prompt
    # cache, and says so.
    assert got.usage.prompt_tokens_details is not None
    assert got.usage.prompt_tokens_details.cached_tokens
    stream = via_gateway.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
    streamed = [t.token for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    assert streamed == [t.token for t in want]


def test_llamacpp_says_how_many_it_runs_at_once_and_its_window(
    gateway_to_real: ServerThread, real_llamacpp: RealServer
) -> None:
    backends, catalog = gateway_to_real.app[BACKENDS], gateway_to_real.app[CATALOG]
    assert backends["llamacpp"].capacity == 2  # its /props total_slots (--parallel 2)
    [deployment] = catalog.deployments(real_llamacpp.model)
    assert deployment.model.context_length == 1024  # 2,048 of context in 2 slots
    assert backends["mlx"].capacity == 0  # mlx_lm.server has no /props: not known
    assert gateway_to_real.call(
        lambda: gateway_to_real.app[ROUTER].balancer.state(deployment).limit) == 2


def test_llamacpp_says_which_model_it_has_loaded_and_how_large(
    gateway_to_real: ServerThread, real_llamacpp: RealServer, real_mlx: RealServer
) -> None:
    # `ollama ps` through the gateway: llama.cpp's /v1/models describes the model it has
    # loaded (its `meta`); mlx_lm.server's lists names only, which says nothing of memory.
    client = ollama.Client(host=gateway_to_real.url)
    try:
        running, shown = client.ps(), client.show(real_llamacpp.model)
    finally:
        client.close()
    assert [m.model for m in running.models] == [real_llamacpp.model]
    assert shown.details.quantization_level == "Q4_1"  # (SmolLM2-135M-Instruct.Q4_1.gguf)
    [deployment] = gateway_to_real.app[CATALOG].deployments(real_llamacpp.model)
    assert 1.3e8 < (deployment.model.parameters or 0) < 1.4e8  # SmolLM2-135M


def test_a_llamacpp_server_without_embeddings_says_so_and_goes_on_chatting(
        tmp_path: Path) -> None:
    """llama.cpp started without ``--embeddings`` answers them 501: the client hears its
    hint as a 400 (which the SDK does not retry), and the refusals do not open the
    deployment's breaker: chat on the same server goes on.
    """
    port = peers.free_port()
    process = peers.start_llamacpp_server(peers.smollm2_gguf_path(), port,
                                          tmp_path / "server.log", alias="smollm2-135m")
    server = start_gateway(gateway_config(
        backend("llamacpp", "openai", f"http://127.0.0.1:{port}/v1")))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            for _ in range(4):  # more than the breaker's failures
                with pytest.raises(openai.BadRequestError) as refused:
                    client.embeddings.create(model="smollm2-135m", input="hello")
                assert refused.value.code == "unsupported_by_backend"
                assert "does not support embeddings. Start it with `--embeddings`" in \
                    refused.value.message
            health = httpx.get(server.url + "/health").json()
            assert health["deployments"]["llamacpp/smollm2-135m"]["breaker"] == "closed"
            reply = client.chat.completions.create(
                model="smollm2-135m", messages=QUESTION,  # type: ignore[arg-type]
                temperature=0, max_tokens=6)
            assert reply.choices[0].message.content
    finally:
        server.stop()
        peers.stop(process)


def test_mlx_asked_for_embeddings_says_so_and_goes_on_chatting(
        real_mlx: RealServer, gateway_to_real: ServerThread) -> None:
    """mlx_lm.server has no embeddings endpoint (its 404 "Not Found"): that was taken for
    a model gone, each refusal counted against the deployment, and after three its chat
    was refused too (503s for every client while one kept asking for embeddings).
    """
    with openai.OpenAI(base_url=gateway_to_real.url + "/v1", api_key="x",
                       max_retries=0) as client:
        for _ in range(4):  # more than the breaker's failures
            with pytest.raises(openai.BadRequestError) as refused:
                client.embeddings.create(model=real_mlx.model, input="hello")
            assert refused.value.code == "unsupported_by_backend"
            assert "HTTP 404: Not Found" in refused.value.message
        health = httpx.get(gateway_to_real.url + "/health").json()
        assert health["deployments"][f"mlx/{real_mlx.model}"]["breaker"] == "closed"
        reply = client.chat.completions.create(
            model=real_mlx.model, messages=QUESTION,  # type: ignore[arg-type]
            temperature=0, max_tokens=4)
        assert reply.choices[0].message.content is not None
