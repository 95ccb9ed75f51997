"""The event loop every command runs on: uvloop when installed (measurably faster for a
proxy), else asyncio's own; how a command waits to be told to stop; and the garbage
collector of a serving process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

FULL_PASS_EVERY, FULL_PASS_LONGEST = 30.0, 600.0  # seconds (see paced_collector)
QUIET = 16  # requests at work, at most, for a full pass to be made on time
_NEVER = 1 << 30  # a threshold no count reaches
# The young generation's threshold: what is allocated and not yet freed since its last pass.
# CPython's 700 is less than the objects a few dozen requests at work hold at once: at 32 at
# once it passed every 23 requests, to find them all alive (at 5,000, every few thousand).
YOUNG = 5_000


# The admin key the commands that ask a running gateway present (``gateway models``,
# ``gateway router export``).
ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"


def local_url(host: str, port: int) -> str:
    """The URL a command on this host reaches the gateway listening on ``host`` at."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def signalled() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, from now on (Ctrl-C then stops the process as
    it stops it, whatever it is doing: never a traceback).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_signalled() -> None:
    """Until SIGINT or SIGTERM."""
    await signalled().wait()


async def unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Whether ``work`` was done (its failure raised) before ``stop`` was set; if not, it
    is cancelled (a start-up the operator gave up on).
    """
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # (cancelled itself: so is the work)
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


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


@contextlib.asynccontextmanager
async def paced_collector(at_work: Callable[[], int], every: float = FULL_PASS_EVERY,
                          longest: float = FULL_PASS_LONGEST) -> AsyncIterator[None]:
    """The cyclic garbage collector of a serving process, whose requests free their objects
    by reference counting alone (``tests/integration/test_soak.py`` holds them to that), and
    whose start-up objects the app has frozen.

    CPython starts a full pass whenever what survived into its oldest generation since the
    last one reaches a quarter of it: with a thousand streams open, every few seconds, each
    pass scanning every stream's objects while every stream waited (20 to 150 ms), to find
    nothing. Here a full pass comes every ``every`` seconds when at most ``QUIET`` requests
    are at work (``at_work()``), so it is short, and at the latest after ``longest`` seconds
    however busy; it frees what cycles others make. The young generations are collected on
    counts as ever, the youngest once ``YOUNG`` objects are held.
    """
    young, middle, oldest = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG) if young else 0, middle, _NEVER)  # (0: kept off)
    task = asyncio.create_task(_full_passes(at_work, every, longest), name="full passes")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.set_threshold(young, middle, oldest)


async def _full_passes(at_work: Callable[[], int], every: float, longest: float) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(every)
        if at_work() <= QUIET or time.monotonic() - last >= longest:
            gc.collect()
            last = time.monotonic()
