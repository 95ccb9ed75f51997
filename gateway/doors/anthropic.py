"""The Anthropic door: ``POST /v1/messages`` (streamed as Anthropic's events, or whole) and
``POST /v1/messages/count_tokens``, as the ``anthropic`` SDK, Claude Code and other agents
speak them; keys by ``x-api-key`` or ``Authorization``; errors in Anthropic's shape.
"""

from __future__ import annotations

from aiohttp import web

from gateway.doors.anthropic_answer import MessageStream, error_body, message_body
from gateway.doors.anthropic_request import FIELDS, chat_body, reasoning_mode
from gateway.errors import GatewayError
from gateway.http.access import context
from gateway.http.bodies import body_of
from gateway.http.middlewares import json_response
from gateway.http.stream import write_stream
from gateway.keys import CONFIG, PIPELINE, REQUEST_ID
from gateway.pipeline import Whole
from gateway.protocol.openai import named_as, parse_chat


async def messages(request: web.Request) -> web.StreamResponse:
    body = await body_of(request)
    chat, ollama = chat_body(body)
    with named_as(FIELDS):
        req = parse_chat(chat)
    req.ollama = ollama or None
    answer = await request.app[PIPELINE].run(context(request, "chat", req))
    mode = reasoning_mode(body, request.app[CONFIG].server.reasoning)
    if isinstance(answer, Whole):
        return json_response(message_body(answer.completion, mode), answer.headers)
    return await write_stream(request, answer, MessageStream(answer.model, mode))


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's length as the model counts it."""
    body = await body_of(request)
    chat, ollama = chat_body(body, counting=True)
    with named_as(FIELDS):
        req = parse_chat(chat)
    req.ollama = ollama or None
    tokens, headers = await request.app[PIPELINE].count_tokens(context(request, "chat", req))
    return json_response({"input_tokens": tokens}, headers)


def error_response(error: GatewayError) -> web.Response:
    """An error as Anthropic sends one: ``{"type": "error", "error": {"type", "message"}}``."""
    return web.Response(status=error.status, body=error_body(error),
                        content_type="application/json", headers=error.headers())


async def request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``request-id`` on every answer of this door, errors and streams too: the SDK reads a
    request's id there (``_request_id``, an error's ``request_id``), not in ``x-request-id``.
    An ``on_response_prepare`` signal, as an error's shape is made without its request.
    """
    if request.path.startswith("/v1/messages") and REQUEST_ID in request:
        response.headers["request-id"] = request[REQUEST_ID]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.on_response_prepare.append(request_id_header)
