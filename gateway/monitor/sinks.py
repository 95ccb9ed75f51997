"""Where alerts go: the log, a JSON webhook, a Telegram bot, a Slack-compatible incoming
webhook. Each sink has a queue and a task of its own: a sink that fails is retried with
backoff (and the batch dropped, said in the log, after ``ATTEMPTS``), a full queue drops
its oldest batch, and nothing waits on a sink but that task — never a request.

Secrets (a Slack URL, a bot token) come from the environment and appear in no log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from gateway.backoff import backoff
from gateway.config import SinkConfig
from gateway.runtime import end_loops

log = logging.getLogger(__name__)

ATTEMPTS = 8  # tries of one batch before it is given up (about four minutes of backoff)
BACKOFF_INITIAL, BACKOFF_MAX = 1.0, 60.0
QUEUE = 100  # batches waiting per sink


@dataclass(frozen=True, slots=True)
class Notice:
    """One alert starting ("firing") or ending ("resolved")."""

    status: str
    rule: str
    kind: str
    target: str
    severity: str
    summary: str
    started: float
    ended: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "rule": self.rule, "kind": self.kind,
                "target": self.target, "severity": self.severity, "summary": self.summary,
                "started": self.started, "ended": self.ended}

    def line(self) -> str:
        mark = "RESOLVED" if self.status == "resolved" else self.severity.upper()
        return f"[{mark}] {self.summary}"


class Sink(Protocol):
    kind: str

    async def send(self, batch: Sequence[Notice], session: aiohttp.ClientSession) -> None:
        """Deliver, or raise."""


class LogSink:
    kind = "log"

    async def send(self, batch: Sequence[Notice], session: aiohttp.ClientSession) -> None:
        for notice in batch:
            level = logging.INFO if notice.status == "resolved" else \
                logging.ERROR if notice.severity == "critical" else logging.WARNING
            log.log(level, "alert: %s", notice.line())


class WebhookSink:
    """A JSON POST: ``{"source": ..., "alerts": [{status, rule, kind, target, severity,
    summary, started, ended}]}``.
    """

    kind = "webhook"

    def __init__(self, url: str, source: str, timeout: float) -> None:
        self._url, self._source, self._timeout = url, source, timeout

    async def send(self, batch: Sequence[Notice], session: aiohttp.ClientSession) -> None:
        await _post(session, self._url, {"source": self._source,
                                         "alerts": [n.as_dict() for n in batch]}, self._timeout)


class SlackSink:
    """Slack's incoming webhooks, and the many services that take the same ``{"text"}``."""

    kind = "slack"

    def __init__(self, url: str, source: str, timeout: float) -> None:
        self._url, self._source, self._timeout = url, source, timeout

    async def send(self, batch: Sequence[Notice], session: aiohttp.ClientSession) -> None:
        await _post(session, self._url, {"text": _text(self._source, batch)}, self._timeout)


class TelegramSink:
    """A bot's ``sendMessage`` to one chat."""

    kind = "telegram"

    def __init__(self, api: str, token: str, chat_id: str, source: str,
                 timeout: float) -> None:
        self._url = f"{api.rstrip('/')}/bot{token}/sendMessage"
        self._chat_id, self._source, self._timeout = chat_id, source, timeout

    async def send(self, batch: Sequence[Notice], session: aiohttp.ClientSession) -> None:
        await _post(session, self._url, {"chat_id": self._chat_id,
                                         "text": _text(self._source, batch),
                                         "disable_web_page_preview": True}, self._timeout)


class SinkError(Exception):
    """A sink that answered with an error (its text, never its URL)."""


async def _post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                seconds: float) -> None:
    try:
        async with session.post(url, json=payload,
                                timeout=aiohttp.ClientTimeout(total=seconds)) as response:
            if response.status >= 300:
                raise SinkError(f"HTTP {response.status}")
    except (aiohttp.ClientError, OSError) as exc:
        raise SinkError(type(exc).__name__) from None  # (its text may hold the URL)


def _text(source: str, batch: Sequence[Notice]) -> str:
    return "\n".join([f"{source}:", *(n.line() for n in batch)])


