"""Request bodies: refused before they are read when they cannot be taken, read within a
time limit under a budget for all bodies held at once (each holding what has arrived of it),
and parsed once (by whoever asks first: the middleware, for what a key may use, or a door).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError, InvalidRequest, PayloadTooLarge, Unavailable
from gateway.keys import BODY, RAW_BODY
from gateway.protocol.openai import parse_body

# The one path whose body is a file upload (multipart/form-data, up to [tasks]
# max_file_bytes, not [server] max_body_bytes); every other body is JSON.
UPLOADS = "/v1/files"
UPLOAD_RATE = 128 * 1024  # bytes a second an upload is given time for (a 1 Mbit/s link)
UPLOAD_OVERHEAD = 64 * 1024  # a multipart body's own, around the file
PARSED_APART = 1024 * 1024  # bytes of a body from which it is parsed off the event loop


def is_upload(request: web.Request) -> bool:
    """Whether the request sends a file (its body's limit is [tasks] max_file_bytes)."""
    return request.path == UPLOADS and request.method == "POST"


async def body_of(request: web.Request) -> dict[str, Any]:
    """The request's JSON body, parsed (and checked) once; a large one in a thread (16 MB
    of small arrays took six seconds, which every other request waited for).
    """
    body = request.get(BODY)
    if body is None:
        raw = raw_body(request)
        body = request[BODY] = parse_body(raw) if len(raw) < PARSED_APART \
            else await _apart(raw)
    return body


def raw_body(request: web.Request) -> bytes:
    """The request's body as it was read (decoded), ``b""`` when it has none."""
    raw: bytes = request.get(RAW_BODY, b"")
    return raw


async def _apart(raw: bytes) -> dict[str, Any]:
    """``raw`` parsed in a thread, which no client leaving stops: its request is over when
    the parse is (the body's share of the budget is held until then).
    """
    parsing = asyncio.ensure_future(asyncio.to_thread(parse_body, raw))
    try:
        return await asyncio.shield(parsing)
    except asyncio.CancelledError:
        while not parsing.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([parsing])
        raise


class BodyBudget:
    """The bytes of request bodies held at once, all requests together, bounded: a flood of
    large uploads is turned away instead of filling memory. A body holds what has arrived
    of it, not what it says it will be: bodies that never come hold nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def holding(self) -> Iterator[Held]:
        """A body's share, grown as it arrives, held until the request is answered."""
        held = Held(self)
        try:
            yield held
        finally:
            self.held -= held.size


class Held:
    """A body's share of the budget."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.size = budget, 0

    def grow(self, size: int) -> None:
        """The body is ``size`` bytes so far (refused when the budget cannot hold that)."""
        budget = self.budget
        if size > budget.limit:  # (never: not a wait, as a full budget is)
            raise PayloadTooLarge(f"The request body is larger than the gateway takes at once "
                                  f"([server] bodies_in_flight_bytes: {budget.limit} bytes).")
        if budget.held + size - self.size > budget.limit:
            raise Unavailable("Too many large request bodies are being received at once; "
                              "retry shortly.", retry_after=1, code="bodies_in_flight")
        budget.held += size - self.size
        self.size = size


async def read_body(request: web.Request, held: Held, limit: int, patience: float,
                    rate: float = 0.0) -> None:
    """Read the body now (``raw_body`` has it then), within ``patience`` seconds, holding
    what has arrived of it, up to ``limit`` bytes as decoded; with a ``rate`` (bytes a
    second), a second more for each ``rate`` bytes that arrive (a large upload on a slow
    link, its length declared or not; one that trickles does not get longer).
    """
    if request.content.is_eof():  # all of it came with the head: nothing to wait for (and
        await _read(request, held, limit)  # no timer to set and cancel, on most requests)
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    step = min(1.0, patience / 4)  # (how often the limit is moved: well before it falls)
    watch: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(patience) as deadline:
            def extend() -> None:
                nonlocal watch
                deadline.reschedule(started + patience + request.content.total_bytes / rate)
                watch = loop.call_later(step, extend)

            if rate:
                watch = loop.call_later(step, extend)
            await _read(request, held, limit)
    except TimeoutError:
        request.content.feed_eof()  # no lingering for the rest: it is not coming
        raise GatewayError(f"The request body did not arrive in time ({patience:g} seconds"
                           + (f", and one more for each {rate / 1024:g} KiB" if rate else "")
                           + ").", status=408, type="invalid_request_error",
                           code="body_timeout") from None
    finally:
        if watch is not None:
            watch.cancel()


async def _read(request: web.Request, held: Held, limit: int) -> None:
    content = request.content
    body = bytearray()
    while chunk := await content.readany():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} "
                                  "bytes.")
        held.grow(len(body))
    request[RAW_BODY] = bytes(body)


def encoding_of(request: web.Request) -> str:
    """The request body's Content-Encoding, as compared ("" for none)."""
    return request.headers.get("Content-Encoding", "").strip().lower()


# Content-Encodings of request bodies the gateway decodes.
ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


def check_body(request: web.Request, limit: int) -> None:
    """Refuse, before a byte of it is read, a body the gateway cannot take: larger than
    ``limit`` by its declared length, or in an encoding it cannot decode.
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    if len(request.headers.getall("Content-Encoding", ())) > 1:  # (aiohttp decodes by the
        # last, what is said here of a body by the first)
        raise InvalidRequest("A request body has one Content-Encoding.", code="bad_body")
    encoding = encoding_of(request)
    if encoding not in ENCODINGS:
        raise GatewayError(f"The request body's Content-Encoding {encoding!r} cannot be "
                           "decoded here: send it plain, or compressed with gzip or deflate.",
                           status=415, type="invalid_request_error",
                           code="unsupported_encoding")

