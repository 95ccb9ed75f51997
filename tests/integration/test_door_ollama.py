"""The Ollama door, through the real ``ollama`` client libraries (Python, and the npm
package under Node), to the simulated fleet: what Continue, Open WebUI and the ollama
tutorials do must work against the gateway as against Ollama itself.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import ollama
import pytest

from gateway.sim import SimModel, create_ollama_app
from gateway.sim.fleet import DEFAULT_REPLY, THOUGHT
from tests.support import ServerThread, Sim, backend, gateway_config, run_node, start_gateway

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[ollama.Client]:
    client = ollama.Client(host=gateway.url)
    yield client
    client.close()


def test_list_names_every_model_with_its_details(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert {"qwq:32b", "command-r-plus:104b", "nomic-embed-text:latest", "auto",
            "auto:code"} <= set(models)
    coder = models["qwen2.5-coder:32b"]
    assert coder.details is not None
    assert (coder.details.family, coder.details.parameter_size) == ("qwen2", "32.8B")
    assert coder.modified_at is not None and coder.modified_at.year == 2026


def test_show_tells_capabilities_and_context(client: ollama.Client) -> None:
    shown = client.show("qwq:32b")
    assert set(shown.capabilities or []) >= {"completion", "tools", "thinking"}
    assert shown.modelinfo is not None and shown.modelinfo["qwen2.context_length"] == 32768


def test_ps_lists_what_the_backend_has_loaded() -> None:
    """With the window Ollama runs each with (it said the model's own: 131072 for 4096)."""
    models = [SimModel("llama3.2:3b", loaded=True, context_length=131072, runs_with=4096),
              SimModel("phi3.5:3.8b")]
    with ServerThread(lambda: create_ollama_app(models)) as sim:
        server = start_gateway(gateway_config(backend("ollama", "ollama", sim.url)))
        client = ollama.Client(host=server.url)
        try:
            assert [m.model for m in client.ps().models] == ["llama3.2:3b"]
            assert client.ps().models[0].context_length == 4096
        finally:
            client.close()
            server.stop()


def test_chat_whole_and_streamed(client: ollama.Client) -> None:
    reply = client.chat(model="qwen2.5-coder:32b", messages=USER, stream=False)
    assert reply.message.content == DEFAULT_REPLY
    assert reply.done and reply.done_reason == "stop"
    assert reply.eval_count == len(DEFAULT_REPLY.split()) and reply.prompt_eval_count
    assert reply.total_duration and reply.total_duration > 0
    # (clients divide by them: tokens a second)
    assert reply.prompt_eval_duration and reply.eval_duration
    parts = list(client.chat(model="command-r-plus:104b", messages=USER, stream=True))
    assert "".join(p.message.content or "" for p in parts) == DEFAULT_REPLY
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    assert parts[-1].eval_count == len(DEFAULT_REPLY.split())


def test_options_reach_the_backend_num_ctx_included(client: ollama.Client,
                                                    ollama_sim: Sim) -> None:
    reply = client.chat(model="qwen2.5-coder:32b", messages=USER, stream=False, options={
        "temperature": 0.2, "num_predict": 3, "seed": 7, "num_ctx": 8192, "top_k": 20},
        keep_alive="10m")
    assert reply.message.content == "The quick brown " and reply.done_reason == "length"
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]
    assert sent["options"] == {"temperature": 0.2, "num_predict": 3, "seed": 7,
                               "num_ctx": 8192, "top_k": 20}
    assert sent["keep_alive"] == "10m"


