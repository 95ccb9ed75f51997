"""Shared fixtures: simulated backends for the whole session, a fresh gateway per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.sim import create_ollama_app, create_openai_app, seed_fleet
from tests.support import (
    ServerThread,
    Sim,
    backend,
    close_test_clients,
    gateway_config,
    start_gateway,
)


@pytest.fixture(scope="session")
def ollama_sim() -> Iterator[Sim]:
    fleet = seed_fleet()["ollama"]
    with ServerThread(lambda: create_ollama_app(fleet)) as server:
        yield Sim(server, "ollama")


@pytest.fixture(scope="session")
def mlx_sim() -> Iterator[Sim]:
    fleet = seed_fleet()["mlx"]
    with ServerThread(lambda: create_openai_app(fleet, flavor="mlx")) as server:
        yield Sim(server, "mlx")


@pytest.fixture(autouse=True)
def _clients_closed() -> Iterator[None]:
    """The SDK clients a test made through ``openai_client`` are closed when it ends."""
    yield
    close_test_clients()


@pytest.fixture(autouse=True)
def _clean_sims(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with sims that have no faults and an empty request log."""
    sims = [request.getfixturevalue(name) for name in ("ollama_sim", "mlx_sim")
            if name in request.fixturenames]
    for sim in sims:
        sim.clear()
    yield
    for sim in sims:
        sim.clear()


@pytest.fixture
def gateway(ollama_sim: Sim, mlx_sim: Sim) -> Iterator[ServerThread]:
    """The gateway in front of a simulated Ollama and a simulated MLX server."""
    config = gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url),
    )
    server = start_gateway(config)
    yield server
    server.stop()
