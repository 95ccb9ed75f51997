"""Configuration: TOML (stdlib ``tomllib``) validated into frozen dataclasses at load.

Every error names the file, the key and what was expected, e.g.
``configs/x.toml: backends[1].url: expected an http:// or https:// URL, got 'localhost'``.
Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

BackendKind = Literal["ollama", "openai"]
Tier = Literal["primary", "server", "cloud"]
ReasoningMode = Literal["separate", "inline", "drop"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "gateway.toml"


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-backend limits, in seconds. Each ends the attempt with a clean error."""

    connect: float = 3.0
    headers: float = 120.0  # request sent → response headers (covers prompt processing)
    idle: float = 60.0  # longest silence between two chunks of a stream
    total: float = 600.0

    def problems(self) -> Iterator[tuple[str, str]]:
        for name in ("connect", "headers", "idle", "total"):
            if getattr(self, name) <= 0:
                yield name, "expected a number of seconds > 0"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream server: an Ollama instance or any OpenAI-compatible API."""

    name: str
    kind: BackendKind
    url: str
    tier: Tier = "primary"
    # Name of the environment variable holding the backend's API key (never the key itself).
    api_key_env: str = ""
    # Models served, when the backend cannot or should not be asked (/v1/models of a cloud API).
    models: tuple[str, ...] = ()
    # Absent at start-up is expected (auto-discovered local servers): logged, not fatal.
    optional: bool = False
    max_connections: int = 100
    # "max_tokens": send the limit as max_tokens, the name local servers understand.
    # "as_sent": forward max_tokens / max_completion_tokens untouched (cloud APIs).
    max_tokens_param: Literal["max_tokens", "as_sent"] = "max_tokens"
    # Ollama only: how long the model stays loaded after a request ("5m", "-1", "0").
    keep_alive: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            yield "name", "expected letters, digits, '_', '.' or '-'"
        if not re.match(r"https?://[^/]+", self.url):
            yield "url", f"expected an http:// or https:// URL, got {self.url!r}"
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            yield "api_key_env", "expected the name of an environment variable, not a key"
        if self.max_connections < 1:
            yield "max_connections", "expected an integer >= 1"
        if self.keep_alive and not re.fullmatch(r"-?\d+|-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+",
                                                self.keep_alive):
            yield "keep_alive", ("expected seconds (\"300\", \"-1\" for ever) or a duration "
                                 f"(\"5m\", \"1h30m\"), got {self.keep_alive!r}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The listening side."""

    host: str = "127.0.0.1"
    port: int = 4000
    max_body_bytes: int = 20 * 1024 * 1024  # images arrive base64-encoded in the body
    shutdown_grace: float = 30.0  # in-flight streams get this long to finish on shutdown
    # How reasoning text reaches clients: a reasoning_content delta, inline in <think> tags
    # for clients that only read content, or not at all.
    reasoning: ReasoningMode = "separate"
    discovery_interval: float = 30.0

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.port <= 65535:
            yield "port", "expected a TCP port 0-65535"
        if self.max_body_bytes < 1024:
            yield "max_body_bytes", "expected at least 1024"
        if self.shutdown_grace < 0:
            yield "shutdown_grace", "expected seconds >= 0"
        if self.discovery_interval <= 0:
            yield "discovery_interval", "expected seconds > 0"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Bearer API keys, stored only as SHA-256 hex digests (see ``gateway keys new``)."""

    key_hashes: tuple[str, ...] = ()

    def problems(self) -> Iterator[tuple[str, str]]:
        for i, digest in enumerate(self.key_hashes):
            if not re.fullmatch(r"(sha256:)?[0-9a-f]{64}", digest):
                yield f"key_hashes[{i}]", "expected a SHA-256 hex digest (gateway keys new)"


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    backends: tuple[BackendConfig, ...] = ()
    source: str = "<defaults>"

    def problems(self) -> Iterator[tuple[str, str]]:
        seen: set[str] = set()
        for i, backend in enumerate(self.backends):
            if backend.name in seen:
                yield f"backends[{i}].name", f"duplicate backend name {backend.name!r}"
            seen.add(backend.name)

    def with_server(self, **changes: Any) -> GatewayConfig:
        """A copy with some server settings replaced (CLI flags)."""
        return dataclasses.replace(self, server=dataclasses.replace(self.server, **changes))


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Read and validate a TOML config; ``None`` means the embedded default."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path))


def parse_config(data: dict[str, Any], source: str = "<config>") -> GatewayConfig:
    """Validate an already-parsed TOML document."""
    if "source" in data:
        raise ConfigError(f"{source}: source: unknown key")
    config: GatewayConfig = _build(GatewayConfig, {**data, "source": source}, source, "")
    return config


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the gateway on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the generic loader -------------------------------------------------------------------


def _build(cls: type[Any], data: Any, source: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or '<top>'}: expected a table, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: {_join(where, key)}: unknown key (known: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], source, _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {_join(where, name)}: required key is missing")
    obj = cls(**values)
    for key, message in obj.problems():
        raise ConfigError(f"{source}: {_join(where, key)}: {message}")
    return obj


def _convert(hint: Any, value: Any, source: str, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where)  # type: ignore[arg-type]
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{source}: {where}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {value!r}")
        return tuple(_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Union, types.UnionType):
        raise TypeError(f"config field {where}: unions are not supported by the loader")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {where}: expected a number, got {value!r}")
        return float(value)
    expected = {str: "a string", int: "an integer", bool: "true or false"}[hint]
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {where}: expected {expected}, got {value!r}")
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
