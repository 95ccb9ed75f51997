"""Learned routing's two doors. ``POST /v1/feedback``: a client's word on an answer, by
its ``x-request-id`` (a ``score`` from 0 to 1, or ``thumbs`` up or down); a tenant can rate
only its own requests, and each answer counts once, however often it is rated.
``GET /admin/router/outcomes``: every outcome kept, as JSON lines, for the operator
(``gateway router export``).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.errors import NotFound, Unavailable
from gateway.http.bodies import body_of
from gateway.http.middlewares import json_response
from gateway.keys import ROUTER, TENANT
from gateway.protocol.openai import invalid
from gateway.routing.learning_link import DOWN


async def feedback(request: web.Request) -> web.Response:
    body = await body_of(request)
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise invalid("request_id", "'request_id' must be the x-request-id of an answer.")
    thumbs, score = body.get("thumbs"), body.get("score")
    if thumbs is not None:
        if thumbs not in ("up", "down"):
            raise invalid("thumbs", "'thumbs' must be \"up\" or \"down\".")
        value = 1.0 if thumbs == "up" else 0.0
    elif isinstance(score, int | float) and not isinstance(score, bool) and 0 <= score <= 1:
        value = float(score)
    else:
        raise invalid("score", "Send a 'score' from 0 (bad) to 1 (good), or 'thumbs' "
                               "(\"up\" or \"down\").")
    try:
        found = await request.app[ROUTER].feedback(request_id, request[TENANT], value)
    except DOWN:
        raise Unavailable("The store of outcomes is unavailable right now.",
                          retry_after=1) from None
    if found is None:
        raise NotFound(f"No answer with the request id {request_id!r} is known here (only "
                       "the newest are kept, each for the key that asked).",
                       param="request_id", code="request_not_found")
    outcome, learned = found
    return json_response({"object": "feedback", "request_id": request_id, "score": value,
                          "model": outcome.get("model"),
                          # learned from: the first word on a learned pick that answered
                          "learned": learned})


async def outcomes(request: web.Request) -> web.Response:
    try:
        kept = await request.app[ROUTER].all_outcomes()
    except DOWN:
        raise Unavailable("The store of outcomes is unavailable right now.",
                          retry_after=1) from None
    lines = b"".join(orjson.dumps(o, option=orjson.OPT_APPEND_NEWLINE) for o in kept)
    return web.Response(body=lines, content_type="application/x-ndjson")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/admin/router/outcomes", outcomes)
