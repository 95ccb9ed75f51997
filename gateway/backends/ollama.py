"""Ollama, spoken natively (``/api/*``): it tells more than its OpenAI layer does —
capabilities, context length, what is loaded, thinking, keep_alive.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import time
from collections.abc import AsyncGenerator
from typing import Any

from gateway.backends.base import Health
from gateway.backends.http import HttpBackend
from gateway.errors import GatewayError, InvalidRequest, Unsupported, UpstreamError
from gateway.protocol import ollama
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol.sse import decode_ndjson
from gateway.protocol.units import Chunk, EmbeddingResult, ModelInfo

log = logging.getLogger(__name__)


class OllamaBackend(HttpBackend):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shown: dict[str, dict[str, Any]] = {}  # /api/show answers, by digest
        # Models that can think: only they are sent "think" (others refuse the request).
        self._thinkers: set[str] = set()

    async def list_models(self) -> list[ModelInfo]:
        tags, running = await asyncio.gather(self.get_json("/api/tags"), self._loaded())
        listed = tags.get("models") if isinstance(tags, dict) else None
        entries = [e for e in listed or []
                   if isinstance(e, dict) and isinstance(e.get("name"), str)]
        shows = await asyncio.gather(*(self._show(e) for e in entries))
        models = [
            ollama.model_info(self.name, entry, show, running)
            for entry, show in zip(entries, shows, strict=True)
        ]
        self._thinkers = {m.name for m in models if "thinking" in m.capabilities}
        return models

    async def probe(self) -> Health:
        started = time.perf_counter()
        try:
            data = await self.get_json("/api/version", quick=True)
        except GatewayError as exc:
            return Health(False, exc.message)
        elapsed = (time.perf_counter() - started) * 1000
        return Health(True, f"ollama {data.get('version', '?')}", elapsed)

    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]:
        payload = ollama.chat_payload(req, model, self.config.keep_alive,
                                      thinks=model in self._thinkers)
        return self.generate("/api/chat", payload, ollama.OllamaTranslator(self.name),
                             decode_ndjson, whole=not req.stream)

    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]:
        if not req.prompt and req.suffix is None:  # (another deployment may complete it)
            raise Unsupported(f"{self.name} (Ollama) cannot complete an empty prompt: Ollama "
                              "takes a request without one for a load of the model.")
        payload = ollama.generate_payload(req, model, self.config.keep_alive,
                                          thinks=model in self._thinkers)
        return self.generate("/api/generate", payload, ollama.OllamaTranslator(self.name),
                             decode_ndjson, whole=not req.stream)

    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult:
        if req.token_ids:
            raise InvalidRequest(f"{self.name} (Ollama) embeds text only: send 'input' as text "
                                 "for this model, not token ids.", param="input",
                                 code="unsupported_input")
        payload: dict[str, Any] = {"model": model, "input": req.inputs}
        if req.dimensions is not None:
            payload["dimensions"] = req.dimensions
        if self.config.keep_alive:
            payload["keep_alive"] = ollama.keep_alive_value(self.config.keep_alive)
        if req.ollama:  # (an Ollama client's own: options, keep_alive, truncate)
            payload.update(req.ollama)
        data = await self.post_json("/api/embed", payload, limits="embedding")
        vectors = data.get("embeddings") if isinstance(data, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(req.inputs):
            raise UpstreamError(f"{self.name} sent an embedding response without embeddings",
                                backend=self.name)
        count = data.get("prompt_eval_count")
        return EmbeddingResult(vectors, count if isinstance(count, int) else 0)

    async def keep_warm(self, model: str, within: float) -> str | None:
        """Ollama unloads a model ``keep_alive`` after its last request (5 minutes unless
        set): load it again before then, with Ollama's documented preload (a generate
        without a prompt). Raises ``GatewayError`` when Ollama does not answer.
        """
        data = await self.get_json("/api/ps", quick=True)
        listed = data.get("models") if isinstance(data, dict) else None
        bare = model.removesuffix(":latest")
        entry = next((m for m in listed or [] if isinstance(m, dict)
                      and str(m.get("name", "")).removesuffix(":latest") == bare), None)
        if entry is not None:
            until = _timestamp(entry.get("expires_at"))
            if until is None or until - time.time() > within:
                return None
        await self.post_json("/api/generate", {
            "model": model, "keep_alive": ollama.keep_alive_value(self.config.keep_alive or
                                                                  WARM_FOR)})
        return "refreshed" if entry is not None else "loaded"

    async def load(self, model: str, keep_alive: Any, embeds: bool = False) -> str:
        """Ollama's own load and unload: a generate without a prompt; for an embedding
        model (which refuses to generate), an embed of nothing."""
        payload: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            payload["keep_alive"] = keep_alive
        if embeds and not _unloads(keep_alive):  # (an unload is a generate's for any model:
            await self.post_json("/api/embed", {**payload, "input": []})  # an embed loads it)
            return "load"
        data = await self.post_json("/api/generate", payload)
        said = data.get("done_reason") if isinstance(data, dict) else None
        return said if isinstance(said, str) and said else "load"

    async def _loaded(self) -> dict[str, int | None]:
        """The models loaded now, each with the window it runs with (when said)."""
        try:
            data = await self.get_json("/api/ps")
        except GatewayError:
            return {}
        listed = data.get("models") if isinstance(data, dict) else None
        return {m.get("name", ""): window if isinstance(window := m.get("context_length"), int)
                and window > 0 else None for m in listed or [] if isinstance(m, dict)}

    async def _show(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        digest = entry.get("digest") or entry.get("name", "")
        if digest in self._shown:
            return self._shown[digest]
        try:
            show = await self.post_json("/api/show", {"model": entry.get("name")},
                                        limits="listing")
        except GatewayError as exc:
            log.info("backend %s: /api/show %s failed: %s", self.name, entry.get("name"), exc)
            return None
        if isinstance(show, dict):
            self._shown[digest] = show
            return show
        return None


def _unloads(keep_alive: Any) -> bool:
    """Whether ``keep_alive`` is none at all (0, "0", "0s", "0.0m"): an unload."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    return isinstance(keep_alive, str) and ZERO.fullmatch(keep_alive.strip()) is not None


ZERO = re.compile(r"0+(?:\.0*)?(?:ns|us|\u00b5s|ms|s|m|h)?")
WARM_FOR = "30m"  # how long a model kept warm stays loaded, unless keep_alive says


def _timestamp(text: Any) -> float | None:
    """Seconds since the epoch of Ollama's RFC 3339 times (nanoseconds, any offset)."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
