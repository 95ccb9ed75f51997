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


async def iter_lines(stream: ByteStream, idle: float) -> AsyncIterator[bytes]:
    """Lines without their ending; raises ``IdleTimeout`` after ``idle`` seconds of silence."""
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


async def decode_sse(lines: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """The JSON payloads of an OpenAI-style event stream, up to ``[DONE]``."""
    async for _event, data in iter_events(lines):
        if data == b"[DONE]":
            return
        try:
            yield orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("skipped a stream event that is not JSON: %.80r", data)


async def decode_ndjson(lines: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """The objects of a newline-delimited JSON stream."""
    async for line in lines:
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("skipped a stream line that is not JSON: %.80r", line)
