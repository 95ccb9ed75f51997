"""The upstream stream reader tolerates what real servers send."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Sequence

import orjson
import pytest

from gateway.protocol.sse import EventReader, LineTooLong, decode_ndjson, decode_sse


async def feed(pieces: Sequence[bytes]) -> AsyncIterator[bytes]:
    """Bytes arriving in the given pieces, as a socket delivers them."""
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


async def events(*pieces: bytes) -> list[tuple[bytes, bytes]]:
    reader = EventReader()
    out = [e async for data in feed(pieces) for e in reader.feed(data)]
    return out + reader.end()


def by_lines(wire: bytes) -> list[tuple[bytes, bytes]]:
    """The events of a whole stream read line by line, as the SSE specification says (a
    byte order mark skipped; CR LF, LF or CR endings): the reference the reader's shortcut
    must agree with.
    """
    out, name, data = [], b"", []
    for line in re.split(rb"\r\n|\r|\n", wire.removeprefix(b"\xef\xbb\xbf")):
        if not line:
            if data:
                out.append((name, b"\n".join(data)))
            name, data = b"", []
        elif line[0] != 0x3A:
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value
    if data:
        out.append((name, b"\n".join(data)))
    return out


async def test_events_split_anywhere_are_reassembled() -> None:
    wire = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    expected = [(b"", b'{"a": 1}'), (b"", b'{"b": 2}'), (b"", b"[DONE]")]
    for cut in range(1, len(wire)):
        assert await events(wire[:cut], wire[cut:]) == expected


async def test_comments_keepalives_and_crlf_are_handled() -> None:
    wire = b': keepalive 1/3\r\n\r\ndata: {"a": 1}\r\n\r\n: ping\n\ndata:{"b": 2}\n\n'
    assert await events(wire) == [(b"", b'{"a": 1}'), (b"", b'{"b": 2}')]


async def test_a_last_event_without_its_blank_line_is_delivered() -> None:
    assert await events(b'data: {"a": 1}\n\ndata: {"b": 2}') == [
        (b"", b'{"a": 1}'), (b"", b'{"b": 2}')]


async def test_multi_line_data_and_event_names() -> None:
    assert await events(b"event: error\ndata: line one\ndata: line two\n\n") == [
        (b"error", b"line one\nline two")]


@pytest.mark.parametrize("seed", range(5))
async def test_any_stream_cut_anywhere_reads_as_the_specification_says(seed: int) -> None:
    rng = random.Random(seed)
    parts = [b"data: {\"n\": %d}\n\n" % i for i in range(30)] + [
        b": keepalive\n\n", b"data:{\"no space\": 1}\n\n", b"event: error\ndata: a\ndata: b\n\n",
        b"data: one\r\n\r\n", b"\n\n\n", b"data: x\n \ndata: y\n\n", b"id: 7\ndata: z\n\n",
        b"data: \r\n\r\n", b"data: cr\rinside\n\n", b"data: old\rdata: mac\r\r",
        b"data: mixed\r\n\n"]
    rng.shuffle(parts)
    bom = b"\xef\xbb\xbf" if seed % 2 else b""
    wire = bom + b"".join(parts) + rng.choice([b"", b"data: last", b"data: last\n"])
    cuts = sorted({*rng.sample(range(1, len(wire)), 12), 1, 2})
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert await events(*pieces) == by_lines(wire)


async def test_payloads_stop_at_done_and_objects_come_per_read() -> None:
    wire = [b'data: {"a": 1}\n\ndata: not json\n\n', b'data: {"b": 2}\n\ndata: [DONE]\n\n',
            b'data: {"after": 1}\n\n']
    assert [objects async for objects in decode_sse(feed(wire))] == [[{"a": 1}], [{"b": 2}]]
    lines = [b'{"a": 1}\n{"b"', b': 2}\n\n{"c": 3}']
    assert [objects async for objects in decode_ndjson(feed(lines))] == [
        [{"a": 1}], [{"b": 2}], [{"c": 3}]]


async def test_what_is_not_json_is_skipped_and_logged_unless_it_is_empty(
        caplog: pytest.LogCaptureFixture) -> None:
    wire = [b'data: {"a": 1}\n\ndata:\n\ndata: \r\n\r\n', b'data: not json\n\ndata: {"b": 2}\n\n']
    with caplog.at_level("WARNING", logger="gateway.protocol.sse"):
        assert [objects async for objects in decode_sse(feed(wire))] == [[{"a": 1}], [{"b": 2}]]
    assert [record.getMessage() for record in caplog.records] == [
        "skipped a stream event that is not JSON: b'not json'"]


async def test_an_event_past_the_limit_is_refused() -> None:
    with pytest.raises(LineTooLong):
        EventReader().feed(b"data: " + b"x" * (4 * 1024 * 1024 + 1))



def parsed(payloads: list[bytes]) -> list[object]:
    """Each payload parsed alone, those that are not JSON skipped: the reference."""
    out = []
    for payload in payloads:
        with contextlib.suppress(orjson.JSONDecodeError):
            out.append(orjson.loads(payload))
    return out


# Events a read may parse as one JSON array, and those that must make it read them one by one.
SHAPES = [b'data: {"n": %d, "text": "a\\n\\ndata: b"}\n\n', b"data: [%d]\n\n", b"data: %d\n\n",
          b'data: "%d"\n\n', b"data: 1,%d\n\n", b"data: [%d\n\ndata: 2]\n\n", b"data: not json\n\n",
          b"data: \n\n", b": keepalive %d\n\n", b"event: e\ndata: {\"e\": %d}\n\n",
          b"data: {\"crlf\": %d}\r\n\r\n", b"data:{\"%d\": 0}\n\n", b"\n\n\n"]


@pytest.mark.parametrize("seed", range(200))
async def test_a_read_parsed_at_once_gives_the_objects_parsed_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    usual = [b'data: {"n": %d}\n\n' % i for i in range(rng.randrange(1, 30))]
    odd = [rng.choice(SHAPES).replace(b"%d", b"%d" % i) for i in range(rng.randrange(0, 4))]
    parts = usual + odd
    rng.shuffle(parts)
    if seed % 3:
        parts.insert(rng.randrange(len(parts) + 1), b"data: [DONE]\n\n")
    wire = b"".join(parts)
    payloads = [data for _name, data in by_lines(wire)]
    expected = parsed(payloads[:payloads.index(b"[DONE]")] if b"[DONE]" in payloads
                      else payloads)
    cuts = sorted(rng.sample(range(1, len(wire)), min(len(wire) - 1, rng.randrange(0, 4))))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    got = [obj async for objects in decode_sse(feed(pieces)) for obj in objects]
    assert got == expected
    lines = [b'{"n": %d}' % i for i in range(rng.randrange(1, 30))] + [
        rng.choice([b"", b"  ", b"1,2", b"[1", b"2]", b"not json", b'{"crlf": 1}\r', b"3"])
        for _ in range(rng.randrange(0, 4))]
    rng.shuffle(lines)
    ndjson = b"\n".join(lines) + b"\n"
    cut = rng.randrange(1, len(ndjson))
    got = [obj async for objects in decode_ndjson(feed([ndjson[:cut], ndjson[cut:]]))
           for obj in objects]
    assert got == parsed([line for line in lines if line.strip()])


@pytest.mark.parametrize("wire", [
    b'data: \n\n{"error": {"message": "boom"}}\n\n',  # a line that is no field of an event
    b'data: {\n  "a": 1\n}\n\n',  # JSON written over lines, as no event's data
    b"data: [1\n\ndata: 2]\n\ndata: 3,4\n\n",  # no one of them JSON, though all together are
])
async def test_what_reads_as_json_only_across_events_is_no_object(wire: bytes) -> None:
    assert [objects async for objects in decode_sse(feed([wire]))] == []


async def test_what_reads_as_json_only_across_lines_is_no_object() -> None:
    for wire in (b"[1\n2]\n3,4\n", b'{"a": 1\n"b": 2}\n3,4\n'):
        assert [objects async for objects in decode_ndjson(feed([wire]))] == []
