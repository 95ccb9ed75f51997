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


async def end_loops(tasks: list[asyncio.Task[None]], within: float) -> None:
    """Cancel a service's background loops and wait for them, at most ``within`` seconds:
    a cancelled Redis command can come back as a ConnectionError rather than the
    cancellation, which a loop would take for Redis being down and go on (such a loop also
    checks a closing flag of its own).
    """
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=within)
