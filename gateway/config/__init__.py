"""Configuration: TOML (stdlib ``tomllib``) validated into frozen dataclasses at load.

Every error names the file, the key and what was expected, e.g.
``configs/x.toml: backends[1].url: expected an http:// or https:// URL, got 'localhost'``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config.observing import AlertRule, MonitorConfig, SinkConfig, TelemetryConfig
from gateway.config.routing import (
    AliasConfig,
    BreakerConfig,
    DeploymentConfig,
    LearnedConfig,
    ModelConfig,
    PluginConfig,
    RoutingConfig,
)
from gateway.config.serving import (
    AuthConfig,
    KeyConfig,
    ReasoningMode,
    ResponsesConfig,
    ServerConfig,
    TenantsConfig,
    is_loopback,
    redis_url_problem,
    split_address,
)
from gateway.config.tasks import TasksConfig
from gateway.config.upstreams import (
    TIERS,
    BackendConfig,
    BackendKind,
    ForwardConfig,
    Tier,
    Timeouts,
    TunnelConfig,
)
from gateway.typed_toml import ConfigError, build

__all__ = [
    "TIERS",
    "AlertRule",
    "AliasConfig",
    "AuthConfig",
    "BackendConfig",
    "BackendKind",
    "BreakerConfig",
    "ConfigError",
    "DeploymentConfig",
    "ForwardConfig",
    "GatewayConfig",
    "KeyConfig",
    "LearnedConfig",
    "ModelConfig",
    "MonitorConfig",
    "PluginConfig",
    "ReasoningMode",
    "ResponsesConfig",
    "RoutingConfig",
    "ServerConfig",
    "SinkConfig",
    "TasksConfig",
    "TelemetryConfig",
    "TenantsConfig",
    "Tier",
    "Timeouts",
    "TunnelConfig",
    "is_loopback",
    "load_config",
    "parse_config",
    "redis_url_problem",
    "split_address",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent.parent / "configs" / "gateway.toml"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    backends: tuple[BackendConfig, ...] = ()
    tunnels: tuple[TunnelConfig, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    models: tuple[ModelConfig, ...] = ()
    aliases: dict[str, AliasConfig] = field(default_factory=dict)
    plugins: tuple[PluginConfig, ...] = ()
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    keys: tuple[KeyConfig, ...] = ()
    source: str = "<defaults>"

    def problems(self) -> Iterator[tuple[str, str]]:
        names = [b.name for b in self.backends]
        for i, name in enumerate(names):
            if name in names[:i]:
                yield f"backends[{i}].name", f"duplicate backend name {name!r}"
        forwards = {f"{t.name}/{f.name}" for t in self.tunnels for f in t.forwards}
        for i, backend in enumerate(self.backends):
            if backend.tunnel and backend.tunnel not in forwards:
                yield f"backends[{i}].tunnel", f"no tunnel forward {backend.tunnel!r}"
        tunnel_names = [t.name for t in self.tunnels]
        for i, name in enumerate(tunnel_names):
            if name in tunnel_names[:i]:
                yield f"tunnels[{i}].name", f"duplicate tunnel name {name!r}"
        taken = {self.server.port}
        for i, tunnel in enumerate(self.tunnels):
            for j, forward in enumerate(tunnel.forwards):
                if forward.local_port and forward.local_port in taken:
                    yield (f"tunnels[{i}].forwards[{j}].local_port",
                           f"port {forward.local_port} is already used by the gateway")
                taken.add(forward.local_port)
        ids = [k.id for k in self.keys]
        for i, key_id in enumerate(ids):
            if key_id in ids[:i]:
                yield f"keys[{i}].id", f"duplicate key id {key_id!r}"
        for i, model in enumerate(self.models):
            for j, deployment in enumerate(model.deployments):
                if deployment.backend not in names:
                    yield (f"models[{i}].deployments[{j}].backend",
                           f"no backend named {deployment.backend!r}")
        yield from self._asking_itself()

    def _asking_itself(self) -> Iterator[tuple[str, str]]:
        """Backends whose URL is one of the gateway's own addresses (the shipped config's
        ``also_listen`` on Ollama's port, beside the Ollama backend there): their requests
        would come back to the gateway, and each hold a connection until it gave up.
        """
        own = [(host, port) for host, port in self.server.addresses() if port]
        for i, backend in enumerate(self.backends):
            if not backend.url or backend.tunnel:
                continue
            url = urlsplit(backend.url)
            try:
                port = url.port or (443 if url.scheme == "https" else 80)
            except ValueError:
                continue
            host = url.hostname or ""
            for listen, listen_port in own:
                if port == listen_port and _one_socket(host, listen):
                    yield (f"backends[{i}].url", f"{backend.url} is the gateway's own address "
                           f"({listen}:{listen_port}): its requests would come back to it")

    @property
    def keyed(self) -> bool:
        """Whether requests need an API key (any kept in the config, or in Redis)."""
        return bool(self.auth.key_hashes or self.keys) or self.tenants.store == "redis"

    def with_server(self, **changes: Any) -> GatewayConfig:
        """A copy with some server settings replaced (CLI flags), checked as the file's."""
        server = dataclasses.replace(self.server, **changes)
        for key, problem in server.problems():
            flag = f"--{key}" if key in changes else f"{self.source}: server.{key}"
            raise ConfigError(f"{flag}: {problem}")
        changed = dataclasses.replace(self, server=server)
        for key, problem in changed._asking_itself():
            raise ConfigError(f"{self.source}: {key}: {problem}")
        return changed


def _one_socket(host: str, listen: str) -> bool:
    """Whether a request to ``host`` reaches a socket listening on ``listen`` (the same
    port): the same address, localhost and a loopback address it names, or a loopback
    address and the wildcard of its family."""
    if host == listen:
        return True
    names = {"localhost": ("127.0.0.1", "::1")}
    if listen in names.get(host, ()) or host in names.get(listen, ()):
        return True
    wild = {"0.0.0.0": ("localhost", "127.0.0.1"), "::": ("localhost", "::1", "127.0.0.1")}
    return host in wild.get(listen, ()) or (listen == "0.0.0.0" and host.startswith("127."))


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Read and validate a TOML config; ``None`` means the embedded default."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not text in UTF-8, as TOML must be") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "<config>") -> GatewayConfig:
    """Validate an already-parsed TOML document."""
    if "source" in data:
        raise ConfigError(f"{source}: source: unknown key")
    return build(GatewayConfig, {**data, "source": source}, source)
