"""HTTP plumbing shared by the backend adapters: one pooled session per backend, the
timeouts, and the translation of every network failure into a ``GatewayError``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from gateway.config import BackendConfig
from gateway.errors import (
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    from_upstream_status,
)
from gateway.protocol.sse import IdleTimeout, iter_lines

log = logging.getLogger(__name__)

MAX_ERROR_BODY = 64 * 1024


class HttpBackend:
    """Base of the adapters: owns the connection pool to one upstream server."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.name = config.name
        self.tier = config.tier
        self.base_url = config.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        headers = {"User-Agent": "hybrid-gateway"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                log.warning("backend %s: environment variable %s is not set; requests go "
                            "without an API key", self.name, self.config.api_key_env)
        timeouts = self.config.timeouts
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=self.config.max_connections),
            timeout=aiohttp.ClientTimeout(total=timeouts.total, sock_connect=timeouts.connect),
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"backend {self.name} is not started")
        return self._session

    @asynccontextmanager
    async def request(
        self, method: str, path: str, payload: Any = None, *, wait: float | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An upstream response with a 2xx status; anything else raises a GatewayError.

        The connection is closed, not pooled, if the caller stops reading early (a client
        that went away), so the upstream server sees the request end.
        """
        url = self.base_url + path
        data = orjson.dumps(payload) if payload is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        limit = wait if wait is not None else self.config.timeouts.headers
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(limit):
                response = await self.session.request(method, url, data=data, headers=headers)
            if response.status >= 400:
                raise await self._status_error(response)
            yield response
        except GatewayError:
            raise
        except IdleTimeout as exc:
            raise UpstreamTimeout(f"{self.name} stalled: {exc}", backend=self.name) from None
        except TimeoutError:
            what = "response headers" if response is None else "the answer"
            raise UpstreamTimeout(
                f"{self.name} did not send {what} in time", backend=self.name
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(
                f"cannot connect to backend {self.name}: {exc.strerror or exc}",
                backend=self.name, code="backend_unreachable",
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(
                f"backend {self.name} broke off the connection ({type(exc).__name__})",
                backend=self.name,
            ) from None
        finally:
            if response is not None:
                # Unread data left means the caller stopped early: drop the connection.
                if not response.content.at_eof():
                    response.close()
                response.release()

    async def get_json(self, path: str, *, wait: float | None = None) -> Any:
        """GET a JSON document; ``wait`` bounds the wait for headers (default: headers timeout)."""
        async with self.request("GET", path, wait=wait) as response:
            return orjson.loads(await response.read())

    async def post_json(self, path: str, payload: Any) -> Any:
        async with self.request("POST", path, payload) as response:
            body = await response.read()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"{self.name} sent a response that is not JSON",
                                backend=self.name) from None

    def lines(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        return iter_lines(response.content, self.config.timeouts.idle)

    async def _status_error(self, response: aiohttp.ClientResponse) -> GatewayError:
        body = await response.content.read(MAX_ERROR_BODY)
        message, code = error_details(body)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return from_upstream_status(self.name, response.status, message, retry_after, code)


def error_details(body: bytes) -> tuple[str, str | None]:
    """The message and (string) code of an upstream error body, whichever dialect it is in:
    Ollama's ``{"error": "..."}``, OpenAI's ``{"error": {"message", "code"}}``, llama.cpp's
    integer codes, or plain text.
    """
    text = body.decode("utf-8", "replace").strip()[:500]
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return text, None
    error = data.get("error", data.get("detail")) if isinstance(data, dict) else None
    if isinstance(error, str):
        return error[:500], None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        if error.get("type") == "exceed_context_size_error":  # llama.cpp
            code = "context_length_exceeded"
        return error["message"][:500], code if isinstance(code, str) else None
    return text, None


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
