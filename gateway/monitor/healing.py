"""The healer: what the gateway mends without its operator, in one place, each action
logged in one line and counted (``gateway.healing.actions`` by action and outcome), the
latest kept for ``/admin/status`` and the dashboard.

- ``rediscover``: a backend that comes back is asked for its models again.
- ``probe_breaker``: a deployment whose breaker is open is tried with a one-token request
  once its cool-down has passed, so it rejoins without a client's request being the trial.
- ``keep_warm``: the model each ``keep_warm`` alias picks is kept loaded on Ollama (its
  documented preload, before ``keep_alive`` runs out), so the first request of the morning
  does not wait for a 30 GB model to load.
- ``reconnect_tunnel`` and ``restart_embedded``: the tunnel's own loop reconnects it and the
  embedded backend's supervisor restarts its llama.cpp server (each where its resource
  lives); the healer records each time they did.
- A configured ``[[models]]`` deployment that names a model its backend does not list is
  warned of (log, ``/admin/status``; ``gateway check`` says it too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.backends.base import Backend
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.monitor.health import HealthWatcher
from gateway.protocol.openai import ChatRequest, EmbeddingRequest, parse_chat, parse_embedding
from gateway.routing.catalog import Deployment, ModelCatalog
from gateway.routing.dispositions import counts_against
from gateway.routing.router import Router
from gateway.runtime import end_loops
from gateway.telemetry import Metrics
from gateway.tunnel.manager import Tunnel, TunnelManager

log = logging.getLogger(__name__)

PROBE_SECONDS = 30.0  # the longest a breaker's probe may take
WARM_BACKOFF_MAX = 1800.0  # the longest keep_warm waits after a model was unloaded again
PROBE_CHAT = {"model": "", "messages": [{"role": "user", "content": "ping"}],
              "max_tokens": 1, "stream": True}


@dataclass(frozen=True, slots=True)
class Action:
    at: float
    action: str
    target: str
    outcome: str  # "ok" or "failed"
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "action": self.action, "target": self.target,
                "outcome": self.outcome, "detail": self.detail}


class Healer:
    def __init__(self, config: GatewayConfig, router: Router, catalog: ModelCatalog,
                 backends: dict[str, Backend], tunnels: TunnelManager, health: HealthWatcher,
                 metrics: Metrics) -> None:
        self._config = config
        self._monitor = config.monitor
        self._router = router
        self._catalog = catalog
        self._backends = backends
        self._health = health
        self.counted = metrics.counter(
            "gateway.healing.actions", "What the monitor mended (or tried to), by action and "
            "outcome", ("action", "outcome"))
        self.recent: deque[Action] = deque(maxlen=50)
        self.warnings: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._probing: set[tuple[str, str]] = set()
        self._restarts = {name: getattr(b, "restarts", 0) for name, b in backends.items()}
        self._catalog_version = -1
        self._warm_failed: set[str] = set()
        self._warming: set[str] = set()  # keep_warm targets being loaded now
        self._warmed: set[str] = set()  # ... that this healer has seen loaded
        self._warm_misses: dict[str, int] = {}  # ... unloaded meanwhile, or failing, in a row
        self._warm_next: dict[str, float] = {}  # ... not looked at again before
        self._was_up: set[str] = set()
        health.on_recovered.append(self.rediscover)
        for tunnel in tunnels.tunnels.values():
            tunnel.on_up.append(self._tunnel_up)

    def record(self, action: str, target: str, outcome: str, detail: str = "") -> None:
        self.recent.append(Action(time.time(), action, target, outcome, detail))
        self.counted.add((action, outcome))
        log.log(logging.INFO if outcome == "ok" else logging.WARNING, "healing: %s %s: %s%s",
                action, target, outcome, f" ({detail})" if detail else "")

    def rediscover(self, backend: str) -> None:
        """A backend is back: learn what it serves now, in the background."""
        self._spawn(self._rediscover(backend), f"rediscover-{backend}")

    async def _rediscover(self, backend: str) -> None:
        await self._catalog.refresh_backend(backend)
        status = self._catalog.status()[backend]
        if status.ok:
            self.record("rediscover", backend, "ok", f"{status.models} models")
        else:
            self.record("rediscover", backend, "failed", "it did not list its models")

    def _tunnel_up(self, tunnel: Tunnel) -> None:
        if tunnel.name in self._was_up:
            self.record("reconnect_tunnel", tunnel.name, "ok",
                        f"reconnected ({tunnel.reconnects} so far)")
        self._was_up.add(tunnel.name)

    def tick(self) -> None:
        """Start what is due. Each job runs in the background, one at a time per target:
        a model taking minutes to load must not hold the monitor's round up.
        """
        self._count_restarts()
        self._check_models()
        if self._monitor.probe_breakers:
            for key, deployment in self._breaker_probes():
                self._spawn(self._probe(key, deployment), f"probe-{key[0]}/{key[1]}")
        now = time.monotonic()
        picks = self._router.picks() if self._monitor.keep_warm else {}
        for alias in self._monitor.keep_warm:
            pick = picks.get(alias)
            if pick is None:
                continue
            deployment = pick[1]
            target = f"{deployment.backend.name}/{deployment.model.name}"
            if target in self._warming or now < self._warm_next.get(target, 0.0):
                continue
            self._warming.add(target)
            self._spawn(self._keep_warm(alias, deployment, target), f"keep-warm-{target}")

    def _count_restarts(self) -> None:
        for name, backend in self._backends.items():
            restarts = getattr(backend, "restarts", 0)
            if restarts > self._restarts[name]:
                self.record("restart_embedded", name, "ok",
                            f"its llama.cpp server was restarted ({restarts} so far)")
                self._restarts[name] = restarts

    def _check_models(self) -> None:
        if self._catalog.version == self._catalog_version:
            return
        self._catalog_version = self._catalog.version
        warnings = self._catalog.unlisted()
        for warning in warnings:
            if warning not in self.warnings:
                log.warning("%s", warning)
        self.warnings = warnings

    def _breaker_probes(self) -> list[tuple[tuple[str, str], Deployment]]:
        """The deployments whose open breaker's cool-down has passed, or that wait
        half-open for a trial no request has made (their backend came back), their trial
        claimed: with no traffic they would stay so (and show degraded) for good.
        """
        now = time.monotonic()
        balancer = self._router.balancer
        due = []
        deployments: dict[tuple[str, str], Deployment] | None = None
        for key, state in balancer.states():
            breaker = state.breaker
            if breaker.state == "closed" or not breaker.available(now) or \
                    balancer.is_down(key[0]) or key in self._probing:
                continue
            if deployments is None:
                deployments = {(d.backend.name, d.model.name): d for name in
                               self._catalog.names() for d in self._catalog.deployments(name)}
            deployment = deployments.get(key)
            if deployment is not None:
                breaker.claim()  # the one trial: clients' requests go elsewhere meanwhile
                self._probing.add(key)
                due.append((key, deployment))
        return due

    async def _probe(self, key: tuple[str, str], deployment: Deployment) -> None:
        breaker = self._router.balancer.state(deployment).breaker
        target = f"{key[0]}/{key[1]}"
        try:
            async with asyncio.timeout(PROBE_SECONDS):
                await _ask(deployment)
        except (GatewayError, TimeoutError) as exc:
            if isinstance(exc, GatewayError) and not counts_against(exc):
                breaker.success()  # it answered, refusing the probe: it is up
                self.record("probe_breaker", target, "ok", f"it answered ({exc.label}); "
                            "breaker closed")
                return
            breaker.failure()
            why = exc.message if isinstance(exc, GatewayError) else "no answer in time"
            self.record("probe_breaker", target, "failed", f"still failing: {why}")
        except Exception as exc:
            breaker.end_trial()
            self.record("probe_breaker", target, "failed", f"the probe failed: {exc!r}")
        else:
            breaker.success()
            self.record("probe_breaker", target, "ok", "it answered; breaker closed")
        finally:
            self._probing.discard(key)

    async def _keep_warm(self, alias: str, deployment: Deployment, target: str) -> None:
        try:
            done = await deployment.backend.keep_warm(deployment.model.name,
                                                      within=3 * self._monitor.interval)
        except GatewayError as exc:
            self._back_off(target)
            if target not in self._warm_failed:  # said once until it works again
                self.record("keep_warm", target, "failed", exc.message)
            self._warm_failed.add(target)
            return
        finally:
            self._warming.discard(target)
        self._warm_failed.discard(target)
        if done == "loaded" and target in self._warmed:
            # Unloaded since it was loaded here: something else wanted the memory. Load it
            # again, less and less often, so as not to fight the requests that need it.
            wait = self._back_off(target)
            self.record("keep_warm", target, "ok", f"loaded again for {alias} (it was "
                        f"unloaded meanwhile; next look in {wait:.0f}s)")
            return
        if done != "loaded":
            self._warm_misses.pop(target, None)
        self._warmed.add(target)
        if done:
            self.record("keep_warm", target, "ok", f"{done} for {alias}")

    def _back_off(self, target: str) -> float:
        misses = self._warm_misses[target] = self._warm_misses.get(target, 0) + 1
        wait: float = min(WARM_BACKOFF_MAX, self._monitor.interval * 2.0 ** min(misses, 16))
        self._warm_next[target] = time.monotonic() + wait
        return wait

    def _spawn(self, job: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(job, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await end_loops(list(self._tasks))


async def _ask(deployment: Deployment) -> None:
    """The smallest request the deployment's model takes: one token, or one embedding."""
    backend, model = deployment.backend, deployment.model
    if "embedding" in model.capabilities and "chat" not in model.capabilities:
        embedding: EmbeddingRequest = parse_embedding({"model": model.name, "input": "ping"})
        await backend.embed(embedding, model.name)
        return
    chat: ChatRequest = parse_chat({**PROBE_CHAT, "model": model.name})
    stream = backend.chat(chat, model.name)
    try:
        async for _ in stream:
            break
    finally:
        await stream.aclose()
