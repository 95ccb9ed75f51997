"""HTTP plumbing shared by the backend adapters: one pooled session per backend, the
timeouts, the loop that turns an upstream answer into chunks, and the translation of every
network failure into a ``GatewayError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import os
import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

import orjson

from gateway.backends.client import ConnectFailed, Pool
from gateway.backends.response import (
    BadResponse,
    Disconnected,
    IdleTimeout,
    Limits,
    Overtime,
    Response,
)
from gateway.config import BackendConfig
from gateway.errors import (
    OVERTIME,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    error_fields,
    from_upstream_status,
)
from gateway.protocol.sse import LineTooLong, MalformedEvent
from gateway.protocol.units import Chunk, Completion
from gateway.telemetry import ANSWER_BEGAN, UPSTREAM

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024
MAX_RETRY_AFTER = 3600.0
DRAIN_SECONDS = 0.25
LISTING_SECONDS = 30.0
RESEND_WITHIN = 0.5  # seconds: a connection dropped this soon after sending never carried it
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")


class Translator(Protocol):
    """Upstream JSON objects → chunks, for one answer (see ``gateway.protocol``)."""

    finished: bool  # the finish reason has arrived
    complete: bool  # ... and the usage: nothing more can follow

    def chunk(self, obj: Any) -> Chunk: ...


Decoder = Callable[[Response], AsyncGenerator[list[Any]]]


class HttpBackend:
    """Base of the adapters: owns the connection pool to one upstream server."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.tier = config.tier
        self.base_url = config.url.rstrip("/")
        self.capacity = config.slots  # requests it runs at once per model (0: not known)
        self._pool: Pool | None = None
        self._key = ""  # the API key it sends (kept out of what it says back)
        self.unreachable = False  # its last connection could not be opened (logged once)
        limits = config.timeouts
        # Answers are always asked for as streams, which send headers at once and then keep
        # talking: the read limit bounds the wait for headers, the idle limit the silences
        # between chunks. Other calls (/api/show, a load) send their headers when their
        # work is done: the headers limit bounds that work, as a stream's. An embedding's
        # work grows with its input (thousands of texts on a CPU take minutes): `total`.
        self._limits = {
            # Between the headers and the body's start, the first token is due (a model
            # Ollama loads sends no headers until it is loaded: the headers limit is its).
            "stream": Limits(limits.connect, read=limits.headers, total=limits.total,
                             idle=limits.idle, first=config.first_token_limit),
            "whole": Limits(limits.connect, read=limits.headers, total=limits.total),
            "embedding": Limits(limits.connect, total=limits.total),
            # Model listings: a server that takes longer is as good as down for discovery.
            "listing": Limits(limits.connect, total=min(LISTING_SECONDS, limits.total),
                              beside=True),
            "quick": Limits(limits.connect, total=limits.connect, beside=True),
        }

    async def start(self) -> None:
        # Content-Type on every request (GETs ignore it): no per-request header merging.
        # No cookies are kept: one a backend sets must never ride along on another
        # client's request.
        headers = {"User-Agent": "hybrid-gateway", "Content-Type": "application/json"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env, "").strip()
            if key and key.isprintable() and key.isascii():
                headers["Authorization"] = f"Bearer {key}"
                self._key = key
            else:
                log.warning("backend %s: environment variable %s is %s; requests go "
                            "without an API key", self.name, self.config.api_key_env,
                            "not a key" if key else "not set")
        self._pool = Pool(self.base_url, self.config.max_connections, headers)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def keep_warm(self, model: str, within: float) -> str | None:
        """Load ``model`` if it would be unloaded within ``within`` seconds; what was done
        (None: nothing, or nothing this backend can do: it keeps its models loaded itself).
        """
        return None

    async def load(self, model: str, keep_alive: Any, embeds: bool = False) -> str:
        """Load ``model`` (``embeds``: an embedding model) for ``keep_alive`` (Ollama's
        duration; 0: unload it), as a client asked; what was done, in Ollama's words ("load",
        "unload"). A server that keeps its models loaded itself has nothing to do.
        """
        return "load"

    @property
    def pool(self) -> Pool:
        if self._pool is None:  # not started, or an embedded server that is off
            raise UpstreamError(f"backend {self.name} is not running", backend=self.name)
        return self._pool

    def request(self, method: str, path: str, payload: Any = None, *,
                timeout: str = "whole", root: bool = False) -> Exchange:
        """``async with backend.request(...) as response``: a 2xx upstream response, or a
        ``GatewayError`` for anything else (an error status, a timeout, a broken connection),
        raised on entry or from the reads inside the block. ``timeout``: "stream", "whole"
        or "quick" (probes: the connect timeout for everything). ``root``: ``path`` is at the
        server's root, not under the API's ``/v1``.
        """
        prefix = self.pool.prefix
        target = (prefix.removesuffix("/v1") if root else prefix) + path
        data = orjson.dumps(payload) if payload is not None else None
        return Exchange(self, method, target, data, self._limits[timeout])

    async def get_json(self, path: str, *, quick: bool = False) -> Any:
        """A listing (or, ``quick``, a probe: the connect timeout for everything)."""
        async with self.request("GET", path, timeout="quick" if quick else "listing") as r:
            return await self.read_json(r)

    async def post_json(self, path: str, payload: Any, *, limits: str = "whole") -> Any:
        async with self.request("POST", path, payload, timeout=limits) as response:
            return await self.read_json(response)

    async def read_json(self, response: Response) -> Any:
        body = await response.read()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"{self.name} sent a response that is not JSON",
                                backend=self.name) from None

    async def generate(self, path: str, payload: dict[str, Any], translator: Translator,
                       decode: Decoder, *, whole: bool = False) -> AsyncGenerator[Chunk]:
        """The answer to ``payload`` as chunks. The upstream is always asked for a stream, so
        a backend that accepts and then falls silent is found out within the header and
        idle limits, never only at ``total``; a ``whole`` answer is the stream collected
        here, and comes as one chunk and its finish. Events that cannot be understood are
        skipped; an answer that ends before its finish is an error, never a shorter answer.
        """
        collected = Completion() if whole else None
        began = False
        async with self.request("POST", path, payload, timeout="stream") as response:
            # The decoder is closed here when the answer is whole before its stream ended
            # ([DONE] still to come): left to the collector, it would be closed in a task of
            # its own, through a wake-up of the event loop, for every answer.
            events = decode(response)
            try:
                async for objects in events:
                    for obj in objects:
                        try:
                            chunk = translator.chunk(obj)
                        except MalformedEvent:
                            log.warning("backend %s: skipped a malformed stream event",
                                        self.name)
                            continue
                        if collected is None:
                            yield chunk
                        else:
                            if not began and chunk.says_something():
                                began = True
                                ANSWER_BEGAN.set(time.monotonic())
                            collected.add(chunk)
                        if translator.complete:
                            break
                    if translator.complete:
                        break
            except GatewayError as exc:  # (an error event: its words go to log and client)
                exc.message = self.said(exc.message)
                exc.args = (exc.message,)
                raise
            except (TimeoutError, OSError, BadResponse) as exc:  # (IdleTimeout, the total
                # limit, a connection closed or broken): after the finish, the answer is whole
                if isinstance(exc, Overtime) and began and collected is not None and \
                        not translator.finished:
                    log.warning("backend %s: %s; the answer ends there (finish: length)",
                                self.name, _translate(self.name, exc, started=True))
                    collected.add(Chunk(finish_reason="length", overtime=True))
                    for chunk in collected.chunks():  # (long, not broken: see OVERTIME)
                        yield chunk
                    return
                if not translator.finished:
                    raise
            finally:
                await events.aclose()
            await _drain(response)
        if not translator.finished:
            raise UpstreamError(f"{self.name} ended the answer before it was complete",
                                backend=self.name, code="upstream_truncated")
        if collected is not None:
            for chunk in collected.chunks():
                yield chunk

    def said(self, message: str) -> str:
        """An upstream's message as the log and the client may see it: without the API key
        the gateway sent it, should it echo the request's headers back.
        """
        if self._key and self._key in message:
            message = message.replace(self._key, "[REDACTED]")
        return _BEARER.sub(r"\1[REDACTED]", message) if "earer" in message else message

    async def status_error(self, response: Response) -> GatewayError:
        try:
            body = await response.read(MAX_ERROR_BODY)
        except (TimeoutError, OSError, BadResponse):  # cut off or stalled: its status
            body = b""  # says what it was (a 429's Retry-After with it)
        message, code = error_details(body)
        message = self.said(message)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return from_upstream_status(self.name, response.status, message, retry_after, code)


