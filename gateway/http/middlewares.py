"""HTTP concerns only: request ids, the error envelope, keys and their limits, bodies.

Anything that reads or rewrites a body or a stream is a plugin, not a middleware. Errors are
written in the shape of the door a path belongs to (each door brings its own; OpenAI's is
the default).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge, model_shown
from gateway.http.access import OPERATOR_PATHS, admit_admin, identify, limited
from gateway.http.bodies import (
    UPLOAD_OVERHEAD,
    UPLOAD_RATE,
    BodyBudget,
    check_body,
    is_upload,
    read_body,
)
from gateway.http.cors import Cors
from gateway.http.stopping import stopped, stopping
from gateway.keys import BODY, CLIENT_CLOSED, CONFIG, ENDED, REQUEST_ID, STREAM_HEADERS, TENANT
from gateway.protocol.ids import unique_id
from gateway.protocol.times import ms, stamp
from gateway.telemetry import NOTES, AnySpan, Instruments, Telemetry
from gateway.tenants import KeyBook, Limits

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers(),
    )


ErrorShape = Callable[[GatewayError], web.Response]


# The front door of each path, and the operation it asks of a model (as the GenAI semantic
# conventions name it; "" for none).
ROUTES = {
    "/v1/chat/completions": ("openai", "chat"), "/v1/completions": ("openai", "text_completion"),
    "/v1/embeddings": ("openai", "embeddings"), "/v1/responses": ("responses", "chat"),
    "/v1/messages": ("anthropic", "chat"), "/v1/messages/count_tokens": ("anthropic", ""),
    "/api/chat": ("ollama", "chat"), "/api/generate": ("ollama", "text_completion"),
    "/api/embed": ("ollama", "embeddings"), "/api/embeddings": ("ollama", "embeddings"),
}


def route_of(path: str) -> tuple[str, str]:
    """The front door of ``path`` and the model operation it asks for."""
    found = ROUTES.get(path)
    if found is not None:
        return found
    if path.startswith("/v1/responses"):
        return "responses", ""
    if path.startswith("/v1/"):
        return "openai", ""
    if path.startswith("/api/") or path == "/":
        return "ollama", ""
    return "gateway", ""


def gateway_middleware(book: KeyBook, limits: Limits, cors: Cors, bodies: BodyBudget,
                       telemetry: Telemetry,
                       shapes: Sequence[tuple[str, ErrorShape]] = ()) -> Middleware:
    """Request id, the browser guard and CORS preflights, keys and their limits, the body,
    and the error envelope, in one layer (one per request is measurably cheaper than
    several). ``shapes``: path prefixes and the error shape of the door under each (the
    first match wins; else OpenAI's).
    """

    def shaped(request: web.Request, error: GatewayError) -> web.Response:
        path = request.path
        for prefix, shape in shapes:
            if path.startswith(prefix):
                return shape(error)
        return error_response(error)

    tracing, metered = telemetry.tracer.enabled, telemetry.metrics.enabled
    watched = tracing or metered or telemetry.keeps_requests  # else no telemetry per request

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        supplied = request.headers.get("x-request-id", "")
        request_id = request[REQUEST_ID] = \
            supplied if _CLIENT_ID.fullmatch(supplied) else unique_id()
        refusal = cors.refusal(request)
        if refusal is None and (preflight := cors.preflight(request)) is not None:
            preflight.headers["x-request-id"] = request_id
            return preflight
        door, operation = route_of(request.path) if watched else ("", "")
        notes: dict[str, Any] | None = None
        if operation and telemetry.keeps_requests:
            notes = {}
            NOTES.set(notes)
        if tracing:
            span = telemetry.request_span(
                f"{request.method} {request.path if request.path in ROUTES else door}",
                request.headers.get("traceparent"),
                {"http.request.method": request.method, "url.path": request.path,
                 "gateway.door": door, "gateway.request_id": request_id})
        else:
            span = telemetry.untraced(request.headers.get("traceparent"))
        try:
            if refusal is not None:
                raise GatewayError(refusal, status=403, type="permission_error",
                                   code="origin_not_allowed")
            key = await identify(request, book) if book.required else None
            request[TENANT] = key.id if key is not None else ""
            if request.path in OPERATOR_PATHS:
                if book.required:
                    admit_admin(request)
            elif request.path.startswith("/admin/"):
                admit_admin(request)
            server = request.app[CONFIG].server
            upload = is_upload(request)
            limit = request.app[CONFIG].tasks.max_file_bytes + UPLOAD_OVERHEAD if upload \
                else server.max_body_bytes
            check_body(request, limit)
            if request.body_exists:
                with bodies.holding() as held:  # (what has arrived, until it is answered)
                    # An upload (a client with a key) gets more time as it arrives: a
                    # 100 MB batch file does not arrive in 30 seconds on a slow link.
                    await read_body(request, held, limit, server.body_timeout,
                                    UPLOAD_RATE if upload else 0.0)
                    response = await (handler(request) if key is None
                                      else limited(request, handler, key, limits))
            else:
                response = await (handler(request) if key is None
                                  else limited(request, handler, key, limits))
        except GatewayError as exc:
            response = shaped(request, exc.kept())
            if notes is not None:
                notes["error"] = exc.label
        except web.RequestPayloadError:
            # The body could not be read (its Content-Encoding does not decode, say): the
            # connection cannot be used again, and what is left of the body is not worth
            # reading (it ends as read, so aiohttp does not try).
            request.content.feed_eof()
            response = shaped(request, InvalidRequest(
                "The request body could not be read: its Content-Encoding does not decode.",
                code="bad_body"))
            response.force_close()
        except web.HTTPException as exc:
            response = _http_exception(request, exc, shaped)
        except Exception:
            log.exception("request %s failed", request_id)
            response = shaped(request, GatewayError(
                "The gateway failed to handle this request.", code="internal_error"))
        except asyncio.CancelledError:
            # (an answer begun, a model's stream or the dashboard's, takes no second one)
            begun = STREAM_HEADERS in request or request.writer.output_size > 0
            if not stopping(request) or begun:
                # the client left (aiohttp cancels its handler): it is in the records
                if metered or span.recording or notes is not None:
                    _account(telemetry, span, notes, door, operation, request,
                             request.get(STREAM_HEADERS, {}), started, CLIENT_CLOSED)
                raise
            # The gateway stops, its grace spent, before the answer began: the client is
            # told so, the answer going out as answers do
            error = stopped()
            response = shaped(request, error)
            response.force_close()
            if notes is not None:
                notes["error"] = error.label
        if not response.prepared:  # a stream sets it before its headers go out
            response.headers["x-request-id"] = request_id
            if response.status in (408, 413, 415):
                response.force_close()  # the body was not read: the connection is spent
        if metered or span.recording or notes is not None:
            _account(telemetry, span, notes, door, operation, request,
                     request.get(STREAM_HEADERS, response.headers),
                     started, request.get(ENDED), response.status)
        if log.isEnabledFor(logging.DEBUG):  # (never a header's value: it may be a key)
            log.debug("%s %s %s: %d in %.1f ms", request_id, request.method, request.path,
                      response.status, (time.perf_counter() - started) * 1000)
        return response

    return middleware


def _account(telemetry: Telemetry, span: AnySpan, notes: dict[str, Any] | None, door: str,
             operation: str, request: web.Request, headers: Mapping[str, str],
             started: float, ended: tuple[int, str] | None, status: int = 0) -> None:
    """The request in the metrics, its span and the request log, with the status the client
    was told in the end: a stream's in-band error, or the client leaving (499), rather than
    the 200 that began it.
    """
    took = time.perf_counter() - started
    if ended is not None:
        status = ended[0]
        if notes is not None:
            notes["error"] = ended[1]
    if telemetry.metrics.enabled or span.recording:
        _observed(telemetry.instruments, span, door, operation, request, headers, status, took)
    if notes is not None:
        telemetry.answered(_record(request, headers, status, door, operation, took, notes))


def _observed(counted: Instruments, span: AnySpan, door: str, operation: str,
              request: web.Request, headers: Mapping[str, str], status: int,
              took: float) -> None:
    """The request in the metrics, and its span ended."""
    model = headers.get("x-gateway-model", "")
    counted.requests.add((door, str(status), model))
    if operation and status < 400:
        counted.duration.record((operation, model, door), took)
    if span.recording:
        span.set("http.response.status_code", status)
        if operation:
            span.set("gen_ai.operation.name", operation)
        body = request.get(BODY)
        if body is not None and isinstance(body.get("model"), str):
            span.set("gen_ai.request.model", model_shown(body["model"]))
        for header, attribute in SPAN_HEADERS:
            if header in headers:
                span.set(attribute, headers[header])
        if request.get(TENANT):
            span.set("gateway.tenant", request[TENANT])
        if status >= 500:
            span.fail(f"HTTP {status}", str(status))
        span.end()


def _record(request: web.Request, headers: Mapping[str, str], status: int, door: str,
            operation: str, took: float, notes: dict[str, Any]) -> dict[str, Any]:
    """The request's line in the request log (and among the dashboard's last requests):
    what was asked and how it was answered, never what was said.
    """
    body = request.get(BODY)
    asked = body.get("model") if body is not None else None
    record = {"time": stamp(time.time()), "id": request[REQUEST_ID],
              "tenant": request.get(TENANT, ""), "door": door, "operation": operation,
              "model": model_shown(asked) if isinstance(asked, str) else "",
              "served": headers.get("x-gateway-model", ""),
              "backend": headers.get("x-gateway-backend", ""),
              "attempts": int(headers.get("x-gateway-attempts", 0) or 0),
              "route": headers.get("x-gateway-route", ""),
              "status": status, "ms": ms(took),
              "stream": isinstance(body, dict) and body.get("stream") is True, **notes}
    if "x-gateway-cache" in headers:
        record["cache"] = headers["x-gateway-cache"]
    if "x-gateway-safety" in headers:  # (what the safety checker did to the request)
        record.setdefault("safety", headers["x-gateway-safety"])
    return record


# Answer headers that say how a request was answered, as its span's attributes.
SPAN_HEADERS = (("x-gateway-model", "gen_ai.response.model"),
                ("x-gateway-backend", "gateway.backend"),
                ("x-gateway-attempts", "gateway.attempts"),
                ("x-gateway-cache", "gateway.cache"))


def _http_exception(request: web.Request, exc: web.HTTPException,
                    shaped: Callable[[web.Request, GatewayError], web.Response]
                    ) -> web.StreamResponse:
    """aiohttp's own errors (no route, wrong method, body too large), shaped as the door
    of the path would shape them."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):  # (as read: gzip's, decoded)
        config = request.app[CONFIG]
        limit = config.tasks.max_file_bytes if is_upload(request) else \
            config.server.max_body_bytes
        return shaped(request, PayloadTooLarge(
            f"The request body is larger than the limit of {limit} bytes."))
    if isinstance(exc, web.HTTPNotFound):
        return shaped(request, NotFound(f"No route for {request.method} {request.path}.",
                                       code="unknown_url"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = shaped(request, InvalidRequest(
            f"{request.method} is not allowed on {request.path}; use {allowed}.",
            status=405, code="method_not_allowed"))
        response.headers["Allow"] = allowed
        return response
    if exc.status < 400:
        raise exc
    return shaped(request, GatewayError(exc.reason, status=exc.status,
                                       type="invalid_request_error"))


def json_response(data: object, headers: dict[str, str] | None = None,
                  status: int = 200) -> web.Response:
    """``data`` as a JSON body (bytes: already JSON)."""
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, status=status,
                        headers={**headers, **_JSON} if headers else _JSON)


_JSON = {"Content-Type": "application/json"}
