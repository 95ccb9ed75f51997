"""The embedded backend against the real SmolLM2 model: served by a llama.cpp server the
gateway starts itself, killed, and brought back by the gateway.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
from openai import OpenAI

from gateway.backends.embedded import EmbeddedBackend
from gateway.keys import BACKENDS, CATALOG
from tests.support import (
    GATEWAY,
    ServerThread,
    Sim,
    backend,
    free_port,
    gateway_config,
    start_gateway,
    wait_ready,
)

ASK = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Say hello."}],
       "temperature": 0, "max_tokens": 12}


@pytest.fixture
def light() -> Iterator[tuple[ServerThread, EmbeddedBackend]]:
    config = gateway_config(backend("light", "embedded", "", tier="server", context_size=2048,
                                    parallel=1),
                            routing={"health_interval": 0.5})
    server = start_gateway(config)
    assert server.app is not None
    embedded = server.app[BACKENDS]["light"]
    assert isinstance(embedded, EmbeddedBackend)
    yield server, embedded
    server.stop()


def test_serves_smollm2_and_comes_back_after_being_killed(
    light: tuple[ServerThread, EmbeddedBackend]
) -> None:
    server, embedded = light
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        first = client.chat.completions.create(**ASK)  # type: ignore[call-overload]
        assert first.choices[0].message.content and first.model == "smollm2:135m"
        ollama_client = ollama.Client(host=server.url)  # `ollama ps`: it is loaded
        try:
            assert [m.model for m in ollama_client.ps().models] == ["smollm2:135m"]
        finally:
            ollama_client.close()
        assert embedded.process is not None
        old_pid = embedded.process.pid
        os.kill(old_pid, signal.SIGKILL)
        # Requests asked while it restarts wait for it (they were sent to its dead port:
        # 502s, and its breaker opened, 503s for seconds after it was back)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            asked = [pool.submit(client.chat.completions.create, **ASK) for _ in range(3)]
            # A discovery round while it loads again keeps its model (one found without it
            # made its requests 404 model_not_found until the next round)
            while embedded.process is None or embedded.process.pid == old_pid:
                time.sleep(0.01)
            catalog = server.app[CATALOG]
            server.wait(catalog.refresh)
            assert server.call(catalog.names) == ["smollm2:135m"]
            answers = [future.result(timeout=60) for future in asked]
    for again in answers:  # temperature 0: the same answer
        assert again.choices[0].message.content == first.choices[0].message.content
    assert embedded.process is not None and embedded.process.pid != old_pid
    assert embedded.restarts == 1


def test_answers_embeddings_as_well_as_chat(light: tuple[ServerThread, EmbeddedBackend]) -> None:
    """The first embeddings request on a fresh machine works too, one as long as the
    model's context as well; a longer one is the client's 400, which leaves chat be.
    """
    server, _ = light
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        result = client.embeddings.create(model="smollm2:135m", input=["hello", "world"])
        assert [len(row.embedding) for row in result.data] == [576, 576]  # SmolLM2's width
        assert result.data[0].embedding != result.data[1].embedding
        long = client.embeddings.create(model="smollm2:135m", input="word " * 1800)
        assert 1800 <= long.usage.prompt_tokens <= 2048  # the slot's context
        for _ in range(4):  # more than the breaker's failures
            with pytest.raises(openai.BadRequestError) as refused:
                client.embeddings.create(model="smollm2:135m", input="word " * 3000)
            assert refused.value.code == "context_length_exceeded"
        assert client.chat.completions.create(**ASK).choices[0].message.content  # type: ignore[call-overload]
        # Fill in the middle, which this model cannot (llama.cpp's /v1/completions leaves
        # the suffix out without a word: the answer was a plain continuation)
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="smollm2:135m", prompt="def add(a, b):\n",
                                      suffix="\n    return total\n", max_tokens=8)
        assert refused.value.code == "unsupported_by_model"
        assert "fill in the middle" in refused.value.message
        # An image, which it cannot see (llama.cpp's 500 "image input is not supported"):
        # the client's 400, and not counted against it (it was, and its breaker opened)
        pixel = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUl" \
            "EQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
        for _ in range(4):
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="smollm2:135m", max_tokens=4, messages=[{
                    "role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": pixel}}]}])
            assert refused.value.code == "unsupported_by_model", refused.value.message
        # Tools it is asked with (llama.cpp takes them, whatever the model makes of them)
        assert client.chat.completions.create(**ASK, tools=[{  # type: ignore[call-overload]
            "type": "function", "function": {"name": "weather", "parameters": {
                "type": "object", "properties": {}}}}]).choices
    # Ollama's clients that pick embedding models by what /api/show says find it.
    with ollama.Client(host=server.url) as ollama_client:
        shown = ollama_client.show("smollm2:135m")
    assert "embedding" in (shown.capabilities or []) and "completion" in (shown.capabilities or [])


def test_a_model_that_cannot_load_keeps_nothing_else_from_being_served(
        ollama_sim: Sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A model file llama.cpp cannot read: the gateway did not listen for two minutes (its
    Ollama's models unserved too), logged "it did not come up" without llama.cpp's reason,
    and listed the model it could not serve.
    """
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(os.urandom(4096))
    started = time.monotonic()
    server = start_gateway(gateway_config(
        backend("light", "embedded", "", tier="server", model_path=str(broken)),
        backend("studio", "ollama", ollama_sim.api_url)))
    try:
        assert time.monotonic() - started < 30
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            assert "broken" not in [m.id for m in client.models.list()]
            answer = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content
        failed = [r.getMessage() for r in caplog.records if "did not come up" in r.getMessage()]
        assert failed and "\n  " in failed[0], failed  # with what llama.cpp said
    finally:
        server.stop()


