"""A client that goes away takes its upstream request with it: the backend sees its
connection closed and stops generating for nobody.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.support import ServerThread, Sim

USER = [{"role": "user", "content": "Hello"}]


async def wait_for_outcome(sim: Sim, path: str) -> dict[str, Any]:
    """The request's log entry once the upstream saw it end (or after five seconds)."""
    deadline = time.monotonic() + 5.0
    while True:
        [record] = sim.requests(path)
        if record.get("closed_by_client") or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.05)


async def test_client_leaving_a_stream_closes_the_upstream_stream(
    gateway: ServerThread, ollama_sim: Sim
) -> None:
    ollama_sim.fault("phi3.5:3.8b", tokens_per_s=20)
    async with aiohttp.ClientSession() as http:
        response = await http.post(gateway.url + "/v1/chat/completions", json={
            "model": "phi3.5:3.8b", "messages": USER, "stream": True})
        assert response.status == 200
        await response.content.readline()  # the first event has arrived
        response.close()  # the client hangs up mid-answer
    record = await wait_for_outcome(ollama_sim, "/api/chat")
    assert record["outcome"] == "client_closed"
    assert record["closed_by_client"] is True
    assert record["tokens"] < 10  # far from the whole answer: generation stopped early


async def test_client_leaving_before_the_answer_cancels_the_upstream_request(
    gateway: ServerThread, mlx_sim: Sim
) -> None:
    mlx_sim.fault("command-r-plus:104b", latency=30)
    async with aiohttp.ClientSession() as http:
        request = http.post(gateway.url + "/v1/chat/completions", json={
            "model": "command-r-plus:104b", "messages": USER})
        try:
            async with asyncio.timeout(0.5):
                await request
        except TimeoutError:
            pass
    record = await wait_for_outcome(mlx_sim, "/v1/chat/completions")
    assert record["outcome"] == "client_closed"
    # And the gateway is none the worse for it.
    async with aiohttp.ClientSession() as http, http.post(
        gateway.url + "/v1/chat/completions",
        json={"model": "phi3.5:3.8b", "messages": USER},
    ) as response:
        assert response.status == 200
