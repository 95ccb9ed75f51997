"""A model's refusal, said in OpenAI's own field for it (``message.refusal``; a cloud model
that will not answer, or not in the structured output asked for), reaches every door's
client: as OpenAI's field, a Responses ``refusal`` part, Anthropic's ``refusal`` stop, and
Ollama's text; a cached answer keeps it; quality assurance takes it for a refusal.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import ollama
import openai
import pydantic
import pytest

from gateway.sim import SimModel, create_openai_app
from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

MODEL = "gpt-4o-mini"
NO = "I'm sorry, I can't help with that request."
USER = [{"role": "user", "content": "Tell me how to pick my neighbour's lock."}]


class Steps(pydantic.BaseModel):
    steps: list[str]


@pytest.fixture(scope="module")
def cloud() -> Iterator[Sim]:
    with ServerThread(lambda: create_openai_app([SimModel(MODEL), SimModel("gpt-4o")],
                                                flavor="openai")) as server:
        yield Sim(server, "openai")


@pytest.fixture
def gateway(cloud: Sim) -> Iterator[ServerThread]:
    cloud.clear()
    cloud.fault(MODEL, refusal=NO)
    server = start_gateway(gateway_config(backend("cloud", "openai", cloud.api_url),
                                          plugins=[{"name": "cache"}]))
    yield server
    server.stop()


@pytest.fixture
def client(gateway: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def test_a_structured_output_refusal_reaches_the_sdks_parse(client: openai.OpenAI) -> None:
    reply = client.chat.completions.parse(model=MODEL, messages=USER,  # type: ignore[arg-type]
                                          response_format=Steps)
    message = reply.choices[0].message
    assert (message.refusal, message.parsed, message.content) == (NO, None, None)


def test_a_refusal_is_in_its_field_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=USER)  # type: ignore[arg-type]
    assert (whole.choices[0].message.refusal, whole.choices[0].message.content) == (NO, None)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER,  # type: ignore
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.refusal or "" for d in deltas) == NO
    assert all(not d.content for d in deltas)
    with client.chat.completions.stream(model=MODEL, messages=USER,  # type: ignore[arg-type]
                                        response_format=Steps) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.refusal == NO


def test_a_cached_refusal_is_still_a_refusal(client: openai.OpenAI, cloud: Sim) -> None:
    first, again = (client.chat.completions.create(model=MODEL, messages=USER,  # type: ignore
                                                   temperature=0) for _ in range(2))
    assert first.choices[0].message.refusal == again.choices[0].message.refusal == NO
    assert len(cloud.requests("/v1/chat/completions")) == 1  # the second from the cache


def test_the_responses_api_says_a_refusal_as_a_refusal_part(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input=USER[0]["content"])
    parts = [p for item in whole.output if item.type == "message" for p in item.content]
    assert [(p.type, getattr(p, "refusal", None)) for p in parts] == [("refusal", NO)]
    events = list(client.responses.create(model=MODEL, input=USER[0]["content"], stream=True))
    assert "".join(e.delta for e in events if e.type == "response.refusal.delta") == NO
    assert [e.refusal for e in events if e.type == "response.refusal.done"] == [NO]
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.output[0].content[0].type == "refusal"
    with client.responses.stream(model=MODEL, input=USER[0]["content"]) as stream:
        final = stream.get_final_response()
    assert final.output[0].content[0].type == "refusal"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_anthropic_and_ollama_clients_read_a_refusal(gateway: ServerThread,
                                                     stream: bool) -> None:
    with anthropic.Anthropic(base_url=gateway.url, api_key="x", max_retries=0) as client:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=64,
                                        messages=USER) as events:  # type: ignore[arg-type]
                message = events.get_final_message()
        else:
            message = client.messages.create(model=MODEL, max_tokens=64,
                                             messages=USER)  # type: ignore[arg-type]
    assert message.stop_reason == "refusal"
    assert "".join(b.text for b in message.content if b.type == "text") == NO
    local = ollama.Client(host=gateway.url)
    try:
        if stream:
            text = "".join(p.message.content or "" for p in
                           local.chat(model=MODEL, messages=USER, stream=True))
        else:
            text = local.chat(model=MODEL, messages=USER).message.content or ""
    finally:
        local.close()
    assert text == NO


def test_quality_assurance_takes_a_refusal_for_one(cloud: Sim) -> None:
    cloud.clear()
    cloud.fault(MODEL, refusal=NO)
    server = start_gateway(gateway_config(backend("cloud", "openai", cloud.api_url),
                                          plugins=[{"name": "qa"}]))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=USER)  # type: ignore[arg-type]
        assert raw.parse().choices[0].message.refusal == NO
        assert raw.headers["x-gateway-qa"].startswith("fail") and \
            "refusal" in raw.headers["x-gateway-qa"]
    finally:
        server.stop()


def test_a_refusal_broken_off_is_not_spliced_onto_another_models_answer(cloud: Sim) -> None:
    """A rescue took no account of a refusal sent: the fallback's answer came after it (or
    its own refusal, the first said twice over)."""
    cloud.clear()
    cloud.fault(MODEL, refusal=NO, cut_after=4)
    server = start_gateway(gateway_config(
        backend("cloud", "openai", cloud.api_url),
        models=[{"name": MODEL, "fallbacks": ["gpt-4o"]}]))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            said: list[str] = []
            with pytest.raises(openai.APIError):
                for chunk in client.chat.completions.create(
                        model=MODEL, messages=USER, stream=True):  # type: ignore[arg-type]
                    delta = chunk.choices[0].delta if chunk.choices else None
                    said.append((delta.refusal or "") + (delta.content or "") if delta else "")
        assert NO.startswith("".join(said)) and "".join(said)
        assert [r["model"] for r in cloud.requests("/v1/chat/completions")] == [MODEL]
    finally:
        server.stop()


def test_the_responses_api_gives_text_and_refusal_alike_whole_and_streamed(
        client: openai.OpenAI, cloud: Sim) -> None:
    cloud.clear()
    cloud.fault(MODEL, refusal=NO)
    whole = client.responses.create(model=MODEL, input="Hello")
    with client.responses.stream(model=MODEL, input="Hello") as stream:
        streamed = stream.get_final_response()
    shapes = [[(item.type, [p.type for p in item.content]) for item in r.output]
              for r in (whole, streamed)]
    assert shapes[0] == shapes[1] == [("message", ["refusal"])]
