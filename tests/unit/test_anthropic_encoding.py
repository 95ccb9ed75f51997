"""What Anthropic's clients receive: a stream whose tool uses they can parse."""

from __future__ import annotations

import orjson

from gateway.doors.anthropic_answer import MessageStream
from gateway.protocol.units import Chunk, Usage


def events(data: bytes) -> list[dict[str, object]]:
    return [orjson.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]


def test_tool_uses_go_out_whole_as_json_objects_and_stop_for_the_tool() -> None:
    stream = MessageStream("m", "separate")
    out = stream.begin()
    out += stream.chunk(Chunk(content="Let me look."))
    out += stream.chunk(Chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                           "function": {"name": "f", "arguments": '{"x": 1,'}}]))
    out += stream.chunk(Chunk(tool_calls=[{"index": 0, "function": {"arguments": ",}"}}]))
    out += stream.chunk(Chunk(tool_calls=[{"index": 1, "id": "call_2", "type": "function",
                                           "function": {"name": "g", "arguments": '{"y": 2}'}}]))
    out += stream.chunk(Chunk(finish_reason="stop", usage=Usage(3, 9)))
    out += stream.end({})
    seen = events(out)
    starts = [e["content_block"] for e in seen if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use", "tool_use"]  # type: ignore[index]
    inputs = [orjson.loads(e["delta"]["partial_json"]) for e in seen  # type: ignore[index]
              if e["type"] == "content_block_delta" and
              e["delta"]["type"] == "input_json_delta"]  # type: ignore[index]
    assert inputs == [{"arguments": '{"x": 1,,}'}, {"y": 2}]  # the broken one kept, as JSON
    indexes = [e["index"] for e in seen if e["type"] == "content_block_start"]
    assert indexes == [0, 1, 2]
    delta = next(e for e in seen if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"  # type: ignore[index]
    assert seen[-1] == {"type": "message_stop"}
