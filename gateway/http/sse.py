"""Writing a stream to the client as server-sent events (aiohttp-sse).

The stream is committed (status 200 sent) only once the first chunk is in hand, so a
backend that fails before answering still gets a proper HTTP error. After that, an error
becomes one in-band ``data: {"error": …}`` event and the stream ends without ``[DONE]``:
a truncated answer is never presented as a finished one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.backends.base import Chunk, Usage
from gateway.errors import GatewayError
from gateway.protocol.responses import StreamEncoder

PING_SECONDS = 15.0  # ": ping" comments keep idle proxies and IDE plugins from hanging up


async def write_stream(
    request: web.Request,
    first: Chunk,
    chunks: AsyncIterator[Chunk],
    encoder: StreamEncoder,
    headers: dict[str, str],
) -> web.StreamResponse:
    response = EventSourceResponse(
        headers=headers, sep="\n", allow_all_methods=True, ping_interval=PING_SECONDS
    )
    await response.prepare(request)
    async with response:
        usage: Usage | None = None
        chunk: Chunk | None = first
        try:
            while chunk is not None:
                if chunk.usage is not None:
                    usage = chunk.usage
                data = encoder.encode(chunk)
                if data is not None:
                    await response.send(data)
                chunk = await anext(chunks, None)
        except GatewayError as exc:
            await response.send(exc.sse_event())
            return response
        final = encoder.encode_usage(usage)
        if final is not None:
            await response.send(final)
        await response.send("[DONE]")
    return response
