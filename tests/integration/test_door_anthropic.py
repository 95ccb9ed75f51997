"""The Anthropic door, through the official ``anthropic`` SDK: messages whole and streamed,
the ``messages.stream`` helper, a tool-use round trip, thinking blocks from a reasoning
model, token counting, usage as Anthropic counts it (cache reads apart), the model list,
keys by ``x-api-key``, and errors in Anthropic's shape (before a stream and within one).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web

from gateway.sim.fleet import DEFAULT_REPLY, THOUGHT
from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

USER = [{"role": "user", "content": "Hello there"}]
TOOL = {"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0) as c:
        yield c


def test_create_returns_a_whole_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="qwen2.5-coder:32b", max_tokens=256, messages=USER,
                                     system="Be brief.")
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == DEFAULT_REPLY  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.model == "qwen2.5-coder:32b"
    assert message.usage.output_tokens == len(DEFAULT_REPLY.split())
    assert message.usage.input_tokens > 0
    assert message._request_id  # from the request-id header


def test_a_stream_is_anthropics_events_in_order(client: anthropic.Anthropic) -> None:
    events = list(client.messages.create(model="command-r-plus:104b", max_tokens=256,
                                         messages=USER, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events  # type: ignore[union-attr]
                   if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text == DEFAULT_REPLY
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.delta.stop_reason == "end_turn"  # type: ignore[union-attr]
    assert delta.usage.output_tokens == len(DEFAULT_REPLY.split())  # type: ignore[union-attr]


def test_the_stream_helper(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="qwen2.5-coder:32b", max_tokens=256,
                                messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text == DEFAULT_REPLY  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_round_trip(client: anthropic.Anthropic, ollama_sim: Sim,
                             streamed: bool) -> None:
    ask = {"model": "qwen2.5-coder:32b", "max_tokens": 256, "tools": [TOOL],
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    if streamed:
        with client.messages.stream(**ask) as stream:  # type: ignore[arg-type]
            first = stream.get_final_message()
    else:
        first = client.messages.create(**ask)  # type: ignore[call-overload]
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": "Paris"})]
    second = client.messages.create(model="qwen2.5-coder:32b", max_tokens=256, tools=[TOOL],  # type: ignore[list-item]
                                    messages=[*ask["messages"],  # type: ignore[misc]
                                              {"role": "assistant", "content": first.content},
                                              {"role": "user", "content": [
                                                  {"type": "tool_result", "tool_use_id": uses[0].id,
                                                   "content": "sunny, 21 C"}]}])
    assert second.content[0].text == "The tool said: sunny, 21 C"  # type: ignore[union-attr]
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}


def test_a_tool_results_blocks_reach_the_model_as_lines_of_text(client: anthropic.Anthropic,
                                                                ollama_sim: Sim) -> None:
    """A tool message carries text alone: a tool result's text blocks are its lines (not
    run together), a text document its text, and an image or a PDF is named in its place.
    Passed on as the turn's image, an image would make every later turn of the session
    need a model that sees images; refused, the session could not go on.
    """
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n a picture").decode()
    client.messages.create(model="qwen2.5-coder:32b", max_tokens=64, messages=[
        {"role": "user", "content": "What is in these files?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read",
                                           "input": {"path": "."}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [  # type: ignore[list-item]
                {"type": "text", "text": "a.txt"}, {"type": "text", "text": "b.png"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": image}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "notes"}},
                {"type": "document", "source": {"type": "base64",
                                                "media_type": "application/pdf",
                                                "data": image}}]},
            {"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
            {"type": "text", "text": "Describe b.png."}]}])
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent[2:] == [
        {"role": "tool", "tool_name": "read", "content": "a.txt\nb.png\n"
         "[image: not passed on by the gateway]\nnotes\n"
         "[document: not passed on by the gateway]"},
        {"role": "user", "content": "<system-reminder>Be brief.</system-reminder>\n"
                                    "Describe b.png."}]


def test_thinking_blocks_come_only_to_a_client_that_turned_thinking_on(
        client: anthropic.Anthropic) -> None:
    """A reasoning model thinks whatever the client said; its thinking is shown only when
    the client asked, as Anthropic's API does (a client that did not reads the first block
    as the answer).
    """
    asked = client.messages.create(model="qwq:32b", max_tokens=4096, messages=USER,
                                   thinking={"type": "enabled", "budget_tokens": 2048})
    assert [b.type for b in asked.content] == ["thinking", "text"]
    plain = client.messages.create(model="qwq:32b", max_tokens=4096, messages=USER)
    assert [b.type for b in plain.content] == ["text"]
    assert plain.content[0].text == asked.content[1].text  # type: ignore[union-attr]
    streamed = list(client.messages.create(model="qwq:32b", max_tokens=4096, messages=USER,
                                           stream=True))
    assert [e.content_block.type for e in streamed  # type: ignore[union-attr]
            if e.type == "content_block_start"] == ["text"]


def test_a_forced_tool_is_the_only_one_an_ollama_model_is_offered(
        client: anthropic.Anthropic, ollama_sim: Sim) -> None:
    """Ollama has no tool_choice: a choice that names a tool is kept by offering that tool
    alone.
    """
    other = {**TOOL, "name": "record_answer"}
    message = client.messages.create(model="qwen2.5-coder:32b", max_tokens=256,
                                     tools=[TOOL, other],  # type: ignore[list-item]
                                     tool_choice={"type": "tool", "name": "record_answer"},
                                     messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.name for b in message.content if b.type == "tool_use"] == ["record_answer"]
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["record_answer"]
    client.messages.create(model="qwen2.5-coder:32b", max_tokens=256,
                           tools=[TOOL, other],  # type: ignore[list-item]
                           messages=[{"role": "user", "content": "Weather in Paris?"}])
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "record_answer"]


def test_errors_name_anthropics_fields_and_ranges(client: anthropic.Anthropic) -> None:
    """A field the door reads as a chat request's is named as the client sent it, and
    checked against Anthropic's range, not OpenAI's (temperature up to 1, not 2).
    """
    for fields, param in (({"temperature": 1.5}, "temperature"),
                          ({"stop_sequences": 5}, "stop_sequences"),
                          ({"stop_sequences": "END"}, "stop_sequences"),  # a list, not a string
                          ({"stream": "yes"}, "stream"),
                          # wrong types the backends were sent (or that were ignored)
                          ({"tools": {}}, "tools"), ({"top_k": -5}, "top_k"),
                          ({"top_k": "x"}, "top_k"), ({"thinking": "yes"}, "thinking")):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model="qwen2.5-coder:32b", max_tokens=64, messages=USER,
                                   extra_body=fields)
        assert f"'{param}'" in caught.value.message
        assert caught.value.type == "invalid_request_error"


def test_a_wrong_type_deep_in_the_turns_is_named_as_the_client_sent_it(
        client: anthropic.Anthropic) -> None:
    """(It was named as the chat request it becomes: 'messages[3].tool_call_id'.)"""
    turns: list[Any] = [{"role": "user", "content": "Weather?"},
                        {"role": "assistant", "content": [
                            {"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
                        {"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": 7, "content": "sunny"}]}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="qwen2.5-coder:32b", max_tokens=64, system="Be brief.",
                               messages=turns)
    assert "messages[2].content[0].tool_use_id must be a string" in caught.value.message
    turns[1]["content"][0]["id"] = 7
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="qwen2.5-coder:32b", max_tokens=64, messages=turns)
    assert "messages[1].content[0].id must be a string" in caught.value.message


def test_an_image_without_its_data_is_a_400(client: anthropic.Anthropic) -> None:
    for data in (5, None, ""):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model="llava:7b", max_tokens=64, messages=[{
                "role": "user", "content": [{"type": "image", "source": {
                    "type": "base64", "media_type": "image/png", "data": data}}]}])  # type: ignore[typeddict-item]
        assert "source.data" in caught.value.message


def test_a_tool_choice_naming_no_tool_of_the_request_is_a_400(
        client: anthropic.Anthropic) -> None:
    """As Anthropic answers it, not left to the model (which would call another tool)."""
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="qwen2.5-coder:32b", max_tokens=64, messages=USER,
                               tools=[TOOL],  # type: ignore[list-item]
                               tool_choice={"type": "tool", "name": "nope"})
    assert "'tool_choice'" in caught.value.message and "'nope'" in caught.value.message


def test_thinking_blocks_come_signed_and_go_back(client: anthropic.Anthropic) -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    with client.messages.stream(model="qwq:32b", max_tokens=4096, messages=USER,
                                thinking=thinking) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    block = final.content[0]
    assert block.thinking == THOUGHT and block.signature  # type: ignore[union-attr]
    again = client.messages.create(model="qwq:32b", max_tokens=4096, thinking=thinking,  # type: ignore[arg-type]
                                   messages=[*USER, {"role": "assistant",  # type: ignore[list-item]
                                                     "content": final.content},
                                             {"role": "user", "content": "And then?"}])
    assert again.content[-1].text == DEFAULT_REPLY  # type: ignore[union-attr]
    off = client.messages.create(model="qwq:32b", max_tokens=256, messages=USER,
                                 thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]


def test_count_tokens_is_the_models_count(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="qwen2.5-coder:32b", messages=USER,
                                           system="Be brief.")
    used = client.messages.create(model="qwen2.5-coder:32b", max_tokens=16, messages=USER,
                                  system="Be brief.")
    assert counted.input_tokens == used.usage.input_tokens > 0


def test_count_tokens_counts_a_prompt_no_model_can_take(client: anthropic.Anthropic) -> None:
    """Counting is how a client asks whether a prompt fits: one too long for every window
    was a 400 (the model was asked for a token, and refused), where it wants the number."""
    long = [{"role": "user", "content": "word " * 160_000}]  # ~160k tokens: past every window
    counted = client.messages.count_tokens(model="llava:7b", messages=long)  # type: ignore[arg-type]
    assert counted.input_tokens >= 160_000


CACHED_USAGE = {"prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001,
                "prompt_tokens_details": {"cached_tokens": 800}}


def prompt_caching_server() -> web.Application:
    """An OpenAI-compatible server (vLLM, llama.cpp, a cloud API) that read 800 of the
    prompt's 1000 tokens from its prompt cache; OpenAI's prompt_tokens include those 800.
    """
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "cached"}]})

    async def chat(request: web.Request) -> web.Response:
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                                "finish_reason": "stop"}]},
                  {"choices": [], "usage": CACHED_USAGE}]
        body = b"".join(b"data: %s\n\n" % json.dumps(
            {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "cached",
             **event}).encode() for event in events)
        return web.Response(body=body + b"data: [DONE]\n\n", content_type="text/event-stream")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def test_input_tokens_leave_out_those_read_from_the_prompt_cache() -> None:
    """Anthropic's input_tokens leave out cache reads (a client adds the two up to get the
    prompt's length), whole and streamed.
    """
    with ServerThread(prompt_caching_server) as upstream:
        server = start_gateway(gateway_config(backend("cache", "openai", upstream.url + "/v1")))
        try:
            with anthropic.Anthropic(base_url=server.url, api_key="unused",
                                     max_retries=0) as sdk:
                whole = sdk.messages.create(model="cached", max_tokens=16, messages=USER)
                with sdk.messages.stream(model="cached", max_tokens=16,
                                         messages=USER) as stream:
                    streamed = stream.get_final_message()
        finally:
            server.stop()
    for usage in (whole.usage, streamed.usage):
        assert (usage.input_tokens, usage.cache_read_input_tokens) == (200, 800)


def test_the_model_list_ends(client: anthropic.Anthropic) -> None:
    models = list(client.models.list())  # pages on unless told there are no more
    assert "qwq:32b" in [m.id for m in models]
    assert models[0].created_at.year >= 2026


def test_errors_in_anthropics_shape(client: anthropic.Anthropic, ollama_sim: Sim) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=16, messages=USER)
    assert missing.value.type == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as server_tool:
        client.messages.create(model="qwen2.5-coder:32b", max_tokens=16, messages=USER,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "server tool" in server_tool.value.api_message
    ollama_sim.fault("phi3.5:3.8b", cut_after=3)
    with pytest.raises(anthropic.APIStatusError) as cut:
        list(client.messages.create(model="phi3.5:3.8b", max_tokens=256, messages=USER,
                                    stream=True))
    assert cut.value.status_code == 200 and cut.value.type == "api_error"


def test_an_error_carries_its_request_id_as_a_success_does(client: anthropic.Anthropic) -> None:
    """The SDK reads a request's id from ``request-id`` (what a user quotes in a report)."""
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=16, messages=USER)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="qwen2.5-coder:32b", max_tokens=0, messages=USER)
    for caught in (missing, refused):
        assert caught.value.request_id == caught.value.response.headers["x-request-id"]


