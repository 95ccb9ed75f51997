"""Browsers. CORS, so a browser app can call the gateway directly: off unless
``[server] cors_origins`` lists the origins allowed (``"*"`` for any). A preflight
``OPTIONS`` is answered before authentication (browsers send it without credentials); every
answer to an allowed origin says so, and lets the page read the ``x-gateway-*`` headers.

And a guard, as Ollama has one: a request a web page sends from an origin neither listed nor
on this machine is refused (a page could otherwise have a gateway without keys generate for
it: a form needs no preflight); and a gateway without keys listening on loopback answers only
requests addressed to a loopback name (a page that rebinds its own name to 127.0.0.1 could
otherwise read the answers).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import web

ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"  # (PATCH: /admin/keys/{id})
# (the SDKs read request-id, the x-ratelimit-* headers and retry-after; a page's script
# can read only the headers named here)
EXPOSE_HEADERS = ("x-request-id, request-id, x-gateway-backend, x-gateway-model, "
                  "x-gateway-attempts, x-gateway-route, x-gateway-cache, x-gateway-qa, "
                  "x-gateway-safety, x-gateway-escalated, x-gateway-dropped-tools, "
                  "x-gateway-worker, retry-after, "
                  "x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
                  "x-ratelimit-reset-requests, x-ratelimit-limit-tokens, "
                  "x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer
HOSTS_KEPT = 64  # Host headers whose judgement is remembered


# Origins on this machine: loopback pages, and the schemes desktop apps and IDE webviews
# (VS Code's, Tauri's, Electron's) send.
_LOCAL_ORIGIN = re.compile(r"(https?://(localhost|[^/:]+\.localhost|127(\.\d{1,3}){3}|\[::1\])"
                           r"(:\d+)?|(app|file|tauri|vscode-webview|vscode-file)://.*)")


class Cors:
    def __init__(self, origins: Iterable[str], *, loopback_only: bool = False) -> None:
        self._origins = frozenset(origins)
        self._any = "*" in self._origins
        self._loopback_only = loopback_only  # no keys, on loopback: loopback names only
        self._hosts: dict[str, bool] = {}  # Host headers judged so far (a few, repeated)

    def allowed(self, origin: str) -> bool:
        return self._any or origin in self._origins

    def refusal(self, request: web.Request) -> str | None:
        """Why this request is refused (None: it is not)."""
        origin = request.headers.get("Origin")
        if origin is not None and not self.allowed(origin) and \
                not _LOCAL_ORIGIN.fullmatch(origin) and \
                origin.partition("://")[2] != request.host:  # (the gateway's own pages)
            return (f"Requests from web pages at {origin} are not allowed; list the origin "
                    "in [server] cors_origins to allow them.")
        if self._loopback_only and not self._loopback(request.host):
            return (f"This gateway answers only requests addressed to this machine "
                    f"(localhost), not to {request.host!r}.")
        return None

    def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a preflight request (None: this is not one, or CORS is off)."""
        if not self._origins or request.method != "OPTIONS" or \
                "Access-Control-Request-Method" not in request.headers:
            return None
        response = web.Response(status=204)
        origin = request.headers.get("Origin", "")
        if self.allowed(origin):  # else no CORS headers: the browser refuses the call
            response.headers.update({
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers":
                    request.headers.get("Access-Control-Request-Headers", ""),
                "Access-Control-Max-Age": MAX_AGE,
                "Vary": "Origin",
            })
        return response

    def _loopback(self, host: str) -> bool:
        known = self._hosts.get(host)
        if known is None:
            if len(self._hosts) >= HOSTS_KEPT:  # names made up to fill memory
                self._hosts.clear()
            known = self._hosts[host] = _loopback_name(host)
        return known

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Headers for every answer to an allowed origin, streams included (an
        ``on_response_prepare`` signal runs just before the headers go out).
        """
        origin = request.headers.get("Origin")
        if origin and self.allowed(origin) and \
                "Access-Control-Allow-Origin" not in response.headers:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers["Vary"] = "Origin"


def _loopback_name(host: str) -> bool:
    """Whether a Host header names this machine: localhost, *.localhost or a loopback IP."""
    try:
        name = (urlsplit("//" + host).hostname or "").lower()
    except ValueError:  # a Host header that is not a host
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
