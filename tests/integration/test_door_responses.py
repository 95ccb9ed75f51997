"""The Responses API door, through the official ``openai`` SDK with strict validation of
every body and event it receives: create (whole and streamed), the ``stream`` helper, a
function-calling round trip, ``previous_response_id``, ``parse`` with a Pydantic model,
reasoning summaries, stored responses per tenant, and clear refusals.
"""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.request
from collections.abc import Iterator

import openai
import pydantic
import pytest

from gateway.sim.fleet import DEFAULT_REPLY, THOUGHT
from tests.support import ServerThread, Sim, backend, gateway_config, openai_client, start_gateway

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False}, "strict": True}


def sdk(url: str, key: str = "unused") -> openai.OpenAI:
    return openai_client(url, key, _strict_response_validation=True)


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with sdk(gateway.url) as c:
        yield c


def test_create_returns_a_whole_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="qwen2.5-coder:32b", input="Hello there",
                                       instructions="Be brief.")
    assert response.status == "completed" and response.object == "response"
    assert response.output_text == DEFAULT_REPLY
    assert response.model == "qwen2.5-coder:32b" and response.instructions == "Be brief."
    assert response.usage is not None and response.usage.output_tokens == \
        len(DEFAULT_REPLY.split())
    assert response.usage.total_tokens == response.usage.input_tokens + \
        response.usage.output_tokens


def test_a_stream_is_the_semantic_events_in_order(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="command-r-plus:104b", input="Hello there",
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == DEFAULT_REPLY
    assert events[-1].response.output_text == DEFAULT_REPLY  # type: ignore[union-attr]
    assert events[-1].response.usage is not None  # type: ignore[union-attr]


def test_the_stream_helper_gives_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="qwen2.5-coder:32b", input="Hello there") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == DEFAULT_REPLY


@pytest.mark.parametrize("streamed", [False, True])
def test_function_calling_round_trip(client: openai.OpenAI, ollama_sim: Sim,
                                     streamed: bool) -> None:
    ask = {"model": "qwen2.5-coder:32b", "tools": [TOOL], "input": "Weather in Paris?"}
    if streamed:
        with client.responses.stream(**ask) as stream:  # type: ignore[call-overload]
            first = stream.get_final_response()
    else:
        first = client.responses.create(**ask)  # type: ignore[call-overload]
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    second = client.responses.create(
        model="qwen2.5-coder:32b", tools=[TOOL], previous_response_id=first.id,  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "sunny, 21 C"}])
    assert second.output_text == "The tool said: sunny, 21 C"
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[2]["tool_name"] == "get_weather"


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI,
                                                         ollama_sim: Sim) -> None:
    first = client.responses.create(model="phi3.5:3.8b", input="My name is Ada.",
                                    instructions="Be brief.")
    second = client.responses.create(model="phi3.5:3.8b", input="What is my name?",
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    # The earlier turn comes along; the earlier instructions do not (as OpenAI does).
    assert sent == [{"role": "user", "content": "My name is Ada."},
                    {"role": "assistant", "content": DEFAULT_REPLY},
                    {"role": "user", "content": "What is my name?"}]


class City(pydantic.BaseModel):
    name: str
    population: int


def test_parse_with_a_pydantic_model(client: openai.OpenAI, ollama_sim: Sim) -> None:
    parsed = client.responses.parse(model="qwen2.5-coder:32b", input="A city, please",
                                    text_format=City)
    assert isinstance(parsed.output_parsed, City)
    schema = ollama_sim.requests("/api/chat")[-1]["payload"]["format"]
    assert set(schema["properties"]) == {"name", "population"}


def test_reasoning_comes_as_a_summary_item(client: openai.OpenAI) -> None:
    response = client.responses.create(model="qwq:32b", input="Hello there",
                                       reasoning={"effort": "medium", "summary": "auto"})
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert response.output[0].summary[0].text == THOUGHT  # type: ignore[union-attr]
    assert response.output_text == DEFAULT_REPLY
    streamed = list(client.responses.create(model="qwq:32b", input="Hello there",
                                            stream=True))
    summary = "".join(e.delta for e in streamed
                      if e.type == "response.reasoning_summary_text.delta")
    assert summary == THOUGHT


def test_stored_responses_can_be_read_and_deleted(client: openai.OpenAI) -> None:
    response = client.responses.create(model="phi3.5:3.8b", input="Hello there")
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == DEFAULT_REPLY
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    unstored = client.responses.create(model="phi3.5:3.8b", input="Hello", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_a_tenant_sees_only_its_own_responses(ollama_sim: Sim) -> None:
    keys = ["sk-alice", "sk-bob"]
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        auth={"key_hashes": [hashlib.sha256(k.encode()).hexdigest() for k in keys]}))
    try:
        with sdk(server.url, "sk-alice") as alice, sdk(server.url, "sk-bob") as bob:
            mine = alice.responses.create(model="phi3.5:3.8b", input="a secret")
            assert alice.responses.retrieve(mine.id).id == mine.id
            with pytest.raises(openai.NotFoundError):
                bob.responses.retrieve(mine.id)
            with pytest.raises(openai.NotFoundError):
                bob.responses.input_items.list(mine.id)
            with pytest.raises(openai.NotFoundError):
                bob.responses.create(model="phi3.5:3.8b", input="and?",
                                     previous_response_id=mine.id)
    finally:
        server.stop()