def test_tool_call_round_trip(client: ollama.Client, ollama_sim: Sim) -> None:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat(model="qwen2.5-coder:32b", messages=question, tools=[WEATHER_TOOL])
    calls = first.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    second = client.chat(model="qwen2.5-coder:32b", tools=[WEATHER_TOOL], messages=[
        *question, first.message,
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}])
    assert second.message.content == "The tool said: sunny, 21 C"
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": {"city": "Paris"}}
    assert sent[2] == {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"}


def test_streamed_tool_calls_arrive_whole(client: ollama.Client) -> None:
    parts = list(client.chat(model="qwen2.5-coder:32b", messages=USER, tools=[WEATHER_TOOL],
                             stream=True))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris"})]
    assert parts[-1].done


def test_images_reach_a_vision_model(client: ollama.Client, ollama_sim: Sim) -> None:
    pixel = b"\x89PNG fake pixel"
    client.chat(model="llava:7b", messages=[
        {"role": "user", "content": "What is this?", "images": [pixel]}])
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"][0]
    assert sent == {"role": "user", "content": "What is this?",
                    "images": [base64.b64encode(pixel).decode()]}


def test_thinking_comes_as_thinking_and_think_false_drops_it(client: ollama.Client) -> None:
    reply = client.chat(model="qwq:32b", messages=USER, think=True)
    assert reply.message.thinking == THOUGHT and reply.message.content == DEFAULT_REPLY
    plain = client.chat(model="qwq:32b", messages=USER, think=False)
    assert not plain.message.thinking and plain.message.content == DEFAULT_REPLY


@pytest.mark.parametrize("reasoning", ["inline", "drop"])
def test_think_true_gives_thinking_whatever_the_gateway_does_for_text_only_clients(
        ollama_sim: Sim, reasoning: str) -> None:
    """``[server] reasoning`` is for OpenAI clients that read only text; an Ollama client
    that says ``think: true`` reads its own field. It got <think> tags in the content, or
    no thinking at all."""
    gateway = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                           server={"reasoning": reasoning}))
    client = ollama.Client(host=gateway.url)
    try:
        for think in (True, "high"):
            reply = client.chat(model="qwq:32b", messages=USER, think=think)
            assert reply.message.thinking == THOUGHT
            assert reply.message.content == DEFAULT_REPLY
        unsaid = client.chat(model="qwq:32b", messages=USER)  # (the gateway's setting)
        assert not unsaid.message.thinking
    finally:
        client.close()
        gateway.stop()


def test_options_past_openais_ranges_reach_ollama_as_sent(client: ollama.Client,
                                                          ollama_sim: Sim) -> None:
    """Ollama takes a temperature of 2.5; it was a 400 ("must be between 0 and 2")."""
    reply = client.chat(model="qwen2.5-coder:32b", messages=USER,
                        options={"temperature": 2.5, "presence_penalty": 3})
    assert reply.message.content == DEFAULT_REPLY
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["options"]
    assert sent["temperature"] == 2.5 and sent["presence_penalty"] == 3


def test_json_format_and_schema(client: ollama.Client, ollama_sim: Sim) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    reply = client.chat(model="qwen2.5-coder:32b", messages=USER, format=schema)
    assert isinstance(json.loads(reply.message.content or ""), dict)
    assert ollama_sim.requests("/api/chat")[-1]["payload"]["format"] == schema


def test_generate_fills_in_the_middle(client: ollama.Client, ollama_sim: Sim) -> None:
    reply = client.generate(model="qwen2.5-coder:32b", prompt="def add(a, b):\n",
                            suffix="\n    return c\n")
    assert reply.response and reply.done
    sent = ollama_sim.requests("/api/generate")[-1]["payload"]
    assert (sent["prompt"], sent["suffix"]) == ("def add(a, b):\n", "\n    return c\n")
    streamed = list(client.generate(model="qwen2.5-coder:32b", prompt="Once", stream=True))
    assert "".join(p.response for p in streamed) == DEFAULT_REPLY and streamed[-1].done


def test_generate_with_system_is_a_chat_turn(client: ollama.Client, ollama_sim: Sim) -> None:
    reply = client.generate(model="phi3.5:3.8b", prompt="Hi", system="Be brief.")
    assert reply.response == DEFAULT_REPLY
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("stream", [False, True])
def test_generate_keeps_the_conversation_in_its_context(client: ollama.Client,
                                                        ollama_sim: Sim, stream: bool) -> None:
    """The ``context`` a generate answer carries, sent back with the next prompt, carries
    the conversation (the older LangChain Ollama LLM, the Ollama docs' example). None came,
    and one sent back was dropped: each turn forgot the ones before."""
    def last(prompt: str, context: list[int] | None) -> Any:
        reply = client.generate(model="qwen2.5-coder:32b", prompt=prompt, context=context,
                                system="Be brief." if context is None else None,
                                stream=stream)
        return list(reply)[-1] if stream else reply  # type: ignore[arg-type]

    first = last("My name is Ada.", None)
    assert first.context and first.done
    second = last("What is my name?", first.context)
    assert second.response == ("" if stream else DEFAULT_REPLY) and second.context
    sent = ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]
    assert sent == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "My name is Ada."},
                    {"role": "assistant", "content": DEFAULT_REPLY},
                    {"role": "user", "content": "What is my name?"}]
    last("And then?", second.context)
    assert len(ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]) == 6
    last("Someone else's tokens?", [1, 2, 3])  # (Ollama's own: read as no context)
    assert len(ollama_sim.requests("/api/chat")[-1]["payload"]["messages"]) == 1
    with pytest.raises(ollama.ResponseError) as caught:  # (too long to unpack on the loop)
        last("A novel?", [first.context[0], *[0] * 300_000])
    assert caught.value.status_code == 400 and "/api/chat" in caught.value.error