def build_sinks(configs: Sequence[SinkConfig], source: str) -> list[Sink]:
    """The sinks of the config; one whose secret is missing from the environment is left
    out, said once in the log (a gateway must start without its alert channel).
    """
    out: list[Sink] = []
    for config in configs:
        if config.kind == "log":
            out.append(LogSink())
        elif config.kind == "webhook":
            out.append(WebhookSink(config.url, source, config.timeout))
        elif config.kind == "slack":
            url = os.environ.get(config.url_env, "") if config.url_env else config.url
            if not url:
                log.error("alerts: the slack sink is off: $%s is not set", config.url_env)
                continue
            out.append(SlackSink(url, source, config.timeout))
        else:
            token = os.environ.get(config.token_env, "")
            chat = os.environ.get(config.chat_id_env, "")
            if not token or not chat:
                log.error("alerts: the telegram sink is off: $%s and $%s must be set",
                          config.token_env, config.chat_id_env)
                continue
            api = os.environ.get(config.api_url_env, "") or "https://api.telegram.org"
            out.append(TelegramSink(api, token, chat, source, config.timeout))
    return out


Claim = Callable[[Notice], Awaitable[bool]]


class Dispatcher:
    """Sends each batch to every sink, each sink in its own task. With ``claim`` (several
    processes watching the same fleet: the workers of ``serve --workers``, hosts on one
    Redis), a notice goes out only from the process that claimed it first.
    """

    def __init__(self, sinks: Sequence[Sink], claim: Claim | None = None) -> None:
        self.sinks = list(sinks)
        self._claim = claim
        self._claiming: asyncio.Queue[list[Notice]] = asyncio.Queue(QUEUE)
        self._queues: list[asyncio.Queue[list[Notice]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        # Each sink's name: its kind, numbered from the second of a kind ("webhook 2")
        self.names = [s.kind if i == 1 else f"{s.kind} {i}"
                      for i, s in _numbered(self.sinks)]
        self.sent = dict.fromkeys(self.names, 0)
        self.failed = dict.fromkeys(self.names, 0)

    def start(self) -> None:
        self._session = aiohttp.ClientSession()
        for sink, name in zip(self.sinks, self.names, strict=True):
            queue: asyncio.Queue[list[Notice]] = asyncio.Queue(QUEUE)
            self._queues.append(queue)
            self._tasks.append(asyncio.create_task(self._deliver(sink, name, queue),
                                                   name=f"alerts-{name}"))
        if self._claim is not None and self.sinks:
            self._tasks.append(asyncio.create_task(self._claimed(self._claim),
                                                   name="alerts-claims"))

    def send(self, batch: list[Notice]) -> None:
        if self._claim is not None and self.sinks:
            if self._claiming.full():
                self._claiming.get_nowait()
                self._claiming.task_done()
            self._claiming.put_nowait(batch)
            return
        self.deliver(batch)

    async def _claimed(self, claim: Claim) -> None:
        """Each batch, with only the notices this process claimed."""
        while True:
            batch = await self._claiming.get()
            try:
                kept = [notice for notice in batch if await claim(notice)]
                if kept:
                    self.deliver(kept)
            finally:
                self._claiming.task_done()

    def deliver(self, batch: list[Notice]) -> None:
        """The batch to every sink (already claimed, where notices are)."""
        for name, queue in zip(self.names, self._queues, strict=True):
            if queue.full():
                queue.get_nowait()
                queue.task_done()
                log.error("alerts: the %s sink is behind; its oldest batch was dropped", name)
            queue.put_nowait(batch)

    async def close(self, patience: float = 2.0) -> None:
        """Give what is queued a moment to go out, then stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._claiming.join()
                await asyncio.gather(*(q.join() for q in self._queues))
        await end_loops(self._tasks)
        if self._session is not None:
            await self._session.close()

    async def _deliver(self, sink: Sink, name: str, queue: asyncio.Queue[list[Notice]]
                       ) -> None:
        assert self._session is not None
        while True:
            batch = await queue.get()
            try:
                for attempt in range(ATTEMPTS):
                    try:
                        await sink.send(batch, self._session)
                        self.sent[name] += 1
                        break
                    except Exception as exc:  # a sink must never take the monitor down
                        self.failed[name] += 1
                        if attempt == ATTEMPTS - 1:
                            log.error("alerts: the %s sink failed %d times (%s); %d alerts "
                                      "were not delivered there", name, ATTEMPTS,
                                      _reason(exc), len(batch))
                        else:
                            delay = backoff(attempt, BACKOFF_INITIAL, BACKOFF_MAX)
                            log.warning("alerts: the %s sink failed (%s); again in %.1fs",
                                        name, _reason(exc), delay)
                            await asyncio.sleep(delay)
            finally:
                queue.task_done()


def _numbered(sinks: Sequence[Sink]) -> list[tuple[int, Sink]]:
    """Each sink with its number among those of its kind (from 1)."""
    seen: dict[str, int] = {}
    out = []
    for sink in sinks:
        seen[sink.kind] = seen.get(sink.kind, 0) + 1
        out.append((seen[sink.kind], sink))
    return out


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SinkError) else type(exc).__name__
