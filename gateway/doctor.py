"""``gateway check``: opens each tunnel, asks each backend and each Redis the config names,
then says what works and, for what does not, what to do. Exits non-zero when the gateway
could not serve as configured: nothing would answer, or a backend that is not optional (or
a Redis) does not.
"""

from __future__ import annotations

import asyncio
import difflib
from urllib.parse import urlsplit

from gateway.app import build_backend
from gateway.backends.base import Backend, Health
from gateway.backends.embedded import EmbeddedBackend, EmbeddedUnavailable
from gateway.config import BackendConfig, GatewayConfig
from gateway.pipeline import load_plugins
from gateway.routing.catalog import ModelCatalog
from gateway.routing.selector import BUILTIN_ALIASES
from gateway.store import redis_problem, shown
from gateway.tunnel.manager import TunnelManager

SETUP_SECONDS = 5.0  # beyond the connect timeout: key exchange, auth, the pty session


async def check(config: GatewayConfig) -> tuple[str, bool]:
    """The report, and whether the gateway can serve as configured."""
    tunnels = TunnelManager(config.tunnels)
    patience = max((t.connect_timeout * 2 for t in config.tunnels), default=0) + SETUP_SECONDS
    await tunnels.start(patience=patience)
    lines: list[str] = []
    try:
        for tunnel in tunnels.tunnels.values():
            where = f"{tunnel.config.user}@{tunnel.config.host}:{tunnel.config.port}"
            if tunnel.connected:
                lines.append(f"tunnel {tunnel.name}  {where}  up")
                lines += [f"  forward {f.name}: 127.0.0.1:{tunnel.ports[f.name]} → "
                          f"{f.remote_host}:{f.remote_port} on the remote host"
                          for f in tunnel.config.forwards]
            else:
                error = tunnel.error or f"still connecting after {patience:g}s"
                lines.append(f"tunnel {tunnel.name}  {where}  DOWN: {error}")
                if tunnel.hint:
                    lines.append(f"  → {tunnel.hint}")
        backends = [(spec, build_backend(spec, tunnels)) for spec in config.backends]
        asked = [b for spec, b in backends if spec.kind != "embedded"]
        await asyncio.gather(*(b.start() for b in asked))
        try:
            results = await asyncio.gather(*(_probe(spec, b) for spec, b in backends))
            for (spec, backend), health in zip(backends, results, strict=True):
                lines += await _backend_lines(spec, backend, health, tunnels)
            lines += await _model_lines(config, [b for (s, b), h in zip(
                backends, results, strict=True) if h.ok and s.kind != "embedded"])
        finally:
            await asyncio.gather(*(b.close() for b in asked))
        lines += await _plugin_lines(config)
        redis_lines, redis_down = await _redis_lines(config)
        lines += redis_lines
    finally:
        await tunnels.close()
    answering = [s for (s, _), h in zip(backends, results, strict=True) if h.ok]
    missing = [s.name for (s, _), h in zip(backends, results, strict=True)
               if not h.ok and not s.optional]
    primary = [h for (s, _), h in zip(backends, results, strict=True) if s.tier == "primary"]
    lines.append(f"\n{len(answering)} of {len(backends)} backends answer (primary tier: "
                 f"{sum(h.ok for h in primary)} of {len(primary)})")
    if not config.backends:
        lines.append("no backends are configured: nothing can answer (add [[backends]])")
        return "\n".join(lines), False
    if not answering:
        lines.append("nothing can answer requests now")
    if missing:
        lines.append(f"down, and not optional: {', '.join(missing)}")
    return "\n".join(lines), bool(answering) and not missing and not redis_down


def _redis_uses(config: GatewayConfig) -> list[tuple[str, str]]:
    """Where the config uses a Redis, and its URL (the cache plugin's is the plugin's to
    check)."""
    return [(what, url) for what, url in (
        ("[tenants]", config.tenants.redis_url if config.tenants.store == "redis" else ""),
        ("[tasks]", config.tasks.redis_url if config.tasks.queue == "redis" else ""),
        ("[responses]", config.responses.redis_url
         if config.responses.backend == "redis" else ""),
        ("[routing]", config.routing.redis_url),
        ("[routing.learned]", config.routing.learned.redis_url)) if url]


