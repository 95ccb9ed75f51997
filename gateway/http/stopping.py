"""The gateway stopping, its grace spent: the handlers still running are cancelled
(``GatewayHandler.stopping`` set on their connections, in ``server``), and each answer not yet
whole tells its client why, rather than breaking off.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.errors import Unavailable


def stopping(request: web.Request) -> bool:
    """Whether this request's handler is cancelled because the gateway stops (not because
    its client left)."""
    return getattr(request.protocol, "stopping", False)


def stopped() -> Unavailable:
    """The error that tells the client, its handler's cancellation taken (what follows, the
    answer's last words, runs as ever)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return Unavailable("The gateway is stopping; ask again.", retry_after=1)