async def test_a_key_in_x_api_key_is_accepted_and_max_tokens_is_required(
        ollama_sim: Sim) -> None:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        auth={"key_hashes": [hashlib.sha256(b"sk-agent").hexdigest()]}))
    try:
        url = server.url + "/v1/messages"
        body = {"model": "phi3.5:3.8b", "max_tokens": 32, "messages": USER}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body, headers={"x-api-key": "sk-agent",
                                                          "anthropic-version": "2023-06-01"}
                                 ) as ok:
                assert ok.status == 200
                assert (await ok.json())["content"][0]["text"] == DEFAULT_REPLY
            async with http.post(url, json=body, headers={"x-api-key": "sk-wrong"}) as denied:
                assert denied.status == 401
                assert (await denied.json())["error"]["type"] == "authentication_error"
            async with http.post(url, json={"model": "phi3.5:3.8b", "messages": USER},
                                 headers={"x-api-key": "sk-agent"}) as no_limit:
                assert no_limit.status == 400
                error = await no_limit.json()
                assert error["type"] == "error" and "max_tokens" in error["error"]["message"]
        with anthropic.Anthropic(base_url=server.url, api_key="sk-agent", max_retries=0) as sdk:
            assert sdk.messages.create(model="phi3.5:3.8b", max_tokens=32,
                                       messages=USER).content  # the SDK's Bearer works too
    finally:
        server.stop()
