"""Reading upstream streams: byte chunks → lines (NDJSON) → server-sent events.

Tolerant by design, since upstream servers differ: comment and keepalive lines
(``: keepalive 3/10``) are skipped, CRLF endings accepted, ``data:`` with or without the
space, and a final event without its blank line is still delivered when the stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol


class ByteStream(Protocol):
    async def readany(self) -> bytes: ...


class IdleTimeout(TimeoutError):
    """The upstream went silent between two chunks for longer than allowed."""


async def iter_lines(stream: ByteStream, idle: float) -> AsyncIterator[bytes]:
    """Lines without their ending; raises ``IdleTimeout`` after ``idle`` seconds of silence."""
    rest = b""
    while True:
        try:
            async with asyncio.timeout(idle):
                data = await stream.readany()
        except TimeoutError:
            raise IdleTimeout(f"no data for {idle:g}s") from None
        if not data:
            break
        if rest:
            data = rest + data
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line
    if rest:
        yield rest


async def iter_events(lines: AsyncIterator[bytes]) -> AsyncIterator[tuple[bytes, bytes]]:
    """``(event, data)`` pairs; multi-line data is joined with newlines."""
    data: list[bytes] = []
    event = b""
    async for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if data:
                yield event, b"\n".join(data)
            data, event = [], b""
            continue
        if line[0] == 0x3A:  # ":" starts a comment
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value
    if data:
        yield event, b"\n".join(data)
