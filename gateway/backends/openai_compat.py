"""Any OpenAI-compatible server: mlx_lm.server, llama.cpp, vLLM, a cloud API.

The client's body is forwarded as sent (so parameters the gateway does not know still
reach the model), with the model name, streaming and usage reporting set by the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.backends.base import Chunk, EmbeddingResult, Health, ModelInfo, Usage
from gateway.backends.http import HttpBackend
from gateway.errors import GatewayError, UpstreamError
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol.sse import IdleTimeout, iter_events

log = logging.getLogger(__name__)

# Fields of the client's body that only concern the client-gateway leg.
_GATEWAY_ONLY = ("stream", "stream_options", "max_completion_tokens", "max_tokens")


class OpenAICompatBackend(HttpBackend):
    async def list_models(self) -> list[ModelInfo]:
        if self.config.models:
            names = list(self.config.models)
        else:
            data = await self.get_json("/models")
            names = [m["id"] for m in data.get("data") or [] if isinstance(m, dict) and "id" in m]
        return [ModelInfo(name=name, backend=self.name) for name in names]

    async def probe(self) -> Health:
        started = time.perf_counter()
        try:
            await self.get_json("/models", wait=self.config.timeouts.connect)
        except GatewayError as exc:
            return Health(False, exc.message)
        return Health(True, "models listed", (time.perf_counter() - started) * 1000)

    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]:
        return self._generate("/chat/completions", self._payload(req.body, model, req.stream))

    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]:
        return self._generate("/completions", self._payload(req.body, model, req.stream))

    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult:
        payload: dict[str, Any] = {"model": model, "input": req.inputs, "encoding_format": "float"}
        if req.dimensions is not None:
            payload["dimensions"] = req.dimensions
        data = await self.post_json("/embeddings", payload)
        try:
            rows = sorted(data["data"], key=lambda row: row.get("index", 0))
            vectors = [row["embedding"] for row in rows]
        except (KeyError, TypeError, AttributeError):
            raise UpstreamError(f"{self.name} sent an embedding response without embeddings",
                                backend=self.name) from None
        usage = data.get("usage") or {}
        return EmbeddingResult(vectors, usage.get("prompt_tokens") or 0)

    def _payload(self, body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
        payload = {k: v for k, v in body.items() if k not in _GATEWAY_ONLY}
        payload["model"] = model
        payload["stream"] = stream
        if stream:
            payload["stream_options"] = {"include_usage": True}
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if self.config.max_tokens_param == "as_sent":
            for key in ("max_tokens", "max_completion_tokens"):
                if key in body:
                    payload[key] = body[key]
        elif limit is not None:
            payload["max_tokens"] = limit
        return payload

    async def _generate(self, path: str, payload: dict[str, Any]) -> AsyncGenerator[Chunk]:
        translator = StreamTranslator(self.name)
        async with self.request("POST", path, payload) as response:
            if not payload["stream"]:
                yield translator.chunk(_json(await response.read(), self.name))
                return
            try:
                async for _event, data in iter_events(self.lines(response)):
                    if data == b"[DONE]":
                        break
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        log.warning("backend %s: skipped a malformed stream event", self.name)
                        continue
                    yield translator.chunk(obj)
                    if translator.finished and translator.usage_seen:
                        break  # nothing can follow the usage
            except IdleTimeout:
                if not translator.finished:
                    raise
        if not translator.finished:
            raise UpstreamError(f"{self.name} ended the stream before the answer was complete",
                                backend=self.name, code="upstream_truncated")


class StreamTranslator:
    """OpenAI chunks (or a whole completion) from any compatible server → chunks."""

    __slots__ = ("_backend", "finished", "usage_seen")

    def __init__(self, backend: str) -> None:
        self._backend = backend
        self.finished = False
        self.usage_seen = False

    def chunk(self, obj: Any) -> Chunk:
        if not isinstance(obj, dict):
            raise UpstreamError(f"{self._backend} sent an event that is not an object",
                                backend=self._backend)
        if obj.get("error"):
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamError(f"{self._backend}: {message}", backend=self._backend,
                                code="upstream_stream_error")
        chunk = Chunk()
        choices = obj.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta") or choice.get("message") or {}
            chunk.content = delta.get("content") or choice.get("text") or ""
            chunk.reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            calls = delta.get("tool_calls")
            if calls:
                chunk.tool_calls = [
                    {**call, "index": call.get("index", i)} for i, call in enumerate(calls)
                ]
            chunk.finish_reason = choice.get("finish_reason")
            if chunk.finish_reason is not None:
                self.finished = True
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage_seen = True
            chunk.usage = Usage(usage.get("prompt_tokens") or 0,
                                usage.get("completion_tokens") or 0)
        return chunk


def _json(body: bytes, backend: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"{backend} sent a response that is not JSON",
                            backend=backend) from None
