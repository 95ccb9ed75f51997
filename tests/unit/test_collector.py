"""A serving process's garbage collector: full passes on a clock, when few requests are at
work, never on allocation counts; and cycles still freed by them.
"""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
import weakref

from gateway.runtime import QUIET, YOUNG, paced_collector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def old_cycle(freed: asyncio.Event) -> None:
    """A cycle, made unreachable only once in the collector's oldest generation: only a
    full pass can free it.
    """
    a, b = Node(), Node()
    a.other, b.other = b, a
    weakref.finalize(a, freed.set)
    gc.collect(1)  # the young passes: it survives them, into the oldest generation


def settle() -> None:
    """A full pass first: what earlier tests left goes now (clients they did not close warn
    as they go, which is no concern of this test's).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def test_full_passes_come_on_a_clock_and_still_free_cycles() -> None:
    settle()
    before = gc.get_threshold()
    freed = asyncio.Event()
    async with paced_collector(lambda: 0, every=0.5):
        old_cycle(freed)
        young, middle, _ = gc.get_threshold()
        # Allocations enough for more passes of the middle generation than start a full one
        # (each comes after middle + 1 young passes, each after young + 1 allocations)
        kept = [[] for _ in range((middle + 4) * (middle + 1) * (young + 1))]
        assert gc.get_count()[2] > middle  # middle passes since the last full one: it waits
        assert not freed.is_set()
        del kept
        await asyncio.wait_for(freed.wait(), 3)  # the clock's pass
    assert gc.get_threshold() == before  # as it was found, once the server stops


async def test_a_busy_server_gets_its_full_pass_later_but_gets_it() -> None:
    """With many requests at work a full pass would hold them all: it waits for a quieter
    moment, up to its longest wait.
    """
    settle()
    at_work = QUIET + 1
    freed = asyncio.Event()
    async with paced_collector(lambda: at_work, every=0.1, longest=1.0):
        started = time.monotonic()
        old_cycle(freed)
        await asyncio.wait_for(freed.wait(), 3)
        assert time.monotonic() - started > 0.8  # not at 0.1 s, busy as it was
        at_work = QUIET
        old_cycle(freed := asyncio.Event())
        started = time.monotonic()
        await asyncio.wait_for(freed.wait(), 3)
        assert time.monotonic() - started < 0.5  # quiet: on the clock


async def test_the_objects_of_requests_at_work_start_no_young_pass() -> None:
    """CPython's young generation passes after 700 objects held: less than a few dozen
    requests at work hold, so it passed every few requests to find them all still alive.
    """
    settle()
    passes = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 0:
            passes.append(1)

    async with paced_collector(lambda: 0):
        gc.collect(0)
        gc.callbacks.append(count)
        try:
            held = [[] for _ in range(YOUNG - 500)]
        finally:
            gc.callbacks.remove(count)
        del held
    assert passes == []
