"""A simulated hybrid fleet for routing tests: two workstation hosts (primary tier), a light
model on the server (server tier) and a cloud API (cloud tier).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.sim import SimModel, create_ollama_app, create_openai_app
from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

TOOLS = ("completion", "tools")


def host_models() -> list[SimModel]:
    return [
        SimModel("qwen2.5-coder:32b", family="qwen2", parameter_size="32.8B",
                 context_length=32768, capabilities=(*TOOLS, "insert")),
        SimModel("qwq:32b", family="qwen2", parameter_size="32.8B", context_length=32768,
                 capabilities=(*TOOLS, "thinking"), thinking="field"),
        SimModel("tiny-ctx:1b", family="llama", parameter_size="1.2B", context_length=64,
                 capabilities=("completion",)),
    ]


@dataclass
class Fleet:
    primary: Sim
    secondary: Sim
    server: Sim
    cloud: Sim
    threads: dict[str, ServerThread]

    def all(self) -> list[Sim]:
        return [self.primary, self.secondary, self.server, self.cloud]

    def restart(self, name: str, make: Callable[[], Any]) -> None:
        """Bring a stopped host back on the same port."""
        port = self.threads[name].port
        self.threads[name] = ServerThread(make, port=port).start()
        getattr(self, name).server = self.threads[name]


def _sims() -> dict[str, tuple[str, Callable[[], Any]]]:
    return {
        "primary": ("ollama", lambda: create_ollama_app(host_models())),
        "secondary": ("ollama", lambda: create_ollama_app(
            [m for m in host_models() if m.name == "qwen2.5-coder:32b"])),
        "server": ("llamacpp", lambda: create_openai_app(
            [SimModel("smollm2:135m", parameter_size="135M", context_length=8192)],
            flavor="llamacpp")),
        "cloud": ("openai", lambda: create_openai_app(
            [SimModel("gpt-4o-mini", context_length=128000)], flavor="openai")),
    }


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    threads = {name: ServerThread(make).start() for name, (_, make) in _sims().items()}
    sims = {name: Sim(threads[name], kind) for name, (kind, _) in _sims().items()}
    fleet = Fleet(threads=threads, **sims)
    yield fleet
    for thread in fleet.threads.values():
        with contextlib.suppress(RuntimeError):  # stopped by the test
            thread.stop()


FAST = {"headers": 1.0, "first_token": 1.0, "first_token_cold": 1.0, "idle": 1.0,
        "total": 10.0, "connect": 1.0}


def fleet_config(fleet: Fleet, **routing: Any) -> Any:
    # (the simulated hosts answer any number at once: their Ollama is told to)
    return gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST, parallel=8),
        backend("secondary", "ollama", fleet.secondary.api_url, timeouts=FAST, parallel=8),
        backend("server", "openai", fleet.server.api_url, tier="server", timeouts=FAST),
        backend("cloud", "openai", fleet.cloud.api_url, tier="cloud", timeouts=FAST,
                models=["gpt-4o-mini"]),
        models=[
            {"name": "qwq:32b", "fallbacks": ["qwen2.5-coder:32b"]},
            {"name": "tiny-ctx:1b", "fallbacks": ["qwen2.5-coder:32b"]},
        ],
        routing={"retries": 1, "backoff_initial": 0.05, "backoff_max": 0.2,
                 "retry_after_cap": 2.0, "health_interval": 0.5,
                 "breaker": {"failures": 3, "cooldown": 1.0}, **routing},
    )


@pytest.fixture
def routed_gateway(fleet: Fleet) -> Iterator[ServerThread]:
    server = start_gateway(fleet_config(fleet))
    yield server
    server.stop()
