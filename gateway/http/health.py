"""``GET /health``: alive, and how each backend, deployment, tunnel and plugin is doing;
``GET /metrics``: the metrics, for Prometheus.

It needs no key, so a gateway that has keys tells only whether it is up (what a load
balancer needs), unless the caller shows an admin key; a gateway without keys, open to
everyone anyway, tells all. It never shows error text: upstream errors name internal hosts
and ports.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway.errors import NotFound
from gateway.http.access import is_admin
from gateway.http.middlewares import json_response
from gateway.keys import CATALOG, CONFIG, HEALTH, PIPELINE, ROUTER, TELEMETRY, TUNNELS


async def health(request: web.Request) -> web.Response:
    """``ok`` when every backend answers, ``degraded`` when some do, ``no_backends`` when
    none does; an optional backend that has not answered since the start (a local server
    that is not there) is absent, and counts for none of them.
    """
    statuses = request.app[CATALOG].status()
    balancer = request.app[ROUTER].balancer
    absent = {name for name in statuses if request.app[HEALTH].absent(name)}
    ok = {name: s.ok and not balancer.is_down(name) for name, s in statuses.items()}
    backends: dict[str, dict[str, object]] = {
        name: {"ok": ok[name], "models": s.models, "checked_at": int(s.refreshed_at) or None,
               **({"absent": True} if name in absent and not ok[name] else {})}
        for name, s in statuses.items()
    }
    for backend in request.app[CONFIG].backends:  # which tunnel to look at when one is down
        if backend.tunnel and backend.name in backends:
            backends[backend.name]["tunnel"] = request.app[TUNNELS].tunnel_of(backend.tunnel).name
    up = sum(ok.values())
    expected = sum(1 for name in ok if ok[name] or name not in absent)
    status = "ok" if up == expected and up else "degraded" if up else "no_backends"
    if request.app[CONFIG].keyed and not is_admin(request):
        return json_response({"status": status, "time": int(time.time())})
    return json_response({"status": status, "time": int(time.time()), "backends": backends,
                          "tunnels": request.app[TUNNELS].report(),
                          "deployments": balancer.report(),
                          "plugins": request.app[PIPELINE].report()})


async def metrics(request: web.Request) -> web.Response:
    """Every metric in Prometheus's text format (an admin key's, when the gateway has keys:
    one of the middleware's OPERATOR_PATHS).
    """
    telemetry = request.app[TELEMETRY]
    if not telemetry.metrics.enabled:
        raise NotFound("Metrics are off ([telemetry] metrics = false).", code="metrics_off")
    return web.Response(body=telemetry.metrics.prometheus().encode(),
                        headers={"Content-Type": PROMETHEUS})


PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)  # one of the middleware's PUBLIC_PATHS
    app.router.add_get("/metrics", metrics)
