"""Request bodies for every front door, from plausible to absurd, and the check that a
gateway answers each one properly: never a 5xx, an error always in its door's shape, a
stream always ended (its normal end, or an in-band error), and never a hang.

Shared by the fuzz test (tests/integration/test_fuzz.py, a few thousand cases) and the
longer run (``python -m loadtest.fuzz``).
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

MODEL = "phi3.5:3.8b"  # a model the simulators serve, so requests go all the way through

JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=16)


def field(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: usually one that makes sense, sometimes any JSON at all."""
    return st.one_of(plausible, plausible, JSON)


TEXT = st.text(max_size=40)
ROLE = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
NUMBER = st.one_of(st.integers(-3, 5000), st.floats(-3, 3, allow_nan=False))
OPENAI_MESSAGE = st.fixed_dictionaries(
    {"role": field(ROLE), "content": field(st.one_of(TEXT, st.lists(st.fixed_dictionaries(
        {"type": field(st.sampled_from(["text", "image_url"])), "text": field(TEXT)}),
        max_size=2)))},
    optional={"tool_calls": field(st.lists(st.fixed_dictionaries(
        {"id": field(TEXT), "type": field(st.just("function")),
         "function": field(st.fixed_dictionaries({"name": field(TEXT),
                                                  "arguments": field(TEXT)}))}),
        max_size=2)),
        "tool_call_id": field(TEXT), "name": field(TEXT)})
TOOL = st.fixed_dictionaries({"type": field(st.just("function")), "function": field(
    st.fixed_dictionaries({"name": field(TEXT), "parameters": field(st.just(
        {"type": "object", "properties": {"x": {"type": "string"}}}))}))})
SAMPLING = {"temperature": field(NUMBER), "top_p": field(NUMBER),
            "max_tokens": field(NUMBER), "seed": field(NUMBER), "stop": field(TEXT),
            "stream": field(st.booleans())}


def door_bodies() -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    """For each door's path: its request bodies."""
    return {
        "/v1/chat/completions": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "messages": field(st.lists(OPENAI_MESSAGE,
                                                                        max_size=3))},
            optional={**SAMPLING, "tools": field(st.lists(TOOL, max_size=2)),
                      "response_format": field(st.sampled_from(
                          [{"type": "json_object"}, {"type": "text"}])),
                      "stream_options": field(st.just({"include_usage": True})),
                      "logprobs": field(st.booleans()), "n": field(NUMBER)}),
        "/v1/completions": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "prompt": field(TEXT)},
            optional={**SAMPLING, "suffix": field(TEXT), "echo": field(st.booleans())}),
        "/v1/embeddings": st.fixed_dictionaries(
            {"model": field(st.just("nomic-embed-text")), "input": field(st.one_of(
                TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(-1, 99), max_size=3)))},
            optional={"dimensions": field(NUMBER),
                      "encoding_format": field(st.sampled_from(["float", "base64"]))}),
        "/v1/responses": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "input": field(st.one_of(TEXT, st.lists(
                st.fixed_dictionaries({"role": field(ROLE), "content": field(TEXT)},
                                      optional={"type": field(st.sampled_from(
                                          ["message", "function_call",
                                           "function_call_output"])),
                                          "call_id": field(TEXT), "output": field(TEXT)}),
                max_size=3)))},
            optional={"instructions": field(TEXT), "stream": field(st.booleans()),
                      "max_output_tokens": field(NUMBER), "temperature": field(NUMBER),
                      "store": field(st.booleans()),
                      "previous_response_id": field(TEXT),
                      "tools": field(st.lists(st.fixed_dictionaries(
                          {"type": field(st.just("function")), "name": field(TEXT)}),
                          max_size=2)),
                      "text": field(st.just({"format": {"type": "json_object"}}))}),
        "/v1/messages": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "max_tokens": field(NUMBER),
             "messages": field(st.lists(st.fixed_dictionaries(
                 {"role": field(st.sampled_from(["user", "assistant"])),
                  "content": field(st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                      {"type": field(st.sampled_from(["text", "tool_use", "tool_result",
                                                      "image"])),
                       "text": field(TEXT)}), max_size=2)))}), max_size=3))},
            optional={"system": field(TEXT), "stream": field(st.booleans()),
                      "stop_sequences": field(st.lists(TEXT, max_size=2)),
                      "temperature": field(NUMBER),
                      "thinking": field(st.just({"type": "enabled", "budget_tokens": 1024})),
                      "tools": field(st.lists(st.fixed_dictionaries(
                          {"name": field(TEXT), "input_schema": field(st.just(
                              {"type": "object"}))}), max_size=2))}),
        "/v1/messages/count_tokens": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "messages": field(st.lists(
                st.fixed_dictionaries({"role": field(st.just("user")),
                                       "content": field(TEXT)}), max_size=2))}),
        "/api/chat": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "messages": field(st.lists(
                st.fixed_dictionaries({"role": field(ROLE), "content": field(TEXT)},
                                      optional={"images": field(st.lists(TEXT, max_size=1)),
                                                "tool_calls": field(JSON)}),
                max_size=3))},
            optional={"stream": field(st.booleans()), "format": field(st.just("json")),
                      "options": field(st.fixed_dictionaries({}, optional={
                          "temperature": field(NUMBER), "num_predict": field(NUMBER),
                          "num_ctx": field(NUMBER)})),
                      "think": field(st.booleans()), "keep_alive": field(TEXT),
                      "tools": field(st.lists(TOOL, max_size=1))}),
        "/api/generate": st.fixed_dictionaries(
            {"model": field(st.just(MODEL)), "prompt": field(TEXT)},
            optional={"suffix": field(TEXT), "system": field(TEXT), "raw": field(st.booleans()),
                      "stream": field(st.booleans()), "images": field(st.lists(TEXT,
                                                                               max_size=1))}),
        "/api/embed": st.fixed_dictionaries(
            {"model": field(st.just("nomic-embed-text")),
             "input": field(st.one_of(TEXT, st.lists(TEXT, max_size=2)))}),
        "/api/show": st.fixed_dictionaries({"model": field(st.just(MODEL))}),
    }


