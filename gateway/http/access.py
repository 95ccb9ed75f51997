"""Who is asking, and what they may do: the key a request presents (``Authorization:
Bearer`` or ``x-api-key``), found in the key book; the models it may use; its limits,
admitted before the request and settled when its answer is whole, their
``x-ratelimit-*`` headers on every answer. And the ``RequestContext`` every door builds
from a request, carrying the tenant, the usage report and the key's cache scope.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from gateway.config import KeyConfig
from gateway.errors import AuthenticationFailed, GatewayError, RateLimited, model_shown
from gateway.http.bodies import body_of, is_upload, raw_body
from gateway.http.stopping import stopping
from gateway.keys import (
    CLIENT_CLOSED,
    CONFIG,
    ENDED,
    KEY,
    RATE_HEADERS,
    REQUEST_ID,
    TENANT,
    USAGE,
)
from gateway.pipeline import Listed
from gateway.protocol.openai import MAX_TOKENS, ChatRequest, CompletionRequest, Kind
from gateway.protocol.units import CHARS_PER_TOKEN
from gateway.routing.catalog import named_in
from gateway.tenants import Admission, KeyBook, Limits, Tally, key_digest
from plugins.base import RequestContext

# Paths anyone may call: liveness for load balancers and orchestrators, and the greeting
# and version by which Ollama's clients recognise a server.
# The dashboard's page and its files (path → file, type): they hold no data.
DASHBOARD = {"/dashboard": ("index.html", "text/html"),
             "/dashboard/app.js": ("app.js", "text/javascript"),
             "/dashboard/fleet.js": ("fleet.js", "text/javascript"),
             "/dashboard/style.css": ("style.css", "text/css")}
PUBLIC_PATHS = frozenset({"/health", "/ready", "/", "/api/version", *DASHBOARD})
# Paths for the operator: anyone's on a gateway without keys, else an admin key's.
OPERATOR_PATHS = frozenset({"/metrics", "/admin/status", "/dashboard/events",
                            "/admin/router/outcomes"})
# What a key's limits count: the requests that set a model to work (counting a prompt's
# tokens too: a one-token answer says how many). Listing models, reading a file or a
# batch's progress, Ollama's /api/show, all come free (IDEs and batch clients poll them).
# (tests/integration/test_tenants.py holds every other POST route to a list of free ones.)
METERED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                     "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                     "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"})
OUTPUT_GUESS = 256  # tokens of an answer whose limit the request does not say
REFUSALS = {"requests": "requests per minute", "tokens": "tokens per minute",
            "concurrency": "requests at once", "budget": "token budget"}


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


async def identify(request: web.Request, book: KeyBook) -> KeyConfig | None:
    """The key a request presents (None when the path is public); raises for a key
    missing, unknown, revoked or expired. Only asked when the gateway has keys.
    """
    if request.path in PUBLIC_PATHS or request.path in OPERATOR_PATHS or \
            request.path.startswith("/admin/"):
        return None
    presented = presented_key(request)
    if not presented:
        raise AuthenticationFailed(
            "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    key = await book.find(key_digest(presented))
    if key is None:
        raise AuthenticationFailed("Invalid API key.")
    check_standing(key)
    return key


def check_standing(key: KeyConfig) -> None:
    """Refuse a key that was revoked or has expired."""
    if key.revoked:
        raise AuthenticationFailed("This API key was revoked.", code="revoked_api_key")
    if key.expires and key.expires < time.time():
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")


def over_limit(admission: Admission) -> RateLimited:
    """The refusal of a request a key's limit did not admit."""
    return RateLimited(f"This API key is over its {REFUSALS[admission.reason]}; retry later.",
                       retry_after=admission.retry_after,
                       code=f"{admission.reason}_limit_exceeded")


def admit_admin(request: web.Request) -> None:
    """The admin API needs an admin key."""
    if not is_admin(request):
        raise GatewayError("The admin API needs an admin key ([auth] admin_key_hashes).",
                           status=401, type="authentication_error", code="admin_key_required")


