"""A short soak: bursts of mixed traffic (streams and whole answers, cache hits, errors, and
clients that hang up mid-stream) leave nothing behind. After each burst the gateway's tasks
come back to what they were before, and the process's open files and its connections to the
upstream do not grow: nothing leaks per request, however it ended. Nor does a request leave
a cycle of objects for the garbage collector: its memory is freed as it ends.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp

from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway

MODEL = "phi3.5:3.8b"
FAILING = "qwq:32b"  # a model whose server answers every request with an error
BURST, AT_ONCE, HANG_UPS = 120, 16, 24  # requests per burst, at once, hung up mid-stream


def tasks(server: ServerThread) -> int:
    return int(server.call(lambda: len(asyncio.all_tasks())))


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def connections_to(port: int) -> int:
    """This machine's established TCP connections to ``port`` on loopback, client ends."""
    count = 0
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


async def one(http: aiohttp.ClientSession, url: str, kind: str, n: int) -> str:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": f"Question {n}"}]}
    if kind == "cached":
        chat = {**chat, "temperature": 0, "messages": [{"role": "user", "content": "Same"}]}
    if kind == "unknown model":
        chat = {**chat, "model": "no-such-model:1b"}
    if kind == "upstream error":
        chat = {**chat, "model": FAILING}
    if kind == "bad body":
        async with http.post(url, data=b"{not json", headers={
                "Content-Type": "application/json"}) as response:
            await response.read()
            return f"{kind} {response.status}"
    if kind in ("stream", "hang up"):
        chat = {**chat, "stream": True}
    async with http.post(url, json=chat) as response:
        if kind == "hang up":
            await response.content.readline()  # the first event: then the client leaves
            response.close()
            return f"{kind} {response.status}"
        await response.read()
        return f"{kind} {response.status}"


async def burst(url: str, seed: int, *, failing: bool = False) -> Counter[str]:
    rng = random.Random(seed)
    kinds = ["hang up"] * HANG_UPS + rng.choices(
        ["whole", "stream", "cached", "unknown model", "bad body"]
        + (["upstream error"] if failing else []), k=BURST - HANG_UPS)
    rng.shuffle(kinds)
    limit = asyncio.Semaphore(AT_ONCE)
    async with aiohttp.ClientSession() as http:
        async def limited(kind: str, n: int) -> str:
            async with limit:
                return await one(http, url, kind, n)
        return Counter(await asyncio.gather(*(limited(k, n) for n, k in enumerate(kinds))))


def settled(server: ServerThread, baseline: int, limit: float = 10.0) -> int:
    """The gateway's tasks once back to ``baseline`` (or what they are after ``limit``)."""
    deadline = time.monotonic() + limit
    while (count := tasks(server)) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


async def test_bursts_with_disconnects_leave_no_tasks_files_or_connections_behind(
    ollama_sim: Sim
) -> None:
    ollama_sim.fault(MODEL, tokens_per_s=200)  # a stream lasts long enough to hang up on
    upstream = urlsplit(ollama_sim.url).port
    assert upstream is not None
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url, max_connections=AT_ONCE),
        plugins=[{"name": "cache"}]))
    url = server.url + "/v1/chat/completions"
    try:
        first = await burst(url, 0)  # warm: pools filled, caches and lazy objects made
        await asyncio.sleep(0.5)
        base_tasks = settled(server, tasks(server))
        base_files, base_connections = open_files(), connections_to(upstream)
        for round_ in range(1, 4):
            seen = await burst(url, round_)
            assert seen["hang up 200"] == HANG_UPS and seen["whole 200"] > 0, seen
            assert seen["cached 200"] > 0 and seen["unknown model 404"] > 0, seen
            assert seen["bad body 400"] > 0 and seen["stream 200"] > 0, seen
            assert settled(server, base_tasks) <= base_tasks, f"round {round_}: tasks left"
            # Kept-alive connections are reused, never more than the pool holds; each one
            # more than at the start is two descriptors here (the simulator's end too).
            kept = connections_to(upstream)
            assert kept <= max(base_connections, AT_ONCE), round_
            assert open_files() <= base_files + 2 + 2 * max(0, kept - base_connections), \
                f"round {round_}: files left open"
        assert sum(first.values()) == BURST
    finally:
        server.stop()
    assert connections_to(upstream) == 0  # the gateway closed every one on its way out


def cycles_of_the_gateway() -> Counter[str]:
    """The gateway's objects (and its functions' frames) the cycle collector finds
    unreachable now, by type: what its reference counts could not free.
    """
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found: Counter[str] = Counter()
        for thing in gc.garbage:
            module = getattr(type(thing), "__module__", "") or ""
            if module.startswith(("gateway.", "plugins.")):
                found[type(thing).__qualname__] += 1
            elif hasattr(thing, "f_code") and "/gateway/" in thing.f_code.co_filename:
                found[f"frame of {thing.f_code.co_name}"] += 1
        return found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_a_finished_request_leaves_no_cycle_for_the_garbage_collector(
    ollama_sim: Sim
) -> None:
    """With a thousand streams open, a full pass of the cycle collector takes tens of
    milliseconds, every stream waiting: so the gateway's requests free their objects by
    reference counting alone, whatever the answer and however it ended.
    """
    ollama_sim.fault(MODEL, tokens_per_s=200)
    ollama_sim.fault(FAILING, status=500, message="out of memory")
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url, max_connections=AT_ONCE),
        plugins=[{"name": "safety"}, {"name": "qa"}, {"name": "cache"}]))
    url = server.url + "/v1/chat/completions"
    try:
        await burst(url, 0, failing=True)  # warm: what is made once is made
        await asyncio.sleep(0.5)
        gc.collect()
        gc.disable()  # (no collection may free a cycle before it is looked for)
        try:
            seen = await burst(url, 1, failing=True)
            settled(server, 0, limit=1.0)
            found = cycles_of_the_gateway()
        finally:
            gc.enable()
    finally:
        server.stop()
    # (The breaker opens on the failing model: what follows is refused without trying it.)
    assert seen["upstream error 502"] + seen["upstream error 503"] > 0, seen
    assert seen["hang up 200"] == HANG_UPS, seen
    assert seen["stream 200"] > 0 and seen["cached 200"] > 0, seen
    assert not found, found


async def test_an_answer_after_a_failed_attempt_leaves_no_cycle(ollama_sim: Sim) -> None:
    """The failed attempt's error, kept to be said should nothing answer, held the frames
    it was raised through, and they held it: every answer that came after a retry or a
    failover left the request's objects to the cycle collector.
    """
    server = start_gateway(gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                                          routing={"backoff_initial": 0.01}))
    url = server.url + "/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as http:
            for faults in ({}, {"status": 500, "remaining": 1}):  # (the first: warm)
                ollama_sim.fault(MODEL, **faults)
                gc.collect()
                gc.disable()
                try:
                    async with http.post(url, json={
                            "model": MODEL, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
                        assert response.status == 200
                        await response.read()
                    settled(server, 0, limit=1.0)
                    found = cycles_of_the_gateway()
                finally:
                    gc.enable()
                assert not found, (faults, found)
    finally:
        server.stop()
        ollama_sim.clear()
