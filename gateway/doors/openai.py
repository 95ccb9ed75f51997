"""The OpenAI door: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and
``/v1/models``, as the official SDKs, curl and IDE plugins speak them.
"""

from __future__ import annotations

import base64
import time
from array import array
from typing import Any

import orjson
from aiohttp import web

from gateway.config import ReasoningMode
from gateway.errors import GatewayError, ModelNotFound
from gateway.http.access import context, usage_sink, visible
from gateway.http.bodies import body_of
from gateway.http.middlewares import json_response
from gateway.http.stream import SSE, sse_comments, sse_event, write_stream
from gateway.keys import CONFIG, PIPELINE
from gateway.pipeline import Embeddings, Listed, Whole
from gateway.protocol.ids import unique_id
from gateway.protocol.openai import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Kind,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from gateway.protocol.reasoning import ReasoningView
from gateway.protocol.times import rfc3339
from gateway.protocol.units import Chunk, Completion, Usage


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat(await body_of(request))
    return await _generate(request, "chat", req)


async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(await body_of(request))
    return await _generate(request, "text", req)


async def _generate(request: web.Request, kind: Kind, req: ChatRequest | CompletionRequest
                    ) -> web.StreamResponse:
    answer = await request.app[PIPELINE].run(context(request, kind, req))
    reasoning = request.app[CONFIG].server.reasoning
    if isinstance(answer, Whole):
        return json_response(completion_body(kind, answer.completion, reasoning),
                             answer.headers)
    encoder = ChatStream(kind, answer.model, include_usage=req.include_usage,
                         reasoning=reasoning)
    return await write_stream(request, answer, encoder)


async def embeddings(request: web.Request) -> web.Response:
    req = parse_embedding(await body_of(request))
    answer = await request.app[PIPELINE].embed(req, usage_sink(request, req.model))
    return json_response(embeddings_body(req, answer), answer.headers)


def embeddings_body(req: EmbeddingRequest, answer: Embeddings) -> dict[str, Any]:
    """The answer to an embeddings request, as OpenAI's API writes it."""
    rows: list[dict[str, Any]] = []
    for i, vector in enumerate(answer.result.vectors):
        embedding: Any = vector
        if req.encoding_format == "base64":
            embedding = base64.b64encode(array("f", vector).tobytes()).decode()
        rows.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = answer.result.prompt_tokens
    return {"object": "list", "data": rows, "model": answer.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def list_models(request: web.Request) -> web.Response:
    """The models, in a list both OpenAI's and Anthropic's SDKs read (Anthropic's pages on
    unless told there is no more).
    """
    data = [model_entry(m) for m in visible(request, request.app[PIPELINE].models.all())]
    return json_response({"object": "list", "data": data, "has_more": False,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None})


async def get_model(request: web.Request) -> web.Response:
    """A model, as the list shows it: one the key may not use is not found, as OpenAI
    answers for a model the account has no access to."""
    name = request.match_info["model"]
    if not visible(request, [model := request.app[PIPELINE].models.one(name)]):
        raise ModelNotFound(name)
    return json_response(model_entry(model))


def model_entry(model: Listed) -> dict[str, Any]:
    """A model as OpenAI's SDKs read it, and Anthropic's (``type``, ``display_name``,
    ``created_at``)."""
    return {"id": model.name, "object": "model", "created": model.created,
            "owned_by": model.owner, "type": "model", "display_name": model.name,
            "created_at": rfc3339(model.created)}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)


# --- encoding -------------------------------------------------------------------------------


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + unique_id()


class ChatStream:
    """One answer as OpenAI stream events (chat or text completion chunks).

    Every event shares the id and created time; the first chat delta carries the role;
    with ``include_usage`` each event has ``usage: null`` and the usage comes last, alone.
    """

    media_type = SSE
    __slots__ = ("_base", "_include_usage", "_kind", "_started", "_usage", "_view")

    def __init__(self, kind: Kind, model: str, *, include_usage: bool,
                 reasoning: ReasoningMode) -> None:
        self._kind = kind
        self._include_usage = include_usage
        self._view = ReasoningView(reasoning)
        self._started = False
        self._usage: Usage | None = None
        self._base: dict[str, Any] = {
            "id": new_id(kind),
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }

    def switch_model(self, model: str) -> None:
        self._base["model"] = model

    def begin(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.fingerprint:
            self._base["system_fingerprint"] = chunk.fingerprint
        reasoning, text = self._view.split(chunk)
        if self._kind == "text":
            text += chunk.refusal  # (text completions have no field for it)
            if not text and chunk.finish_reason is None:
                return b""
            return self._event({"index": 0, "text": text, "logprobs": chunk.logprobs,
                                "finish_reason": chunk.finish_reason})
        delta: dict[str, Any] = {}
        if not self._started:
            delta["role"] = "assistant"
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text:
            delta["content"] = text
        if chunk.refusal:
            delta.setdefault("content", None)
            delta["refusal"] = chunk.refusal
        if chunk.tool_calls:
            delta.setdefault("content", None)
            delta["tool_calls"] = chunk.tool_calls
        if not delta and chunk.finish_reason is None:
            return b""
        if not self._started:
            delta.setdefault("content", "")
            self._started = True
        return self._event({"index": 0, "delta": delta, "logprobs": chunk.logprobs,
                            "finish_reason": chunk.finish_reason})

    def end(self, trailers: dict[str, str]) -> bytes:
        """The usage, when the client asked for it (the only event without choices); the
        gateway's late verdicts as comment lines (``: x-gateway-qa: pass``), which clients
        skip; then ``[DONE]``.
        """
        out = b""
        if self._include_usage:
            usage = (self._usage or Usage()).as_dict()
            out = sse_event(orjson.dumps({**self._base, "choices": [], "usage": usage}))
        return out + sse_comments(trailers) + b"data: [DONE]\n\n"

    def error(self, error: GatewayError) -> bytes:
        return sse_event(error.body())

    def _event(self, choice: dict[str, Any]) -> bytes:
        event = {**self._base, "choices": [choice]}
        if self._include_usage:
            event["usage"] = None
        return sse_event(orjson.dumps(event))


def completion_body(kind: Kind, completion: Completion, reasoning: ReasoningMode
                    ) -> dict[str, Any]:
    """The non-streaming response for a chat or text completion."""
    thought, text = ReasoningView(reasoning).whole(completion)
    choice: dict[str, Any]
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant"}
        if thought:
            message["reasoning_content"] = thought
        message["content"] = text if text or not (completion.tool_calls or completion.refusal) \
            else None
        message["refusal"] = completion.refusal or None
        if completion.tool_calls:
            message["tool_calls"] = completion.tool_calls
        choice = {"index": 0, "message": message, "logprobs": completion.logprobs,
                  "finish_reason": completion.finish_reason}
    else:
        choice = {"index": 0, "text": text + completion.refusal, "logprobs": completion.logprobs,
                  "finish_reason": completion.finish_reason}
    return {
        "id": new_id(kind),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": completion.model,
        "system_fingerprint": completion.fingerprint,
        "choices": [choice],
        "usage": (completion.usage or Usage()).as_dict(),
    }