async def _drain(response: Response) -> None:
    """Read the little that follows a complete answer ([DONE], the chunked terminator), so
    the connection goes back to the pool instead of being closed; but never wait long.
    """
    if response.at_eof():
        return
    with contextlib.suppress(TimeoutError, OSError, BadResponse):
        async with asyncio.timeout(DRAIN_SECONDS):
            while await response.readany():
                pass


class Exchange:
    """One upstream request-response. The connection is closed, not pooled, when the caller
    stops reading early (a client that went away), so the upstream sees the request end.

    A class rather than ``@asynccontextmanager``: it runs on every request.
    """

    __slots__ = ("_backend", "_data", "_limits", "_method", "_response", "_target")

    def __init__(self, backend: HttpBackend, method: str, target: str, data: bytes | None,
                 limits: Limits) -> None:
        self._backend, self._method, self._target = backend, method, target
        self._data, self._limits = data, limits
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        backend = self._backend
        traceparent = UPSTREAM.get()  # the attempt's span, or the client's own
        headers = {"traceparent": traceparent} if traceparent else None
        try:
            try:
                response = await backend.pool.request(self._method, self._target, self._data,
                                                      self._limits, headers)
            except Disconnected as exc:
                if not self._resend(exc):
                    raise
                response = await backend.pool.request(self._method, self._target, self._data,
                                                      self._limits, headers)
        except Exception as exc:
            refused = isinstance(exc, ConnectFailed)
            if refused:  # logged as it happens, not at each probe while it lasts (every 2 s)
                log.log(logging.DEBUG if backend.unreachable else logging.INFO,
                        "backend %s: cannot connect: %s", backend.name, exc.__cause__ or exc)
            backend.unreachable = refused
            raise _translate(backend.name, exc, started=False) from None
        backend.unreachable = False
        self._response = response
        if not 200 <= response.status < 300:  # (a redirect too: backends are not followed)
            raise await self._refusal(response)
        return response

    async def _refusal(self, response: Response) -> Exception:
        """The error an answer with an error status stands for; its connection let go.
        (Made here, not held in a variable of the frame that raises it: the traceback would
        hold that frame, and the frame the error, a cycle only the gc frees.)
        """
        try:
            return await self._backend.status_error(response)
        except Exception as exc:  # the error's body could not be read
            return _translate(self._backend.name, exc, started=True)
        finally:
            self._finish()

    def _resend(self, exc: Disconnected) -> bool:
        """Whether a request whose kept-alive connection the server had closed meanwhile
        (llama.cpp's server closes one after a few requests) is sent again on a new one:
        a read, always; a generation only if the connection was closed at once and
        cleanly, and by a server of our own (a cloud API might have begun on it, and
        bills).
        """
        if not exc.reused or exc.answered:
            return False
        if self._method == "GET":
            return True
        return not exc.reset and exc.after <= RESEND_WITHIN and self._backend.tier != "cloud"

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        self._finish()
        if isinstance(exc, Exception) and not isinstance(exc, GatewayError):
            raise _translate(self._backend.name, exc, started=True) from None

    def _finish(self) -> None:
        response = self._response
        if response is not None:  # read to its end, its connection is kept; else closed
            response.release()