def test_stops_its_server_on_shutdown() -> None:
    config = gateway_config(backend("light", "embedded", "", tier="server"))
    server = start_gateway(config)
    assert server.app is not None
    embedded = server.app[BACKENDS]["light"]
    assert isinstance(embedded, EmbeddedBackend) and embedded.process is not None
    pid = embedded.process.pid
    server.stop()
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_readmes_first_request_works_on_the_default_config(tmp_path: Path) -> None:
    """README, "Two commands": on a fresh machine (no Ollama, no MLX server) the default
    config's first request works, as "Point a client at it" writes it (the SDK, ``auto``).
    """
    port = free_port()
    process = subprocess.Popen(  # (a home of its own: the default keeps batches there)
        [*GATEWAY, "serve", "--port", str(port)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "HOME": str(tmp_path)})
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process, timeout=120)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                        api_key="your-gateway-key-or-anything")
        reply = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "Hello"}])
        assert reply.choices[0].message.content
        assert reply.model == "smollm2:135m"
    finally:
        process.terminate()
        process.communicate(timeout=30)


def test_fill_in_the_middle_goes_only_where_the_suffix_is_kept(ollama_sim: Sim) -> None:
    """The embedded server leaves a suffix out without a word: a model it serves under the
    name of one Ollama fills in the middle with was failed over to when Ollama's broke, and
    answered a plain continuation; and a [[models]] entry for it let the suffix through.
    """
    model = "qwen2.5-coder:32b"  # Ollama's simulator: it can insert
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("light", "embedded", "", tier="server", context_size=2048, parallel=1,
                models=[model]),
        models=[{"name": "smollm2", "deployments": [{"backend": "light", "model": model}],
                 "capabilities": ["completion", "tools"]}],
        routing={"retries": 0})
    server = start_gateway(config)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            fim = {"prompt": "def add(a, b):\n", "suffix": "\n    return total\n",
                   "max_tokens": 8}
            assert client.completions.create(model=model, **fim).choices  # Ollama's
            ollama_sim.fault(model, status=500)
            with pytest.raises(openai.APIStatusError) as failed:  # not the embedded's
                client.completions.create(model=model, **fim)
            assert failed.value.status_code == 502
            with pytest.raises(openai.BadRequestError) as refused:
                client.completions.create(model="smollm2", **fim)
            assert "cannot fill in the middle" in refused.value.message
    finally:
        server.stop()


def test_requests_waiting_inside_a_server_that_dies_are_answered_by_the_next() -> None:
    """Requests queued inside llama.cpp when it died (no token yet) broke off with it:
    its connections close before its exit is seen, and they were 502s, then its breaker's
    503s. They are sent again to the server that comes back.
    """
    config = gateway_config(backend("light", "embedded", "", tier="server", context_size=2048,
                                    parallel=1, max_concurrency=4),
                            routing={"health_interval": 0.5})
    server = start_gateway(config)
    try:
        embedded = server.app[BACKENDS]["light"]  # type: ignore[index]
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client, \
                concurrent.futures.ThreadPoolExecutor(4) as pool:
            long = client.chat.completions.create(**{**ASK, "max_tokens": 400, "stream": True})  # type: ignore[call-overload]
            next(iter(long))  # the one slot busy: the next three wait inside the server
            asked = [pool.submit(client.chat.completions.create, **ASK) for _ in range(3)]
            time.sleep(0.5)
            os.kill(embedded.process.pid, signal.SIGKILL)
            answers = [future.result(timeout=60) for future in asked]
            long.close()
        assert all(a.choices[0].message.content for a in answers)
    finally:
        server.stop()
