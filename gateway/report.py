"""``gateway models``: the catalog as the gateway sees it — each backend and its models
(size, quantization, context, capabilities, loaded, breaker), the names that span backends,
and what each ``auto`` alias picks right now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import aiohttp

from gateway.backends.base import Backend
from gateway.backends.embedded import EmbeddedBackend
from gateway.config import GatewayConfig
from gateway.protocol.units import ModelInfo
from gateway.routing.catalog import ModelCatalog
from gateway.routing.selector import Needs, Selector
from gateway.runtime import ADMIN_KEY_ENV, local_url
from gateway.tunnel.manager import TunnelManager


async def catalog_report(config: GatewayConfig, backends: list[Backend]) -> str:
    """Discover every backend now and describe what was found."""
    catalog = ModelCatalog(backends, config.models)
    await catalog.refresh()
    breakers = await _live_breakers(config)
    lines: list[str] = []
    for spec, (name, status) in zip(config.backends, catalog.status().items(), strict=True):
        where = f"via tunnel {spec.tunnel}" if spec.tunnel else spec.url or "embedded"
        state = "up" if status.ok else f"DOWN: {status.error}"
        if spec.kind == "embedded":
            state = "starts with the gateway (not started for this listing)" if \
                catalog.listing(name) else "cannot start (see gateway check)"
        lines.append(f"{name}  ({spec.kind}, {spec.tier}, {where})  {state}")
        lines += [_model_line(info, breakers.get(f"{name}/{info.name}"))
                  for info in catalog.listing(name)]
        if status.ok and not catalog.listing(name):
            lines.append("  (no models)")
    spanning = [(m.name, catalog.deployments(m.name)) for m in config.models if m.deployments]
    if spanning:
        lines.append("\nmodels across backends:")
        for name, deployments in spanning:
            where = ", ".join(f"{d.backend.name}/{d.model.name}" for d in deployments)
            lines.append(f"  {name:<28} {where or '(no deployment up)'}")
    lines.append("\nauto aliases pick now:")
    selector = Selector(catalog, config)
    for alias in sorted(selector.aliases(available=False)):
        picks = [c.name for c in selector.alias_picks(alias, Needs())]
        shown = picks[0] if picks else "(nothing available)"
        if len(picks) > 1:
            shown += f"   (then {', '.join(picks[1:4])})"
        lines.append(f"  {alias:<16} → {shown}")
    if breakers is _UNKNOWN:
        lines.append(f"\n(no gateway answering on {config.server.host}:{config.server.port}: "
                     "breaker states unknown)")
    elif breakers is _KEYED:
        lines.append(f"\n(the gateway on {config.server.host}:{config.server.port} shows its "
                     f"breakers to an admin: set ${ADMIN_KEY_ENV} to an admin key)")
    return "\n".join(lines)


def _model_line(info: ModelInfo, breaker: str | None) -> str:
    size = f"{info.parameters / 1e9:.1f}B" if info.parameters else "-"
    context = str(info.context_length or "-")
    caps = ",".join(sorted(info.capabilities)) if info.known else "(capabilities unknown)"
    extra = " ".join(x for x in ("loaded" if info.loaded else "",
                                 f"breaker {breaker}" if breaker else "") if x)
    return (f"  {info.name:<40} {size:>7} {info.quantization or '-':<8} "
            f"ctx {context:>7}  {caps}  {extra}").rstrip()


_UNKNOWN: dict[str, str] = {}  # (no gateway answered)
_KEYED: dict[str, str] = {}  # (one did, and would not say without an admin key)


async def _live_breakers(config: GatewayConfig) -> dict[str, str]:
    """Breaker states from the running gateway, if one answers on the configured address
    (asked with the admin key in ``$GATEWAY_ADMIN_KEY``: a gateway with keys shows its
    deployments to an admin alone).
    """
    url = local_url(config.server.host, config.server.port) + "/health"
    key = os.environ.get(ADMIN_KEY_ENV)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, OSError):
        async with aiohttp.ClientSession() as http, http.get(
            url, timeout=aiohttp.ClientTimeout(total=1),
            headers={"Authorization": f"Bearer {key}"} if key else None,
        ) as response:
            data: Any = await response.json()
            if "deployments" not in data:
                return _KEYED
            return {k: v["breaker"] for k, v in (data.get("deployments") or {}).items()}
    return _UNKNOWN


async def print_catalog(config: GatewayConfig) -> None:
    """Open the tunnels, ask every backend, print the report."""
    from gateway.app import build_backend

    tunnels = TunnelManager(config.tunnels)
    await tunnels.start(patience=max((t.connect_timeout for t in config.tunnels), default=0))
    backends = [build_backend(b, tunnels) for b in config.backends]
    # An embedded backend is not started just to be listed (it would load its model): it
    # says what it would serve.
    asked = [b for b in backends if not isinstance(b, EmbeddedBackend)]
    for backend in backends:
        if isinstance(backend, EmbeddedBackend):
            backend.unstarted = True
    try:
        await asyncio.gather(*(b.start() for b in asked))
        print(await catalog_report(config, backends))
    finally:
        await asyncio.gather(*(b.close() for b in asked))
        await tunnels.close()
