"""What OpenAI clients receive: stream events and whole completions built from chunks."""

from __future__ import annotations

import orjson

from gateway.doors.openai import ChatStream, completion_body
from gateway.protocol.units import Chunk, Completion, Usage


def decode(data: bytes) -> dict[str, object]:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    return orjson.loads(data[6:])  # type: ignore[no-any-return]


def test_stream_events_share_id_and_carry_the_role_first() -> None:
    encoder = ChatStream("chat", "m", include_usage=True, reasoning="separate")
    first = decode(encoder.chunk(Chunk(content="Hi")))
    second = decode(encoder.chunk(Chunk(content="!")))
    assert first["id"] == second["id"] and first["created"] == second["created"]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}  # type: ignore[index]
    assert second["choices"][0]["delta"] == {"content": "!"}  # type: ignore[index]
    assert first["usage"] is None and first["object"] == "chat.completion.chunk"
    encoder.chunk(Chunk(finish_reason="stop", usage=Usage(3, 2)))
    usage = decode(encoder.end({}).removesuffix(b"data: [DONE]\n\n"))
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_without_include_usage_there_is_no_usage_anywhere() -> None:
    encoder = ChatStream("chat", "m", include_usage=False, reasoning="separate")
    assert "usage" not in decode(encoder.chunk(Chunk(content="Hi")))
    encoder.chunk(Chunk(usage=Usage(1, 1)))
    assert encoder.end({}) == b"data: [DONE]\n\n"


def test_empty_chunks_after_the_first_are_not_sent() -> None:
    encoder = ChatStream("chat", "m", include_usage=False, reasoning="separate")
    assert encoder.chunk(Chunk(content="a"))
    assert encoder.chunk(Chunk(usage=Usage(1, 1))) == b""
    assert encoder.chunk(Chunk(reasoning="r"))


def test_inline_reasoning_is_wrapped_in_think_tags_across_chunks() -> None:
    encoder = ChatStream("chat", "m", include_usage=False, reasoning="inline")
    texts = [decode(encoder.chunk(c))["choices"][0]["delta"]["content"]  # type: ignore[index]
             for c in (Chunk(reasoning="a"), Chunk(reasoning="b"), Chunk(content="c"))]
    assert "".join(texts) == "<think>ab</think>c"


def test_tool_call_deltas_merge_into_whole_calls() -> None:
    completion = Completion()
    completion.add(Chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "f", "arguments": '{"a"'}}]))
    completion.add(Chunk(tool_calls=[{"index": 0, "function": {"arguments": ": 1}"}}]))
    completion.add(Chunk(tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                                      "function": {"name": "g", "arguments": "{}"}}]))
    completion.add(Chunk(finish_reason="tool_calls", usage=Usage(5, 4)))
    body = completion_body("chat", completion, "separate")
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in message["tool_calls"]] == [("call_1", "f", '{"a": 1}'), ("call_2", "g", "{}")]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["total_tokens"] == 9


def test_text_completion_body() -> None:
    completion = Completion()
    completion.add(Chunk(content="return a + b", finish_reason="stop", usage=Usage(4, 5)))
    body = completion_body("text", completion, "separate")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "return a + b"


def test_a_failed_response_stream_carries_what_had_come_as_the_sdk_reads_it() -> None:
    """An answer that breaks off in the Responses door: ``response.failed`` holds the text
    and tool-call arguments that had arrived (received in pieces, joined once), and the
    ``openai`` SDK's own event type reads it.
    """
    from openai.types.responses import ResponseFailedEvent

    from gateway.doors.responses_answer import ResponseStream, new_response
    from gateway.errors import UpstreamError

    stream = ResponseStream(new_response({"model": "m"}, store=False), "separate")
    sent = stream.begin()
    for piece in ("Hel", "lo"):
        sent += stream.chunk(Chunk(content=piece))
    for piece in ('{"city": ', '"Paris"}'):
        sent += stream.chunk(Chunk(tool_calls=[{"index": 0, "id": "call_1", "function": {
            "name": "weather", "arguments": piece}}]))
    sent += stream.chunk(Chunk(content=" again"))  # a second message, open when it breaks
    sent += stream.error(UpstreamError("the backend went away", backend="b"))
    failed = [line[len(b"data: "):] for line in sent.split(b"\n")
              if line.startswith(b"data: ") and b'"response.failed"' in line]
    assert len(failed) == 1
    event = ResponseFailedEvent.model_validate_json(failed[0])
    message, call, open_message = event.response.output
    assert message.type == "message" and message.content[0].text == "Hello"
    assert call.type == "function_call" and call.arguments == '{"city": "Paris"}'
    assert open_message.content[0].text == " again"
    assert event.response.status == "failed"


def test_a_responses_answer_of_text_and_refusal_has_the_same_items_whole_and_streamed() -> None:
    from gateway.doors.responses_answer import ResponseStream, new_response

    whole = ResponseStream(new_response({"model": "m"}, False), "separate").whole(
        Completion(content="Partly. ", refusal="The rest, no."))
    stream = ResponseStream(new_response({"model": "m"}, False), "separate")
    stream.begin()
    for chunk in (Chunk(content="Partly. "), Chunk(refusal="The rest, no."),
                  Chunk(finish_reason="stop")):
        stream.chunk(chunk)
    stream.end({})

    def shape(response: dict[str, object]) -> list[tuple[str, list[str]]]:
        return [(item["type"], [part["type"] for part in item["content"]])  # type: ignore
                for item in response["output"]]  # type: ignore[attr-defined]

    assert shape(whole) == shape(stream.response) == [
        ("message", ["output_text"]), ("message", ["refusal"])]
