"""A service's background tasks end at a stop, even when a cancellation is lost."""

from __future__ import annotations

import asyncio

from gateway.runtime import end_loops


async def test_a_loop_whose_cancellation_wait_for_lost_still_ends() -> None:
    """Python 3.11's ``asyncio.wait_for`` (redis-py sends each command through it) returns
    what it waited for when it is cancelled as that comes: a loop of such calls, cancelled
    then, goes on. Workers whose supervisor was killed lived on so, serving nothing.
    """
    answers: asyncio.Queue[int] = asyncio.Queue()

    async def loop() -> None:  # a loop of commands, each with a timeout
        while True:
            await asyncio.wait_for(answers.get(), 60)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)  # it waits for an answer
    answers.put_nowait(1)
    await asyncio.sleep(0)  # the answer is in; wait_for has not yet seen it
    started = asyncio.get_running_loop().time()
    await end_loops([task], within=5.0)
    assert task.cancelled()
    assert asyncio.get_running_loop().time() - started < 2.0
