"""HTTP concerns only: request ids, the error envelope, and API-key auth.

Anything that reads or rewrites a body or a stream is a plugin, not a middleware. Errors are
written in the shape of the door a path belongs to (each door brings its own; OpenAI's is
the default).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from gateway.http.cors import Cors
from gateway.keys import CONFIG, REQUEST_ID, TENANT
from gateway.protocol.ids import unique_id

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths anyone may call: liveness for load balancers and orchestrators, and the greeting
# and version by which Ollama's clients recognise a server.
PUBLIC_PATHS = frozenset({"/health", "/", "/api/version"})


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers(),
    )


ErrorShape = Callable[[GatewayError], web.Response]


def gateway_middleware(key_hashes: Iterable[str], cors: Cors, bodies: BodyBudget,
                       shapes: Sequence[tuple[str, ErrorShape]] = ()) -> Middleware:
    """Request id, the browser guard and CORS preflights, API-key auth and the error
    envelope, in one layer (one per request is measurably cheaper than several). ``shapes``:
    path prefixes and the error shape of the door under each (the first match wins; else
    OpenAI's).
    """
    digests = frozenset(h.removeprefix("sha256:") for h in key_hashes)

    def shaped(request: web.Request, error: GatewayError) -> web.Response:
        path = request.path
        for prefix, shape in shapes:
            if path.startswith(prefix):
                return shape(error)
        return error_response(error)

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
        try:
            if refusal is not None:
                raise GatewayError(refusal, status=403, type="permission_error",
                                   code="origin_not_allowed")
            request[TENANT] = authenticate(request, digests)
            server = request.app[CONFIG].server
            check_body(request, server.max_body_bytes)
            if request.body_exists:
                with bodies.holding(request.content_length or server.max_body_bytes):
                    await read_body(request, server.body_timeout)
                    response = await handler(request)
            else:
                response = await handler(request)
        except GatewayError as exc:
            response = shaped(request, exc)
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
        if not response.prepared:  # a stream sets it before its headers go out
            response.headers["x-request-id"] = request_id
            if response.status in (408, 413, 415):
                response.force_close()  # the body was not read: the connection is spent
        if log.isEnabledFor(logging.DEBUG):  # (never a header's value: it may be a key)
            log.debug("%s %s %s: %d in %.1f ms", request_id, request.method, request.path,
                      response.status, (time.perf_counter() - started) * 1000)
        return response

    return middleware


class BodyBudget:
    """The bytes of request bodies held at once, all requests together, bounded: a flood of
    large (or never-ending) uploads is turned away instead of filling memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def holding(self, size: int) -> Iterator[None]:
        if self.held + size > self.limit:
            raise Unavailable("Too many large request bodies are being received at once; "
                              "retry shortly.", retry_after=1, code="bodies_in_flight")
        self.held += size
        try:
            yield
        finally:
            self.held -= size


async def read_body(request: web.Request, patience: float) -> None:
    """Read the body now (aiohttp keeps it for the handler), within ``patience`` seconds."""
    try:
        async with asyncio.timeout(patience):
            await request.read()
    except TimeoutError:
        request.content.feed_eof()  # no lingering for the rest: it is not coming
        raise GatewayError(f"The request body did not arrive within {patience:g} seconds.",
                           status=408, type="invalid_request_error",
                           code="body_timeout") from None


# Content-Encodings of request bodies the gateway decodes.
ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})


def check_body(request: web.Request, limit: int) -> None:
    """Refuse, before a byte of it is read, a body the gateway cannot take: larger than
    ``limit`` by its declared length, or in an encoding it cannot decode.
    """
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        raise GatewayError(f"The request body's Content-Encoding {encoding!r} cannot be "
                           "decoded here: send it plain, or compressed with gzip or deflate.",
                           status=415, type="invalid_request_error",
                           code="unsupported_encoding")


def authenticate(request: web.Request, digests: frozenset[str]) -> str:
    """The tenant (a digest prefix of the API key), or "" when keys are not required."""
    if not digests or request.path in PUBLIC_PATHS:
        return ""
    key = presented_key(request)
    if not key:
        raise AuthenticationFailed(
            "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    digest = key_digest(key)
    if digest not in digests:
        raise AuthenticationFailed("Invalid API key.")
    return digest[:16]


def presented_key(request: web.Request) -> str:
    """The key a request carries (``Authorization: Bearer`` or ``x-api-key``), or ""."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        key = request.headers.get("x-api-key", "")  # how Anthropic's clients send it
    return key.strip()


def is_admin(request: web.Request) -> bool:
    """Whether the request carries one of the operator's keys (``[auth] admin_key_hashes``)."""
    digests = {h.removeprefix("sha256:") for h in request.app[CONFIG].auth.admin_key_hashes}
    key = presented_key(request)
    return bool(key) and key_digest(key) in digests


def key_digest(key: str) -> str:
    """The SHA-256 of a key (bytes that were not UTF-8 count as they came)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _http_exception(request: web.Request, exc: web.HTTPException,
                    shaped: Callable[[web.Request, GatewayError], web.Response]
                    ) -> web.StreamResponse:
    """aiohttp's own errors (no route, wrong method, body too large), shaped as the door
    of the path would shape them."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[CONFIG].server.max_body_bytes
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


def json_response(data: object, headers: dict[str, str] | None = None) -> web.Response:
    """``data`` as a JSON body (bytes: already JSON)."""
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, headers={**headers, **_JSON} if headers else _JSON)


_JSON = {"Content-Type": "application/json"}
