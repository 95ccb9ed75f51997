"""Every typed key under which the application and requests keep their state."""

from __future__ import annotations

from aiohttp import web

from gateway.backends.base import Backend
from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline
from gateway.routing.catalog import ModelCatalog
from gateway.routing.health import HealthWatcher
from gateway.routing.router import Router
from gateway.store import Store
from gateway.tunnel.manager import TunnelManager

CONFIG = web.AppKey("config", GatewayConfig)
BACKENDS = web.AppKey("backends", dict[str, Backend])
CATALOG = web.AppKey("catalog", ModelCatalog)
ROUTER = web.AppKey("router", Router)
HEALTH = web.AppKey("health", HealthWatcher)
TUNNELS = web.AppKey("tunnels", TunnelManager)
PIPELINE = web.AppKey("pipeline", Pipeline)
RESPONSES = web.AppKey("responses", Store)  # stored Responses API responses

REQUEST_ID = web.RequestKey("request_id", str)
# Who is asking: a short digest of the API key, or "" when auth is off.
TENANT = web.RequestKey("tenant", str)
