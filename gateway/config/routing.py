"""Settings of how a request finds its answer: attempts, retries, breakers, the models that
span backends and their fallbacks, the aliases, and the plugins around every request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config.serving import redis_url_problem


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
class LearnedConfig:
    """The learned policy (``policy = "learned"``): how much it explores, how much the static
    priority counts against what it learns, and where what it learned is kept.
    """

    exploration: float = 1.0  # weight of the bonus for what is still uncertain (0: none)
    prior_strength: float = 2.0  # the static priority counts as this many outcomes
    # Outcomes a model's estimate mostly rests on: older ones weigh less and less, so a model
    # that gets worse (or better) is noticed.
    memory: int = 300
    outcomes: int = 10000  # outcomes kept in memory (for feedback and export)
    # Where what was learned is kept across restarts ("": learned-routing.json in
    # [tasks] data_dir)...
    state_file: str = ""
    # ...or a Redis every gateway process shares: each learns from all their outcomes.
    redis_url: str = ""

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.exploration <= 2:
            yield "exploration", "expected a weight from 0 (never explore) to 2"
        if self.prior_strength <= 0:
            yield "prior_strength", "expected a number > 0"
        if self.memory < 20:
            yield "memory", "expected at least 20 outcomes"
        if self.outcomes < 1:
            yield "outcomes", "expected an integer >= 1"
        if self.redis_url and (problem := redis_url_problem(self.redis_url)):
            yield "redis_url", problem


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How a request finds an answer: attempts, retries, fallbacks, breakers."""

    max_attempts: int = 4  # upstream attempts per request, retries and failovers together
    retries: int = 1  # further tries on the same deployment after a transient error
    backoff_initial: float = 0.2  # seconds; doubled per retry, jittered
    backoff_max: float = 2.0
    retry_after_cap: float = 3.0  # a longer Retry-After fails over instead of waiting
    # Longest wait for a free slot when every deployment of the model is busy: in line here
    # a request loses nothing (on a local fleet the alternative is an error); a client that
    # gives up leaves the line.
    queue_timeout: float = 60.0
    fallbacks: tuple[str, ...] = ()  # for models without their own list (names or aliases)
    tier_fallback: bool = True  # after a model's own fallbacks: the server tier, then cloud
    rescue: bool = True  # continue a stream that broke mid-answer on another deployment
    max_escalations: int = 1  # stronger models tried after a failing quality verdict
    health_interval: float = 2.0  # seconds between probes of a backend that is down
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # A Redis every gateway process shares (the workers of `serve --workers N`, other
    # hosts): a breaker one opens, or a backend one finds down, is avoided by all at once.
    redis_url: str = ""
    # How an alias orders its picks: its static priority lists, or what was learned from
    # outcomes (with the lists as the prior); an alias may say otherwise.
    policy: Literal["priority", "learned"] = "priority"
    learned: LearnedConfig = field(default_factory=LearnedConfig)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.max_attempts < 1:
            yield "max_attempts", "expected an integer >= 1"
        if self.retries < 0:
            yield "retries", "expected an integer >= 0"
        for key in ("backoff_initial", "backoff_max", "retry_after_cap", "queue_timeout"):
            if getattr(self, key) < 0:
                yield key, "expected seconds >= 0"
        if self.health_interval <= 0:  # (0: a probe without a pause, a core kept busy)
            yield "health_interval", "expected seconds > 0"
        if self.redis_url and (problem := redis_url_problem(self.redis_url)):
            yield "redis_url", problem


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
    # Whether it continues a final assistant message (a broken stream's rescue); "auto":
    # as its backend's ``prefill`` says.
    prefill: Literal["auto", "yes", "no"] = "auto"


@dataclass(frozen=True, slots=True)
class AliasConfig:
    """A model name like ``auto:code`` that picks the best model available now."""

    # Priority lists, one per backend family (e.g. "ollama", "mlx"), best first.
    priority: dict[str, tuple[str, ...]] = field(default_factory=dict)
    prefer: tuple[str, ...] = ()  # which list's best goes first
    require: tuple[str, ...] = ()  # capabilities every pick must have
    # After the lists: every other model that qualifies, smallest or largest first.
    others: Literal["none", "smallest", "largest"] = "none"
    policy: Literal["", "priority", "learned"] = ""  # "": as [routing] policy says
    # What a second of an answer's time costs against its quality (0 to 1), learning.
    latency_cost: float = 0.02

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.latency_cost < 0:
            yield "latency_cost", "expected a number >= 0"


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
