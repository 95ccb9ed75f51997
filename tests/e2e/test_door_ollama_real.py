"""The Ollama door in front of a real llama.cpp server (SmolLM2-135M at temperature 0):
what the ``ollama`` client gets is what a direct ``/v1`` call to that server gets.
"""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import openai
import pytest

from tests.e2e.conftest import RealServer
from tests.support import ServerThread, backend, gateway_config, start_gateway

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 12, "seed": 1}


@pytest.fixture(scope="module")
def gateway(real_llamacpp: RealServer) -> Iterator[ServerThread]:
    server = start_gateway(gateway_config(backend("llamacpp", "openai", real_llamacpp.url)))
    yield server
    server.stop()


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[ollama.Client]:
    client = ollama.Client(host=gateway.url)
    yield client
    client.close()


@pytest.fixture
def direct(real_llamacpp: RealServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=real_llamacpp.url, api_key="x", max_retries=0) as c:
        yield c


def test_chat_says_what_the_server_says(client: ollama.Client, direct: openai.OpenAI) -> None:
    expected = direct.chat.completions.create(model=MODEL, messages=QUESTION,  # type: ignore[arg-type]
                                              temperature=0, max_tokens=12, seed=1)
    text = expected.choices[0].message.content
    assert text
    whole = client.chat(model=MODEL, messages=QUESTION, options=GREEDY)
    assert whole.message.content == text
    streamed = list(client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert "".join(p.message.content or "" for p in streamed) == text
    assert streamed[-1].done and streamed[-1].eval_count == expected.usage.completion_tokens  # type: ignore[union-attr]


def test_generate_fills_in_the_middle_as_the_server_does(client: ollama.Client,
                                                         direct: openai.OpenAI) -> None:
    prompt, suffix = "def add(a, b):\n    ", "\n    return result\n"
    expected = direct.completions.create(model=MODEL, prompt=prompt, suffix=suffix,
                                         temperature=0, max_tokens=12, seed=1)
    reply = client.generate(model=MODEL, prompt=prompt, suffix=suffix, options=GREEDY)
    assert reply.response == expected.choices[0].text != ""


def test_embed_gives_the_servers_vectors(client: ollama.Client, direct: openai.OpenAI) -> None:
    expected = direct.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    got = client.embed(model=MODEL, input="hello")
    assert list(got.embeddings[0]) == pytest.approx(expected.data[0].embedding, abs=1e-6)
