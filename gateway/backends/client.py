"""The HTTP/1.1 client the backends reach their servers with: a pool of kept-alive
connections per backend, and responses whose bodies are read as they arrive.

Written for the one job it has, which runs on every request and on every chunk of every
answer: a request with a JSON body, an answer read as bytes (a stream of events, mostly).
Answers are parsed by httptools (llhttp, the parser of Node.js); bodies framed by
``Content-Length``, by chunks or by the end of the connection; TCP or TLS (``https``); no
proxies, redirects or compression (it asks for none). Against aiohttp's client it takes
about a fifth of the gateway's CPU time per request off (``loadtest/RESULTS.md``).
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
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, urlsplit

import httptools

MAX_HEAD = 64 * 1024  # status line and headers: more is not a server the gateway can follow
HIGH_WATER = 256 * 1024  # bytes received and not yet read: past them, stop reading
KEEP_IDLE = 15.0  # seconds a connection is kept unused (servers close theirs after 5-75 s)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class ConnectFailed(OSError):
    """No connection to the server could be made (refused, unreachable, no such name, TLS)."""


class Disconnected(ConnectionError):
    """The server closed the connection before its answer was whole. ``answered``: some of
    the answer had come; ``reused``: the connection had carried an earlier request;
    ``reset``: it was reset (a crash), not closed; ``after``: this long after the request
    was sent.
    """

    def __init__(self, message: str, *, answered: bool, reused: bool, reset: bool,
                 after: float) -> None:
        super().__init__(message)
        self.answered, self.reused, self.reset = answered, reused, reset
        self.after = after  # seconds from the request's sending


class IdleTimeout(TimeoutError):
    """The server went silent in the middle of its answer for longer than allowed."""


class BadResponse(ValueError):
    """What the server sent is not HTTP/1.x."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Seconds: ``connect`` to open a connection, ``read`` at most between two arrivals of
    data (the wait for the headers included), ``idle`` instead of it once the headers
    have come, ``total`` for the whole exchange, from the wait for a connection to the
    body's end. None: no limit.
    """

    connect: float
    read: float | None = None
    total: float | None = None
    idle: float | None = None


class Pool:
    """The connections to one server; at most ``limit`` open, the rest of the requests
    wait for one. ``headers`` go on every request.
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
        self._waiters: deque[asyncio.Future[None]] = deque()
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
            connection = await self._connection(loop, limits.connect, response.deadline)
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
                          deadline: float | None) -> Connection:
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
            if len(self._all) < self.limit:
                due = loop.time() + connect
                return await self._open(loop, due if deadline is None else min(due, deadline))
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # it was this one's turn: pass it on
                else:
                    with contextlib.suppress(ValueError):  # (a wake may have taken it)
                        self._waiters.remove(waiter)
                raise

    async def _open(self, loop: asyncio.AbstractEventLoop, due: float) -> Connection:
        connection = Connection(self)
        self._all.add(connection)  # counted while it opens, so the limit holds
        try:
            async with asyncio.timeout_at(due):
                await loop.create_connection(
                    lambda: connection, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None)
        except TimeoutError as exc:  # the limit, or the system's own
            self._drop(connection)
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
        """A connection whose answer was read to its end, free for the next request."""
        if self._closed or connection.lost:
            connection.close()
            return
        assert connection.transport is not None
        connection.transport.resume_reading()  # (a no-op unless the answer paused it)
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)
        self._wake()

    def _drop(self, connection: Connection) -> None:
        """A connection that closed: its place is free."""
        if connection in self._all:
            self._all.discard(connection)
            with contextlib.suppress(ValueError):
                self._idle.remove(connection)
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
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

    __slots__ = ("idle_since", "lost", "pool", "response", "reused", "transport")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.idle_since = 0.0
        self.lost = False
        self.reused = False

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

    def close(self) -> None:
        self.lost = True
        response, self.response = self.response, None
        if self.transport is not None:
            self.transport.close()
        self.pool._drop(self)
        if response is not None:  # the pool closing under a request
            response.connection_ended(ConnectionAbortedError("the backend was closed"))


