"""The backends' HTTP/1.1 client (gateway/backends/client.py) against real servers on
loopback: aiohttp's server, and plain sockets that send exactly the bytes a case needs (a
chunk cut anywhere, trailers, an interim 100, a body ended by closing, a broken head).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import socket
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.backends import client
from gateway.backends.client import ConnectFailed, Pool
from gateway.backends.http import HttpBackend
from gateway.backends.response import BadResponse, Disconnected, IdleTimeout, Limits
from gateway.config import BackendConfig
from gateway.errors import UpstreamError
from gateway.protocol.openai_stream import OpenAITranslator
from gateway.protocol.sse import decode_sse

LIMITS = Limits(connect=2.0, read=5.0, total=10.0)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose ``handler`` answers each connection; it counts connections and
    how many were open at once.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = self.open = self.most_open = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self.handlers.discard(task)
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        for task in list(server.handlers):  # ended here, not by the test's loop closing
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def pooled(handler: Handler, limit: int = 4) -> AsyncIterator[tuple[RawServer, Pool]]:
    """A server, and a pool of connections to it (closed first)."""
    async with raw_server(handler) as server:
        pool = Pool(server.url, limit, {})
        try:
            yield server, pool
        finally:
            await pool.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def answering(*replies: bytes, pause: float = 0.0, one_byte_at_a_time: bool = False,
              then_close: bool = False) -> Handler:
    """A handler that answers the requests on a connection with ``replies`` in turn."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in replies:
            await read_request(reader)
            await asyncio.sleep(pause)
            pieces = [reply[i:i + 1] for i in range(len(reply))] if one_byte_at_a_time \
                else [reply]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                if one_byte_at_a_time:
                    await asyncio.sleep(0)
        if then_close:
            return
        await reader.read()  # until the client closes
    return handler


CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"b\r\ndata: one\n\n\r\n"
           b"B;name=value\r\ndata: two\n\n\r\n"
           b"0\r\nX-Trailer: yes\r\n\r\n")


async def body_of(pool: Pool, path: str = "/x") -> tuple[int, bytes]:
    response = await pool.request("POST", path, b"{}", LIMITS)
    try:
        pieces = []
        while data := await response.readany():
            pieces.append(data)
        assert response.at_eof()
        return response.status, b"".join(pieces)
    finally:
        response.release()


async def test_a_chunked_body_cut_at_every_byte_reads_whole_and_keeps_its_connection() -> None:
    async with pooled(answering(CHUNKED, CHUNKED, one_byte_at_a_time=True)) as (server, pool):
        assert await body_of(pool) == (200, b"data: one\n\ndata: two\n\n")
        assert await body_of(pool) == (200, b"data: one\n\ndata: two\n\n")
        assert server.connections == 1  # the second request went on the first's connection


