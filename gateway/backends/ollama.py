"""Ollama, spoken natively (``/api/*``): it tells more than its OpenAI layer does —
capabilities, context length, what is loaded, thinking, keep_alive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.backends.base import Chunk, EmbeddingResult, Health, ModelInfo
from gateway.backends.http import HttpBackend
from gateway.errors import GatewayError, UpstreamError
from gateway.protocol import ollama
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger(__name__)


class OllamaBackend(HttpBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, dict[str, Any]] = {}  # /api/show answers, by digest

    async def list_models(self) -> list[ModelInfo]:
        tags, running = await asyncio.gather(self.get_json("/api/tags"), self._loaded())
        entries = [e for e in tags.get("models") or [] if isinstance(e, dict)]
        shows = await asyncio.gather(*(self._show(e) for e in entries))
        return [
            ollama.model_info(self.name, entry, show, running)
            for entry, show in zip(entries, shows, strict=True)
        ]

    async def probe(self) -> Health:
        started = time.perf_counter()
        try:
            data = await self.get_json("/api/version", wait=self.config.timeouts.connect)
        except GatewayError as exc:
            return Health(False, exc.message)
        elapsed = (time.perf_counter() - started) * 1000
        return Health(True, f"ollama {data.get('version', '?')}", elapsed)

    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]:
        payload = ollama.chat_payload(req, model, self.config.keep_alive)
        return self._generate("/api/chat", payload)

    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]:
        payload = ollama.generate_payload(req, model, self.config.keep_alive)
        return self._generate("/api/generate", payload)

    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult:
        payload: dict[str, Any] = {"model": model, "input": req.inputs}
        if req.dimensions is not None:
            payload["dimensions"] = req.dimensions
        if self.config.keep_alive:
            payload["keep_alive"] = self.config.keep_alive
        data = await self.post_json("/api/embed", payload)
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(req.inputs):
            raise UpstreamError(f"{self.name} sent an embedding response without embeddings",
                                backend=self.name)
        return EmbeddingResult(vectors, data.get("prompt_eval_count") or 0)

    async def _generate(self, path: str, payload: dict[str, Any]) -> AsyncGenerator[Chunk]:
        translator = ollama.StreamTranslator(self.name)
        async with self.request("POST", path, payload) as response:
            if not payload["stream"]:
                yield translator.chunk(orjson.loads(await response.read()))
                return
            async for line in self.lines(response):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("backend %s: skipped a malformed stream line", self.name)
                    continue
                chunk = translator.chunk(obj)
                yield chunk
                if chunk.finish_reason is not None:
                    return
        raise UpstreamError(f"{self.name} ended the stream before the answer was complete",
                            backend=self.name, code="upstream_truncated")

    async def _loaded(self) -> set[str]:
        try:
            data = await self.get_json("/api/ps")
        except GatewayError:
            return set()
        return {m.get("name", "") for m in data.get("models") or [] if isinstance(m, dict)}

    async def _show(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        digest = entry.get("digest") or entry.get("name", "")
        if digest in self._shown:
            return self._shown[digest]
        try:
            show = await self.post_json("/api/show", {"model": entry.get("name")})
        except GatewayError as exc:
            log.info("backend %s: /api/show %s failed: %s", self.name, entry.get("name"), exc)
            return None
        if isinstance(show, dict):
            self._shown[digest] = show
            return show
        return None
