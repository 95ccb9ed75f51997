"""Writing a stream to the client as server-sent events (aiohttp-sse).

The stream is committed (status 200 sent) only once the first chunk is in hand, so a
backend that fails before answering still gets a proper HTTP error. After that, an error
becomes one in-band ``data: {"error": …}`` event and the stream ends without ``[DONE]``:
a truncated answer is never presented as a finished one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.backends.base import Chunk, Usage
from gateway.errors import GatewayError
from gateway.keys import REQUEST_ID
from gateway.protocol.responses import StreamEncoder

log = logging.getLogger(__name__)

PING_SECONDS = 15.0  # ": ping" comments keep idle proxies and IDE plugins from hanging up


async def write_stream(
    request: web.Request,
    first: Chunk,
    chunks: AsyncIterator[Chunk],
    encoder: StreamEncoder,
    headers: dict[str, str],
    on_end: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> tuple[web.StreamResponse, bool]:
    """Send ``first`` and the rest of ``chunks``; whether it all went out. Every failure after
    the commit ends the stream in-band (nothing may escape: a second response would corrupt
    this one). ``on_end`` runs when the answer is whole, before ``[DONE]``; what it returns
    rides on the last event (the QA verdict, say).
    """
    response = EventSourceResponse(
        headers=headers, sep="\n", allow_all_methods=True, ping_interval=PING_SECONDS
    )
    await response.prepare(request)
    async with response:
        try:
            usage = await _relay(response, first, chunks, encoder)
            extra = await on_end() if on_end is not None else {}
        except GatewayError as exc:
            await _send_error(response, exc)
            return response, False
        except (ConnectionError, TimeoutError):
            return response, False  # the client left or stopped reading; the caller cleans up
        except Exception:
            log.exception("stream %s failed", request.get(REQUEST_ID, "?"))
            await _send_error(response, GatewayError("The gateway failed while streaming.",
                                                     code="internal_error"))
            return response, False
        with contextlib.suppress(ConnectionError, TimeoutError):
            final = encoder.encode_final(usage, extra)
            if final is not None:
                await response.send(final)
            await response.send("[DONE]")
    return response, True


async def _relay(response: EventSourceResponse, first: Chunk, chunks: AsyncIterator[Chunk],
                 encoder: StreamEncoder) -> Usage | None:
    usage: Usage | None = None
    chunk: Chunk | None = first
    while chunk is not None:
        if chunk.usage is not None:
            usage = chunk.usage
        data = encoder.encode(chunk)
        if data is not None:
            await response.send(data)
        chunk = await anext(chunks, None)
    return usage


async def _send_error(response: EventSourceResponse, error: GatewayError) -> None:
    with contextlib.suppress(ConnectionError, TimeoutError):
        await response.send(error.sse_event())