def test_a_tenant_storing_much_evicts_its_own_oldest_never_anothers(ollama_sim: Sim) -> None:
    """The memory store is full: one tenant's many responses made room by evicting every
    other tenant's, whose conversations could then not be continued.
    """
    keys = ["sk-alice", "sk-bob"]
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url), responses={"max_entries": 4},
        auth={"key_hashes": [hashlib.sha256(k.encode()).hexdigest() for k in keys]}))
    try:
        with sdk(server.url, "sk-alice") as alice, sdk(server.url, "sk-bob") as bob:
            kept = alice.responses.create(model="phi3.5:3.8b", input="remember this")
            bobs = [bob.responses.create(model="phi3.5:3.8b", input=f"note {n}")
                    for n in range(6)]
            assert alice.responses.create(model="phi3.5:3.8b", input="and?",
                                          previous_response_id=kept.id).output_text
            with pytest.raises(openai.NotFoundError):  # bob's oldest made room for his own
                bob.responses.retrieve(bobs[0].id)
            assert bob.responses.retrieve(bobs[-1].id).id == bobs[-1].id
    finally:
        server.stop()

@pytest.mark.parametrize("tool", [{"type": "web_search", "external_web_access": False},
                                  {"type": "file_search", "vector_store_ids": ["vs_1"]},
                                  {"type": "code_interpreter", "container": {"type": "auto"}}])
def test_built_in_tools_are_left_out_and_the_answer_says_so(
        client: openai.OpenAI, ollama_sim: Sim, tool: dict[str, object]) -> None:
    # Codex CLI sends web_search with every request: refusing it would refuse Codex.
    raw = client.responses.with_raw_response.create(
        model="qwen2.5-coder:32b", input="Weather in Paris?", tools=[tool, TOOL, tool])  # type: ignore[list-item]
    assert raw.headers["x-gateway-dropped-tools"] == tool["type"]  # (named once)
    calls = [item for item in raw.parse().output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]  # the function tool still works
    offered = ollama_sim.requests("/api/chat")[-1]["payload"]["tools"]
    assert [t["function"]["name"] for t in offered] == ["get_weather"]
    alone = client.responses.with_raw_response.create(
        model="qwen2.5-coder:32b", input="Hello there", tools=[tool])  # type: ignore[list-item]
    assert alone.parse().output_text == DEFAULT_REPLY  # asked with no tools at all
    assert "tools" not in ollama_sim.requests("/api/chat")[-1]["payload"]


NAMESPACE = {"type": "namespace", "name": "weather", "description": "Weather tools",
             "tools": [{k: v for k, v in TOOL.items() if k != "strict"}]}


@pytest.mark.parametrize("streamed", [False, True])
def test_a_namespaces_function_is_called_by_its_namespace_and_name(
        client: openai.OpenAI, ollama_sim: Sim, streamed: bool) -> None:
    ask = {"model": "qwen2.5-coder:32b", "tools": [NAMESPACE], "input": "Weather in Paris?",
           "store": False}
    if streamed:
        with client.responses.stream(**ask) as stream:  # type: ignore[call-overload]
            first = stream.get_final_response()
    else:
        first = client.responses.create(**ask)  # type: ignore[call-overload]
    offered = ollama_sim.requests("/api/chat")[-1]["payload"]["tools"]
    assert [t["function"]["name"] for t in offered] == ["weather__get_weather"]
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.namespace, call.name, json.loads(call.arguments)) == \
        ("weather", "get_weather", {"city": "Paris"})
    # Codex sends the whole conversation back (store false): the call, then its output.
    second = client.responses.create(
        model="qwen2.5-coder:32b", tools=[NAMESPACE], store=False,  # type: ignore[list-item]
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "namespace": "weather",
                "name": "get_weather", "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "sunny, 21 C"}])
    assert second.output_text == "The tool said: sunny, 21 C"
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["name"] == "weather__get_weather"


@pytest.mark.parametrize(("tools", "choice", "param"), [
    # Two tools the model would know by one name: the namespace's, and a function's...
    ([{"type": "function", "name": "weather__get_weather"}, NAMESPACE], None, "tools[1]"),
    # ...or two namespaces' (a__b's c, a's b__c).
    ([{**NAMESPACE, "name": "a__b", "tools": [{"type": "function", "name": "c"}]},
      {**NAMESPACE, "name": "a", "tools": [{"type": "function", "name": "b__c"}]}], None,
     "tools[1]"),
    ([{"type": "custom", "name": "apply_patch"}], None, "tools[0].type"),
    ([{"type": "web\r\nx-evil: 1"}], None, "tools[0].type"),
    ([{"type": "web_search"}], "required", "tool_choice"),
])
def test_tools_the_gateway_cannot_offer_as_asked_are_a_400(
        client: openai.OpenAI, tools: list[dict[str, object]], choice: str | None,
        param: str) -> None:
    extra = {"tool_choice": choice} if choice else {}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="qwen2.5-coder:32b", input="Hi", tools=tools,  # type: ignore[arg-type]
                                **extra)  # type: ignore[arg-type]
    assert caught.value.param == param


