"""Model names resolve to deployments the way clients write them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from gateway.backends.base import Health
from gateway.errors import GatewayError, ModelNotFound, UpstreamError
from gateway.protocol.units import Chunk, EmbeddingResult, ModelInfo
from gateway.routing.catalog import ModelCatalog


class Listed:
    """A backend reduced to its model list (the catalog never asks it for anything else)."""

    tier = "primary"

    def __init__(self, name: str, models: list[str] | None) -> None:
        self.name = name
        self._models = models

    async def list_models(self) -> list[ModelInfo]:
        if self._models is None:
            raise UpstreamError(f"cannot connect to backend {self.name}")
        return [ModelInfo(name=m, backend=self.name) for m in self._models]

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def probe(self) -> Health: return Health(True)
    def chat(self, req: object, model: str) -> AsyncGenerator[Chunk]: raise NotImplementedError
    def complete(self, req: object, model: str) -> AsyncGenerator[Chunk]: raise NotImplementedError
    async def embed(self, req: object, model: str) -> EmbeddingResult: raise NotImplementedError


async def catalog(*backends: Listed) -> ModelCatalog:
    result = ModelCatalog(backends)  # type: ignore[arg-type]
    await result.refresh()
    return result


async def test_names_with_and_without_latest_and_with_a_backend_prefix() -> None:
    cat = await catalog(Listed("ollama", ["llama3.2:latest", "qwen:7b"]),
                        Listed("mlx", ["mlx-community/Qwen-7B", "qwen:7b"]))
    assert [d.model.name for d in cat.resolve("llama3.2")] == ["llama3.2:latest"]
    assert [d.backend.name for d in cat.resolve("qwen:7b")] == ["ollama", "mlx"]
    assert [d.backend.name for d in cat.resolve("mlx/qwen:7b")] == ["mlx"]
    assert [d.model.name for d in cat.resolve("mlx-community/Qwen-7B")] == ["mlx-community/Qwen-7B"]
    assert [name for name, _ in cat.models()] == [
        "llama3.2:latest", "qwen:7b", "mlx-community/Qwen-7B"]


async def test_unknown_models_name_the_backends_that_could_not_be_asked() -> None:
    cat = await catalog(Listed("ollama", ["a"]), Listed("mlx", None))
    with pytest.raises(ModelNotFound) as caught:
        cat.resolve("b")
    assert "Not reachable right now: mlx" in caught.value.message
    assert cat.status()["mlx"].ok is False and cat.status()["ollama"].ok is True


async def test_a_backend_that_goes_away_keeps_its_last_known_models() -> None:
    flaky = Listed("ollama", ["a"])
    cat = await catalog(flaky)
    flaky._models = None
    await cat.refresh()
    assert cat.resolve("a")[0].backend is flaky
    assert cat.status()["ollama"].ok is False


async def test_a_listing_that_raises_something_unexpected_does_not_stop_discovery() -> None:
    class Broken(Listed):
        async def list_models(self) -> list[ModelInfo]:
            raise KeyError("models")

    cat = await catalog(Broken("weird", []), Listed("ollama", ["a"]))
    assert cat.resolve("a") and not cat.status()["weird"].ok
    assert isinstance(ModelNotFound("x"), GatewayError)


async def test_one_name_for_the_same_model_on_ollama_and_mlx() -> None:
    from gateway.config import DeploymentConfig, ModelConfig

    coder = ModelConfig(
        name="coder",
        deployments=(DeploymentConfig("ollama", "qwen2.5-coder:32b"),
                     DeploymentConfig("mlx", "mlx-community/Qwen2.5-Coder-32B-Instruct-4bit"),
                     DeploymentConfig("mlx", "not-there")),
        capabilities=("completion", "tools"), context_length=32768)
    cat = ModelCatalog([Listed("ollama", ["qwen2.5-coder:32b"]),
                        Listed("mlx", ["mlx-community/Qwen2.5-Coder-32B-Instruct-4bit"])],
                       [coder])  # type: ignore[list-item]
    await cat.refresh()
    deployments = cat.resolve("coder")
    assert [(d.backend.name, d.model.name) for d in deployments] == [
        ("ollama", "qwen2.5-coder:32b"), ("mlx", "mlx-community/Qwen2.5-Coder-32B-Instruct-4bit")]
    assert all(d.model.context_length == 32768 and d.model.known
               and "tools" in d.model.capabilities and "chat" in d.model.capabilities
               for d in deployments)
    # The backends' own names still work, one deployment each.
    assert len(cat.resolve("qwen2.5-coder:32b")) == 1


class Slow(Listed):
    """A backend whose listings answer when told, each with the models as they were when
    it was asked."""

    def __init__(self, name: str, models: list[str]) -> None:
        super().__init__(name, models)
        self.asked: asyncio.Queue[asyncio.Event] = asyncio.Queue()  # (each one's answer)

    async def list_models(self) -> list[ModelInfo]:
        models = list(self._models or [])
        answer = asyncio.Event()
        self.asked.put_nowait(answer)
        await answer.wait()
        return [ModelInfo(name=m, backend=self.name) for m in models]


async def test_a_listing_asked_before_a_later_one_and_answered_after_it_is_not_kept() -> None:
    """A slow discovery round that began before a model was removed, answering after the
    listing the removal set off, brought the removed model back until the next round.
    """
    backend = Slow("ollama", ["a", "b"])
    cat = ModelCatalog([backend])  # type: ignore[arg-type]
    slow_round = asyncio.create_task(cat.refresh())
    first = await backend.asked.get()
    backend._models = ["a"]  # ("ollama rm b")
    relist = asyncio.create_task(cat.refresh_backend("ollama"))
    (await backend.asked.get()).set()  # the later listing answers first...
    for _ in range(5):
        await asyncio.sleep(0)
    first.set()  # ...then the round's
    async with asyncio.timeout(5):
        await asyncio.gather(slow_round, relist)
    assert [name for name, _ in cat.models()] == ["a"]