class Response:
    """An answer: its status and headers (names in lower case), and its body read with
    ``readany``/``read``. ``release()`` gives its connection back (or closes it, if the
    body was not read to its end).
    """

    __slots__ = ("_close_delimited", "_connection", "_eof", "_error", "_head_size",
                 "_interim", "_keep_alive", "_last", "_limits", "_loop", "_parser", "_paused",
                 "_pieces", "_read_timer", "_reused", "_sent", "_size", "_total_timer", "_waiter",
                 "_whole",
                 "deadline",
                 "headers", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self._loop, self._limits = loop, limits
        self._connection: Connection | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self._head_size = 0  # bytes received before the head was whole
        self._interim = False  # the head being read is an interim one (100 Continue)
        self._close_delimited = False  # the body ends where the connection does
        self._whole = False  # the parser saw the answer end
        self._keep_alive = False
        self._reused = False  # its connection had carried an earlier request
        self._pieces: list[bytes] = []
        self._size = 0
        self._eof = False
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last = self._sent = loop.time()  # when data last came (or reading resumed)
        self._read_timer: asyncio.TimerHandle | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        self.deadline = None if limits.total is None else self._last + limits.total
        if self.deadline is not None:
            self._total_timer = loop.call_at(self.deadline, self._expired,
                                             "the exchange took too long")

    # -- the connection's side

    def send(self, connection: Connection, request: bytes) -> None:
        self._connection = connection
        self._reused = connection.reused
        connection.response = self
        assert connection.transport is not None
        connection.transport.write(request)
        self._last = self._sent = self._loop.time()
        if self._limits.read is not None:
            self._read_timer = self._loop.call_at(self._last + self._limits.read,
                                                  self._read_watch)

    def _silence_limit(self) -> float | None:
        limits = self._limits
        return limits.idle if self.status and limits.idle is not None else limits.read

    def feed(self, data: bytes) -> None:
        self._last = self._loop.time()
        if self._whole:  # more after the answer's end: a server out of step
            self._keep_alive = False
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._whole:  # (an error raised by a callback is the parser's context)
                why = exc.__context__ if isinstance(exc.__context__, BadResponse) else exc
                self._fail(BadResponse(f"not HTTP/1.x: {why}"))
                return
            self._keep_alive = False  # what followed the answer is not HTTP: not kept
        if not self.status:
            self._head_size += len(data)
            if self._head_size > MAX_HEAD:
                self._fail(BadResponse("a response head longer than 64 KiB"))
            return
        if self._whole:
            self._finish()
        elif self._size > HIGH_WATER and not self._paused and self._connection is not None:
            self._paused = True
            assert self._connection.transport is not None
            self._connection.transport.pause_reading()
        self._wake()

    # The parser's callbacks (httptools: llhttp, the parser of Node.js), called from feed.

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:  # a second message after the first's end: not read
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        if self.status:
            return
        status = self._parser.get_status_code()
        if status < 100 or status == 101:  # (wrapped into an error feed_data raises)
            raise BadResponse(f"status {status}")
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._interim = True
            self.headers = {}
            return
        headers = self.headers
        self.status = status
        if self._limits.idle is not None:  # from now on, the idle limit
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self._loop.call_at(self._loop.time() + self._limits.idle,
                                                  self._read_watch)
        self._keep_alive = self._parser.should_keep_alive()
        chunked = headers.get("transfer-encoding", "").lower().rstrip().endswith("chunked")
        self._close_delimited = status not in (204, 304) and not chunked and \
            "content-length" not in headers

    def on_message_begin(self) -> None:
        if self._whole:  # a second answer nobody asked for: the connection is not kept
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self._whole:
            self._pieces.append(body)
            self._size += len(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif self.status:
            self._whole = True

    def _finish(self) -> None:
        self._eof = True
        self._stop_timers()
        self._wake()

    def connection_ended(self, exc: Exception | None) -> None:
        """The server closed the connection (``exc``: why, if it broke)."""
        self._connection = None
        if self._eof:
            return
        if isinstance(exc, ssl.SSLEOFError):  # a TLS server that closed without saying so
            exc = None
        if self._close_delimited and exc is None:
            self._finish()  # the end of the connection is the end of this body
            return
        if isinstance(exc, ConnectionAbortedError):  # the pool closing under it
            self._fail(exc)
            return
        answered = bool(self.status or self._head_size)
        what = "in the middle of the answer" if answered else "before answering"
        how = "reset" if exc is not None else "closed"
        error = Disconnected(f"the server {how} the connection {what}", answered=answered,
                             reused=self._reused, reset=exc is not None,
                             after=self._loop.time() - self._sent)
        error.__cause__ = exc
        self._fail(error)

    def _read_watch(self) -> None:
        """The read limit: one timer, moved on when data came meanwhile; a wait the
        gateway made itself (reading paused for a slow reader) does not count.
        """
        if self._eof or self._error is not None:
            return
        limit = self._silence_limit()
        assert limit is not None
        now = self._loop.time()
        if self._paused:
            self._last = now
        due = self._last + limit
        if now >= due:
            self._expired(f"no data for {limit:g}s", IdleTimeout if self.status else TimeoutError)
        else:
            self._read_timer = self._loop.call_at(due, self._read_watch)

    def _expired(self, why: str, kind: type[TimeoutError] = TimeoutError) -> None:
        if not self._eof and self._error is None:
            self._fail(kind(why))

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._keep_alive = False
        self._stop_timers()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.response = None
            connection.close()
        self._wake()

    def _stop_timers(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if self._total_timer is not None:
            self._total_timer.cancel()
            self._total_timer = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._paused:  # the reader wants more than is held: take it in
            self._consumed()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- the reader's side

    async def started(self) -> None:
        """Until the head has arrived."""
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """The body as it arrives, a read at a time."""
        data = await self.readany()
        if not data:
            raise StopAsyncIteration
        return data

    async def readany(self) -> bytes:
        """What has arrived and was not read yet, waiting for some; b"" at the end."""
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._consumed()
                return data
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()

    async def read(self, limit: int = -1) -> bytes:
        """The body to its end, or its first ``limit`` bytes if it is longer."""
        while not self._eof and (limit < 0 or self._size < limit):
            if self._error is not None:
                raise self._error
            await self._wait()
        data = b"".join(self._pieces)
        if 0 <= limit < len(data):
            data, rest = data[:limit], data[limit:]
            self._pieces = [rest]
            self._size = len(rest)
        else:
            self._pieces.clear()
            self._size = 0
        return data

    def _consumed(self) -> None:
        self._size = sum(map(len, self._pieces)) if self._pieces else 0
        if self._paused:
            self._paused = False
            self._last = self._loop.time()
            connection = self._connection
            if connection is not None and connection.transport is not None:
                connection.transport.resume_reading()

    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self._eof and not self._pieces

    def release(self) -> None:
        """Done with this answer: its connection serves the next request if the body was
        read to its end, and is closed otherwise (the server sees the request end).
        """
        self._stop_timers()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.response = None
        if self._eof and self._keep_alive and self._error is None:
            connection.pool.put_back(connection)
        else:
            connection.close()
