"""No request body, however wrong its types, makes a door's parser fail with anything but a
clear 400: every field of a valid body of each door, at every depth, is replaced by each of
a set of values of the wrong kind.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.doors import anthropic_request, ollama_request, responses_request
from gateway.errors import GatewayError
from gateway.protocol.openai import parse_chat, parse_completion, parse_embedding

ODD = [None, True, 0, -1, 1.5, "", "x", [], {}, [None], [1], [{}], {"a": None}, ["x"]]
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def _responses(body: dict[str, Any]) -> None:
    chat, _, _ = responses_request.chat_body(body, [])
    parse_chat(chat)


def _anthropic(body: dict[str, Any]) -> None:
    chat, _ = anthropic_request.chat_body(body)
    parse_chat(chat)


def _anthropic_count(body: dict[str, Any]) -> None:
    chat, _ = anthropic_request.chat_body(body, counting=True)
    parse_chat(chat)


DOORS: dict[str, tuple[Callable[[dict[str, Any]], object], dict[str, Any]]] = {
    "openai chat": (parse_chat, {
        "model": "m", "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 5, "temperature": 0.5, "stop": ["x"], "seed": 1,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]}),
    "openai text": (parse_completion, {"model": "m", "prompt": "def", "suffix": "x",
                                       "max_tokens": 3}),
    "openai embeddings": (parse_embedding, {"model": "m", "input": ["a"], "dimensions": 3,
                                            "encoding_format": "float"}),
    "responses": (_responses, {
        "model": "m", "instructions": "be brief", "stream": True, "max_output_tokens": 9,
        "temperature": 0.2, "tool_choice": {"type": "function", "name": "f"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}},
                  {"type": "namespace", "name": "n", "description": "d", "tools": [
                      {"type": "function", "name": "g", "parameters": {"type": "object"}}]},
                  {"type": "web_search"}],
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}},
        "reasoning": {"effort": "low"},
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "d", "namespace": "n", "name": "g",
             "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c",
             "output": [{"type": "input_text", "text": "ok"}]}]}),
    "anthropic": (_anthropic, {
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "be brief"}],
        "stop_sequences": ["x"], "temperature": 0.1, "top_k": 3,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tool_choice": {"type": "tool", "name": "f"},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "metadata": {"user_id": "u"},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "t", "signature": "s"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [{"type": "text", "text": "ok"}]}]}]}),
    "anthropic count": (_anthropic_count, {"model": "m", "messages": [
        {"role": "user", "content": "hi"}]}),
    "ollama chat": (ollama_request.chat_request, {
        "model": "m", "stream": False, "format": {"type": "object"}, "think": True,
        "keep_alive": "5m", "options": {"temperature": 0.1, "num_predict": 5, "num_ctx": 8},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "messages": [{"role": "user", "content": "hi", "images": [IMAGE]},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"function": {"name": "f", "arguments": {"a": 1}}}]},
                     {"role": "tool", "content": "ok", "tool_name": "f"}]}),
    "ollama generate": (ollama_request.generate_request, {
        "model": "m", "prompt": "def", "suffix": "x", "options": {"seed": 1},
        "stream": False}),
    "ollama generate chat": (ollama_request.generate_request, {
        "model": "m", "prompt": "hi", "system": "s", "images": [IMAGE], "format": "json"}),
}


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key)
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield (*path, i)
            yield from _paths(item, (*path, i))


def _replaced(body: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(body)
    holder: Any = out
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    return out


@pytest.mark.parametrize("door", list(DOORS))
def test_every_field_of_the_wrong_kind_is_a_clear_400(door: str) -> None:
    parse, body = DOORS[door]
    parse(copy.deepcopy(body))  # the body itself is fine
    crashes = []
    for path in _paths(body):
        for odd in ODD:
            try:
                parse(_replaced(body, path, odd))
            except GatewayError as exc:
                assert exc.status == 400, (path, odd, exc)
            except Exception as exc:
                crashes.append(f"{'.'.join(map(str, path))} = {odd!r}: {exc!r}")
    assert crashes == []


def test_a_generate_context_forgets_its_oldest_turns_to_stay_within_what_is_read_back() -> None:
    """(A conversation longer than a context may hold came out whole, and the next turn,
    sending it back, was refused.)"""
    from gateway.doors.ollama_context import CONTEXT_MAX, context_of, history_of

    turns = [{"role": "user" if i % 2 else "assistant", "content": f"{i} " + "w" * 40_000}
             for i in range(30)]  # ~1.2 MB
    context = context_of(turns)
    assert len(context) <= CONTEXT_MAX
    kept = history_of(context)
    assert kept == turns[-len(kept):] and 2 <= len(kept) < 30
