"""Reading upstream streams: byte chunks → lines → JSON objects, from NDJSON (Ollama) or
server-sent events (OpenAI-compatible servers).

Tolerant by design, since upstream servers differ: comment and keepalive lines
(``: keepalive 3/10``) are skipped, CRLF endings accepted, ``data:`` with or without the
space, a final event without its blank line still delivered, a line that is not JSON skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson

log = logging.getLogger(__name__)

MAX_LINE = 4 * 1024 * 1024  # longer than any sane event; beyond it the upstream is broken


class ByteStream(Protocol):
    async def readany(self) -> bytes: ...


class IdleTimeout(TimeoutError):
    """The upstream went silent between two chunks for longer than allowed."""


class LineTooLong(ValueError):
    """A line past ``MAX_LINE`` bytes: not a stream the gateway can follow."""


class MalformedEvent(ValueError):
    """An event that parsed but does not have the shape its protocol promises."""


def text_field(value: Any) -> str:
    """A text field of an upstream event: absent is empty, anything but a string is broken."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedEvent(f"text of type {type(value).__name__}")
    return value


async def iter_lines(stream: ByteStream, idle: float) -> AsyncIterator[list[bytes]]:
    """Lines without their ending, as many at a time as each read brought (a whole answer
    often comes in one: its lines are then handled in one loop, not one step each); raises
    ``IdleTimeout`` after ``idle`` seconds of silence.
    """
    rest = b""
    while True:
        timer = asyncio.timeout(idle)
        try:
            async with timer:
                data = await stream.readany()
        except TimeoutError:
            if timer.expired():
                raise IdleTimeout(f"no data for {idle:g}s") from None
            raise
        if not data:
            break
        if rest:
            data = rest + data
        lines = data.split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            raise LineTooLong(f"a line longer than {MAX_LINE} bytes")
        if lines:
            yield lines
    if rest:
        yield [rest]


class EventReader:
    """Server-sent events from lines, fed as they come: ``(event, data)`` pairs, multi-line
    data joined with newlines.
    """

    __slots__ = ("data", "event")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.event = b""

    def feed(self, lines: list[bytes]) -> list[tuple[bytes, bytes]]:
        out = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self.data:
                    out.append((self.event, b"\n".join(self.data)))
                self.data, self.event = [], b""
                continue
            if line[0] == 0x3A:  # ":" starts a comment
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self.data.append(value)
            elif name == b"event":
                self.event = value
        return out

    def end(self) -> list[tuple[bytes, bytes]]:
        """The last event, should the stream end without its blank line."""
        return [(self.event, b"\n".join(self.data))] if self.data else []


async def iter_events(batches: AsyncIterator[list[bytes]]
                      ) -> AsyncIterator[list[tuple[bytes, bytes]]]:
    """The events of a stream, as many at a time as its reads brought."""
    reader = EventReader()
    async for lines in batches:
        events = reader.feed(lines)
        if events:
            yield events
    last = reader.end()
    if last:
        yield last


async def decode_sse(batches: AsyncIterator[list[bytes]]) -> AsyncIterator[list[Any]]:
    """The JSON payloads of an OpenAI-style event stream, up to ``[DONE]``, as many at a
    time as its reads brought.
    """
    async for events in iter_events(batches):
        payloads = [data for _event, data in events]
        done = b"[DONE]" in payloads
        objects = _decoded(payloads[:payloads.index(b"[DONE]")] if done else payloads, "event")
        if objects:
            yield objects
        if done:
            return


async def decode_ndjson(batches: AsyncIterator[list[bytes]]) -> AsyncIterator[list[Any]]:
    """The objects of a newline-delimited JSON stream, as many at a time as its reads
    brought.
    """
    async for lines in batches:
        objects = _decoded([line for line in lines if line.strip()], "line")
        if objects:
            yield objects


def _decoded(payloads: list[bytes], what: str) -> list[Any]:
    """The payloads parsed; one that is not JSON is skipped (and logged)."""
    objects = []
    for data in payloads:
        try:
            objects.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            log.warning("skipped a stream %s that is not JSON: %.80r", what, data)
    return objects
