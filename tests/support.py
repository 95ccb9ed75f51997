"""Test plumbing: real servers on free loopback ports, each in its own thread and event
loop, so both the sync and the async OpenAI SDK (and curl) can talk to them over TCP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig, parse_config
from gateway.http.server import GatewayRunner

_TO_CLOSE: list[Callable[[], object]] = []  # what close_test_clients closes


def openai_client(url: str, key: str = "x", **options: Any) -> openai.OpenAI:
    """The official SDK pointed at a gateway (``url``: its root), without retries, closed
    when the test ends (``tests/conftest.py``): its connections are otherwise left to the
    garbage collector, which would warn about them in whichever later test it ran.
    """
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, **options)
    _TO_CLOSE.append(client.close)
    return client


def close_test_clients() -> None:
    while _TO_CLOSE:
        _TO_CLOSE.pop()()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """An aiohttp application served on 127.0.0.1 from a background thread."""

    def __init__(self, make_app: Callable[[], web.Application], *, shutdown_timeout: float = 5.0,
                 port: int | None = None) -> None:
        self._make_app = make_app
        self._shutdown_timeout = shutdown_timeout
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: web.Application | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        return self

    async def _start(self) -> None:
        self.app = self._make_app()
        self._runner = GatewayRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    @staticmethod
    async def _cleanup(runner: web.AppRunner) -> None:
        await runner.cleanup()
        await asyncio.sleep(0.05)  # connections closed above finish closing before the loop stops

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (for reading its state safely)."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def wait(self, fn: Callable[[], Any]) -> Any:
        """Await ``fn()`` on the server's loop; what it gives."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout=30)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._cleanup(self._runner), self.loop).result(
                timeout=60)
            self._runner = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sim:
    """A running simulator and its control surface (``/_sim/*``)."""

    def __init__(self, server: ServerThread, kind: str) -> None:
        self.server = server
        self.kind = kind
        self.url = server.url

    @property
    def api_url(self) -> str:
        """The URL a gateway backend config points at."""
        return self.url if self.kind == "ollama" else self.url + "/v1"

    def fault(self, model: str, **knobs: Any) -> None:
        """Make ``model`` misbehave (see ``gateway.sim.fleet.Faults`` for the knobs)."""
        self._call("PUT", f"/_sim/faults/{model}", knobs)

    def skills(self, model: str, skills: dict[str, float]) -> None:
        """How often ``model`` answers each kind of task well (``SimModel.skills``)."""
        self._call("PUT", f"/_sim/skills/{model}", skills)

    def clear(self) -> None:
        self._call("DELETE", "/_sim/faults")
        self._call("DELETE", "/_sim/requests")

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """What the simulator was asked, oldest first, optionally for one path."""
        log: list[dict[str, Any]] = self._call("GET", "/_sim/requests")
        return [r for r in log if path is None or r["path"] == path]

    def hung_up(self, path: str, model: str, timeout: float = 3.0) -> dict[str, Any]:
        """The last request for ``model`` once the simulator saw its client hang up (the
        gateway closing the upstream connection reaches it a moment after the client's answer).
        """
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.requests(path) if r["model"] == model]
            if (records and records[-1].get("closed_by_client")) or time.monotonic() > deadline:
                assert records, f"no request for {model} reached the simulator"
                return records[-1]
            time.sleep(0.02)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def backend(name: str, kind: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "url": url, **extra}


def gateway_config(*backends: dict[str, Any], **sections: Any) -> GatewayConfig:
    """A validated config, as if read from TOML, for the given backends."""
    server = {"port": 0, "shutdown_grace": 2.0, **sections.pop("server", {})}
    tasks = {"data_dir": tempfile.mkdtemp(prefix="gw-tasks-"), **sections.pop("tasks", {})}
    return parse_config({"server": server, "backends": list(backends), "tasks": tasks,
                         **sections}, source="<test>")


def start_gateway(config: GatewayConfig) -> ServerThread:
    return ServerThread(lambda: create_app(config)).start()


def wait_until(check: Callable[[], Any], limit: float, what: str) -> float:
    """Poll ``check`` until it is true; how long that took (fails past ``limit`` seconds)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < limit, f"{what} took over {limit}s"
        time.sleep(0.05)
    return time.monotonic() - started


NODE_DIR = Path(__file__).resolve().parent / "node"


def run_node(script: str, *args: str, timeout: float = 60) -> str:
    """Run one of tests/node's scripts with the Node SDKs run-tests installed there; what it
    printed (it fails the test if the script fails).
    """
    result = subprocess.run(["node", script, *args], cwd=NODE_DIR, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"node {script} failed:\n{result.stderr}"
    return result.stdout


GATEWAY = [sys.executable, "-m", "gateway"]


def wait_ready(url: str, process: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited early: {process.communicate()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


class GatewayProcess:
    """``gateway serve`` in a process of its own, as an operator runs it."""

    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*GATEWAY, "serve", "--config", str(config), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_ready(self.url + "/health", self.process)
        except BaseException:
            self.stop()
            raise

    def stopped_in(self, limit: float) -> float:
        """SIGTERM, as a service manager stops it; the seconds it took to exit (cleanly)."""
        self.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert self.process.wait(timeout=limit) == 0
        return time.monotonic() - started

    def stop(self) -> str:
        """Ends it (by its PID); what it printed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.communicate(timeout=15)[0]
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.communicate(timeout=10)[0]
