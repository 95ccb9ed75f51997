"""The monitor: watches the tunnels, backends, Redis and the traffic; heals what it can
(``healing``); raises alerts (``alerts``, sent by ``sinks``); and tells the operator all of
it (``status()``, for ``/admin/status`` and the dashboard).

One loop: every second a snapshot of the metrics (``window``); every ``[monitor] interval``
seconds the healing that is due, Redis pinged, and the alert rules checked.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from gateway.backends.base import Backend
from gateway.config import GatewayConfig
from gateway.config.observing import RATED
from gateway.monitor.alerts import Alert, Alerter, Facts, conditions
from gateway.monitor.claims import AlertClaims
from gateway.monitor.healing import Healer
from gateway.monitor.health import HealthWatcher
from gateway.monitor.sinks import Dispatcher, build_sinks
from gateway.monitor.window import Window
from gateway.pipeline import Pipeline
from gateway.routing.catalog import ModelCatalog
from gateway.routing.router import Router
from gateway.runtime import end_loops
from gateway.store import shown
from gateway.telemetry import Telemetry
from gateway.tunnel.manager import TunnelManager

log = logging.getLogger(__name__)

__all__ = ["HealthWatcher", "Monitor"]

SAMPLE_SECONDS = 1.0
REDIS_TIMEOUT = 1.0
TRAFFIC_WINDOW = 60.0  # what /admin/status shows as "now"


def _version() -> str:
    try:
        return importlib.metadata.version("hybrid-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


class Monitor:
    def __init__(self, config: GatewayConfig, router: Router, catalog: ModelCatalog,
                 backends: dict[str, Backend], tunnels: TunnelManager, health: HealthWatcher,
                 pipeline: Pipeline, telemetry: Telemetry) -> None:
        self.config = config
        self.router = router
        self.catalog = catalog
        self.backends = backends
        self.tunnels = tunnels
        self.health = health
        self.pipeline = pipeline
        self.telemetry = telemetry
        self.started = time.time()
        self.healer = Healer(config, router, catalog, backends, tunnels, health,
                             telemetry.metrics)
        self.window = Window(telemetry.metrics, telemetry.instruments)
        # Processes sharing a Redis (``serve --workers``, hosts) watch the same fleet: each
        # notice goes out from the one that claims it there first.
        shared = config.tasks.redis_url if config.tasks.queue == "redis" else \
            config.routing.redis_url
        self._claims = AlertClaims(shared, config.telemetry.service_name) if shared else None
        self.dispatcher = Dispatcher(build_sinks(config.monitor.sinks,
                                                 config.telemetry.service_name), self._claims)
        self.alerter = Alerter(config.monitor, self.dispatcher)
        blind = [rule.id for rule in config.monitor.alerts if rule.kind in RATED]
        if blind and not telemetry.metrics.enabled:
            log.warning("alerts: %s judge the traffic, which is not counted with [telemetry] "
                        "metrics = false: they never fire", ", ".join(blind))
        self._redis = {shown(url): url for url in _redis_urls(config)}
        self._redis_down: dict[str, float] = {}  # where → since when
        self._redis_clients: dict[str, aioredis.Redis] = {}
        self._task: asyncio.Task[None] | None = None
        # More of the status, from parts above the monitor (the batches): name → report.
        self.sections: dict[str, Callable[[], Any]] = {}

    async def start(self) -> None:
        self.dispatcher.start()
        self._task = asyncio.create_task(self._run(), name="monitor")

    async def close(self) -> None:
        if self._task is not None:
            await end_loops([self._task])
        self.alerter.flush()
        await self.healer.close()
        await self.dispatcher.close()
        if self._claims is not None:
            await self._claims.close()
        for client in self._redis_clients.values():
            await client.aclose()

    async def _run(self) -> None:
        interval = self.config.monitor.interval
        next_round = 0.0
        while True:
            now = time.monotonic()
            try:
                self.window.sample(now)
                if now >= next_round:
                    next_round = now + interval
                    await self.round()
            except Exception:  # the monitor must outlive any one bad round
                log.exception("monitor: a round failed")
            await asyncio.sleep(SAMPLE_SECONDS)

    async def round(self) -> None:
        """Start the healing that is due (it runs on in the background: a model taking a
        minute to load must not stall the rules), ping Redis, check the alert rules.
        """
        self.healer.tick()
        await self._ping_redis()
        self.alerter.check(conditions(self.config.monitor.alerts, self.facts()))
        if self._claims is not None:  # (this process sees them still)
            due = await self._claims.keep([(a.condition.rule.id, a.condition.target)
                                           for a in self.alerter.firing()])
            if due:
                self.dispatcher.deliver(due)

    def facts(self) -> Facts:
        now = time.time()
        rules = self.config.monitor.alerts
        traffic = {}
        for rule in rules:
            if rule.window not in traffic:
                traffic[rule.window] = self.window.over(rule.window)
        usable: dict[str, int] = {b.tier: 0 for b in self.config.backends}
        for deployment in self.router.usable():
            usable[deployment.backend.tier] = usable.get(deployment.backend.tier, 0) + 1
        return Facts(
            tunnels={t.name: now - t.down_since for t in self.tunnels.tunnels.values()
                     if t.down_since},
            backends={name: self.health.down_for(name) for name, up in self.health.up.items()
                      if up is False and not self.health.absent(name)},
            redis={where: now - since for where, since in self._redis_down.items()},
            usable_by_tier=usable,
            tier_of={b.name: b.tier for b in self.config.backends},
            traffic=traffic)

    async def _ping_redis(self) -> None:
        for where, url in self._redis.items():
            client = self._redis_clients.get(where)
            if client is None:
                client = self._redis_clients[where] = aioredis.from_url(
                    url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
            try:
                await client.ping()
            except Exception:  # any failure to answer is what this watches for
                if where not in self._redis_down:
                    self._redis_down[where] = time.time()
                    log.warning("monitor: Redis at %s does not answer", where)
            else:
                if self._redis_down.pop(where, None) is not None:
                    log.info("monitor: Redis at %s answers again", where)

    def ready(self) -> tuple[bool, int]:
        """Whether at least one route can serve, and how many deployments can."""
        usable = len(self.router.usable())
        return usable > 0, usable

    def status(self) -> dict[str, Any]:
        """Everything an operator wants at a glance (for ``/admin/status``)."""
        statuses = self.catalog.status()
        balancer = self.router.balancer
        now = time.time()
        picks = {alias: None if pick is None else {
            "model": pick[1].model.name, "backend": pick[1].backend.name, "why": pick[0]}
            for alias, pick in self.router.picks().items()}
        traffic = self.window.over(TRAFFIC_WINDOW)
        return {
            "version": VERSION,
            "uptime_s": round(now - self.started, 1),
            "time": now,
            "ready": self.ready()[0],
            "tunnels": {name: {"state": t.state, "since": t.since,
                               "down_since": t.down_since or None, "reconnects": t.reconnects,
                               "error": t.error, "hint": t.hint,
                               "forwards": {f.name: f.remote_port for f in t.config.forwards}}
                        for name, t in self.tunnels.tunnels.items()},
            "backends": {
                name: {"kind": b.config.kind, "tier": b.tier,
                       "tunnel": b.config.tunnel or None,
                       "up": self.health.up.get(name) is not False and statuses[name].ok,
                       "probe": self.health.up.get(name), "since": self.health.since[name],
                       "absent": self.health.absent(name),
                       "listed": statuses[name].ok, "error": statuses[name].error,
                       "models": [m.name for m in self.catalog.listing(name)]}
                for name, b in self.backends.items()},
            "deployments": balancer.report(),
            "models": {name: [f"{d.backend.name}/{d.model.name}"
                              for d in self.catalog.deployments(name)]
                       for name in self.catalog.names()},
            "aliases": picks,
            "plugins": self.pipeline.report(),
            "redis": {where: {"up": where not in self._redis_down,
                              "since": self._redis_down.get(where)} for where in self._redis},
            "traffic": traffic.summary() if traffic is not None else None,
            "metrics": self.telemetry.metrics.enabled,
            "alerts": {"firing": [_alert(a) for a in self.alerter.firing()],
                       "recent": [n.as_dict() for n in reversed(self.alerter.history)],
                       "sinks": {"sent": self.dispatcher.sent,
                                 "failed": self.dispatcher.failed}},
            "healing": [a.as_dict() for a in reversed(self.healer.recent)],
            "warnings": list(self.healer.warnings),
            "recent": list(reversed(self.telemetry.recent)),
            **{name: report() for name, report in self.sections.items()},
        }


def _alert(alert: Alert) -> dict[str, Any]:
    c = alert.condition
    return {"rule": c.rule.id, "kind": c.rule.kind, "target": c.target,
            "severity": c.rule.severity, "summary": alert.summary(time.time()),
            "started": alert.started}


def _redis_urls(config: GatewayConfig) -> list[str]:
    """Every Redis the gateway uses (the cache's, the keys', the Responses store's, the
    shared routing state's, what was learned, the task queue's).
    """
    urls = [url for url in (config.routing.redis_url, config.routing.learned.redis_url)
            if url]
    if config.tasks.queue == "redis":
        urls.append(config.tasks.redis_url)
    if config.tenants.store == "redis":
        urls.append(config.tenants.redis_url)
    if config.responses.backend == "redis":
        urls.append(config.responses.redis_url)
    for plugin in config.plugins:
        options = plugin.options or {}
        if options.get("backend") == "redis":
            urls.append(str(options.get("redis_url", "redis://127.0.0.1:6379/0")))
    return list(dict.fromkeys(urls))
