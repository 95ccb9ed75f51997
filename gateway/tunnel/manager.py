"""SSH tunnels the gateway owns: it opens them, keeps them up with jittered backoff, and tells
routing at once when one drops (every backend behind it is taken out of rotation, no request
waits for a timeout) and when it is back (rediscovery, traffic returns).

States: connecting → up (the session is up and the services behind it answer) or degraded
(session up, a service behind it down) → down when the link breaks → backing off → connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import asyncssh

from gateway.config import TunnelConfig
from gateway.tunnel.ssh import TunnelError, backoff, connect, make_interactive

log = logging.getLogger(__name__)

State = Literal["connecting", "up", "degraded", "down", "backing_off"]
Listener = Callable[["Tunnel"], Awaitable[None] | None]


class Tunnel:
    """One SSH connection with local forwards, kept up for the gateway's lifetime."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.name = config.name
        # Fixed for the process's life, so backends keep one URL across reconnects.
        self.ports = {f.name: f.local_port or _free_port() for f in config.forwards}
        self.connected = False
        self.phase: State = "connecting"
        self.error = ""  # why the last attempt failed (no secrets: see ssh.explain)
        self.hint = ""
        self.reconnects = 0
        self.since = time.time()
        self.on_down: list[Listener] = []
        self.on_up: list[Listener] = []
        self.services_ok: Callable[[], bool] = lambda: True
        self._connection: asyncssh.SSHClientConnection | None = None
        self._first = asyncio.Event()

    @property
    def state(self) -> State:
        if self.phase == "up" and not self.services_ok():
            return "degraded"
        return self.phase

    def url(self, forward: str) -> str:
        return f"http://127.0.0.1:{self.ports[forward]}"

    async def run(self) -> None:
        """Connect, forward, watch the link; when it breaks, back off and do it again."""
        attempt = 0
        while True:
            self._set("connecting")
            try:
                connection = await connect(self.config)
                await make_interactive(connection, self.config)
                await self._forward(connection)
            except TunnelError as exc:
                self.error, self.hint = exc.message, exc.hint
                log.warning("tunnel %s: %s", self.name, exc)
            else:
                attempt = 0
                self.error = self.hint = ""
                await self._serve(connection)
            self._first.set()
            self._set("backing_off")
            await asyncio.sleep(backoff(attempt, self.config))
            attempt += 1

    async def wait_first_attempt(self, patience: float) -> None:
        """Until the first connection attempt has succeeded or failed (or ``patience`` ran
        out): start-up gives a tunnel a moment before discovery asks through it.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._first.wait()

    async def close(self) -> None:
        """After ``run`` is cancelled (which closes a live connection itself)."""
        if self._connection is not None:
            self._connection.close()

    async def _forward(self, connection: asyncssh.SSHClientConnection) -> None:
        try:
            for forward in self.config.forwards:
                await connection.forward_local_port(
                    "127.0.0.1", self.ports[forward.name], forward.remote_host,
                    forward.remote_port)
        except OSError as exc:
            connection.close()
            raise TunnelError(f"cannot listen on a local port for tunnel {self.name}: "
                              f"{exc.strerror or exc}", "is the port taken?") from None

    async def _serve(self, connection: asyncssh.SSHClientConnection) -> None:
        self._connection = connection
        self.connected = True
        if self.reconnects or self._first.is_set():
            log.info("tunnel %s is back", self.name)
        else:
            log.info("tunnel %s is up (%s)", self.name, ", ".join(
                f"127.0.0.1:{self.ports[f.name]} → {f.remote_host}:{f.remote_port}"
                for f in self.config.forwards))
        self._set("up")
        self._first.set()
        await _notify(self.on_up, self)
        try:
            await connection.wait_closed()
        except asyncio.CancelledError:  # the gateway is stopping: close it ourselves
            connection.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await connection.wait_closed()
            raise
        finally:
            self.connected = False
            self._connection = None
        self.reconnects += 1
        self._set("down")
        log.warning("tunnel %s dropped; the backends behind it are out of rotation", self.name)
        await _notify(self.on_down, self)

    def _set(self, phase: State) -> None:
        if phase != self.phase:
            self.phase = phase
            self.since = time.time()


class TunnelManager:
    """Every configured tunnel, run for the app's lifetime."""

    def __init__(self, configs: tuple[TunnelConfig, ...]) -> None:
        self.tunnels = {c.name: Tunnel(c) for c in configs}
        self._tasks: list[asyncio.Task[None]] = []

    def url(self, reference: str) -> str:
        """``"tunnel/forward"`` → the forward's local URL."""
        tunnel, _, forward = reference.partition("/")
        return self.tunnels[tunnel].url(forward)

    def tunnel_of(self, reference: str) -> Tunnel:
        return self.tunnels[reference.partition("/")[0]]

    async def start(self, patience: float = 5.0) -> None:
        self._tasks = [asyncio.create_task(t.run(), name=f"tunnel-{t.name}")
                       for t in self.tunnels.values()]
        await asyncio.gather(*(t.wait_first_attempt(patience) for t in self.tunnels.values()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(t.close() for t in self.tunnels.values()))

    def report(self) -> dict[str, dict[str, object]]:
        """For /health: states only (no hosts, no errors: /health needs no key)."""
        return {name: {"state": t.state, "since": int(t.since), "reconnects": t.reconnects}
                for name, t in self.tunnels.items()}


async def _notify(listeners: list[Listener], tunnel: Tunnel) -> None:
    for listener in listeners:
        try:
            result = listener(tunnel)
            if result is not None:
                await result
        except Exception:
            log.exception("tunnel %s: a listener failed", tunnel.name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
