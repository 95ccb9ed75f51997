"""CORS, so a browser app can call the gateway directly: off unless ``[server] cors_origins``
lists the origins allowed (``"*"`` for any). A preflight ``OPTIONS`` is answered before
authentication (browsers send it without credentials); every answer to an allowed origin
says so, and lets the page read the ``x-gateway-*`` headers.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSE_HEADERS = ("x-request-id, x-gateway-backend, x-gateway-model, x-gateway-attempts, "
                  "x-gateway-route, x-gateway-cache, x-gateway-qa, x-gateway-safety, "
                  "x-gateway-escalated, retry-after")
MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self._origins = frozenset(origins)
        self._any = "*" in self._origins

    def allowed(self, origin: str) -> bool:
        return self._any or origin in self._origins

    def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a preflight request (None: this is not one)."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
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