def test_a_function_outputs_parts_reach_the_model_as_lines_of_text(
        client: openai.OpenAI, ollama_sim: Sim) -> None:
    """A tool message carries text alone: a function call output's text parts are its
    lines (not run together), and an image or a file is named in its place.
    """
    image = "data:image/png;base64," + base64.b64encode(b"\x89PNG a picture").decode()
    client.responses.create(model="qwen2.5-coder:32b", input=[  # type: ignore[list-item]
        {"role": "user", "content": "What is in these files?"},
        {"type": "function_call", "call_id": "call_1", "name": "read", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [
            {"type": "input_text", "text": "a.txt"}, {"type": "input_text", "text": "b.png"},
            {"type": "input_image", "image_url": image}]},
        {"role": "user", "content": "Describe b.png."}])
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert [(m["role"], m["content"], m.get("images")) for m in sent[2:]] == [
        ("tool", "a.txt\nb.png\n[input_image: not passed on by the gateway]", None),
        ("user", "Describe b.png.", None)]


def test_allowed_tools_narrow_the_tools_offered(client: openai.OpenAI, ollama_sim: Sim) -> None:
    other = {**TOOL, "name": "record_answer"}
    response = client.responses.create(
        model="qwen2.5-coder:32b", input="Weather in Paris?",
        tools=[TOOL, other],  # type: ignore[list-item]
        tool_choice={"type": "allowed_tools", "mode": "required",
                     "tools": [{"type": "function", "name": "record_answer"}]})
    assert [item.name for item in response.output  # type: ignore[union-attr]
            if item.type == "function_call"] == ["record_answer"]
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["record_answer"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="qwen2.5-coder:32b", input="Hi", tools=[TOOL],  # type: ignore[list-item]
            tool_choice={"type": "allowed_tools", "mode": "required",
                         "tools": [{"type": "function", "name": "nothing"}]})
    assert caught.value.param == "tool_choice"


def test_a_bad_max_output_tokens_is_named_so(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="phi3.5:3.8b", input="Hi", max_output_tokens=0)
    assert caught.value.param == "max_output_tokens"
    assert "'max_output_tokens'" in caught.value.message


def test_a_wrong_value_is_named_as_the_client_sent_it(client: openai.OpenAI) -> None:
    """(It was named as the chat request it becomes: 'messages[2].role', 'response_format'.)"""
    for fields, param in (
            ({"instructions": "Be brief.", "input": [{"role": "user", "content": "a"},
                                                      {"role": "critic", "content": "b"}]},
             "input[1].role"),
            ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
             "text.format.schema")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="phi3.5:3.8b", **fields)  # type: ignore[call-overload]
        assert caught.value.param == param, caught.value.message


def test_tools_not_a_list_or_a_choice_of_no_tool_is_a_400(client: openai.OpenAI) -> None:
    """(Tools as an object were ignored; a function chosen that is not among the tools was
    sent on, and the model called another.)"""
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    for fields in ({"tools": {}}, {"tools": [tool], "tool_choice": {"type": "function",
                                                                    "name": "elsewhere"}},
                   {"tools": [{"type": "web_search" + "_x" * 50_000}]}):  # (not named back)
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="phi3.5:3.8b", input="Hi", extra_body=fields)
        assert str(caught.value.param).split(".")[0].split("[")[0] in fields, caught.value


def test_a_conversation_is_refused_not_ignored(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="phi3.5:3.8b", input="Hi", conversation="conv_123")
    assert caught.value.param == "conversation"


def test_an_unknown_previous_response_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="phi3.5:3.8b", input="Hi",
                                previous_response_id="resp_nothing")
    assert caught.value.param == "previous_response_id"


