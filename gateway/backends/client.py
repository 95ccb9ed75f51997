"""The HTTP/1.1 client the backends reach their servers with: a pool of kept-alive
connections per backend, each request sent whole on one; its answer is read as it arrives
by a ``gateway.backends.response.Response``.

Written for the one job it has, which runs on every request and on every chunk of every
answer: a request with a JSON body, an answer read as bytes (a stream of events, mostly).
TCP or TLS (``https``); no proxies, redirects or compression (it asks for none). Against
aiohttp's client it takes about a fifth of the gateway's CPU time per request off
(``loadtest/RESULTS.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import ssl
from collections import deque
from typing import cast
from urllib.parse import quote, urlsplit

from gateway.backends.response import (
    Limits,
    Response,
)

KEEP_IDLE = 15.0  # seconds a connection is kept unused (some servers close theirs sooner;
# Ollama's never does, so after a burst its sockets, and the tunnel's channels they run
# through, would stay open until the gateway stopped)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ConnectFailed(OSError):
    """No connection to the server could be made (refused, unreachable, no such name, TLS)."""


class Pool:
    """The connections to one server; at most ``limit`` open, the rest of the requests
    wait for one, first come first served: a connection put back is handed to the first
    in line, and the place of one that closed is kept for it, so a newcomer never takes
    a turn from a request that waited. ``headers`` go on every request. A connection
    unused for ``KEEP_IDLE`` seconds is closed (one timer a pool, while any is idle).
    """

    def __init__(self, url: str, limit: int, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or \
                parts.username is not None:
            raise ValueError("expected an http(s) URL without credentials")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        # The path every request's is under, as it goes on the wire.
        self.prefix = quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        default_port = self.port == (443 if self._ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {"Host": host if default_port else f"{host}:{self.port}", **headers}
        self._fixed = b"".join(_header(name, value) for name, value in fixed.items())
        self.limit = max(1, limit)
        self._idle: deque[Connection] = deque()
        self._all: set[Connection] = set()
        # Each gets the connection put back for it, or None: a place is free (or the end).
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._kept = 0  # places of closed connections kept for the waiters woken to them
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(self, method: str, target: str, body: bytes | None, limits: Limits,
                      headers: dict[str, str] | None = None) -> Response:
        """Send a request and wait for its answer's headers; the body is read from the
        ``Response``, which must be ``release()``d. ``target``: the path, with its query.
        """
        request = b"".join((  # made first: a request that cannot be made takes no connection
            f"{method} {target} HTTP/1.1\r\n".encode("ascii"), self._fixed,
            b"".join(_header(n, v) for n, v in headers.items()) if headers else b"",
            b"Content-Length: %d\r\n\r\n" % len(body) if body is not None else b"\r\n",
            body or b""))
        loop = asyncio.get_running_loop()
        response = Response(loop, limits)
        try:
            connection = await self._connection(loop, limits.connect, response.deadline,
                                                limits.beside)
            if response._error is not None:  # its time ran out as its turn came: not sent
                self.put_back(connection)
                raise response._error
            response.send(connection, request)
            await response.started()
        except BaseException:
            response.release()
            raise
        return response

    async def _connection(self, loop: asyncio.AbstractEventLoop, connect: float,
                          deadline: float | None, beside: bool = False) -> Connection:
        kept = beside  # (beside the line: a connection of its own, past the limit if need be)
        waited = False  # it was in line already: it goes back to the front
        while True:
            if self._closed:
                raise ConnectFailed("the backend's connections are closed")
            now = loop.time()
            while self._idle:
                connection = self._idle.pop()  # the most recently used: the likeliest alive
                if now - connection.idle_since < KEEP_IDLE and not connection.lost:
                    connection.reused = True
                    return connection
                connection.close()
            if kept or (len(self._all) + self._kept < self.limit and not self._waiters):
                past = len(self._all) + self._kept >= self.limit
                connection = await self._open(loop, loop.time() + connect, deadline)
                connection.beside = beside and past
                return connection
            waiter: asyncio.Future[Connection | None] = loop.create_future()
            if waited:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            waited = True
            try:
                async with asyncio.timeout_at(deadline):
                    handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # its turn came: pass it on
                    self._pass_on(self._taken(waiter.result()))
                else:
                    with contextlib.suppress(ValueError):  # (a wake may have taken it)
                        self._waiters.remove(waiter)
                raise
            if (handed := self._taken(handed)) is None:  # a place kept for it, or the end
                kept = len(self._all) < self.limit
            elif not handed.lost:
                handed.reused = True
                return handed
            else:  # it broke as it was handed on: its place is this one's, if still held
                kept = handed in self._all
                self._all.discard(handed)  # (so that closing it passes nothing on)
                handed.close()

    async def _open(self, loop: asyncio.AbstractEventLoop, due: float,
                    deadline: float | None) -> Connection:
        """A new connection, within the connect limit (``due``) and the request's own
        ``deadline``: that one running out is the request's time up (a ``TimeoutError``),
        not a backend that cannot be reached.
        """
        connection = Connection(self)
        self._all.add(connection)  # counted while it opens, so the limit holds
        ours = deadline is not None and deadline < due
        try:
            async with asyncio.timeout_at(deadline if ours else due):
                await loop.create_connection(
                    lambda: connection, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None)
        except TimeoutError as exc:  # the limit, or the system's own
            self._drop(connection)
            if ours:
                raise
            raise ConnectFailed(errno.ETIMEDOUT, "connection timed out") from exc
        except OSError as exc:
            self._drop(connection)
            raise ConnectFailed(exc.errno, _why(exc)) from exc
        except BaseException:
            self._drop(connection)
            raise
        if self._closed:  # closed while this one opened
            connection.close()
            raise ConnectFailed("the backend's connections are closed")
        return connection

    def put_back(self, connection: Connection) -> None:
        """A connection whose answer was read to its end, free for the next request (one
        opened past the limit, beside the line, is closed: the limit holds).
        """
        if self._closed or connection.lost:
            connection.close()
            return
        if connection.beside and len(self._all) > self.limit:  # (no place passed on)
            self._all.discard(connection)
            connection.close()
            return
        connection.beside = False  # (the limit holds again: one of the pool's now)
        assert connection.transport is not None
        connection.transport.resume_reading()  # (a no-op unless the answer paused it)
        if self._wake(connection):
            return
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = loop.call_at(connection.idle_since + KEEP_IDLE, self._close_idle)

    def _close_idle(self) -> None:
        """Close the connections unused for ``KEEP_IDLE`` (the oldest are first in line),
        and those a tenth short of it with them: a burst's go in one sweep, not one each.
        """
        self._sweep = None
        idle = self._idle
        loop = asyncio.get_running_loop()
        while idle and loop.time() - idle[0].idle_since >= KEEP_IDLE * 0.9:
            idle.popleft().close()
        if idle:
            self._sweep = loop.call_at(idle[0].idle_since + KEEP_IDLE, self._close_idle)

    def _drop(self, connection: Connection) -> None:
        """A connection that closed: its place is free."""
        if connection in self._all:
            self._all.discard(connection)
            with contextlib.suppress(ValueError):
                self._idle.remove(connection)
            self._pass_on(None)

    def _taken(self, handed: Connection | None) -> Connection | None:
        """What a woken waiter was handed; a place kept for it is kept no longer."""
        if handed is None and self._kept:
            self._kept -= 1
        return handed

    def _pass_on(self, connection: Connection | None) -> None:
        """A connection, or the place of one that closed, goes to the first in line."""
        if connection is not None:
            self.put_back(connection)
        elif self._wake(None):
            self._kept += 1

    def _wake(self, connection: Connection | None) -> bool:
        """Whether a waiter was woken, and handed ``connection``."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)  # to find the pool closed
        await asyncio.sleep(0)  # the transports' closing callbacks run

    @property
    def open_connections(self) -> int:
        return len(self._all)


