"""Any OpenAI-compatible server: mlx_lm.server, llama.cpp, vLLM, a cloud API.

The client's body is forwarded as sent (so parameters the gateway does not know still
reach the model), with the model name, streaming and usage reporting set by the gateway.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from gateway.backends.base import Health
from gateway.backends.http import HttpBackend
from gateway.backends.response import Response
from gateway.errors import GatewayError, UpstreamError
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol.openai_stream import OpenAITranslator
from gateway.protocol.sse import decode_sse, decode_whole
from gateway.protocol.times import plausible_seconds
from gateway.protocol.units import Chunk, EmbeddingResult, ModelInfo, presumed

# Fields of the client's body the gateway sets itself for the upstream leg.
_GATEWAY_SET = ("stream", "stream_options", "max_completion_tokens", "max_tokens")


class OpenAICompatBackend(HttpBackend):
    async def list_models(self) -> list[ModelInfo]:
        if self.config.models:
            return [ModelInfo(name, self.name, capabilities=can, known=known)
                    for name in self.config.models for can, known in [presumed(name)]]
        data = await self.get_json("/models")
        listed = data.get("data") if isinstance(data, dict) else None
        window = await self._llamacpp_props() if self.tier != "cloud" else None
        return [self._info(m, window)
                for m in listed or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def _info(self, entry: dict[str, Any], window: int | None) -> ModelInfo:
        """A listed model; llama.cpp adds ``meta`` for the model it has loaded (its
        parameters, its quantization).
        """
        meta = entry.get("meta")
        if not isinstance(meta, dict):
            meta = {}
        n_params, ftype = meta.get("n_params"), meta.get("ftype")
        can, known = presumed(entry["id"])
        return ModelInfo(
            name=entry["id"], backend=self.name, context_length=window,
            capabilities=can, known=known,
            created=plausible_seconds(entry.get("created")),
            parameters=float(n_params) if isinstance(n_params, int) and n_params > 0 else None,
            quantization=ftype if isinstance(ftype, str) else "", loaded=bool(meta))

    async def _llamacpp_props(self) -> int | None:
        """A llama.cpp server says how many requests it runs at once (its slots: the
        gateway queues the rest) and each slot's context window; other servers have no
        ``/props``. The window, if said.
        """
        try:
            async with self.request("GET", "/props", timeout="quick", root=True) as response:
                props = await self.read_json(response)
        except GatewayError:
            return None
        if not isinstance(props, dict):
            return None
        slots = props.get("total_slots")
        if isinstance(slots, int) and slots > 0 and not self.config.slots:
            self.capacity = slots
        settings = props.get("default_generation_settings")
        window = settings.get("n_ctx") if isinstance(settings, dict) else None
        return window if isinstance(window, int) and window > 0 else None

    async def probe(self) -> Health:
        started = time.perf_counter()
        try:
            await self.get_json("/models", quick=True)
        except GatewayError as exc:
            return Health(False, exc.message)
        return Health(True, "models listed", (time.perf_counter() - started) * 1000)

    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]:
        payload = self._payload(req, model)
        return self.generate("/chat/completions", payload, OpenAITranslator(self.name),
                             _decode, whole=not req.stream)

    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]:
        payload = self._payload(req, model)
        return self.generate("/completions", payload, OpenAITranslator(self.name), _decode,
                             whole=not req.stream)

    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult:
        payload: dict[str, Any] = {"model": model, "input": req.inputs, "encoding_format": "float"}
        if req.dimensions is not None:
            payload["dimensions"] = req.dimensions
        data = await self.post_json("/embeddings", payload, limits="embedding")
        try:
            rows = sorted(data["data"], key=lambda row: row.get("index", 0))
            vectors = [row["embedding"] for row in rows]
            usage = data.get("usage") or {}
            return EmbeddingResult(vectors, int(usage.get("prompt_tokens") or 0))
        except (KeyError, TypeError, AttributeError, ValueError):
            raise UpstreamError(f"{self.name} sent an embedding response without embeddings",
                                backend=self.name) from None

    def _payload(self, req: ChatRequest | CompletionRequest, model: str) -> dict[str, Any]:
        body = req.body
        payload = {k: v for k, v in body.items() if k not in _GATEWAY_SET}
        payload["model"] = model
        payload["stream"] = True  # a whole answer is the collected stream
        payload["stream_options"] = {"include_usage": True}
        if self.config.max_tokens_param == "as_sent":
            for key in ("max_tokens", "max_completion_tokens"):
                if body.get(key) is not None:
                    payload[key] = body[key]
        elif req.sampling.max_tokens is not None:
            payload["max_tokens"] = req.sampling.max_tokens
        return payload


def _decode(response: Response) -> AsyncGenerator[list[Any]]:
    """The answer's event stream, as asked for; or, from a server that ignores ``stream``
    and answers whole, that answer as its one event.
    """
    if response.headers.get("content-type", "").startswith("application/json"):
        return decode_whole(response)
    return decode_sse(response)