def test_a_stream_that_breaks_ends_failed(client: openai.OpenAI, ollama_sim: Sim) -> None:
    ollama_sim.fault("phi3.5:3.8b", cut_after=3)
    events = list(client.responses.create(model="phi3.5:3.8b", input="Hello there",
                                          stream=True))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1].response.status == "failed"  # type: ignore[union-attr]
    assert events[-1].response.error is not None  # type: ignore[union-attr]


@pytest.mark.parametrize("output", [[{"type": "input_text", "text": None}],
                                    [{"type": "input_text", "text": 5}], 7])
def test_a_tool_output_of_the_wrong_type_is_a_400(client: openai.OpenAI,
                                                  output: object) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="phi3.5:3.8b", input=[  # type: ignore[list-item]
            {"type": "function_call_output", "call_id": "call_1", "output": output}])
    assert caught.value.param and caught.value.param.startswith("input[0].output")


def test_an_empty_answer_can_be_continued(client: openai.OpenAI, ollama_sim: Sim) -> None:
    ollama_sim.fault("phi3.5:3.8b", reply="", remaining=1)
    first = client.responses.create(model="phi3.5:3.8b", input="Hello there")
    assert first.output_text == ""
    client.responses.create(model="phi3.5:3.8b", input="Still there?",
                            previous_response_id=first.id)
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent[1] == {"role": "assistant", "content": ""}


def test_parallel_tool_calls_null_is_echoed_as_a_boolean(gateway: ServerThread) -> None:
    request = urllib.request.Request(
        gateway.url + "/v1/responses", method="POST",
        data=json.dumps({"model": "phi3.5:3.8b", "input": "Hi",
                         "parallel_tool_calls": None}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.loads(response.read())
    assert body["parallel_tool_calls"] is True
    openai.types.responses.Response.model_validate(body, strict=False)


def test_a_field_given_as_none_is_not_said(client: openai.OpenAI) -> None:
    """The SDK sends a parameter given as None as null; OpenAI reads it as unset (``store``
    true, the default), and so does the gateway.
    """
    response = client.responses.create(
        model="phi3.5:3.8b", input="Hi", store=None, stream=None, background=None,
        conversation=None, include=None, instructions=None, max_output_tokens=None,
        metadata=None, parallel_tool_calls=None, previous_response_id=None, reasoning=None,
        temperature=None, top_p=None, truncation=None, prompt_cache_key=None)
    assert response.output_text == DEFAULT_REPLY and response.store is True
    assert client.responses.retrieve(response.id).id == response.id


def test_endpoints_the_gateway_does_not_serve_are_a_404_that_says_so(
        client: openai.OpenAI) -> None:
    for call in (lambda: client.responses.input_tokens.count(model="phi3.5:3.8b", input="Hi"),
                 lambda: client.responses.compact(model="phi3.5:3.8b", input="Hi")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.code == "unknown_url"
        assert "not supported by this gateway" in caught.value.message


def test_a_response_over_the_size_limit_is_answered_but_not_kept(ollama_sim: Sim) -> None:
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                          responses={"max_record_bytes": 2048}))
    try:
        with sdk(server.url) as client:
            small = client.responses.create(model="phi3.5:3.8b", input="Hello there")
            large = client.responses.create(model="phi3.5:3.8b", input="x" * 4096)
            assert large.output_text == DEFAULT_REPLY  # answered all the same
            assert client.responses.retrieve(small.id).id == small.id
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(large.id)
    finally:
        server.stop()


def test_an_empty_input_is_a_400_on_input(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="phi3.5:3.8b", input=[], max_output_tokens=1)
    assert caught.value.param == "input"


def test_a_stored_responses_input_items_are_listed_a_page_at_a_time(
        client: openai.OpenAI) -> None:
    given = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
             {"role": "assistant", "content": "It is sunny."},
             {"role": "user", "content": "Thanks"}]
    response = client.responses.create(model="phi3.5:3.8b", input=given)  # type: ignore[arg-type]
    newest_first = list(client.responses.input_items.list(response.id, limit=2))  # 3 pages
    assert [item.type for item in newest_first] == [
        "message", "message", "function_call_output", "function_call", "message", "message"]
    assert newest_first[0].content[0].text == "Thanks"  # type: ignore[union-attr]
    assert newest_first[3].name == "get_weather"  # type: ignore[union-attr]
    assert len({item.id for item in newest_first}) == 6  # every item has an id of its own
    page = client.responses.input_items.list(response.id, order="asc", limit=2,
                                             after=newest_first[-2].id)
    assert [item.id for item in page.data] == [newest_first[-3].id, newest_first[-4].id]
    assert page.has_more
    one = client.responses.create(model="phi3.5:3.8b", input="Hello there")
    [item] = client.responses.input_items.list(one.id).data
    assert item.content[0].text == "Hello there"  # type: ignore[union-attr]
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_nothing")
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.input_items.list(one.id, limit=500)
    assert caught.value.param == "limit"
