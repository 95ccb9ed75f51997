"""The Responses API door: ``POST /v1/responses`` (streamed as semantic events, or whole),
``GET`` and ``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``, as the
``openai`` SDKs' ``client.responses`` speaks it (Codex CLI, newer SDK code); its
``input_tokens`` and ``compact`` endpoints are a 404 that says they are not served.

A response asked to be stored (``store``, true unless the request says otherwise) is kept,
for its tenant only, for ``[responses] ttl`` seconds, with its conversation (in chat form:
``previous_response_id`` continues it) and the items it was asked with (as the API lists
them). Built-in tools (web search, file search, code interpreter...) need
OpenAI's own servers: the model is not offered them (``responses_request`` says how).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from gateway.doors.responses_answer import ResponseStream, new_response
from gateway.doors.responses_request import FIELDS, chat_body, input_items
from gateway.errors import GatewayError, NotFound, Unavailable
from gateway.http.access import context
from gateway.http.bodies import body_of
from gateway.http.middlewares import json_response
from gateway.http.stream import write_stream
from gateway.keys import CONFIG, PIPELINE, RESPONSES, TENANT
from gateway.pipeline import Whole
from gateway.protocol.openai import invalid, named_as, parse_chat
from gateway.store import StoreUnavailable

log = logging.getLogger(__name__)
PREFIX = "gw:response:"  # a stored response's key: this, its tenant, a colon, its id


async def create(request: web.Request) -> web.StreamResponse:
    body = await body_of(request)
    store = body.get("store")
    if store is None:  # null is not said (the SDK's store=None), as OpenAI reads it
        store = True
    elif not isinstance(store, bool):
        raise invalid("store", "'store' must be true or false.")
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise invalid("previous_response_id", "'previous_response_id' must be a string.")
        history = (await _load(request, previous, "previous_response_id"))["conversation"]
    chat, conversation, dropped = chat_body(body, history)
    with named_as(FIELDS):
        req = parse_chat(chat)
    with named_as({"messages": "input"}):  # (a request refused as it is, by a plugin)
        answer = await request.app[PIPELINE].run(context(request, "chat", req))
    given = input_items(body["input"]) if store else []
    if dropped:
        answer.headers["x-gateway-dropped-tools"] = ", ".join(dropped)
    reasoning = request.app[CONFIG].server.reasoning
    response = new_response(body, store)
    if isinstance(answer, Whole):
        response["model"] = answer.completion.model
        encoder = ResponseStream(response, reasoning)
        encoder.whole(answer.completion)
        if store:
            await _keep(request, encoder, conversation, given)
        return json_response(encoder.dumped, answer.headers)
    response["model"] = answer.model
    encoder = ResponseStream(response, reasoning)

    async def keep() -> None:
        if store:
            await _keep(request, encoder, conversation, given)

    return await write_stream(request, answer, encoder, before_end=keep)


async def retrieve(request: web.Request) -> web.Response:
    if request.query.get("stream") == "true":
        raise invalid("stream", "A stored response is sent whole; streaming it again is not "
                            "supported.")
    record = await _load(request, request.match_info["id"], None)
    return json_response(record["response"])


async def listed_input(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}/input_items``: the items the response was asked with, a page
    at a time (``limit``, 20; ``order``, newest first unless ``asc``; ``after``/``before``
    an item's id).
    """
    query = request.query
    limit = _limit(query.get("limit", "20"))
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("order", "'order' must be 'asc' or 'desc'.")
    items = (await _load(request, request.match_info["id"], None)).get("input", [])
    if order == "desc":
        items = items[::-1]
    ids = [item["id"] for item in items]
    start, end = 0, len(items)
    for param, cursor in (("after", query.get("after")), ("before", query.get("before"))):
        if cursor is not None:
            if cursor not in ids:
                raise invalid(param, f"No input item {cursor!r} in this response.")
            if param == "after":
                start = ids.index(cursor) + 1
            else:
                end = ids.index(cursor)
    page = items[start:end][:limit]
    return json_response({"object": "list", "data": page,
                          "first_id": page[0]["id"] if page else "",
                          "last_id": page[-1]["id"] if page else "",
                          "has_more": start + len(page) < end})


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise invalid("limit", "'limit' must be a whole number from 1 to 100.")
    return limit


async def delete(request: web.Request) -> web.Response:
    response_id = request.match_info["id"]
    try:
        found = await request.app[RESPONSES].delete(_key(request, response_id))
    except StoreUnavailable:
        raise _store_down() from None
    if not found:
        raise _missing(response_id, None)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def _keep(request: web.Request, encoder: ResponseStream,
                conversation: list[dict[str, Any]], given: list[dict[str, Any]]) -> None:
    """Store the response, its conversation and its input items; a store that is down costs
    the request nothing but this (the log says so).
    """
    response = encoder.response
    turns = orjson.dumps([*conversation, encoder.assistant_turn()])
    record = b'{"response":%s,"conversation":%s,"input":%s}' % (encoder.dumped, turns,
                                                                 orjson.dumps(given))
    limit = request.app[CONFIG].responses.max_record_bytes
    if len(record) > limit:
        log.warning("response %s is not stored: with its conversation it is %d bytes, over "
                    "[responses] max_record_bytes (%d)", response["id"], len(record), limit)
        return
    try:
        await request.app[RESPONSES].set(_key(request, response["id"]), record,
                                         request.app[CONFIG].responses.ttl)
    except StoreUnavailable:
        log.warning("response %s could not be stored: the store is unavailable",
                    response["id"])


async def _load(request: web.Request, response_id: str, param: str | None) -> dict[str, Any]:
    try:
        raw = await request.app[RESPONSES].get(_key(request, response_id))
    except StoreUnavailable:
        raise _store_down() from None
    if raw is None:
        raise _missing(response_id, param)
    record: dict[str, Any] = orjson.loads(raw)
    return record


def _key(request: web.Request, response_id: str) -> str:
    return f"{PREFIX}{request[TENANT]}:{response_id}"


def owner(key: str) -> str:
    """The tenant a stored response's key is of (the store makes room at the expense of
    whoever stores the most).
    """
    return key[len(PREFIX):].rpartition(":")[0]


def _missing(response_id: str, param: str | None) -> GatewayError:
    return NotFound(f"No response with id {response_id!r} is stored here (it may have "
                    "expired, or was not stored).", param=param, code="response_not_found")


def _store_down() -> GatewayError:
    return Unavailable("The store of responses is unavailable right now.", retry_after=1)


async def unserved(request: web.Request) -> web.Response:
    """An endpoint of the Responses API the gateway does not serve: a 404 that says so (left
    to match ``/v1/responses/{id}``, it would be a 405 saying to use GET or DELETE).
    """
    raise NotFound(f"{request.method} {request.path} is not supported by this gateway (it "
                   "creates, retrieves and deletes responses, and lists their input items).",
                   code="unknown_url")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create)
    app.router.add_post("/v1/responses/input_tokens", unserved)
    app.router.add_post("/v1/responses/compact", unserved)
    app.router.add_get("/v1/responses/{id}", retrieve)
    app.router.add_get("/v1/responses/{id}/input_items", listed_input)
    app.router.add_delete("/v1/responses/{id}", delete)