def _why(exc: OSError) -> str:
    """Why a connection failed, in words that hold no address."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or 'the handshake failed'}"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "no such host"
    return os.strerror(exc.errno) if exc.errno else "the connection failed"


def _header(name: str, value: str) -> bytes:
    if not _TOKEN.fullmatch(name) or any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r} cannot be sent as it is")
    return f"{name}: {value}\r\n".encode("latin-1")


class Connection(asyncio.Protocol):
    """One connection; it feeds the response it is carrying."""

    __slots__ = ("beside", "idle_since", "lost", "pool", "response", "reused", "transport")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.idle_since = 0.0
        self.lost = False
        self.reused = False
        self.beside = False  # opened past the pool's limit, for a probe (see Pool.put_back)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked: a server that talks out of turn
            self.close()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        self.lost = True  # not to be picked for a request meanwhile
        self._end(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._end(exc)
        self.pool._drop(self)

    def _end(self, exc: Exception | None) -> None:
        response, self.response = self.response, None
        if response is not None:
            response.connection_ended(exc)

    def put_back(self) -> None:
        self.pool.put_back(self)

    def close(self) -> None:
        self.lost = True
        response, self.response = self.response, None
        if self.transport is not None:
            self.transport.close()
        self.pool._drop(self)
        if response is not None:  # the pool closing under a request
            response.connection_ended(ConnectionAbortedError("the backend was closed"))


