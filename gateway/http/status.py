"""What the operator sees: ``GET /ready`` (for load balancers: 200 while at least one route
can serve, else 503), ``GET /admin/status`` (everything, as JSON), and the live dashboard at
``/dashboard`` (static HTML and JavaScript, no build step, nothing fetched from elsewhere)
fed by ``GET /dashboard/events`` (the status as server-sent events, every second).

``/admin/status`` and the events need an admin key when the gateway has keys (the
middleware's OPERATOR_PATHS); the dashboard's page holds no data, so it loads without one
and asks for the key when the events refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import sse_response

from gateway.http.access import DASHBOARD
from gateway.http.middlewares import json_response
from gateway.keys import MONITOR

PAGES = Path(__file__).resolve().parent / "dashboard"
FILES = DASHBOARD
EVENT_SECONDS = 1.0
STOPPING = web.AppKey("dashboard_stopping", asyncio.Event)


async def ready(request: web.Request) -> web.Response:
    ok, usable = request.app[MONITOR].ready()
    if ok:
        return json_response({"status": "ready", "deployments": usable})
    return json_response({"status": "not_ready",
                          "reason": "no backend can serve: each is down, not yet discovered, "
                                    "or has its breakers open"}, status=503,
                         headers={"Retry-After": "5"})


async def status(request: web.Request) -> web.Response:
    return json_response(_status(request.app))


def _status(app: web.Application) -> dict[str, Any]:
    """The monitor's status, built at most once a second however many watch it."""
    cached = app[_CACHE]
    now = time.monotonic()
    if cached[1] is None or now - cached[0] >= EVENT_SECONDS * 0.9:
        cached[:] = [now, app[MONITOR].status()]
    return cached[1]  # type: ignore[no-any-return]


_CACHE = web.AppKey("status_cache", list)  # [when built, the status]


async def page(request: web.Request) -> web.Response:
    name, kind = FILES[request.path]
    return web.Response(body=(PAGES / name).read_bytes(), content_type=kind,
                        headers={"Cache-Control": "no-cache",
                                 "Content-Security-Policy": CSP})


# Nothing but the gateway's own scripts, styles and connections.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; frame-ancestors 'none'")


async def events(request: web.Request) -> web.StreamResponse:
    stopping = request.app[STOPPING]
    async with sse_response(request) as response:
        while not stopping.is_set():
            await response.send(orjson.dumps(_status(request.app)).decode(), event="status")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVENT_SECONDS):
                    await stopping.wait()
    return response


async def _stop_streams(app: web.Application) -> None:
    app[STOPPING].set()  # the dashboards' streams end, so shutdown need not wait for them


def add_routes(app: web.Application) -> None:
    app[STOPPING] = asyncio.Event()
    app[_CACHE] = [0.0, None]
    app.on_shutdown.append(_stop_streams)
    app.router.add_get("/ready", ready)  # PUBLIC_PATHS
    app.router.add_get("/admin/status", status)  # OPERATOR_PATHS
    for path in FILES:
        app.router.add_get(path, page)  # PUBLIC_PATHS
    app.router.add_get("/dashboard/events", events)  # OPERATOR_PATHS