def _translate(backend: str, exc: Exception, *, started: bool) -> Exception:
    """A network-level failure as the ``GatewayError`` a client should see."""
    if isinstance(exc, IdleTimeout):
        return UpstreamTimeout(f"{backend} stalled: {exc}", backend=backend)
    if isinstance(exc, Overtime):
        return UpstreamTimeout(f"{backend}'s answer was still coming when the backend's "
                               "total time limit ran out", backend=backend, code=OVERTIME)
    if isinstance(exc, TimeoutError):
        what = "the answer" if started else "response headers"
        return UpstreamTimeout(f"{backend} did not send {what} in time", backend=backend)
    if isinstance(exc, LineTooLong):
        return UpstreamError(f"{backend} sent {exc}", backend=backend)
    if isinstance(exc, ConnectFailed):
        # The client hears why in words, never the backend's address; the log has it all.
        why = (exc.strerror or "the connection failed").lower()  # words, no address
        return UpstreamError(f"cannot connect to backend {backend}: {why}",
                             backend=backend, code="backend_unreachable")
    if isinstance(exc, BadResponse):
        log.info("backend %s: %s", backend, exc)
        return UpstreamError(f"backend {backend} sent an answer that is not HTTP",
                             backend=backend)
    if isinstance(exc, OSError):
        return UpstreamError(f"backend {backend} broke off the connection "
                             f"({type(exc).__name__})", backend=backend)
    return exc


def error_details(body: bytes) -> tuple[str, str | None]:
    """The message and (string) code of an upstream error body, whichever dialect it is in
    (``error_fields``), or plain text.
    """
    text = body.decode("utf-8", "replace").strip()[:500]
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return text, None
    error = data.get("error", data.get("detail")) if isinstance(data, dict) else None
    fields = error_fields(error)
    return (fields[0], fields[1]) if fields is not None else (text, None)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
