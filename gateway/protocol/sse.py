"""Reading upstream streams: byte chunks → lines (NDJSON, Ollama's) or server-sent events
(OpenAI-compatible servers') → JSON objects.

Tolerant by design, since upstream servers differ: comment and keepalive lines
(``: keepalive 3/10``) are skipped, CRLF endings accepted, ``data:`` with or without the
space, a final event without its blank line still delivered, a line that is not JSON skipped
(an empty ``data:`` quietly).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAX_LINE = 4 * 1024 * 1024  # longer than any sane event; beyond it the upstream is broken
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
_NEXT = b"\n\ndata: "  # between two one-line events


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


class LineReader:
    """Lines without their ending from bytes fed as they come, as many at a time as each
    read brought (a whole answer often comes in one: its lines are then handled in one
    loop, not one step each).
    """

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self._rest:
            data = self._rest + data
        lines = data.split(b"\n")
        self._rest = lines.pop()
        if len(self._rest) > MAX_LINE:
            raise LineTooLong(f"a line longer than {MAX_LINE} bytes")
        return lines

    def end(self) -> list[bytes]:
        """The last line, should the stream end without its newline."""
        rest, self._rest = self._rest, b""
        return [rest] if rest else []


class EventReader:
    """Server-sent events from bytes fed as they come: ``(event, data)`` pairs, multi-line
    data joined with newlines; lines end in CR LF, LF or CR, and a byte order mark at the
    start is skipped, as the specification says. An event of one ``data: `` line (what
    OpenAI-compatible servers send) is taken whole; any other is read line by line.
    """

    __slots__ = ("_rest", "_started")

    def __init__(self) -> None:
        self._rest = b""
        self._started = False

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        data = self._take(data)
        return self._events(data) if data else []

    def payloads(self, data: bytes) -> tuple[list[Any], bool]:
        """The JSON payloads of the events ``data`` completes, up to ``[DONE]``, and whether
        it came. A read of nothing but one-line ``data: `` events, each ended by one blank
        line (what servers send; a whole answer's often come in one read), is cut into its
        payloads in one split.
        """
        data = self._take(data)
        if data[:6] == b"data: " and b"\r" not in data:
            end = data.rfind(b"\n\n")
            if end > 0:
                payloads = data[6:end].split(_NEXT)
                if data.count(b"\n", 0, end) == 2 * (len(payloads) - 1):  # (no other line)
                    self._keep(data[end + 2:])
                    return _payloads(payloads)
        return _payloads([payload for _, payload in self._events(data)]) if data else ([], False)

    def end(self) -> list[tuple[bytes, bytes]]:
        """The last event, should the stream end without its blank line."""
        return self.feed(b"\n\n")

    def _take(self, data: bytes) -> bytes:
        """``data`` after what the last read left incomplete, without the stream's byte
        order mark; b"" (all of it held) while too short to tell whether it starts with one.
        """
        if self._rest:
            data, self._rest = self._rest + data, b""
        if not self._started:
            if len(data) < 3 and _BOM.startswith(data):
                self._rest = data
                return b""
            self._started = True
            data = data.removeprefix(_BOM)
        return data

    def _events(self, data: bytes) -> list[tuple[bytes, bytes]]:
        held = b""
        if b"\r" in data:
            if data[-1] == 0x0D:  # a CR whose LF may come with the next read
                data, held = data[:-1], b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        blocks = data.split(b"\n\n")
        self._keep(blocks.pop() + held)
        out = []
        for block in blocks:
            if block[:6] == b"data: " and b"\n" not in block:
                out.append((b"", block[6:]))
            elif block and (event := _event(block)) is not None:
                out.append(event)
        return out

    def _keep(self, rest: bytes) -> None:
        """Hold the start of an event whose end has not come yet."""
        if len(rest) > MAX_LINE:
            raise LineTooLong(f"an event longer than {MAX_LINE} bytes")
        self._rest = rest


def _event(block: bytes) -> tuple[bytes, bytes] | None:
    """One event's lines: its name and data (None: no data, a comment or keepalive)."""
    name, data = b"", []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # ":" starts a comment
            continue
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    return (name, b"\n".join(data)) if data else None


async def decode_sse(reads: AsyncIterable[bytes]) -> AsyncGenerator[list[Any]]:
    """The JSON payloads of an OpenAI-style event stream, up to ``[DONE]``, as many at a
    time as its reads brought.
    """
    reader = EventReader()
    async for data in reads:
        objects, done = reader.payloads(data)
        if objects:
            yield objects
        if done:
            return
    objects, _ = _payloads([payload for _, payload in reader.end()])
    if objects:
        yield objects


async def decode_whole(reads: AsyncIterable[bytes]) -> AsyncGenerator[list[Any]]:
    """A whole JSON answer, as the one event of its stream: what a server that ignores
    ``stream`` sends.
    """
    objects = _each([b"".join([data async for data in reads])], "answer")
    if objects:
        yield objects


def _payloads(payloads: list[bytes]) -> tuple[list[Any], bool]:
    """The events' JSON objects up to ``[DONE]``, and whether it came."""
    done = b"[DONE]" in payloads
    if done:
        payloads = payloads[:payloads.index(b"[DONE]")]
    return _decoded(payloads, "event"), done


async def decode_ndjson(reads: AsyncIterable[bytes]) -> AsyncGenerator[list[Any]]:
    """The objects of a newline-delimited JSON stream, as many at a time as its reads
    brought.
    """
    reader = LineReader()
    async for data in reads:
        objects = _decoded([line for line in reader.feed(data) if line.strip()], "line")
        if objects:
            yield objects
    objects = _decoded([line for line in reader.end() if line.strip()], "line")
    if objects:
        yield objects


def _decoded(payloads: list[bytes], what: str) -> list[Any]:
    """The payloads parsed; one that is not JSON is skipped (and logged, unless empty: a
    ``data:`` with nothing after it, which some servers send to keep a stream alive).
    """
    try:  # (all of them, as nearly always, in one go)
        return [orjson.loads(data) for data in payloads]
    except orjson.JSONDecodeError:
        return _each(payloads, what)


def _each(payloads: list[bytes], what: str) -> list[Any]:
    """The payloads parsed one by one, what is not JSON skipped (see ``_decoded``)."""
    objects = []
    for data in payloads:
        try:
            objects.append(orjson.loads(data))
        except orjson.JSONDecodeError:
            if data.strip():
                log.warning("skipped a stream %s that is not JSON: %.80r", what, data)
    return objects
