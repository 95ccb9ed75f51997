"""``create_app(config)``: builds and wires everything; nothing runs at import time.

Background services live in ``cleanup_ctx``, started in order and stopped in reverse:
the store (of Responses API responses) → telemetry → tenants → tunnels → backends
(connection pools) → discovery (the catalog and its refresh loop) → health watch → plugins →
the monitor (healing, alerts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from gateway.backends.base import Backend
from gateway.backends.embedded import EmbeddedBackend
from gateway.backends.ollama import OllamaBackend
from gateway.backends.openai_compat import OpenAICompatBackend
from gateway.config import BackendConfig, GatewayConfig, is_loopback
from gateway.doors import anthropic, ollama, openai, responses
from gateway.http import admin, feedback, middlewares, status
from gateway.http import health as health_endpoint
from gateway.http.access import rate_headers
from gateway.http.bodies import BodyBudget
from gateway.http.cors import Cors
from gateway.keys import (
    BACKENDS,
    CATALOG,
    CONFIG,
    HEALTH,
    KEYBOOK,
    LIMITS,
    MONITOR,
    PIPELINE,
    RESPONSES,
    ROUTER,
    TELEMETRY,
    TUNNELS,
)
from gateway.monitor import HealthWatcher, Monitor
from gateway.monitor.shared import SharedHealth
from gateway.pipeline import Pipeline, load_plugins
from gateway.routing.catalog import ModelCatalog
from gateway.routing.learned import LearnedOrder
from gateway.routing.learning_link import DOWN as LINK_DOWN
from gateway.routing.learning_link import LearningLink
from gateway.routing.router import Router
from gateway.runtime import end_loops
from gateway.store import open_store
from gateway.tasks import Tasks
from gateway.tasks import api as tasks_api
from gateway.tasks.records import TERMINAL as FINISHED
from gateway.telemetry import Telemetry
from gateway.tenants import KeyBook, Limits, Link, MemoryLimits, RedisKeys, RedisLimits
from gateway.tunnel.manager import Tunnel, TunnelManager
from plugins.base import Plugin

log = logging.getLogger(__name__)

# Start-up waits this long for the first discovery; slower backends join on the next round.
FIRST_DISCOVERY_SECONDS = 10.0
LEARNED_FILE = "learned-routing.json"
LEARNED_SAVE_SECONDS = 10.0


def build_backend(config: BackendConfig, tunnels: TunnelManager | None = None) -> Backend:
    """The adapter for a backend; one behind a tunnel talks to the tunnel's local end."""
    if config.tunnel and tunnels is not None:
        path = urlsplit(config.url).path if config.url else \
            ("/v1" if config.kind == "openai" else "")
        config = dataclasses.replace(config, url=tunnels.url(config.tunnel) + path)
    if config.kind == "ollama":
        return OllamaBackend(config)
    if config.kind == "embedded":
        return EmbeddedBackend(config)
    return OpenAICompatBackend(config)


def create_app(config: GatewayConfig) -> web.Application:
    telemetry = Telemetry(config.telemetry)
    cors = Cors(config.server.cors_origins, loopback_only=not config.keyed and all(
        is_loopback(host) for host, _ in config.server.addresses()))
    book, limits = _tenancy(config)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,  # (the middleware reads bodies itself,
        # each to its own limit, as decoded: see bodies.read_body)
        middlewares=[middlewares.gateway_middleware(
            book, limits, cors, BodyBudget(config.server.bodies_in_flight_bytes), telemetry,
            shapes=[("/api/", ollama.error_response),
                    ("/v1/messages", anthropic.error_response)])],
    )
    app[KEYBOOK], app[LIMITS] = book, limits
    if book.required:
        app.on_response_prepare.append(rate_headers)
    if config.server.cors_origins:
        app.on_response_prepare.append(cors.on_prepare)
    app[CONFIG] = config
    kept = config.responses
    app[RESPONSES] = open_store(kept.backend, kept.redis_url, max_entries=kept.max_entries,
                                max_bytes=kept.max_bytes, timeout=kept.timeout,
                                max_connections=16, label="responses", owner=responses.owner)
    tunnels = app[TUNNELS] = TunnelManager(config.tunnels)
    backends = {b.name: build_backend(b, tunnels) for b in config.backends}
    app[BACKENDS] = backends
    catalog = ModelCatalog(backends.values(), config.models,
                           optional=[b.name for b in config.backends if b.optional])
    app[CATALOG] = catalog
    app[TELEMETRY] = telemetry
    router = app[ROUTER] = Router(config, backends, catalog, telemetry.instruments)
    health = app[HEALTH] = HealthWatcher(list(backends.values()), router.balancer,
                                         config.routing.health_interval)
    router.on_unreachable = health.lost
    router.on_missing = catalog.stale
    pipeline = app[PIPELINE] = Pipeline(load_plugins(config), router,
                                        config.routing.max_escalations)
    _watch_tunnels(config, tunnels, health)
    _gauges(telemetry, router, tunnels, health, pipeline)
    app[MONITOR] = Monitor(config, router, catalog, backends, tunnels, health, pipeline,
                           telemetry)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_telemetry_ctx)
    app.cleanup_ctx.append(_tenants_ctx)
    app.cleanup_ctx.append(_tunnels_ctx)
    app.cleanup_ctx.append(_backends_ctx)
    app.cleanup_ctx.append(_discovery_ctx)
    app.cleanup_ctx.append(_health_ctx)
    if config.routing.redis_url:
        app.cleanup_ctx.append(_shared_health_ctx)
    app.cleanup_ctx.append(_plugins_ctx)
    app.cleanup_ctx.append(_monitor_ctx)
    app.cleanup_ctx.append(_learned_ctx)
    tasks = app[tasks_api.TASKS] = Tasks(config, pipeline, book, limits)
    app[MONITOR].sections["tasks"] = tasks.report
    telemetry.metrics.gauge(
        "gateway.batch.requests", "Requests of the batches not yet finished, by state "
        "(total, completed, failed)", ("state",),
        lambda: [((state,), sum(b[state] for b in tasks.recent if b["status"] not in
                                 FINISHED)) for state in ("total", "completed", "failed")],
        across="own")  # (every worker reads the same batches)
    app.cleanup_ctx.append(_tasks_ctx)
    app.on_startup.append(_freeze_startup_objects)
    openai.add_routes(app)
    ollama.add_routes(app)
    responses.add_routes(app)
    anthropic.add_routes(app)
    tasks_api.add_routes(app)
    health_endpoint.add_routes(app)
    admin.add_routes(app)
    status.add_routes(app)
    feedback.add_routes(app)
    return app


