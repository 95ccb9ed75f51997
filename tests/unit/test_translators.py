"""Upstream answers, in every dialect, become the same normalized chunks."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import UpstreamError
from gateway.protocol import ollama
from gateway.protocol.ollama import OllamaTranslator
from gateway.protocol.openai_stream import OpenAITranslator
from gateway.protocol.sse import MalformedEvent
from gateway.protocol.times import plausible_seconds, rfc3339
from gateway.protocol.units import Chunk, Completion


def test_ollama_stream_lines() -> None:
    t = OllamaTranslator("o")
    first = t.chunk({"message": {"role": "assistant", "content": "Hi", "thinking": ""},
                     "done": False})
    assert (first.content, first.finish_reason, t.finished) == ("Hi", None, False)
    last = t.chunk({"message": {"role": "assistant", "content": ""}, "done": True,
                    "done_reason": "length", "prompt_eval_count": 7, "eval_count": 3})
    assert last.finish_reason == "length"
    assert last.usage is not None and last.usage.as_dict() == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert t.finished and t.complete


def test_ollama_tool_calls_get_indexes_ids_and_json_arguments() -> None:
    t = OllamaTranslator("o")
    chunk = t.chunk({"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "a", "arguments": {"x": 1}}},
        {"function": {"name": "b", "arguments": {}}}]}, "done": False})
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"])
            for c in chunk.tool_calls or []] == [(0, "a", '{"x":1}'), (1, "b", "{}")]
    assert all(c["id"].startswith("call_") for c in chunk.tool_calls or [])
    done = t.chunk({"message": {"role": "assistant", "content": ""}, "done": True,
                    "done_reason": "stop"})
    assert done.finish_reason == "tool_calls"


def test_ollama_error_line_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="out of memory"):
        OllamaTranslator("o").chunk({"error": "out of memory"})


@pytest.mark.parametrize("obj", [["x"], {"message": "text"}, {"message": {"content": 5}},
                                 {"response": {"a": 1}}, {"message": {"content": "x",
                                                                      "tool_calls": {"a": 1}}}])
def test_ollama_objects_of_the_wrong_shape_are_malformed(obj: object) -> None:
    with pytest.raises(MalformedEvent):
        OllamaTranslator("o").chunk(obj)


def test_openai_chunks_from_mlx_and_llamacpp() -> None:
    t = OpenAITranslator("m")
    # MLX repeats the role; llama.cpp starts with a role-only chunk and null content.
    assert t.chunk({"choices": [{"delta": {"role": "assistant", "content": None}}]}).content == ""
    assert t.chunk({"choices": [{"delta": {"role": "assistant", "content": "A"}}]}).content == "A"
    finish = t.chunk({"choices": [{"delta": {}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    assert finish.finish_reason == "stop" and finish.usage is not None
    assert t.finished and t.complete


def test_openai_usage_chunk_after_the_finish_completes_the_answer() -> None:
    t = OpenAITranslator("m")
    t.chunk({"choices": [{"delta": {}, "finish_reason": "length"}]})
    assert t.finished and not t.complete
    t.chunk({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert t.complete


def test_openai_whole_completion_and_reasoning_field_names() -> None:
    t = OpenAITranslator("m")
    chunk = t.chunk({"choices": [{"message": {"role": "assistant", "content": "x",
                                              "reasoning": "because"},
                                  "finish_reason": "stop"}]})
    assert (chunk.content, chunk.reasoning, chunk.finish_reason) == ("x", "because", "stop")


def test_openai_think_tags_in_text_become_reasoning() -> None:
    t = OpenAITranslator("m")
    texts = ["<think>", "hmm", "</think>", "\n\nYes."]
    chunks = [t.chunk({"choices": [{"delta": {"content": x}}]}) for x in texts]
    assert "".join(c.reasoning for c in chunks) == "hmm"
    assert "".join(c.content for c in chunks) == "Yes."


@pytest.mark.parametrize("obj", [{"choices": ["x"]}, {"choices": [{"delta": {"content": 3}}]},
                                 {"usage": "many"}, "text", {"choices": [{"text": 0}]},
                                 {"choices": [{"delta": {"content": None}, "text": False}]},
                                 {"choices": [{"delta": {"reasoning": []}}]},
                                 {"choices": {"first": {"delta": {"content": "x"}}}}])
def test_openai_events_of_the_wrong_shape_are_malformed(obj: object) -> None:
    with pytest.raises(MalformedEvent):
        OpenAITranslator("m").chunk(obj)


def test_openai_error_event_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="boom"):
        OpenAITranslator("m").chunk({"error": {"message": "boom"}})


def test_openai_logprobs_fingerprint_and_usage_details_are_kept() -> None:
    t = OpenAITranslator("m")
    top = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    chunk = t.chunk({"system_fingerprint": "b4567-cpu", "choices": [
        {"delta": {"content": "Hi"}, "logprobs": {"content": [top]}}]})
    assert chunk.logprobs == {"content": [top]} and chunk.fingerprint == "b4567-cpu"
    last = t.chunk({"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {
        "prompt_tokens": 9, "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 3}}})
    assert last.usage is not None and last.usage.as_dict() == {
        "prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 3}}


def test_a_whole_answer_gathers_the_logprobs_of_its_pieces() -> None:
    completion = Completion()
    for token in ("A", "B"):
        completion.add(Chunk(content=token, logprobs={"content": [{"token": token}]}))
    completion.add(Chunk(content="C", logprobs={"tokens": ["C"], "token_logprobs": [-1.0]}))
    assert completion.logprobs == {"content": [{"token": "A"}, {"token": "B"}],
                                   "tokens": ["C"], "token_logprobs": [-1.0]}


def test_a_whole_answer_read_while_it_grows_has_every_piece() -> None:
    """Its texts are held in pieces and joined when read: a read between pieces (the QA
    plugin looks at a buffered answer, a door at a tool call) loses none of them.
    """
    completion = Completion(content="He")
    seen = []
    for piece in ("llo", ", ", "world"):
        completion.add(Chunk(content=piece, reasoning=piece.upper(), tool_calls=[
            {"index": 1, "id": "call_x", "function": {"name": "f", "arguments": piece}}]))
        seen.append((completion.content, completion.reasoning,
                     completion.tool_calls[1]["function"]["arguments"]))
    assert seen == [("Hello", "LLO", "llo"), ("Hello, ", "LLO, ", "llo, "),
                    ("Hello, world", "LLO, WORLD", "llo, world")]
    assert completion.tool_calls[0]["function"]["arguments"] == ""  # a call never sent
    assert [c.content for c in completion.chunks()] == ["Hello, world", ""]
    completion.content = ""
    assert completion.content == "" and completion.reasoning == "LLO, WORLD"


def test_openai_tool_calls_get_ids_and_finish_as_tool_calls() -> None:
    t = OpenAITranslator("m")
    first = t.chunk({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"name": "f", "arguments": "{\"a\""}}]}}]})
    more = t.chunk({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ": 1}"}}]}}]})
    last = t.chunk({"choices": [{"delta": {}, "finish_reason": "stop"}]})
    assert first.tool_calls is not None and first.tool_calls[0]["id"].startswith("call_")
    assert more.tool_calls is not None and "id" not in more.tool_calls[0]  # one id per call
    assert last.finish_reason == "tool_calls"  # whatever the server said


def test_a_backends_time_in_milliseconds_is_not_taken_for_seconds() -> None:
    assert plausible_seconds(1_717_000_000) == 1_717_000_000
    assert plausible_seconds(1_717_000_000_000) is None  # milliseconds
    assert plausible_seconds(True) is None and plausible_seconds("1717000000") is None
    assert rfc3339(1_717_000_000).startswith("2024-05-29T")


@pytest.mark.parametrize("call", [
    {"index": "0", "function": {"name": "f"}},  # an index as text
    {"index": True, "function": {"name": "f"}},
    {"index": -1, "function": {"name": "f"}},
    {"index": 10**9, "function": {"name": "f"}},  # would have the calls up to it made
    {"index": 0, "function": "f"},
    {"index": 0, "function": {"name": 5}},
    {"index": 0, "function": {"name": "f", "arguments": ["a"]}},
    {"index": 0, "id": 7, "function": {"name": "f"}},
])
def test_a_tool_call_delta_that_is_not_one_is_a_malformed_event(call: dict[str, Any]) -> None:
    """Skipped as any malformed event is (before, it reached the answer and failed the
    request when merged, or asked for a billion empty calls)."""
    t = OpenAITranslator("m")
    with pytest.raises(MalformedEvent):
        t.chunk({"choices": [{"delta": {"tool_calls": [call]}}]})
    done = t.chunk({"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]})
    assert done.finish_reason == "stop"  # no call was begun
    completion = Completion()
    completion.add(done)
    assert completion.tool_calls == [] and completion.content == "ok"


def test_tool_call_arguments_sent_as_an_object_are_passed_on_as_json() -> None:
    t = OpenAITranslator("m")
    chunk = t.chunk({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}]}}]})
    completion = Completion()
    completion.add(chunk)
    assert completion.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a":1}'}


@pytest.mark.parametrize("call", [{"id": 7, "function": {"name": "f"}},
                                  {"function": {"name": ["f"]}}])
def test_an_ollama_tool_call_that_is_not_one_is_a_malformed_event(call: dict[str, Any]
                                                                   ) -> None:
    t = OllamaTranslator("m")
    with pytest.raises(MalformedEvent):
        t.chunk({"message": {"role": "assistant", "content": "", "tool_calls": [call]}})
    done = t.chunk({"message": {"role": "assistant", "content": "ok"}, "done": True})
    assert done.finish_reason == "stop"  # the call that was not one is not counted


@pytest.mark.parametrize("family", [None, "", "llama"])
def test_a_model_ollama_did_not_describe_is_presumed_able(family: str | None) -> None:
    """/api/show failed: capabilities presumed (a null family among /api/tags' details took
    the whole backend's listing down)."""
    entry = {"name": "mystery:7b", "details": {"family": family, "parameter_size": "7B"}}
    info = ollama.model_info("ollama", entry, None, {})
    assert not info.known and info.can("chat") and info.can("vision")
    embedder = ollama.model_info("ollama", {"name": "nomic-embed-text:latest",
                                            "details": {"family": family}}, None, {})
    assert embedder.known and embedder.capabilities == {"embedding"}


def test_parts_ollama_has_no_place_for_are_named_in_the_text() -> None:
    """Audio and a file (a PDF) sent to a model on Ollama: they were dropped, and the model
    answered as if they had never been sent.
    """
    [message] = ollama.messages([{"role": "user", "content": [
        {"type": "text", "text": "What is said here?"},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;"
                                  "base64,JVBERi0="}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert message == {"role": "user", "images": ["iVBORw0KGgo="], "content": (
        "What is said here?\n[input_audio: not passed on by the gateway]\n"
        "[file: not passed on by the gateway]")}


def test_an_assistants_refusal_part_goes_to_ollama_as_its_text() -> None:
    [message] = ollama.messages([{"role": "assistant", "content": [
        {"type": "refusal", "refusal": "I cannot help with that."}]}])
    assert message == {"role": "assistant", "content": "I cannot help with that."}