# How each door's stream may end: its normal end, or its in-band error.
STREAM_ENDS = ("data: [DONE]", "event: message_stop", "event: response.completed",
               "event: response.incomplete", "event: response.failed", "event: error",
               'data: {"error"')


@dataclass
class Outcome:
    status: int
    content_type: str
    body: bytes


class Prober:
    """Sends requests on one kept-alive connection (a new one when the gateway closes it)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None

    def send(self, path: str, body: bytes) -> Outcome:
        for _ in range(2):
            connection = self._connection or http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=self.timeout)
            self._connection = connection
            try:
                connection.request("POST", path, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                data = response.read()  # a stream too: to its end, or the timeout fails it
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()  # the gateway closed a spent connection: a fresh one
                continue
            if response.will_close:
                self.close()
            return Outcome(response.status, response.getheader("Content-Type") or "", data)
        raise AssertionError(f"{path}: the connection closed without an answer")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def check(path: str, outcome: Outcome) -> None:
    """Raises if the answer to a request is not a proper one."""
    assert outcome.status < 500, (outcome.status, outcome.body[:300])
    if outcome.status >= 400:
        error = json.loads(outcome.body)
        if path.startswith("/api/"):
            assert set(error) == {"error"} and isinstance(error["error"], str), error
        elif path.startswith("/v1/messages"):
            assert error["type"] == "error" and set(error["error"]) == {"type", "message"}
        else:
            assert set(error["error"]) == {"message", "type", "param", "code"}, error
        return
    if outcome.content_type.startswith("text/event-stream"):
        events = [e for e in outcome.body.decode().split("\n\n")
                  if e.strip() and not e.startswith(":")]
        last = events[-1]
        assert any(end in last for end in STREAM_ENDS), last[-300:]
    elif outcome.content_type.startswith("application/x-ndjson"):
        last = json.loads(outcome.body.strip().splitlines()[-1])
        assert last.get("done") is True or "error" in last, last
    else:
        json.loads(outcome.body)