def _watch_tunnels(config: GatewayConfig, tunnels: TunnelManager,
                   health: HealthWatcher) -> None:
    """A tunnel that drops takes its backends out of rotation at once; one that comes back
    has them probed at once (they rejoin as soon as they answer).
    """
    tunnel_of: dict[str, Tunnel] = {}  # (each backend behind one)
    for tunnel in tunnels.tunnels.values():
        behind = [b.name for b in config.backends
                  if b.tunnel and tunnels.tunnel_of(b.tunnel) is tunnel]
        tunnel_of.update(dict.fromkeys(behind, tunnel))

        def down(t: Tunnel, names: list[str] = behind) -> None:
            for name in names:
                health.lost(name, f"tunnel {t.name} is down")

        async def up(t: Tunnel, names: list[str] = behind) -> None:
            # Those known to be down are probed now (at start-up nothing is known yet:
            # the health watch's first round covers them).
            await asyncio.gather(*(health.check_now(name) for name in names
                                   if health.up.get(name) is False))

        def services_ok(names: list[str] = behind) -> bool:
            return all(health.up.get(name) is not False for name in names)  # None: not yet

        tunnel.on_down.append(down)
        tunnel.on_up.append(up)
        tunnel.services_ok = services_ok

    checking: set[asyncio.Task[None]] = set()  # (held until done)

    def lost(name: str) -> None:
        """A backend behind a tunnel that is up stopped answering: its link is asked at
        once (one gone silent is dropped, and the requests waiting on it fail over now).
        """
        tunnel = tunnel_of.get(name)
        if tunnel is not None and tunnel.connected:
            task = asyncio.get_running_loop().create_task(tunnel.check_link())
            checking.add(task)
            task.add_done_callback(checking.discard)

    health.on_lost.append(lost)


BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def _gauges(telemetry: Telemetry, router: Router, tunnels: TunnelManager,
            health: HealthWatcher, pipeline: Pipeline) -> None:
    """The metrics read from the gateway's state when collected (nothing per request)."""
    metrics = telemetry.metrics
    states = router.balancer.states
    deployment = ("gateway.backend", "gen_ai.request.model")
    metrics.gauge("gateway.breaker.state", "Each deployment's circuit breaker: 0 closed, 1 "
                  "half-open (one trial request), 2 open", deployment,
                  lambda: [(k, BREAKER_STATES[s.breaker.state]) for k, s in states()],
                  across="max")
    metrics.gauge("gateway.deployment.in_flight", "Requests each deployment is answering",
                  deployment, lambda: [(k, s.in_flight) for k, s in states()])
    metrics.gauge("gateway.deployment.queued", "Requests waiting for a slot on each "
                  "deployment", deployment, lambda: [(k, len(s.waiters)) for k, s in states()])
    metrics.gauge("gateway.backend.up", "Whether each backend answers its health probe (1), "
                  "or not (0)", ("gateway.backend",),
                  lambda: [((name, ), 1 if up else 0) for name, up in health.up.items()
                           if up is not None], across="min")
    metrics.gauge("gateway.tunnel.up", "Whether each SSH tunnel is up (1), or not (0)",
                  ("gateway.tunnel",), lambda: [((t.name,), 1 if t.state in ("up", "degraded")
                                                 else 0) for t in tunnels.tunnels.values()],
                  across="min")
    for plugin in pipeline.plugins:
        for count in plugin.counts():
            def read(plugin: Plugin = plugin, name: str = count.name
                     ) -> list[tuple[tuple[str, ...], float]]:
                return [item for c in plugin.counts() if c.name == name
                        for item in c.values.items()]

            metrics.observed_counter(count.name, count.description, count.labels, read)


