"""Writing a streamed answer to the client, in whichever format its door speaks: server-sent
events (OpenAI, the Responses API, Anthropic) or newline-delimited JSON (Ollama).

The stream is committed (status 200 sent) only once the first chunk is in hand, so a
backend that fails before answering still gets a proper HTTP error. After that, an error
becomes the door's in-band error event and the stream ends without its normal ending: a
truncated answer is never presented as a finished one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from multidict import CIMultiDict

from gateway.errors import GatewayError
from gateway.http.stopping import stopped, stopping
from gateway.keys import CLIENT_CLOSED, ENDED, REQUEST_ID, STREAM_HEADERS
from gateway.pipeline import Streamed
from gateway.protocol.units import Chunk

log = logging.getLogger(__name__)

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
PING_SECONDS = 15.0  # ": ping" comments keep idle proxies and IDE plugins from hanging up
SEND_SECONDS = 120.0  # a client that takes no data for this long is dropped
WATCH_SECONDS = 5.0  # how often a stream's watch looks (a stalled client goes within this)


class StreamEncoder(Protocol):
    """One answer in one door's stream format. Each method returns the bytes to send,
    framed (``b""``: nothing).
    """

    media_type: str

    def begin(self) -> bytes: ...  # before the first chunk (a door's opening events)
    def chunk(self, chunk: Chunk) -> bytes: ...
    def end(self, trailers: dict[str, str]) -> bytes: ...  # the answer is whole
    def error(self, error: GatewayError) -> bytes: ...  # it cannot be finished
    def switch_model(self, model: str) -> None: ...  # a rescue goes on from another model


def sse_event(data: bytes, event: str | None = None) -> bytes:
    """One server-sent event (``data`` is one line of JSON)."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def sse_comments(fields: dict[str, str]) -> bytes:
    """``: name: value`` comment lines, which every event-stream client skips: how verdicts
    known only at the end ride along without a client having to understand them.
    """
    return b"".join(f": {name}: {_one_line(value)}\n\n".encode() for name, value in fields.items())


def ndjson_line(obj: object) -> bytes:
    return orjson.dumps(obj) + b"\n"


async def write_stream(request: web.Request, answer: Streamed, encoder: StreamEncoder, *,
                       before_end: Callable[[], Awaitable[None]] | None = None
                       ) -> web.StreamResponse:
    """Send ``answer`` encoded by ``encoder``; the answer is closed however it ends.
    ``before_end`` runs once the answer is whole, before its last events go out (the
    Responses door stores the response there, so a client that continues the conversation
    the moment it has the end finds it).
    """
    headers = {**answer.headers, "x-request-id": request[REQUEST_ID]}
    # Who answered, as the metrics, the trace and the request log say it: a rescue's model
    # and backend once it takes over (the headers sent named the first).
    served = CIMultiDict(headers)

    def switched(model: str, backend: str) -> None:  # (holds no answer: no cycle)
        encoder.switch_model(model)
        served["x-gateway-model"], served["x-gateway-backend"] = model, backend

    answer.on_switch = switched
    ok = False
    try:
        response: web.StreamResponse
        if encoder.media_type == SSE:
            response = EventSourceResponse(headers=headers, sep="\n", allow_all_methods=True,
                                           ping_interval=PING_SECONDS,
                                           send_timeout=SEND_SECONDS)
        else:
            response = web.StreamResponse(headers={**headers,
                                                   "Content-Type": encoder.media_type})
            if request.version >= (1, 1):  # (HTTP/1.0 has none: the body ends with the
                response.enable_chunked_encoding()  # connection, as an nginx asks by default)
        if request.version < (1, 1):  # ... closed, then, even when the client asked to keep it
            response.force_close()
        await response.prepare(request)
        request[STREAM_HEADERS] = served  # (should the client leave, it is read at once)
        pinging = response if isinstance(response, EventSourceResponse) \
            else contextlib.nullcontext(response)
        async with pinging:
            ok = await _relay(request, response, answer, encoder, before_end)
    finally:
        await answer.close(ok)
    return response


async def _relay(request: web.Request, response: web.StreamResponse, answer: Streamed,
                 encoder: StreamEncoder, before_end: Callable[[], Awaitable[None]] | None
                 ) -> bool:
    """Whether the whole answer went out. Every failure after the commit ends the stream
    in-band (nothing may escape: a second response would corrupt this one).
    """
    watch = SendWatch(request)
    try:
        await watch.send(response, encoder.begin() + encoder.chunk(answer.first))
        async for chunk in answer.rest:
            data = encoder.chunk(chunk)
            if data:
                await watch.send(response, data)
        last = encoder.end(await answer.finish())
        if before_end is not None:
            await before_end()
    except GatewayError as exc:
        request[ENDED] = exc.status, exc.label
        await _send_last(request, response, encoder.error(exc))
        return False
    except (ConnectionError, TimeoutError):
        request[ENDED] = CLIENT_CLOSED
        return False  # the client left or stopped reading; the caller cleans up
    except asyncio.CancelledError:
        if not stopping(request):
            raise  # (the client left: aiohttp cancels its handler)
        # The gateway stops, its grace spent: the client is told so, in-band, rather than
        # left with a stream broken off (the SDKs' protocol error, not the API's), and the
        # stream ends as streams end
        error: GatewayError = stopped()
        request[ENDED] = error.status, error.label
        await _send_last(request, response, encoder.error(error))
        return False
    except Exception:
        log.exception("stream %s failed", request.get(REQUEST_ID, "?"))
        error = GatewayError("The gateway failed while streaming.", code="internal_error")
        request[ENDED] = error.status, error.label
        await _send_last(request, response, encoder.error(error))
        return False
    finally:
        watch.close()
    await _send_last(request, response, last)
    return True


class SendWatch:
    """Drops a client that takes no data for ``SEND_SECONDS`` (a stalled client never
    drains the buffer; its connection is aborted, and the write waiting on it fails): one
    timer a stream, looking every ``WATCH_SECONDS``, rather than one armed and cancelled
    around each of its writes.
    """

    __slots__ = ("_handle", "_loop", "_request", "_since")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the write under way began
        self._handle = self._loop.call_later(WATCH_SECONDS, self._look)

    async def send(self, response: web.StreamResponse, data: bytes) -> None:
        self._since = self._loop.time()
        await response.write(data)
        self._since = None

    def _look(self) -> None:
        since = self._since
        if since is not None and self._loop.time() - since >= SEND_SECONDS:
            log.info("stream %s: the client took no data for %.0fs; dropped",
                     self._request.get(REQUEST_ID, "?"), SEND_SECONDS)
            if self._request.transport is not None:
                self._request.transport.abort()
            return
        self._handle = self._loop.call_later(WATCH_SECONDS, self._look)

    def close(self) -> None:
        """Stop looking (the last write, after, is bounded by ``_send_last``)."""
        self._handle.cancel()


async def _send_last(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """The stream's last events; a client that has stopped reading is not waited for longer
    than ``SEND_SECONDS`` (then dropped, as the watch would: a plain close would wait for
    its buffer to drain, which it never does).
    """
    with contextlib.suppress(ConnectionError):
        try:
            async with asyncio.timeout(SEND_SECONDS):
                await response.write(data)
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")