async def limited(request: web.Request, handler: Any, key: KeyConfig | None,
                  limits: Limits) -> web.StreamResponse:
    """The handler's answer, within what ``key`` may do: its models, and its limits,
    admitted now and settled (with the tokens the answer used) once it is whole.
    """
    if key is None:
        return await handler(request)  # type: ignore[no-any-return]
    request[KEY] = key
    try:
        # (Every body but a file upload is read as JSON, whatever its Content-Type says: the
        # doors read it so, and a body labelled otherwise must not pass unchecked.)
        body = await body_of(request) if request.method == "POST" and \
            request.body_exists and not is_upload(request) else {}
        if key.models:  # (Ollama's clients may name the model "name"; the door checks too)
            for name in (body.get("model"), body.get("name")):
                if isinstance(name, str) and name:
                    check_model(request, name)
    except GatewayError:
        if key.rpm or key.tpm:  # (an error's answer says what is left too)
            request[RATE_HEADERS] = (await limits.look(key)).headers(key)
        raise
    if request.path not in METERED:  # (its headers say what is left all the same)
        if key.rpm or key.tpm:
            request[RATE_HEADERS] = (await limits.look(key)).headers(key)
        return await handler(request)  # type: ignore[no-any-return]
    prompt = len(raw_body(request)) // CHARS_PER_TOKEN  # (as decoded)
    estimate = _estimate(request, body, prompt) if key.tpm or key.budget else 0
    admission = await limits.admit(key, estimate)
    request[RATE_HEADERS] = admission.headers(key)
    if admission.reason:
        raise over_limit(admission)
    tally = request[USAGE] = Tally()
    answered = False
    try:
        response: web.StreamResponse = await handler(request)
        answered = response.status < 400
        return response
    except asyncio.CancelledError:
        # the client hung up while it was being answered (the gateway stopping: an error)
        answered = not stopping(request)
        raise
    finally:
        # The tokens used, as the answer said; an answer that did not say (cut off by the
        # client, or from a backend that does not count) costs what was estimated, or its
        # prompt and what came of it when that is more; a stream an error broke off (its
        # status long since 200), its prompt and what came of it; an error, nothing.
        ended = request.get(ENDED)
        used = tally.tokens + tally.output if tally.reported else \
            prompt + tally.output if ended is not None and ended != CLIENT_CLOSED else \
            max(estimate, prompt + tally.output) if answered else 0
        await limits.settle(key, admission, min(used, MAX_TOKENS))


async def rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The key's ``x-ratelimit-*`` headers, on every answer (an ``on_response_prepare``
    signal: streams and errors too).
    """
    headers = request.get(RATE_HEADERS)
    if headers:
        response.headers.update(headers)


def check_model(request: web.Request, model: str) -> None:
    """Refuse a model the request's key may not use."""
    key = request.get(KEY)
    if key is not None:
        check_allowed(key.models, model)


def check_allowed(models: tuple[str, ...], model: str) -> None:
    """Refuse a model that is not one of ``models`` (none: every model is)."""
    if models and not named_in(model, models):
        raise GatewayError(f"This API key may not use the model {model_shown(model)!r} (it "
                           f"may use: {', '.join(models)}).", status=403, type="permission_error",
                           code="model_not_allowed", param="model")


def context(request: web.Request, kind: Kind, req: ChatRequest | CompletionRequest
            ) -> RequestContext:
    """The request as the pipeline takes it: who asks, which models they may use, what
    they may keep, where to report the tokens used.
    """
    key = request.get(KEY)
    request_id = request.get(REQUEST_ID, "")
    if key is None:
        return RequestContext(kind=kind, req=req, tenant=request[TENANT],
                              client_headers=request.headers, request_id=request_id)
    check_model(request, req.model)
    tally = request.get(USAGE)
    return RequestContext(kind=kind, req=req, tenant=request[TENANT],
                          client_headers=request.headers,
                          on_usage=tally.add if tally is not None else None,
                          on_output=tally.saw if tally is not None else None,
                          cache_scope=key.cache, models=key.models, request_id=request_id)


def usage_sink(request: web.Request, model: str) -> Any:
    """Where the tokens of an answer made outside a ``RequestContext`` (embeddings) are
    reported; refused for a ``model`` the request's key may not use, as ``context`` is.
    """
    check_model(request, model)
    tally = request.get(USAGE)
    return tally.add if tally is not None else None


def visible(request: web.Request, models: list[Listed]) -> list[Listed]:
    """The models the request's key may use, of ``models``."""
    key = request.get(KEY)
    if key is None or not key.models:
        return models
    return [m for m in models if named_in(m.name, key.models)]


def _estimate(request: web.Request, body: dict[str, Any], prompt: int) -> int:
    if "model" not in body and "name" not in body:
        return 0  # nothing to generate (a list of models, say)
    return estimate(body, prompt, "embed" in request.path)


def estimate(body: dict[str, Any], prompt: int, embeds: bool) -> int:
    """The tokens a request will use, before it is answered: its ``prompt`` (its size, at
    about four characters a token) and the answer's limit, or a guess at it (none for
    embeddings).
    """
    if embeds:
        return prompt
    options = body.get("options")
    limits = (body.get("max_completion_tokens"), body.get("max_tokens"),
              body.get("max_output_tokens"),
              options.get("num_predict") if isinstance(options, dict) else None)
    limit = next((v for v in limits if isinstance(v, int) and not isinstance(v, bool)
                  and v > 0), OUTPUT_GUESS)
    return prompt + min(limit, MAX_TOKENS)