async def _telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[TELEMETRY].start()
    yield
    await app[TELEMETRY].close()


async def _tasks_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[tasks_api.TASKS].start()
    yield
    await app[tasks_api.TASKS].close()


async def _monitor_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[MONITOR].start()
    yield
    await app[MONITOR].close()


async def _plugins_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[PIPELINE].start()
    yield
    await app[PIPELINE].close()


def _tenancy(config: GatewayConfig) -> tuple[KeyBook, Limits]:
    """The key book and the limits' counters: in memory, or shared through Redis."""
    tenants = config.tenants
    if tenants.store == "redis":
        link = Link(tenants.redis_url, tenants.timeout)  # one pool for keys and limits
        return (KeyBook(config.keys, config.auth.key_hashes, RedisKeys(link)),
                RedisLimits(link, tenants.on_redis_down))
    return KeyBook(config.keys, config.auth.key_hashes), MemoryLimits()


async def _tenants_ctx(app: web.Application) -> AsyncIterator[None]:
    shared = app[KEYBOOK].shared
    if shared is not None:
        await shared.start()
    yield
    await app[LIMITS].close()
    if shared is not None:
        await shared.link.close()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[RESPONSES].start()
    yield
    await app[RESPONSES].close()


async def _tunnels_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[TUNNELS].start()
    yield
    await app[TUNNELS].close()


async def _freeze_startup_objects(app: web.Application) -> None:
    """Everything built so far lives as long as the process: keeping it out of the cyclic
    garbage collector's full passes cuts the gateway's CPU per request by about a fifth
    (measured with loadtest/). When those passes come is the serving process's choice
    (``gateway.runtime.paced_collector``).
    """
    gc.collect()
    gc.freeze()


async def _backends_ctx(app: web.Application) -> AsyncIterator[None]:
    backends = app[BACKENDS].values()
    await asyncio.gather(*(backend.start() for backend in backends))
    yield
    await asyncio.gather(*(backend.close() for backend in backends))


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[HEALTH].run(), name="health")
    yield
    await end_loops([task])


async def _shared_health_ctx(app: web.Application) -> AsyncIterator[None]:
    routing = app[CONFIG].routing
    shared = SharedHealth(routing.redis_url, app[ROUTER].balancer, app[HEALTH],
                          routing.breaker.cooldown)
    await shared.start()
    yield
    await shared.close()


def _learned_path(config: GatewayConfig) -> Path:
    return Path(os.path.expanduser(config.routing.learned.state_file or
                                   os.path.join(config.tasks.data_dir, LEARNED_FILE)))


async def _learned_ctx(app: web.Application) -> AsyncIterator[None]:
    """What learned routing learned before, read at start (from the Redis every process
    shares, or a file), written every few seconds (when it changed) and at the end.
    """
    router = app[ROUTER]
    learned, link = router.selector.learned, router.link
    if learned is None:
        yield
        return
    path = _learned_path(app[CONFIG])
    if link is not None:
        await link.start()
    else:
        await asyncio.to_thread(learned.restore, path)

    async def keep() -> None:
        while True:
            await asyncio.sleep(LEARNED_SAVE_SECONDS)
            await _save_learned(learned, link, path)

    task = asyncio.create_task(keep(), name="learned routing")
    yield
    await end_loops([task])
    if link is not None:
        await link.close()
    else:
        await _save_learned(learned, None, path)


async def _save_learned(learned: LearnedOrder, link: LearningLink | None, path: Path) -> None:
    try:
        if link is not None:
            await link.save()
        else:
            await asyncio.to_thread(learned.save, path)
    except (OSError, *LINK_DOWN) as exc:
        log.warning("learned routing: cannot keep what was learned: %s", exc)
    except Exception:  # the saving must outlive one bad save
        log.exception("learned routing: keeping what was learned failed")


async def _discovery_ctx(app: web.Application) -> AsyncIterator[None]:
    catalog = app[CATALOG]
    interval = app[CONFIG].server.discovery_interval
    first = asyncio.create_task(catalog.refresh())
    done, _ = await asyncio.wait({first}, timeout=FIRST_DISCOVERY_SECONDS)
    if not done:
        log.warning("first model discovery is still running after %.0fs; serving meanwhile",
                    FIRST_DISCOVERY_SECONDS)

    async def loop() -> None:
        await first
        while True:
            await asyncio.sleep(interval)
            await catalog.refresh()

    task = asyncio.create_task(loop(), name="discovery")
    yield
    await end_loops([task])
    await catalog.close()
