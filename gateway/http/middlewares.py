"""HTTP concerns only: request ids, the error envelope, and API-key auth.

Anything that reads or rewrites a body or a stream is a plugin, not a middleware.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from gateway.keys import CONFIG, REQUEST_ID, TENANT
from gateway.protocol.responses import unique_id

log = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Paths anyone may call: liveness for load balancers and orchestrators.
PUBLIC_PATHS = frozenset({"/health"})


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers(),
    )


def gateway_middleware(key_hashes: Iterable[str]) -> Middleware:
    """Request id, API-key auth and the error envelope, in one layer (one per request is
    measurably cheaper than three).
    """
    digests = frozenset(h.removeprefix("sha256:") for h in key_hashes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        supplied = request.headers.get("x-request-id", "")
        request_id = request[REQUEST_ID] = \
            supplied if _CLIENT_ID.fullmatch(supplied) else unique_id()
        try:
            request[TENANT] = authenticate(request, digests)
            response = await handler(request)
        except GatewayError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            response = _http_exception(request, exc)
        except Exception:
            log.exception("request %s failed", request_id)
            response = error_response(GatewayError(
                "The gateway failed to handle this request.", code="internal_error"))
        if not response.prepared:  # a stream sets it before its headers go out
            response.headers["x-request-id"] = request_id
        return response

    return middleware


def authenticate(request: web.Request, digests: frozenset[str]) -> str:
    """The tenant (a digest prefix of the API key), or "" when keys are not required."""
    if not digests or request.path in PUBLIC_PATHS:
        return ""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationFailed(
            "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    digest = key_digest(key.strip())
    if digest not in digests:
        raise AuthenticationFailed("Invalid API key.")
    return digest[:16]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _http_exception(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    """aiohttp's own errors (no route, wrong method, body too large) in OpenAI's shape."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[CONFIG].server.max_body_bytes
        return error_response(PayloadTooLarge(
            f"The request body is larger than the limit of {limit} bytes."))
    if isinstance(exc, web.HTTPNotFound):
        return error_response(NotFound(f"No route for {request.method} {request.path}.",
                                       code="unknown_url"))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = error_response(InvalidRequest(
            f"{request.method} is not allowed on {request.path}; use {allowed}.",
            status=405, code="method_not_allowed"))
        response.headers["Allow"] = allowed
        return response
    if exc.status < 400:
        raise exc
    return error_response(GatewayError(exc.reason, status=exc.status,
                                       type="invalid_request_error"))


def json_response(data: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data),
                        headers={**headers, **_JSON} if headers else _JSON)


_JSON = {"Content-Type": "application/json"}
