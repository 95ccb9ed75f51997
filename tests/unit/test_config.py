"""Configs load into frozen dataclasses; every mistake is named by file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config import DEFAULT_CONFIG, ConfigError, is_loopback, load_config, parse_config


def test_the_embedded_default_is_loopback_only_and_discovers_local_servers() -> None:
    config = load_config()
    assert config.source == str(DEFAULT_CONFIG)
    assert is_loopback(config.server.host)
    assert not config.auth.key_hashes
    urls = {b.name: (b.kind, b.url, b.tier, b.optional) for b in config.backends}
    assert urls == {"ollama": ("ollama", "http://127.0.0.1:11434", "primary", True),
                    "mlx": ("openai", "http://127.0.0.1:11435/v1", "primary", True),
                    "light": ("embedded", "", "server", True)}


def test_the_demo_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG.parent / "demo.toml")
    assert [b.kind for b in config.backends] == ["ollama", "openai"]


def test_the_seed_topology_loads() -> None:
    config = load_config(DEFAULT_CONFIG.parent / "seed-topology.toml")
    assert [b.tier for b in config.backends] == ["primary", "primary", "server", "cloud"]
    coder = config.models[0]
    assert [d.backend for d in coder.deployments] == ["ollama", "mlx"]


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"server": {"port": "80"}}, "server.port: expected an integer, got a string"),
        ({"server": {"port": True}}, "server.port: expected an integer, got true"),
        # (a value in the wrong place is not repeated: it may be a secret)
        ({"tenants": [{"redis_url": "redis://:Secret@h"}]},
         "tenants: expected a table, got a list"),
        ({"auth": {"key_hashes": "sk-live-123"}}, "auth.key_hashes: expected a list, got a string"),
        ({"routing": {"health_interval": 0}}, "routing.health_interval: expected seconds > 0"),
        ({"tasks": {"retry_max": 0}}, "tasks.retry_max: expected seconds > 0"),
        ({"server": {"shutdown_grace": float("nan")}},
         "server.shutdown_grace: expected a number, got nan"),
        ({"backends": [{"name": "b", "kind": "ollama", "url": "http://h",
                        "timeouts": {"total": float("inf")}}]},
         "backends[0].timeouts.total: expected a number, got inf"),
        ({"server": {"prot": 80}}, "server.prot: unknown key"),
        ({"server": {"reasoning": "loud"}},
         "server.reasoning: expected one of ['separate', 'inline', 'drop'], got 'loud'"),
        ({"backends": [{"name": "a", "kind": "ollama"}]},
         "backends[0].url: expected an http:// or https:// URL, got ''"),
        ({"backends": [{"name": "a", "kind": "vllm", "url": "http://x"}]},
         "backends[0].kind: expected one of ['ollama', 'openai', 'embedded']"),
        ({"models": [{"name": "m", "deployments": [{"backend": "nowhere", "model": "m"}]}]},
         "models[0].deployments[0].backend: no backend named 'nowhere'"),
        ({"aliases": {"auto:x": {"priority": {"ollama": "qwq"}}}},
         "aliases.auto:x.priority.ollama: expected a list, got a string"),
        ({"routing": {"breaker": {"failures": 0}}},
         "routing.breaker.failures: expected an integer >= 1"),
        ({"backends": [{"name": "a", "kind": "openai", "url": "localhost:8080"}]},
         "backends[0].url: expected an http:// or https:// URL"),
        ({"backends": [{"name": "a", "kind": "openai", "url": "http://x",
                        "api_key_env": "sk-live-abc123"}]},
         "backends[0].api_key_env: expected the name of an environment variable"),
        ({"backends": [{"name": "a", "kind": "openai", "url": "http://x",
                        "timeouts": {"idle": 0}}]},
         "backends[0].timeouts.idle: expected a number of seconds > 0"),
        ({"backends": [{"name": "a", "kind": "openai", "url": "http://x"},
                       {"name": "a", "kind": "ollama", "url": "http://y"}]},
         "backends[1].name: duplicate backend name 'a'"),
        ({"auth": {"key_hashes": ["secret"]}}, "auth.key_hashes[0]: expected a SHA-256"),
    ],
)
def test_mistakes_are_named(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="^x.toml: " + _escape(message)):
        parse_config(document, source="x.toml")


def test_a_backend_at_the_gateways_own_address_is_refused() -> None:
    """The shipped config suggests also_listen on Ollama's port, above the Ollama backend
    there: the gateway asked itself, and each request hung until it gave up."""
    ollama = {"name": "ollama", "kind": "ollama", "url": "http://127.0.0.1:11434"}
    with pytest.raises(ConfigError, match=r"backends\[0\]\.url: .* the gateway's own address"):
        parse_config({"server": {"also_listen": ["127.0.0.1:11434"]}, "backends": [ollama]},
                     source="x.toml")
    with pytest.raises(ConfigError, match="the gateway's own address"):
        parse_config({"server": {"host": "0.0.0.0", "port": 4000}, "backends": [
            {**ollama, "url": "http://localhost:4000/v1", "kind": "openai"}]}, source="x.toml")
    for listen in ("[::1]:11434", "127.0.0.2:11434"):  # another socket of the same port
        parse_config({"server": {"also_listen": [listen]}, "backends": [ollama]},
                     source="x.toml")
    config = parse_config({"server": {"port": 4000}, "backends": [ollama]}, source="x.toml")
    with pytest.raises(ConfigError, match="the gateway's own address"):
        config.with_server(port=11434)  # (gateway serve --port 11434)
    assert config.with_server(port=4001).server.port == 4001


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1")
    with pytest.raises(ConfigError, match=f"^{_escape(str(broken))}: not valid TOML"):
        load_config(broken)


def test_integers_are_accepted_where_seconds_are_expected() -> None:
    config = parse_config({"server": {"shutdown_grace": 5}})
    assert config.server.shutdown_grace == 5.0 and isinstance(config.server.shutdown_grace, float)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
    ("192.168.1.5", False), ("gateway.example", False),
])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_first_token_limits_suit_interactive_use_and_the_embedded_cpu_model() -> None:
    config = parse_config({"backends": [
        {"name": "studio", "kind": "ollama", "url": "http://127.0.0.1:11434"},
        {"name": "light", "kind": "embedded"},
        {"name": "slow", "kind": "ollama", "url": "http://127.0.0.1:11435",
         "timeouts": {"first_token": 180}},
    ]})
    limits = {b.name: b.first_token_limit for b in config.backends}
    assert limits == {"studio": 30.0, "light": 120.0, "slow": 180.0}
    slots = {b.name: b.slots for b in config.backends}
    assert slots == {"studio": 1, "light": 2, "slow": 1}  # Ollama's: its own default
    assert config.routing.queue_timeout == 60.0