def test_raw_generate_is_sent_raw(client: ollama.Client, ollama_sim: Sim) -> None:
    client.generate(model="phi3.5:3.8b", prompt="<|user|>Hi<|end|>", raw=True)
    sent = ollama_sim.requests("/api/generate")[-1]["payload"]
    assert sent["raw"] is True and sent["prompt"] == "<|user|>Hi<|end|>"


def test_embed_and_the_older_embeddings(client: ollama.Client) -> None:
    result = client.embed(model="nomic-embed-text", input=["one", "two"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 768
    single = client.embeddings(model="nomic-embed-text", prompt="one")
    assert list(single.embedding) == pytest.approx(list(result.embeddings[0]), abs=1e-6)


def test_embeds_ollama_fields_reach_ollama_as_sent(client: ollama.Client,
                                                  ollama_sim: Sim) -> None:
    # A long document with truncate off must fail at Ollama, not be cut to its context;
    # keep_alive and num_ctx as the client set them.
    client.embed(model="nomic-embed-text", input="a long document", truncate=False,
                 keep_alive="1h", options={"num_ctx": 8192})
    sent = ollama_sim.requests("/api/embed")[-1]["payload"]
    assert (sent["truncate"], sent["keep_alive"], sent["options"]) == (
        False, "1h", {"num_ctx": 8192})


def test_errors_come_as_ollama_sends_them(client: ollama.Client, ollama_sim: Sim) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="no-such-model", messages=USER)
    assert (missing.value.status_code, missing.value.error) == \
        (404, "model 'no-such-model' not found")
    with pytest.raises(ollama.ResponseError) as pull:
        client.pull("llama3.2")
    assert pull.value.status_code == 403 and "does not pull" in pull.value.error
    ollama_sim.fault("qwen2.5-coder:32b", cut_after=3)
    with pytest.raises(ollama.ResponseError) as cut:
        list(client.chat(model="qwen2.5-coder:32b", messages=USER, stream=True))
    assert cut.value.status_code == -1  # an error line mid-stream, as Ollama sends one


def test_a_prompt_less_request_loads_or_unloads_the_model_on_ollama(
        client: ollama.Client, ollama_sim: Sim) -> None:
    """A request without a prompt is Ollama's load, and with ``keep_alive`` 0 its unload
    (``ollama stop``, Open WebUI's unload): passed on to the Ollama that has the model. The
    gateway answered "load" itself, and nothing was loaded or unloaded."""
    assert client.generate(model="phi3.5:3.8b", keep_alive="1h").done_reason == "load"
    assert client.chat(model="phi3.5:3.8b", messages=[]).done_reason == "load"
    assert client.generate(model="phi3.5:3.8b", keep_alive=0).done_reason == "unload"
    assert client.chat(model="phi3.5:3.8b", messages=[], keep_alive=0).done_reason == "unload"
    asked = [(r["payload"].get("keep_alive"), r["outcome"])
             for r in ollama_sim.requests("/api/generate")
             if r["payload"].get("keep_alive") != "30m"]  # (not the monitor's keep-warm)
    assert asked == [("1h", "loaded"), (None, "loaded"), (0, "unloaded"), (0, "unloaded")]
    # (an embedding model's load is an empty input, passed on as one: Ollama refuses to load
    # it by a generate; a model nobody has is a 404)
    ollama_sim.clear()
    assert client.embed(model="nomic-embed-text", input=[]).embeddings == []
    assert [r["payload"]["input"] for r in ollama_sim.requests("/api/embed")] == [[]]
    # (its unload is a generate's, as any model's: an embed would load it first)
    assert client.embed(model="nomic-embed-text", input=[], keep_alive=0).embeddings == []
    assert len(ollama_sim.requests("/api/embed")) == 1
    assert [r["outcome"] for r in ollama_sim.requests("/api/generate")
            if r["model"] == "nomic-embed-text:latest"] == ["unloaded"]
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="no-such-model", input=[])
    assert caught.value.status_code == 404