@pytest.mark.parametrize("seed", range(4))
async def test_chunks_of_every_size_cut_anywhere_read_back_the_same(seed: int) -> None:
    rng = random.Random(seed)
    parts = [bytes(rng.randrange(256) for _ in range(size))
             for size in (1, 15, 16, 17, 255, 4096, 70_000, 3)]
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if rng.random() < 0.3 else b"", p)
                    for p in parts) + b"0\r\n\r\n"
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body

    async def in_random_pieces(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            pos = 0
            while pos < len(reply):
                step = rng.choice((1, 2, 3, 7, 100, 5000, 100_000))
                writer.write(reply[pos:pos + step])
                await writer.drain()
                await asyncio.sleep(0)
                pos += step
        await reader.read()

    async with pooled(in_random_pieces) as (server, pool):
        assert await body_of(pool) == (200, b"".join(parts))
        assert await body_of(pool) == (200, b"".join(parts))
        assert server.connections == 1


async def test_bodies_framed_every_way_http_has() -> None:
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + sized
    empty = b"HTTP/1.1 204 No Content\r\n\r\n"
    async with pooled(answering(sized, interim, empty, sized)) as (server, pool):
        assert await body_of(pool) == (200, b"hello")
        assert await body_of(pool) == (200, b"hello")  # the interim 100 is passed over
        assert await body_of(pool) == (204, b"")
        assert await body_of(pool) == (200, b"hello")
        assert server.connections == 1
    # Ended by closing the connection (HTTP/1.0, or no length): never kept.
    closing = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"
    async with pooled(answering(closing, then_close=True)) as (server, pool):
        assert await body_of(pool) == (200, b"until the end")
        assert await body_of(pool) == (200, b"until the end")
        assert server.connections == 2
    # A server that says it closes: a new connection for the next request.
    said = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with pooled(answering(said, then_close=True)) as (server, pool):
        assert await body_of(pool) == (200, b"ok")
        assert await body_of(pool) == (200, b"ok")
        assert server.connections == 2


async def test_headers_are_read_whatever_their_case_and_repeats_are_joined() -> None:
    reply = (b"HTTP/1.1 429 Too Many Requests\r\nretry-AFTER:  7 \r\nVia: a\r\nvia: b\r\n"
             b"Content-Length: 0\r\n\r\n")
    async with pooled(answering(reply)) as (_server, pool):
        response = await pool.request("GET", "/", None, LIMITS)
        assert response.status == 429
        assert response.headers["retry-after"] == "7"
        assert response.headers["via"] == "a, b"
        response.release()


@pytest.mark.parametrize("reply", [
    b"SPDY/3 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024),
])
async def test_what_is_not_http_is_refused_and_its_connection_dropped(reply: bytes) -> None:
    async with pooled(answering(reply)) as (_server, pool):
        with pytest.raises(BadResponse):
            await body_of(pool)
        assert pool.open_connections == 0


async def test_at_most_limit_connections_and_the_rest_wait_their_turn() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with pooled(answering(*[reply] * 20, pause=0.05), 2) as (server, pool):
        results = await asyncio.gather(*(body_of(pool) for _ in range(12)))
        assert results == [(200, b"ok")] * 12
        assert server.most_open == 2
        assert server.connections == 2


async def test_a_probe_does_not_wait_in_line_and_the_limit_holds_after_it() -> None:
    """A probe (``beside``) with every connection busy opens one of its own rather than
    time out behind them; once done, that one is closed, not kept (a first version handed
    it on, and the connections open grew with the demand).
    """
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with pooled(answering(*[reply] * 40, pause=0.2), 2) as (server, pool):
        busy = [asyncio.ensure_future(body_of(pool)) for _ in range(10)]
        await asyncio.sleep(0.05)  # two at work, eight in line
        probe = await pool.request("GET", "/version", None,
                                   Limits(connect=1.0, total=1.0, beside=True))
        try:
            assert (probe.status, await probe.read()) == (200, b"ok")
        finally:
            probe.release()
        await asyncio.sleep(0.05)
        assert server.open == 2  # the probe's closed, the line still waiting
        assert await asyncio.gather(*busy) == [(200, b"ok")] * 10
        assert server.most_open == 3  # two, and the probe's

async def test_the_connection_closed_past_the_limit_is_the_probes_not_one_in_line() -> None:
    """A request's connection came back while a probe's (opened past the limit) was still
    at work: the request's was closed, and the next in line waited for the probe."""
    async def by_path(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            await asyncio.sleep(float(head.split(b" ")[1].strip(b"/")))  # (the path: a pause)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with pooled(by_path, 2) as (_, pool):
        quick = asyncio.ensure_future(body_of(pool, "/0.1"))
        slow = asyncio.ensure_future(body_of(pool, "/1.5"))
        await asyncio.sleep(0.02)
        probe = asyncio.ensure_future(pool.request(
            "GET", "/1.0", None, Limits(connect=1.0, total=5.0, beside=True)))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        assert await body_of(pool, "/0") == (200, b"ok")  # in line behind the two
        assert time.monotonic() - started < 0.5  # served as the quick one was done
        await asyncio.gather(quick, slow)
        (await probe).release()

async def test_silence_and_slowness_end_in_timeouts_not_hangs() -> None:
    head_only = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    # The read limit bounds a silence; once the headers are in, the idle limit does if set.
    cases: list[tuple[Limits, type[TimeoutError]]] = [
        (Limits(2.0, read=0.3, total=10), TimeoutError),
        (Limits(2.0, read=5, idle=0.3), IdleTimeout)]
    async with pooled(answering(head_only)) as (_server, pool):
        for limits, silence in cases:
            started = time.monotonic()
            response = await pool.request("POST", "/", b"{}", limits)
            assert await response.readany() == b"abc"
            with pytest.raises(silence):
                await response.readany()
            assert 0.25 < time.monotonic() - started < 2
            response.release()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_server(silent) as server:  # no answer at all: ``total`` bounds the wait
        pool = Pool(server.url, 4, {})
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/", b"{}", Limits(2.0, total=0.3))
        assert time.monotonic() - started < 2
        assert pool.open_connections == 0
        await pool.close()


async def test_a_connection_cut_before_or_during_the_answer_is_told_apart() -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def close_mid_body(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()

    async with pooled(close_at_once) as (_server, pool):
        with pytest.raises(Disconnected) as before:
            await pool.request("POST", "/", b"{}", LIMITS)
        assert not before.value.answered and not before.value.reused
    async with pooled(close_mid_body) as (_server, pool):
        response = await pool.request("POST", "/", b"{}", LIMITS)
        assert await response.readany() == b"half"  # what came before the cut is read
        with pytest.raises(Disconnected) as during:
            await response.readany()
        assert during.value.answered
        response.release()


async def test_nothing_listening_is_a_connect_failure_in_words_without_the_address() -> None:
    async with raw_server(answering()) as server:
        url = server.url
    pool = Pool(url, 4, {})
    with pytest.raises(ConnectFailed) as failed:
        await pool.request("GET", "/", None, LIMITS)
    assert failed.value.strerror == "Connection refused"
    assert "127.0.0.1" not in str(failed.value)
    await pool.close()


async def test_a_large_body_is_held_back_by_the_reader_not_buffered_whole() -> None:
    size = 16 * 1024 * 1024
    sent: list[int] = []

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            sent.append(len(block))
        await reader.read()

    async with pooled(big) as (_server, pool):
        response = await pool.request("GET", "/", None, LIMITS)
        await asyncio.sleep(0.5)  # the reader reads nothing for a while
        held_back = sum(sent)
        got = 0
        while data := await response.readany():
            got += len(data)
        assert got == size
        assert held_back < size / 2  # the server had to wait for the reader
        response.release()


async def test_closing_the_pool_ends_a_read_in_progress() -> None:
    stalled = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with raw_server(answering(stalled)) as server:
        pool = Pool(server.url, 4, {})
        response = await pool.request("POST", "/", b"{}", Limits(2.0))  # no read limit
        reading = asyncio.create_task(response.readany())
        await asyncio.sleep(0.05)
        await pool.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(reading, 2)
        response.release()


def one_answer_per_connection(reset: bool = False) -> Handler:
    """A server that answers the first request on a connection and drops the connection
    when a second one comes on it, unanswered (as llama.cpp's server does after a few;
    ``reset``: as a crashing one does).
    """
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}')
        await writer.drain()
        await read_request(reader)
        if reset:
            writer.transport.abort()  # type: ignore[attr-defined]
    return handler


async def backend_on(url: str, tier: str = "primary") -> HttpBackend:
    backend = HttpBackend(BackendConfig(name="b", kind="openai", url=url, tier=tier))  # type: ignore[arg-type]
    await backend.start()
    return backend


async def test_a_request_that_meets_a_kept_alive_connection_closed_is_sent_again() -> None:
    async with raw_server(one_answer_per_connection()) as server:
        backend = await backend_on(server.url)
        try:
            for _ in range(4):
                assert await backend.post_json("/x", {}) == {}
            assert server.connections == 4  # each request after the first went twice
        finally:
            await backend.close()


async def test_only_reads_are_sent_again_to_the_cloud_or_after_a_reset() -> None:
    async with raw_server(one_answer_per_connection(reset=True)) as server:
        backend = await backend_on(server.url, tier="cloud")
        try:
            for _ in range(3):
                assert await backend.get_json("/models") == {}
            assert server.connections == 3
            with pytest.raises(UpstreamError) as error:  # a reused one was reset: not sent
                await backend.post_json("/x", {})        # again, a cloud API may bill it
            assert "broke off the connection" in error.value.message
            assert server.connections == 3
            assert await backend.post_json("/x", {}) == {}  # a new connection: answered
        finally:
            await backend.close()


async def test_an_error_whose_body_breaks_off_is_a_clean_error_and_frees_its_connection(
) -> None:
    async def half_an_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 100\r\n\r\n{\"error\": ")
        await writer.drain()

    async with raw_server(half_an_error) as server:
        backend = await backend_on(server.url)
        try:
            with pytest.raises(UpstreamError):
                await backend.post_json("/x", {})
            await asyncio.sleep(0.05)  # the closed connection's last callbacks
            assert backend.pool.open_connections == 0
        finally:
            await backend.close()


async def test_a_large_answer_read_whole_leaves_its_connection_ready_for_the_next() -> None:
    big = b"[" + b"1," * 400_000 + b"1]"
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
    async with pooled(answering(reply, reply)) as (server, pool):
        for _ in range(2):
            response = await pool.request("GET", "/", None, Limits(2.0, total=5))
            assert await response.read() == big
            response.release()
        assert server.connections == 1


async def test_a_slow_reader_is_not_taken_for_a_silent_server() -> None:
    async def steady(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):
            writer.write(b"8000\r\n" + b"x" * 0x8000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await reader.read()

    async with pooled(steady) as (_server, pool):
        response = await pool.request("GET", "/", None, Limits(2.0, read=1.0, total=30))
        await asyncio.sleep(1.5)  # the gateway's own client is slow: reading pauses
        assert len(await response.read()) == 40 * 0x8000
        response.release()


async def test_a_waiter_cancelled_as_its_turn_comes_is_cancelled_cleanly() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with pooled(answering(reply, reply), 1) as (_server, pool):
        first = await pool.request("GET", "/", None, LIMITS)
        waiting = asyncio.create_task(pool.request("GET", "/", None, LIMITS))
        await asyncio.sleep(0.05)
        assert await first.read() == b"ok"
        waiting.cancel()
        first.release()  # the turn passes to the waiter, cancelled in the same moment
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await body_of(pool) == (200, b"ok")  # and the next one still gets it


@pytest.mark.parametrize("first_closes", [False, True], ids=["put-back", "closed"])
async def test_a_request_that_waits_its_turn_is_not_overtaken_by_a_newcomer(
        first_closes: bool) -> None:
    """A connection put back goes to the request that waited for it, and so does the place
    of one that closed: a request that arrives in the same moment queues behind.
    """
    paths: list[bytes] = []
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            paths.append((await read_request(reader)).split(b" ")[1])
            closing = first_closes and len(paths) == 1
            writer.write(ok.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                         if closing else ok)
            await writer.drain()
            if closing:  # the gateway closes it, as it puts the answer down
                await reader.read()
                return

    async with pooled(handler, 1) as (server, pool):
        first = await pool.request("POST", "/first", b"{}", LIMITS)
        waiting = asyncio.create_task(body_of(pool, "/waiting"))
        await asyncio.sleep(0.05)  # in line for the one connection
        assert await first.read() == b"ok"
        newcomer = asyncio.create_task(body_of(pool, "/newcomer"))  # runs before the waiter
        first.release()
        assert await asyncio.gather(waiting, newcomer) == [(200, b"ok")] * 2
        assert paths == [b"/first", b"/waiting", b"/newcomer"]
        assert server.connections == (2 if first_closes else 1)
        assert server.most_open == 1


@pytest.mark.parametrize("seed", range(5))
async def test_turns_survive_requests_cancelled_timed_out_and_connections_closed(
        seed: int) -> None:
    """Many requests on a few connections, some given up while they wait (cancelled, or out
    of time) and some answers closing their connection: every other request is answered,
    never more connections open than the limit, and nothing is left waiting or kept.
    """
    rng = random.Random(seed)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    most_open = 0  # as the pool counts them (one the gateway closed may not have gone yet)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal most_open
        while True:
            await read_request(reader)
            most_open = max(most_open, pool.open_connections)
            await asyncio.sleep(rng.random() * 0.01)
            if rng.random() < 0.3:
                writer.write(ok.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                await reader.read()
                return
            writer.write(ok)
            await writer.drain()

    async def ask(kind: str) -> str:
        await asyncio.sleep(rng.random() * 0.05)
        limits = Limits(2.0, 5.0, 0.01) if kind == "short" else LIMITS
        try:
            response = await pool.request("POST", "/", b"{}", limits)
        except (TimeoutError, ConnectFailed):  # (out of time as its connection opened)
            return "timed out"
        try:
            return (await response.read()).decode()
        except TimeoutError:
            return "timed out"
        finally:
            response.release()

    async with pooled(handler, 3) as (server, pool):
        kinds = rng.choices(["whole", "cancelled", "short"], [6, 2, 2], k=80)
        tasks = [asyncio.create_task(ask(kind)) for kind in kinds]
        for kind, task in zip(kinds, tasks, strict=True):
            if kind == "cancelled":
                asyncio.get_running_loop().call_later(rng.random() * 0.1, task.cancel)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for kind, result in zip(kinds, results, strict=True):
            if kind == "whole":
                assert result == "ok"
            elif kind == "short":
                assert result in ("ok", "timed out")
            else:
                assert result == "ok" or isinstance(result, asyncio.CancelledError)
        assert most_open == 3 and server.connections > 3
        assert not pool._waiters and pool._kept == 0
        assert await body_of(pool) == (200, b"ok")


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "it did not happen in time"
        await asyncio.sleep(0.01)


async def test_connections_left_unused_are_closed_and_one_in_use_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a burst the connections it opened are closed once unused for KEEP_IDLE, by the
    gateway (Ollama never closes an idle one), not only when a request next looks; one
    carrying an answer meanwhile is kept, and goes its turn after.
    """
    monkeypatch.setattr(client, "KEEP_IDLE", 1.0)
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with pooled(answering(*[reply] * 20, pause=0.05), 4) as (server, pool):
        assert await asyncio.gather(*(body_of(pool) for _ in range(4))) == [(200, b"ok")] * 4
        assert pool.open_connections == server.open == 4
        held = await pool.request("GET", "/", None, LIMITS)  # in use across the sweep
        await until(lambda: pool.open_connections == 1)
        await until(lambda: server.open == 1)  # closed on the server's side too
        assert await held.read() == b"ok"
        held.release()  # unused from now: closed in its turn
        await until(lambda: pool.open_connections == 0)
        await until(lambda: server.open == 0)
        assert await body_of(pool) == (200, b"ok")  # and the pool goes on with a new one
        assert server.connections == 5


async def test_a_request_whose_time_runs_out_as_its_connection_opens_is_a_timeout() -> None:
    """The request's own total limit ending while a connection opens is its time up, not a
    backend that cannot be reached (which would mark the backend down for every request).
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: one connection fills its line, the next hang
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            pool = Pool(f"http://127.0.0.1:{port}", 4, {})
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError) as timed_out:
                    await pool.request("GET", "/", None, Limits(connect=5.0, total=0.3))
                assert not isinstance(timed_out.value, ConnectFailed)
                assert time.monotonic() - started < 2.0
                with pytest.raises(ConnectFailed):  # the connect limit is the sooner
                    await pool.request("GET", "/", None, Limits(connect=0.3, total=5.0))
                assert pool.open_connections == 0
            finally:
                await pool.close()


async def test_odd_urls_and_statuses() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await read_request(reader)).split(b" ")[1])
        writer.write(b"HTTP/1.1 000 Nothing\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with raw_server(record) as server:
        pool = Pool(server.url + "/modèles v1", 4, {})
        with pytest.raises(BadResponse):
            await pool.request("GET", pool.prefix + "/x", None, LIMITS)
        assert seen == [b"/mod%C3%A8les%20v1/x"]
        assert pool.open_connections == 0
        await pool.close()
    with pytest.raises(ValueError):
        Pool("http://user:secret@127.0.0.1/", 4, {})


async def test_requests_carry_the_backends_headers_and_a_body_an_aiohttp_server_reads() -> None:
    seen: list[tuple[str, str, bytes]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append((request.headers["Authorization"], request.headers["Host"],
                     await request.read()))
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_post("/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        pool = Pool(f"http://127.0.0.1:{port}/v1", 4, {"Authorization": "Bearer k"})
        response = await pool.request("POST", pool.prefix + "/chat", b'{"a": 1}', LIMITS)
        assert await response.read() == b'{"path": "/v1/chat"}'
        response.release()
        assert seen == [("Bearer k", f"127.0.0.1:{port}", b'{"a": 1}')]
        with pytest.raises(ValueError):
            Pool("http://127.0.0.1/", 4, {"X": "a\r\nInjected: yes"})
        await pool.close()
    finally:
        await runner.cleanup()


async def test_a_backend_that_cannot_be_reached_is_a_clean_gateway_error_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Refused connections are an error in words; the log says so as the backend becomes
    unreachable, not at each of the health monitor's probes while it stays so.
    """
    async with raw_server(answering()) as server:
        url = server.url
    port = int(url.rsplit(":", 1)[1])
    backend = HttpBackend(BackendConfig(name="gone", kind="openai", url=url))
    await backend.start()
    caplog.set_level("INFO", logger="gateway.backends.http")
    try:
        for _ in range(3):
            with pytest.raises(UpstreamError) as error:
                await backend.post_json("/x", {})
            assert error.value.message == "cannot connect to backend gone: connection refused"
            assert error.value.code == "backend_unreachable"
        async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
            writer.close()

        back = await asyncio.start_server(once, "127.0.0.1", port)
        assert await backend.post_json("/x", {}) == {}  # back: logged again when it goes
        back.close()
        await back.wait_closed()
        with pytest.raises(UpstreamError):
            await backend.post_json("/x", {})
        logged = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
        assert len(logged) == 2  # as it went, and as it went again
        assert all(m.startswith("backend gone: cannot connect: ") for m in logged)
    finally:
        await backend.close()


async def test_answers_the_client_cannot_follow_are_refused_cleanly(
        caplog: pytest.LogCaptureFixture) -> None:
    upgrade = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\n\r\n")
    async with pooled(answering(upgrade)) as (server, pool):
        with pytest.raises(BadResponse):
            await pool.request("GET", "/", None, LIMITS)
    assert "Fatal error" not in caplog.text
    moved = b"HTTP/1.1 301 Moved\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"
    async with raw_server(answering(moved)) as server:
        backend = await backend_on(server.url)
        try:
            with pytest.raises(UpstreamError) as error:  # not followed, not taken as an answer
                await backend.get_json("/models")
            assert "301" in error.value.message
        finally:
            await backend.close()


async def test_an_identity_body_ends_with_its_connection_and_a_stray_answer_spoils_it() -> None:
    identity = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nto the end"
    async with pooled(answering(identity, then_close=True)) as (server, pool):
        assert await body_of(pool) == (200, b"to the end")
    stray = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
             b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    async with pooled(answering(stray, stray)) as (server, pool):
        assert await body_of(pool) == (200, b"ok")
        assert await body_of(pool) == (200, b"ok")  # not "hello", the stray one
        assert server.connections == 2


async def test_a_request_that_waited_its_turn_is_still_sent_again() -> None:
    """The time that decides a resend runs from the sending, not from the wait for a
    connection before it.
    """
    async def slow_then_drop(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(0.6)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}')
        await writer.drain()
        await read_request(reader)  # a second request on this connection: dropped

    async with raw_server(slow_then_drop) as server:
        backend = HttpBackend(BackendConfig(name="b", kind="openai", url=server.url,
                                            max_connections=1))
        await backend.start()
        try:
            answers = await asyncio.gather(backend.post_json("/x", {}),
                                           backend.post_json("/x", {}))
            assert answers == [{}, {}]
        finally:
            await backend.close()


async def test_a_key_that_cannot_be_a_header_is_not_sent_and_does_not_stop_the_start(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ODD_KEY", "ключ")
    backend = HttpBackend(BackendConfig(name="b", kind="openai", url="http://127.0.0.1:9/v1",
                                        api_key_env="ODD_KEY"))
    await backend.start()
    await backend.close()
    assert "ODD_KEY is not a key" in caplog.text
    assert "ключ" not in caplog.text


def sse_answer(*events: dict[str, object]) -> bytes:
    body = b"".join(b"data: %s\n\n" % json.dumps(event).encode() for event in events)
    body += b"data: [DONE]\n\n"
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body


async def test_an_answer_leaves_no_generator_for_the_event_loop_to_close() -> None:
    """Reading an answer, whole or streamed, closes what it opened on the way. A generator
    dropped unfinished (the usage came, [DONE] was still to be read) is closed by the
    event loop in a task of its own, through a wake-up of the loop: on every request.
    """
    reply = sse_answer(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    first_iteration, finalizer = sys.get_asyncgen_hooks()
    dropped: list[str] = []

    def noting(generator: AsyncGenerator[Any]) -> None:
        dropped.append(generator.__qualname__)
        if finalizer is not None:
            finalizer(generator)

    sys.set_asyncgen_hooks(first_iteration, noting)
    try:
        async with raw_server(answering(reply, reply, reply)) as server:
            backend = await backend_on(server.url)
            try:
                for whole in (True, False, True):
                    chunks = [chunk async for chunk in backend.generate(
                        "/chat/completions", {}, OpenAITranslator("b"), decode_sse,
                        whole=whole)]
                    assert "".join(chunk.content for chunk in chunks) == "Hi"
                    assert chunks[-1].usage is not None
                assert server.connections == 1
            finally:
                await backend.close()
        gc.collect()
    finally:
        sys.set_asyncgen_hooks(first_iteration, finalizer)
    assert dropped == []
