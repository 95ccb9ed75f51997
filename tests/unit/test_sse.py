"""The upstream stream reader tolerates what real servers send."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.protocol.sse import IdleTimeout, iter_events, iter_lines


class Feed:
    """Bytes arriving in the given pieces, as a socket delivers them."""

    def __init__(self, pieces: Sequence[bytes], pause: float = 0.0) -> None:
        self._pieces = list(pieces)
        self._pause = pause

    async def readany(self) -> bytes:
        if self._pause:
            await asyncio.sleep(self._pause)
        return self._pieces.pop(0) if self._pieces else b""


async def events(*pieces: bytes) -> list[tuple[bytes, bytes]]:
    return [e async for batch in iter_events(iter_lines(Feed(pieces), idle=5)) for e in batch]


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


async def test_silence_longer_than_idle_raises() -> None:
    with pytest.raises(IdleTimeout):
        [lines async for lines in iter_lines(Feed([b"data: x\n"], pause=0.3), idle=0.1)]