def test_root_and_version_answer_as_ollama(gateway: ServerThread) -> None:
    with urllib.request.urlopen(gateway.url + "/", timeout=5) as response:
        assert response.read() == b"Ollama is running"
    with urllib.request.urlopen(gateway.url + "/api/version", timeout=5) as response:
        assert json.loads(response.read())["version"]


def test_the_npm_client_lists_chats_and_generates(gateway: ServerThread) -> None:
    out = json.loads(run_node("ollama_client.mjs", gateway.url, "qwen2.5-coder:32b"))
    assert "qwen2.5-coder:32b" in out["names"]
    assert out["streamed"] == DEFAULT_REPLY == out["whole"]
    assert out["tool"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out["generated"] == DEFAULT_REPLY
    assert out["missing"] == {"status": 404, "error": "model 'no-such-model' not found"}


def test_an_empty_suffix_is_no_suffix(client: ollama.Client, ollama_sim: Sim) -> None:
    reply = client.generate(model="phi3.5:3.8b", prompt="Hi", suffix="")
    assert reply.response == DEFAULT_REPLY
    assert ollama_sim.requests("/api/chat")  # a chat turn, the model's template applied
    assert not ollama_sim.requests("/api/generate")


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embeddings"])
def test_a_request_said_wrong_is_a_400_not_a_load(gateway: ServerThread, ollama_sim: Sim,
                                                   path: str) -> None:
    """A request without a prompt is Ollama's load of the model (with ``keep_alive`` 0, its
    unload): one whose messages or prompt are of the wrong type was taken for one.
    """
    model = "nomic-embed-text" if path == "/api/embeddings" else "qwq:32b"
    key = "messages" if path == "/api/chat" else "prompt"
    wrong: list[Any] = ["", 0, False, {}] if key == "messages" else [0, False, [], {}]
    if path != "/api/embeddings":
        wrong += [{"options": []}, {"think": 1}, {"keep_alive": {}},
                  {"tools": {}} if path == "/api/chat" else {"raw": "yes"}]
    ollama_sim.clear()
    for value in wrong:
        fields = value if isinstance(value, dict) and value else {key: value}
        if key not in fields:
            fields[key] = USER if key == "messages" else "Hello"
        body = json.dumps({"model": model, "keep_alive": 0, **fields}).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(gateway.url + path, body))
            raise AssertionError(f"{fields} was answered")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400, (fields, exc.read())
            assert set(json.loads(exc.read())) == {"error"}
    assert ollama_sim.requests() == [], "a backend was asked"


def test_a_bad_option_is_named_as_the_client_sent_it(client: ollama.Client) -> None:
    for call in (lambda: client.chat("qwen2.5-coder:32b", [{"role": "user", "content": "Hi"}],
                                     options={"num_predict": "many"}),
                 lambda: client.generate("qwen2.5-coder:32b", "Hi",
                                         options={"temperature": "warm"})):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 400
        assert "'options." in caught.value.error and "max_tokens" not in caught.value.error


@pytest.mark.parametrize("keep", ["", "Connection: keep-alive\r\n"], ids=["close", "keep"])
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
def test_a_stream_asked_over_http_1_0_ends_with_the_connection(gateway: ServerThread,
                                                               path: str, keep: str) -> None:
    """As an nginx in front asks by default (``proxy_http_version`` 1.0): HTTP/1.0 has no
    chunked encoding, and the stream was a 500 once its first token had come; and one asked
    to keep the connection (``ab -k``, some proxies) never ended: nothing said where.
    """
    body = json.dumps({"model": "qwen2.5-coder:32b", "messages": USER, "prompt": "Hello",
                       "stream": True})
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{keep}Content-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        raw = b""
        while piece := sock.recv(65536):  # (to the end: the server closes the connection)
            raw += piece
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.0 200 OK"
    if path.startswith("/v1"):
        events = [line.removeprefix(b"data: ") for line in rest.splitlines()
                  if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                       for e in events[:-1]) == DEFAULT_REPLY
        return
    lines = [json.loads(line) for line in rest.splitlines() if line]
    text = "".join(line["message"]["content"] if path == "/api/chat" else line["response"]
                   for line in lines)
    assert text == DEFAULT_REPLY and lines[-1]["done"] is True


def test_a_stream_said_to_be_null_streams_as_ollama_does(gateway: ServerThread) -> None:
    body = json.dumps({"model": "qwen2.5-coder:32b", "messages": USER, "stream": None})
    request = urllib.request.Request(gateway.url + "/api/chat", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        lines = [json.loads(line) for line in response.read().splitlines() if line]
    assert len(lines) > 2 and lines[-1]["done"] is True
