"""A client that goes away takes its upstream request with it: the backend sees its
connection closed and stops generating for nobody. So does one that stays but stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from gateway.app import create_app
from gateway.http import stream
from tests.support import ServerThread, Sim, backend, gateway_config, openai_client, wait_until

USER = [{"role": "user", "content": "Hello"}]


async def wait_for_outcome(sim: Sim, path: str, limit: float = 5.0) -> dict[str, Any]:
    """The request's log entry once the upstream saw it end (or after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
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


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])  # SSE, NDJSON
async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_closed(
    gateway: ServerThread, ollama_sim: Sim, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A client that keeps its connection open but takes no more data: once the buffers
    between are full, the gateway waits ``SEND_SECONDS`` for it, then drops it and closes
    the upstream stream; the next client is served.
    """
    monkeypatch.setattr(stream, "SEND_SECONDS", 1.0)
    monkeypatch.setattr(stream, "WATCH_SECONDS", 0.2)
    ollama_sim.fault("phi3.5:3.8b", reply=" ".join(f"word{n}" for n in range(200_000)),
                     tokens_per_s=1_000_000, remaining=1)
    host, port = gateway.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "phi3.5:3.8b", "messages": USER, "stream": True}).encode()
    sleeper = socket.socket()
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting)
    sleeper.connect((host, int(port)))
    try:
        sleeper.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode()
                        + b"\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert sleeper.recv(12) == b"HTTP/1.1 200"  # and then reads no more
        started = time.monotonic()
        record = await wait_for_outcome(ollama_sim, "/api/chat", limit=20.0)
        assert record["outcome"] == "client_closed", record
        assert record["tokens"] < 200_000  # cut short, not generated for nobody
        assert time.monotonic() - started < 15
        sleeper.settimeout(5)
        with contextlib.suppress(ConnectionError):
            while sleeper.recv(65536):  # what was buffered, then the end: dropped
                pass
    finally:
        sleeper.close()
    async with aiohttp.ClientSession() as http, http.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "phi3.5:3.8b", "messages": USER}) as response:
        assert response.status == 200


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("door", ["openai", "ollama"])
def test_an_answer_cut_by_the_gateway_stopping_says_so(ollama_sim: Sim, mlx_sim: Sim,
                                                       door: str, stream: bool,
                                                       tmp_path: Path) -> None:
    """Its grace spent, a stream was broken off (the SDKs said a protocol error: the body
    ended in the middle) and a whole answer's connection closed, neither saying why. A
    stream says, in-band, that the gateway is stopping, and ends as a stream ends; a whole
    answer is a 503 that says so; the backend's request is closed.
    """
    log = tmp_path / "requests.jsonl"
    server = ServerThread(lambda: create_app(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        telemetry={"request_log": str(log)})), shutdown_timeout=0.5).start()
    ollama_sim.fault("phi3.5:3.8b", tokens_per_s=5)
    caught: list[BaseException] = []
    text: list[str] = []

    def ask() -> None:
        try:
            if door == "openai":
                client = openai_client(server.url)
                if not stream:
                    client.chat.completions.create(model="phi3.5:3.8b",
                                                   messages=USER)  # type: ignore[arg-type]
                for chunk in client.chat.completions.create(
                        model="phi3.5:3.8b", messages=USER, stream=True):  # type: ignore
                    text.append(chunk.choices[0].delta.content or "")
            else:
                local = ollama.Client(host=server.url)
                try:
                    if not stream:
                        local.chat(model="phi3.5:3.8b", messages=USER, stream=False)
                    for part in local.chat(model="phi3.5:3.8b", messages=USER, stream=True):
                        text.append(part.message.content or "")
                finally:
                    local.close()
        except BaseException as exc:  # (what the SDK raised is what the test looks at)
            caught.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    wait_until(lambda: text if stream else ollama_sim.requests("/api/chat"), 10,
               "the answer begun")
    time.sleep(0.2)
    server.stop()
    thread.join(10)
    [error] = caught
    assert isinstance(error, (openai.APIError, ollama.ResponseError)), repr(error)
    assert "The gateway is stopping" in str(error)
    if not stream:
        assert getattr(error, "status_code", None) == 503
    [record] = [json.loads(line) for line in log.read_text().splitlines()]
    assert (record["status"], record["error"]) == (503, "service_unavailable")
    assert ollama_sim.hung_up("/api/chat", "phi3.5:3.8b")["closed_by_client"]
