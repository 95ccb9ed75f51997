"""Serving the app: a runner whose connections answer aiohttp's own errors (a request line
or header that is not HTTP, a body whose encoding cannot be decoded) in the gateway's error
shape, and log only what kind of error it was: the raw header line aiohttp would quote can
hold an API key; and whose shutdown gives requests in flight their grace once.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
)

from gateway.errors import GatewayError
from gateway.http.middlewares import error_response

log = logging.getLogger(__name__)

HANDLERS_END = 2.0  # seconds the requests cut at the end of the grace get to clean up


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server makes ``GatewayHandler`` connections."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same server, but for the connections it makes (the one override).
        server.__class__ = _GatewayServer
        return server


class _GatewayServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return GatewayHandler(self, loop=self._loop, **self._kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Requests in flight get ``timeout`` to finish; then their handlers are cancelled
        (a stream says in-band that the gateway stops: ``stopping``) and their connections
        closed. aiohttp's own waits the timeout, cancels only the reading of a body, and
        waits as long again: a stop took twice the grace.
        """
        try:
            async with asyncio.timeout(timeout):
                await super().shutdown(timeout)
        except TimeoutError:
            handlers = []
            for connection in self._connections:
                task = getattr(connection, "_task_handler", None)
                if task is not None and not task.done():
                    if isinstance(connection, GatewayHandler):
                        connection.stopping = True
                    task.cancel()
                    handlers.append(task)
            if handlers:  # their cancellation's own cleanup (the last event written, the
                # upstream request closed, what was used counted), before the services they
                # use are closed
                await asyncio.wait(handlers, timeout=HANDLERS_END)
            for connection in list(self._connections):
                connection.force_close()
            self._connections.clear()


class GatewayHandler(web.RequestHandler):
    """A connection; what aiohttp refuses before the app sees it is refused in the
    gateway's shape, and the connection closed (its parser state is lost).
    """

    stopping = False  # the gateway stops, the grace spent: its handler is cancelled

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        log.info("refused a malformed request from %s: %s", request.remote,
                 type(exc).__name__ if exc is not None else status)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has begun: no error can be sent")
        response = error_response(refusal(exc, status))
        response.force_close()
        return response


def refusal(exc: BaseException | None, status: int) -> GatewayError:
    """What a client is told of a request aiohttp could not take (never the raw header or
    request line, which may carry a key).
    """
    if isinstance(exc, ContentEncodingError):
        return GatewayError("The request body's Content-Encoding cannot be decoded here: send "
                            "it plain, or compressed with gzip or deflate.", status=415,
                            type="invalid_request_error", code="unsupported_encoding")
    if isinstance(exc, BadHttpMethod):
        text = "The request method is not one HTTP has."
    elif isinstance(exc, LineTooLong):
        text = "The request line or a header is too long."
    elif isinstance(exc, HttpProcessingError) and "Too many headers" in (exc.message or ""):
        text = "The request has too many headers."
    elif isinstance(exc, HttpProcessingError):
        text = "The request is not valid HTTP: its request line or a header is malformed."
    else:
        text = "The gateway could not read this request."
    return GatewayError(text, status=status if 400 <= status < 500 else 400,
                        type="invalid_request_error", code="bad_request")