async def _redis_lines(config: GatewayConfig) -> tuple[list[str], bool]:
    """A line for each Redis the config names, with what uses it; and whether one is down."""
    uses: dict[str, list[str]] = {}
    for what, url in _redis_uses(config):
        uses.setdefault(url, []).append(what)
    problems = await asyncio.gather(*(redis_problem(url) for url in uses))
    lines = []
    for (url, used_by), problem in zip(uses.items(), problems, strict=True):
        head = f"redis {shown(url)}  (for {', '.join(used_by)})"
        lines += [f"{head}  OK"] if problem is None else [f"{head}  DOWN", f"  → {problem}"]
    return lines, any(problems)


async def _plugin_lines(config: GatewayConfig) -> list[str]:
    """Each plugin in order, with what is wrong with what it depends on (a cache's Redis)."""
    lines = []
    for plugin in load_plugins(config):
        await plugin.start()
        try:
            check = getattr(plugin, "check", None)
            problem = await check() if check is not None else None
        finally:
            await plugin.close()
        lines.append(f"plugin {plugin.name}  " + ("OK" if problem is None else "DEGRADED"))
        if problem:
            lines.append(f"  → {problem}")
    return lines


async def _model_lines(config: GatewayConfig, answering: list[Backend]) -> list[str]:
    """The ``[[models]]`` deployments whose backend answers but does not list their model;
    the names in the config's aliases' priority lists that no backend that answers lists
    (a typo leaves the alias with nothing to pick: 503s), or that are aliases themselves.
    """
    if (not config.models and not config.aliases) or not answering:
        return []
    catalog = ModelCatalog(answering, config.models)
    await catalog.refresh()
    warnings = catalog.unlisted()
    aliases = {*BUILTIN_ALIASES, *config.aliases}
    names = catalog.names()
    for alias, spec in config.aliases.items():
        for label, picks in spec.priority.items():
            for name in picks:
                where = f"[aliases.{alias!r}] priority.{label}"
                if name in aliases:
                    warnings.append(f"{where} names the alias {name!r}: an alias picks among "
                                    "models (name them)")
                elif not catalog.deployments(name):
                    near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                    warnings.append(f"{where}: no backend that answers lists {name!r}"
                                    + (f" (did you mean {near[0]!r}?)" if near else ""))
    return [f"WARNING {warning}" for warning in warnings]


async def _probe(spec: BackendConfig, backend: Backend) -> Health:
    if isinstance(backend, EmbeddedBackend):  # it runs with the gateway: whether it can
        try:
            return Health(True, f"starts with the gateway (model {backend.model_file()})")
        except EmbeddedUnavailable as exc:
            return Health(False, f"cannot start: {exc}")
    try:
        return await backend.probe()
    except Exception as exc:  # one odd backend must not cut the report short
        return Health(False, f"the check itself failed: {type(exc).__name__}")


async def _backend_lines(spec: BackendConfig, backend: Backend, health: Health,
                         tunnels: TunnelManager) -> list[str]:
    via = f"via tunnel {spec.tunnel}" if spec.tunnel else \
        "embedded" if spec.kind == "embedded" else spec.url
    head = f"backend {spec.name}  ({spec.kind}, {spec.tier}, {via})"
    if spec.kind == "embedded":
        return [f"{head}  {'OK' if health.ok else 'DOWN'}: {health.detail}"]
    if health.ok:
        return [f"{head}  OK: {health.detail} ({health.latency_ms:.0f} ms)"]
    return [f"{head}  DOWN: {health.detail}", f"  → {await _hint(spec, tunnels)}"]


async def _hint(spec: BackendConfig, tunnels: TunnelManager) -> str:
    service = "Ollama (ollama serve)" if spec.kind == "ollama" else "the server"
    if spec.tunnel:
        tunnel = tunnels.tunnel_of(spec.tunnel)
        if not tunnel.connected:
            return f"the tunnel {tunnel.name} is down (see above)"
        name = spec.tunnel.partition("/")[2]
        forward = next(f for f in tunnel.config.forwards if f.name == name)
        return await tunnel.refusal(forward) or (
            f"the service behind the tunnel is down: is {service} running on "
            f"{tunnel.config.host}, listening on {forward.remote_host}:{forward.remote_port}?")
    if spec.optional:
        return f"optional: start {service} at {spec.url} when you want it"
    host = urlsplit(spec.url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return f"is {service} running at {spec.url}?"
    return f"can this machine reach {host}? (DNS, network, proxy, firewall)"
