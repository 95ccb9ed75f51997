"""A batch line answered as the same request sent live would be: through the pipeline
(routing with its tiers and fallbacks, the cache, safety, QA), within what the batch's key
may use, its answer written as the OpenAI door writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import ReasoningMode
from gateway.doors.openai import completion_body, embeddings_body
from gateway.doors.responses_answer import ResponseStream, new_response
from gateway.doors.responses_request import FIELDS, chat_body
from gateway.errors import GatewayError
from gateway.http.access import check_allowed
from gateway.pipeline import Pipeline, Whole
from gateway.protocol.openai import (
    Kind,
    invalid,
    named_as,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from gateway.tenants import Tally
from plugins.base import RequestContext


@dataclass(frozen=True, slots=True)
class Who:
    """Whose batch it is: the key's id, the models it may use, its cache scope."""

    tenant: str
    models: tuple[str, ...] = ()
    cache_scope: str = ""


async def answer(pipeline: Pipeline, endpoint: str, body: dict[str, Any], who: Who,
                 reasoning: ReasoningMode, used: Tally | None = None
                 ) -> tuple[int, dict[str, Any]]:
    """The status and body the endpoint would have answered the line with; ``used`` is
    told the tokens its answer used (none for a cached answer), as a live request's is.
    """
    original = body
    try:
        body = {**body, "stream": False}  # a batch's answers are whole
        if endpoint == "/v1/embeddings":
            body.pop("stream")
            embedding = parse_embedding(body)
            check_allowed(who.models, embedding.model)
            return 200, embeddings_body(embedding, await pipeline.embed(
                embedding, on_usage=used.add if used else None, batch=True))
        if endpoint == "/v1/responses":
            if body.get("previous_response_id") is not None:
                raise invalid("previous_response_id", "A batch line cannot continue a stored "
                              "response; send the whole input.")
            body = chat_body(body, [])[0]
        kind: Kind = "text" if endpoint == "/v1/completions" else "chat"
        with named_as(FIELDS if endpoint == "/v1/responses" else {}):
            req = parse_chat(body) if kind == "chat" else parse_completion(body)
        check_allowed(who.models, req.model)
        ctx = RequestContext(kind=kind, req=req, tenant=who.tenant, client_headers={},
                             cache_scope=who.cache_scope, models=who.models, batch=True,
                             on_usage=used.add if used else None,
                             on_output=used.saw if used else None)
        result = await pipeline.run(ctx)
        assert isinstance(result, Whole)  # (stream is false)
        if endpoint != "/v1/responses":
            return 200, completion_body(kind, result.completion, reasoning)
        response = new_response(original, store=False)  # (a batch's answers are not kept)
        response["model"] = result.completion.model
        encoder = ResponseStream(response, reasoning)
        encoder.whole(result.completion)
        return 200, orjson.loads(encoder.dumped)
    except GatewayError as exc:
        return exc.status, exc.payload()
