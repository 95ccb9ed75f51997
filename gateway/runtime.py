"""The event loop every command runs on: uvloop when installed (measurably faster for a
proxy), else asyncio's own; and how a command waits to be told to stop.
"""

from __future__ import annotations

import asyncio
import signal


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def until_signalled() -> None:
    """Until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
