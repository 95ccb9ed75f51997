"""The event loop every command runs on: uvloop when installed (measurably faster for a
proxy), else asyncio's own; how a command waits to be told to stop; and the garbage
collector of a serving process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import site
import sysconfig
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from types import CodeType
from typing import Any

log = logging.getLogger(__name__)

FULL_PASS_EVERY, FULL_PASS_LONGEST = 30.0, 600.0  # seconds (see paced_collector)
QUIET = 16  # requests at work, at most, for a full pass to be made on time
_NEVER = 1 << 30  # a threshold no count reaches
# The young generation's threshold: what is allocated and not yet freed since its last pass.
# CPython's 700 is less than the objects a few dozen requests at work hold at once: at 32 at
# once it passed every 23 requests, to find them all alive (at 5,000, every few thousand).
YOUNG = 5_000
LOOPS_END = 5.0  # seconds a service's background tasks get to end, at shutdown
RECANCEL = 0.5  # seconds between cancellations of a task that goes on (see end_loops)
# Seconds past its grace period a stopping gateway gets to be done: its services' closes are
# each bounded (telemetry's last export and flush 5 s each, llama.cpp's stop 11 s, alerts 2 s,
# the batch worker's lines put back 2 s...); together they rarely take more than a few.
STOP_MARGIN = 30.0


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


def signalled(*more: signal.Signals) -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (and ``more``), from now on (Ctrl-C then stops the
    process as it stops it, whatever it is doing: never a traceback).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, *more):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def until_signalled(*more: signal.Signals) -> None:
    """Until SIGINT or SIGTERM (or one of ``more``)."""
    await signalled(*more).wait()


@contextlib.contextmanager
def stopped_within(seconds: float) -> Iterator[None]:
    """The process ends (exit code 1) should the stop this wraps take longer than
    ``seconds``, after saying what it still waited for. A stop that waits for ever leaves a
    process that serves nothing and never goes: told again, it would only be told what it
    knows (a worker whose supervisor died is told once).
    """
    handle = asyncio.get_running_loop().call_later(seconds, _give_up, seconds)
    try:
        yield
    finally:
        handle.cancel()


def _give_up(seconds: float) -> None:
    try:
        waiting = sorted(f"{task.get_name()} ({_awaiting(task)})"
                         for task in asyncio.all_tasks())
        log.error("not stopped %g s after being told to; ending now (still running: %s)",
                  seconds, ", ".join(waiting) or "nothing")
        logging.shutdown()
    finally:
        os._exit(1)


def _awaiting(task: asyncio.Task[Any]) -> str:
    """What a task is at: its coroutine and, of those it awaits in turn (through async
    generators too, such as the app's cleanup contexts), the innermost of the gateway's own
    or a plugin's (else of a library's).
    """
    chain: list[CodeType] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        if hasattr(awaited, "cr_code"):
            chain.append(awaited.cr_code)
            awaited = awaited.cr_await
        elif hasattr(awaited, "ag_code"):
            chain.append(awaited.ag_code)
            awaited = awaited.ag_await
        elif type(awaited).__name__ in ("async_generator_asend", "async_generator_athrow"):
            awaited = next((held for held in gc.get_referents(awaited)  # (its generator)
                            if hasattr(held, "ag_code")), None)
        else:
            break
    if not chain:
        return "?"
    inner = next((code for code in reversed(chain) if code.co_filename.startswith(_OWN)
                  or not code.co_filename.startswith(_LIBRARIES)), chain[-1])
    return " ... ".join(dict.fromkeys((chain[0].co_qualname, inner.co_qualname)))


_LIBRARIES = tuple({sysconfig.get_path(name) for name in ("stdlib", "platstdlib")} |
                   set(site.getsitepackages()) - {""})
_OWN = tuple(os.path.join(os.path.dirname(os.path.dirname(__file__)), package, "")
             for package in ("gateway", "plugins"))  # (wherever installed)


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


async def end_loops(tasks: Collection[asyncio.Task[Any]], within: float = LOOPS_END) -> None:
    """Cancel a service's background tasks and wait for them, at most ``within`` seconds.

    A cancellation can be lost: Python 3.11's ``asyncio.wait_for``, which redis-py sends
    each command through, returns the command's answer when it is cancelled just as that
    answer comes, and a loop so told nothing goes on for ever. A task still running is
    therefore cancelled again every ``RECANCEL`` seconds. (A cancelled Redis command can
    also come back as a ConnectionError, which a loop takes for Redis being down: it goes on
    to its next wait, where the next cancellation ends it.)
    """
    pending = set(tasks)
    deadline = time.monotonic() + within
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - time.monotonic()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL, left))
    if pending:
        log.warning("still running %g s after being cancelled, left behind: %s", within,
                    ", ".join(sorted(f"{task.get_name()} ({_awaiting(task)})"
                                     for task in pending)))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("%s had ended with an error", task.get_name(), exc_info=task.exception())


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
        await end_loops([task])
        gc.set_threshold(young, middle, oldest)


async def _full_passes(at_work: Callable[[], int], every: float, longest: float) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(every)
        if at_work() <= QUIET or time.monotonic() - last >= longest:
            gc.collect()
            last = time.monotonic()
