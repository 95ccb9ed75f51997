"""Settings of how the gateway serves clients: where it listens, who may call it, how
reasoning reaches them, and how long Responses API responses are kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

ReasoningMode = Literal["separate", "inline", "drop"]


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, or None (never quoting it: it may hold a password)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "expected a redis://, rediss:// or unix:// URL"
    try:
        urlsplit(url).port  # noqa: B018 (read for its check)
    except ValueError:
        return "expected a port 0-65535 in the URL"
    return None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The listening side."""

    host: str = "127.0.0.1"
    port: int = 4000
    max_body_bytes: int = 20 * 1024 * 1024  # images arrive base64-encoded in the body
    body_timeout: float = 30.0  # the longest a request body may take to arrive
    # Request bodies held at once, all requests together (each holds what has arrived of
    # it): past it, requests are turned away (503) rather than buffered; a body larger than
    # all of it is a 413.
    bodies_in_flight_bytes: int = 256 * 1024 * 1024
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
        if self.body_timeout <= 0:
            yield "body_timeout", "expected seconds > 0"
        if self.bodies_in_flight_bytes < self.max_body_bytes:
            yield "bodies_in_flight_bytes", "expected at least max_body_bytes"
        if self.shutdown_grace < 0:
            yield "shutdown_grace", "expected seconds >= 0"
        if self.discovery_interval <= 0:
            yield "discovery_interval", "expected seconds > 0"
        seen = {(self.host, self.port)}
        for i, address in enumerate(self.also_listen):
            try:
                where = split_address(address)
            except ValueError as exc:
                yield f"also_listen[{i}]", str(exc)
                continue
            if where in seen and where[1]:
                yield f"also_listen[{i}]", f"{address} is listened on already"
            seen.add(where)
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
        if self.backend == "redis" and (problem := redis_url_problem(self.redis_url)):
            yield "redis_url", problem
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
    # Keys for the operator: /health in full, the admin API. Not keys for models.
    admin_key_hashes: tuple[str, ...] = ()

    def problems(self) -> Iterator[tuple[str, str]]:
        for name in ("key_hashes", "admin_key_hashes"):
            for i, digest in enumerate(getattr(self, name)):
                if not re.fullmatch(r"(sha256:)?[0-9a-f]{64}", digest):
                    yield f"{name}[{i}]", "expected a SHA-256 hex digest (gateway keys new)"


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


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """A named API key and what it may do (0: no limit). Only its SHA-256 is kept."""

    id: str
    hash: str
    name: str = ""
    created: int = 0  # Unix seconds
    expires: int = 0  # Unix seconds; 0: never
    models: tuple[str, ...] = ()  # the models and aliases it may ask for (none: all)
    rpm: int = 0  # requests per minute
    tpm: int = 0  # tokens per minute, prompt and answer together
    concurrency: int = 0  # requests at once
    budget: int = 0  # tokens per budget_period
    budget_period: Literal["day", "month"] = "day"
    # Whose cached answers it may get: its own ("key"), any key's ("shared"), none ("off");
    # unset: as the cache's own ``shared`` option says.
    cache: Literal["", "key", "shared", "off"] = ""
    revoked: bool = False

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.id):
            yield "id", "expected 1-64 letters, digits, '_', '.' or '-'"
        if not re.fullmatch(r"(sha256:)?[0-9a-f]{64}", self.hash):
            yield "hash", "expected a SHA-256 hex digest (gateway keys new)"
        for key in ("rpm", "tpm", "concurrency", "budget", "created", "expires"):
            if not 0 <= getattr(self, key) <= 2**53:
                yield key, "expected an integer >= 0 (and below 2**53)"


@dataclass(frozen=True, slots=True)
class TenantsConfig:
    """Where keys and their counters live: the config and this process's memory, or Redis
    (shared by every gateway process, so limits hold for all of them together).
    """

    store: Literal["config", "redis"] = "config"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # When Redis does not answer: "open" counts in this process alone until it is back;
    # "closed" refuses requests (503).
    on_redis_down: Literal["open", "closed"] = "open"
    timeout: float = 0.1  # the longest one call to Redis may make a request wait

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.store == "redis" and (problem := redis_url_problem(self.redis_url)):
            yield "redis_url", problem
        if self.timeout <= 0:
            yield "timeout", "expected seconds > 0"
