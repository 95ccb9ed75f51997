"""The official OpenAI SDK, sync and async, through the gateway to the Ollama simulator."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from gateway.sim.fleet import DEFAULT_REPLY, THOUGHT
from tests.support import ServerThread, Sim

USER = [{"role": "user", "content": "Hello there"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(gateway: ServerThread) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused",
                                  max_retries=0) as c:
        yield c


def test_non_streaming_chat_returns_the_whole_answer_with_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="qwen2.5-coder:32b", messages=USER)
    assert reply.object == "chat.completion"
    assert reply.model == "qwen2.5-coder:32b"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == DEFAULT_REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == len(DEFAULT_REPLY.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_sends_role_first_usage_last(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="qwen2.5-coder:32b", messages=USER, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_sampling_parameters_reach_ollama_as_options(
    client: openai.OpenAI, ollama_sim: Sim
) -> None:
    reply = client.chat.completions.create(
        model="qwen2.5-coder:32b", messages=USER, temperature=0.2, top_p=0.9, max_tokens=3,
        stop=["END"], seed=7,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "The quick brown "
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]
    assert sent["options"] == {"temperature": 0.2, "top_p": 0.9, "num_predict": 3,
                               "stop": ["END"], "seed": 7}


def test_max_completion_tokens_is_honoured(client: openai.OpenAI, ollama_sim: Sim) -> None:
    client.chat.completions.create(model="qwen2.5-coder:32b", messages=USER,
                                   max_completion_tokens=2)
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["options"]["num_predict"] == 2


def test_tool_call_round_trip(client: openai.OpenAI, ollama_sim: Sim) -> None:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="qwen2.5-coder:32b", messages=question,
                                           tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id
    follow_up = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = client.chat.completions.create(model="qwen2.5-coder:32b", messages=follow_up,
                                            tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "The tool said: sunny, 21 C"
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather",
                                                   "arguments": {"city": "Paris"}}}]
    assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="qwen2.5-coder:32b", messages=USER, tools=[WEATHER_TOOL], stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert calls[0].index == 0 and calls[0].type == "function"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_image_parts_become_ollama_images(client: openai.OpenAI, ollama_sim: Sim) -> None:
    pixel = base64.b64encode(b"\x89PNG fake pixel").decode()
    client.chat.completions.create(model="llava:7b", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
    ]}])
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"][0]
    assert sent == {"role": "user", "content": "What is this?", "images": [pixel]}


def test_remote_image_urls_are_refused_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llava:7b", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}])
    assert caught.value.code == "invalid_image_url"


def test_json_mode_and_schema_become_ollama_format(client: openai.OpenAI, ollama_sim: Sim) -> None:
    reply = client.chat.completions.create(model="qwen2.5-coder:32b", messages=USER,
                                           response_format={"type": "json_object"})
    assert json.loads(reply.choices[0].message.content) == {"answer": DEFAULT_REPLY}
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["format"] == "json"
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat.completions.create(
        model="qwen2.5-coder:32b", messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert set(json.loads(reply.choices[0].message.content)) == {"city"}
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["format"] == schema


def test_ollama_thinking_comes_out_as_reasoning_content(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="qwq:32b", messages=USER)
    message = reply.choices[0].message
    assert message.reasoning_content == THOUGHT  # type: ignore[attr-defined]
    assert message.content == DEFAULT_REPLY
    stream = list(client.chat.completions.create(model="qwq:32b", messages=USER, stream=True))
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                      for c in stream if c.choices)
    assert thought == THOUGHT


def test_reasoning_effort_none_turns_thinking_off(client: openai.OpenAI, ollama_sim: Sim) -> None:
    reply = client.chat.completions.create(model="qwq:32b", messages=USER,
                                           reasoning_effort="none")  # type: ignore[arg-type]
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["think"] is False


def test_text_completion_with_suffix_is_fill_in_the_middle(
    client: openai.OpenAI, ollama_sim: Sim
) -> None:
    reply = client.completions.create(model="qwen2.5-coder:32b", prompt="def add(a, b):\n    ",
                                      suffix="\n\nprint(add(1, 2))", max_tokens=20)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "return a + b"
    sent = ollama_sim.requests("/api/generate")[-1]["payload"]
    assert sent["prompt"] == "def add(a, b):\n    " and sent["suffix"] == "\n\nprint(add(1, 2))"
    stream = client.completions.create(model="qwen2.5-coder:32b", prompt="def add(a, b):",
                                       suffix="\n", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == "return a + b"


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    # The SDK asks for base64 by default and decodes it.
    result = client.embeddings.create(model="nomic-embed-text", input=["one", "two"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 768
    assert result.usage.prompt_tokens == 2
    floats = client.embeddings.create(model="nomic-embed-text", input="one",
                                      encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-6)
    with pytest.raises(openai.BadRequestError) as alias:  # an alias picks for chat
        client.embeddings.create(model="auto", input="one")
    assert alias.value.param == "model" and "by a model's own name" in alias.value.message


def test_model_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "qwq:32b" in ids and "command-r-plus:104b" in ids
    model = client.models.retrieve("qwq:32b")
    assert model.id == "qwq:32b" and model.owned_by == "ollama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


async def test_async_client_streams_and_completes(aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.chat.completions.create(model="phi3.5:3.8b", messages=USER)
    assert reply.choices[0].message.content == DEFAULT_REPLY
    stream = await aclient.chat.completions.create(model="phi3.5:3.8b", messages=USER,
                                                   stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == DEFAULT_REPLY
    embedded = await aclient.embeddings.create(model="nomic-embed-text:latest", input="x")
    assert len(embedded.data[0].embedding) == 768
    models = [m.id async for m in aclient.models.list()]
    assert "phi3.5:3.8b" in models
