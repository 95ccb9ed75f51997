"""Every typed key under which the application and requests keep their state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.backends.base import Backend
from gateway.config import GatewayConfig, KeyConfig
from gateway.monitor import HealthWatcher, Monitor
from gateway.pipeline import Pipeline
from gateway.routing.catalog import ModelCatalog
from gateway.routing.router import Router
from gateway.store import Store
from gateway.telemetry import Telemetry
from gateway.tenants import KeyBook, Limits, Tally
from gateway.tunnel.manager import TunnelManager

CONFIG = web.AppKey("config", GatewayConfig)
BACKENDS = web.AppKey("backends", dict[str, Backend])
CATALOG = web.AppKey("catalog", ModelCatalog)
ROUTER = web.AppKey("router", Router)
HEALTH = web.AppKey("health", HealthWatcher)
TUNNELS = web.AppKey("tunnels", TunnelManager)
PIPELINE = web.AppKey("pipeline", Pipeline)
RESPONSES = web.AppKey("responses", Store)  # stored Responses API responses
TELEMETRY = web.AppKey("telemetry", Telemetry)
MONITOR = web.AppKey("monitor", Monitor)

KEYBOOK = web.AppKey("keybook", KeyBook)
LIMITS = web.AppKey("limits", Limits)

REQUEST_ID = web.RequestKey("request_id", str)
# Who is asking: the key's id (for an unnamed key, a digest prefix), or "" when auth is off.
TENANT = web.RequestKey("tenant", str)
KEY = web.RequestKey("key", KeyConfig)  # the key presented, when there is one
BODY = web.RequestKey("body", dict[str, Any])  # the JSON body, once parsed
RAW_BODY = web.RequestKey("raw_body", bytes)  # the body, as read (decoded)
USAGE = web.RequestKey("usage", Tally)  # the tokens the answers used (a key with limits)
RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])  # x-ratelimit-*
# How a stream that had begun ended otherwise than whole, as (status, label): its in-band
# error's, or the client's leaving (``CLIENT_CLOSED``): what the records say of it, its status
# long since 200. (Not the error itself: its traceback would hold the request, a cycle.)
ENDED = web.RequestKey("ended", tuple[int, str])
CLIENT_CLOSED = (499, "client_closed")  # (as nginx logs a client that left)
# The headers of the stream answering it, once begun (who answered, should the client leave).
STREAM_HEADERS = web.RequestKey("stream_headers", Mapping[str, str])
