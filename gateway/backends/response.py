"""One answer from a backend's server, read as it arrives: its head and body parsed by
httptools (llhttp, the parser of Node.js), bodies framed by ``Content-Length``, by chunks or
by the end of the connection; the limits on its silences and on its whole time; and the
errors of an exchange. The connections it arrives on are ``gateway.backends.client``'s.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol

import httptools

MAX_HEAD = 64 * 1024  # status line and headers: more is not a server the gateway can follow
HIGH_WATER = 256 * 1024  # bytes received and not yet read: past them, stop reading


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


class Overtime(TimeoutError):
    """The answer was still coming when the exchange's ``total`` ran out."""


class BadResponse(ValueError):
    """What the server sent is not HTTP/1.x."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Seconds: ``connect`` to open a connection, ``read`` at most between two arrivals of
    data (the wait for the headers included), ``idle`` instead of it once the body has
    begun (and, from the headers to the body's start, ``first`` if that is longer: a model
    that thinks, or loads, after its server sent the headers), ``total`` for the whole
    exchange, from the wait for a connection to the body's end. None: no limit.
    ``beside``: the exchange does not wait in line for one of the pool's connections (a
    probe or a listing, which must not time out behind the very requests whose backend it
    checks on): with none idle, it opens one of its own.
    """

    connect: float
    read: float | None = None
    total: float | None = None
    idle: float | None = None
    first: float | None = None
    beside: bool = False


class Connection(Protocol):
    """What an answer needs of the connection it arrives on (``client.Connection``)."""

    transport: asyncio.Transport | None
    response: Response | None
    reused: bool  # it carried an earlier request

    def close(self) -> None: ...

    def put_back(self) -> None:
        """Free for the next request: the answer was read to its end."""


class Response:
    """An answer: its status and headers (names in lower case), and its body read with
    ``readany``/``read``. ``release()`` gives its connection back (or closes it, if the
    body was not read to its end).
    """

    __slots__ = ("_bodied", "_close_delimited", "_connection", "_eof", "_error", "_head_size",
                 "_interim", "_keep_alive", "_last", "_limits", "_loop", "_parser", "_paused",
                 "_pieces", "_read_timer", "_reused", "_sent", "_size", "_total_timer",
                 "_waiter", "_whole", "deadline", "headers", "status")

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self._loop, self._limits = loop, limits
        self._connection: Connection | None = None
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
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
        self._bodied = False  # the body has begun
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last = self._sent = loop.time()  # when data last came (or reading resumed)
        self._read_timer: asyncio.TimerHandle | None = None
        self._total_timer: asyncio.TimerHandle | None = None
        self.deadline = None if limits.total is None else self._last + limits.total
        if self.deadline is not None:
            self._total_timer = loop.call_at(self.deadline, self._out_of_time)

    # -- the connection's side

    def send(self, connection: Connection, request: bytes) -> None:
        self._connection = connection
        self._reused = connection.reused
        connection.response = self
        assert connection.transport is not None
        connection.transport.write(request)
        self._last = self._sent = self._loop.time()
        self._watch_silence()

    def _silence_limit(self) -> float | None:
        """The longest silence allowed now: ``read`` until the head, then ``idle`` (until
        the body begins, ``first`` if longer).
        """
        limits = self._limits
        if not self.status or limits.idle is None:
            return limits.read
        if not self._bodied and limits.first is not None:
            return max(limits.idle, limits.first)
        return limits.idle

    def _watch_silence(self) -> None:
        """(Re)start the one timer that keeps the silence limit, from now."""
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        limit = self._silence_limit()
        if limit is not None:
            self._read_timer = self._loop.call_at(self._loop.time() + limit,
                                                  self._read_watch)

    def feed(self, data: bytes) -> None:
        self._last = self._loop.time()
        parser = self._parser
        if self._whole or parser is None:  # more after the answer's end (or its release):
            # a server out of step
            self._keep_alive = False
            return
        try:
            parser.feed_data(data)
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
        parser = self._parser
        assert parser is not None  # (its own callback)
        status = parser.get_status_code()
        if status < 100 or status == 101:  # (wrapped into an error feed_data raises)
            raise BadResponse(f"status {status}")
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._interim = True
            self.headers = {}
            return
        headers = self.headers
        self.status = status
        if self._limits.idle is not None:  # from now on, the idle limit
            self._watch_silence()
        self._keep_alive = parser.should_keep_alive()
        chunked = headers.get("transfer-encoding", "").lower().rstrip().endswith("chunked")
        self._close_delimited = status not in (204, 304) and not chunked and \
            "content-length" not in headers

    def on_message_begin(self) -> None:
        if self._whole:  # a second answer nobody asked for: the connection is not kept
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not self._bodied:
            self._bodied = True
            if self._limits.first is not None:  # from now on, the idle limit alone
                self._watch_silence()
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

    def _out_of_time(self) -> None:
        # (an answer coming token after token, bounded by ``idle``: a generation's stream)
        overtime = self._bodied and self._limits.idle is not None
        self._expired("the exchange took too long", Overtime if overtime else TimeoutError)

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
        self._parser = None  # (it holds this response's callbacks: freed now, not by the gc)
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.response = None
        if self._eof and self._keep_alive and self._error is None:
            connection.put_back()
        else:
            connection.close()
