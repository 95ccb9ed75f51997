"""SSH tunnels the gateway owns: it opens them, keeps them up with jittered backoff, and tells
routing at once when one drops (every backend behind it is taken out of rotation, no request
waits for a timeout) and when it is back (the backends are probed and rejoin).

States: connecting → up (the session is up and the services behind it answer) or degraded
(session up, a service behind it down) → down when the link breaks → backing off → connecting.

A forward's local port belongs to the gateway for its whole life: while the tunnel is down a
placeholder listener holds it and turns connections away, so no other local program can
take the port and receive what was meant for the workstation.
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

from gateway.config import ConfigError, ForwardConfig, TunnelConfig
from gateway.runtime import end_loops
from gateway.tunnel.ssh import TunnelError, connect, keep_connected, make_interactive

log = logging.getLogger(__name__)

State = Literal["connecting", "up", "degraded", "down", "backing_off"]
LINK_CHECK_SECONDS = 2.0  # for the remote sshd to answer a channel's opening
REFUSAL_SECONDS = 5.0  # ... when `gateway check` asks why a service does not answer
LEAVING_SECONDS = 2.0  # for the link to close cleanly as the gateway stops
Listener = Callable[["Tunnel"], Awaitable[None] | None]


class Tunnel:
    """One SSH connection with local forwards, kept up for the gateway's lifetime."""

    def __init__(self, config: TunnelConfig) -> None:
        self.config = config
        self.name = config.name
        self._held = {f.name: _hold(f.local_port, config.name) for f in config.forwards}
        # Fixed for the process's life, so backends keep one URL across reconnects.
        self.ports = {name: sock.getsockname()[1] for name, sock in self._held.items()}
        self._placeholders: dict[str, asyncio.Server] = {}
        self._listeners: list[asyncssh.SSHListener] = []  # the forwards' while it is up
        self._connection: asyncssh.SSHClientConnection | None = None  # while it is up
        self._leaving: asyncssh.SSHClientConnection | None = None  # closed as it stops
        self.connected = False
        self.phase: State = "connecting"
        self.error = ""  # why the last attempt failed (no secrets: see ssh.explain)
        self.hint = ""
        self.reconnects = 0
        self.since = time.time()  # the phase's start
        self.down_since = time.time()  # when it was last up (start-up: when it began), or 0
        self.on_down: list[Listener] = []
        self.on_up: list[Listener] = []
        self.services_ok: Callable[[], bool] = lambda: True
        self._first = asyncio.Event()

    @property
    def state(self) -> State:
        if self.phase == "up" and not self.services_ok():
            return "degraded"
        return self.phase

    def url(self, forward: str) -> str:
        """The local URL of a forward (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.ports[forward]}"

    async def run(self) -> None:
        """Connect, forward, watch the link; when it breaks, back off and do it again."""
        await self._hold_ports()
        await keep_connected(self.config, self._session, self._failed, f"tunnel {self.name}")

    async def _session(self) -> float:
        """Connect and serve until the link drops; how long it was up."""
        self._set("connecting")
        try:
            connection = await self._open()
            self.error = self.hint = ""
            return await self._serve(connection)
        finally:
            self._first.set()
            self._set("backing_off")

    def _failed(self, exc: Exception) -> None:
        """Why the last attempt failed, for /health and ``gateway check`` (no secrets: see
        ``ssh.explain``)."""
        if isinstance(exc, TunnelError):
            self.error, self.hint = exc.message, exc.hint
        else:
            self.error, self.hint = f"unexpected failure: {type(exc).__name__}", ""

    async def refusal(self, forward: ForwardConfig) -> str:
        """Why the remote host's sshd will not open a forward's channel ("" if it will, or
        cannot be asked): a service that is down reads the same through the forward's port
        as an sshd that forbids forwarding.
        """
        failure = await self._open_channel(forward, REFUSAL_SECONDS)
        if isinstance(failure, asyncssh.ChannelOpenError) and \
                failure.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
            return (f"sshd on {self.config.host} forbids forwarding to {forward.remote_host}:"
                    f"{forward.remote_port}: set AllowTcpForwarding yes in its sshd_config "
                    "(and, if PermitOpen is set, let it name that port)")
        return ""

    async def check_link(self) -> None:
        """Whether the link still carries anything, asked now (a backend behind it stopped
        answering): a channel opened through it is answered at once, even refused; a link
        gone silent (a network that drops everything) is dropped, not left to its
        keepalives (three of them: 20 s by default, while requests through it wait).
        """
        connection = self._connection
        if connection is None or not self.config.forwards:
            return
        failure = await self._open_channel(self.config.forwards[0], LINK_CHECK_SECONDS)
        if isinstance(failure, TimeoutError) and connection is self._connection:
            log.warning("tunnel %s: the link did not answer within %gs; dropping it",
                        self.name, LINK_CHECK_SECONDS)
            connection.abort()

    async def _open_channel(self, forward: ForwardConfig, within: float
                            ) -> BaseException | None:
        """A channel opened to a forward's service and closed again: why it was not (None:
        it was, or there is no link to ask).
        """
        connection = self._connection
        if connection is None:
            return None
        try:
            async with asyncio.timeout(within):
                _, writer = await connection.open_connection(forward.remote_host,
                                                             forward.remote_port)
            writer.close()
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            return exc
        return None

    async def wait_first_attempt(self, patience: float) -> None:
        """Until the first connection attempt has succeeded or failed (or ``patience`` ran
        out): start-up gives a tunnel a moment before discovery asks through it.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                await self._first.wait()

    async def close(self) -> None:
        """After ``run`` is cancelled: the link closed cleanly, the ports given back."""
        if self._leaving is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(LEAVING_SECONDS):
                    await self._leaving.wait_closed()
            self._leaving = None
        await self._release_placeholders()
        for sock in self._held.values():
            sock.close()

    async def _open(self) -> asyncssh.SSHClientConnection:
        connection = await connect(self.config)
        try:
            await make_interactive(connection, self.config)
            await self._release_placeholders()
            for forward in self.config.forwards:
                self._listeners.append(await self._forward(connection, forward))
            if connection.is_closed():  # lost while the forwards were set up
                raise TunnelError(f"the connection of tunnel {self.name} dropped as it was "
                                  "set up", "it is dialled again")
        except BaseException:
            connection.close()
            await self._close_listeners()
            await self._hold_ports()
            raise
        return connection

    async def _forward(self, connection: asyncssh.SSHClientConnection,
                       forward: ForwardConfig) -> asyncssh.SSHListener:
        try:
            return await connection.forward_local_port(
                "127.0.0.1", self.ports[forward.name], forward.remote_host,
                forward.remote_port)
        except OSError as exc:
            raise TunnelError(f"cannot listen on 127.0.0.1:{self.ports[forward.name]} for "
                              f"tunnel {self.name}: {exc.strerror or exc}",
                              "another program took the port") from None

    async def _serve(self, connection: asyncssh.SSHClientConnection) -> float:
        """Until the link drops; how long it was up."""
        started = time.monotonic()
        self.connected, self._connection = True, connection
        log.info("tunnel %s is up (%s)", self.name, ", ".join(
            f"127.0.0.1:{self.ports[f.name]} → {f.remote_host}:{f.remote_port}"
            for f in self.config.forwards))
        self._set("up")
        self._first.set()
        try:
            await _notify(self.on_up, self)  # (inside: a stop meanwhile closes the link too)
            await connection.wait_closed()
        except asyncio.CancelledError:  # the gateway is stopping: close it (close() waits)
            connection.close()
            self._leaving = connection
            raise
        finally:
            self.connected, self._connection = False, None
            await self._close_listeners()
        self.reconnects += 1
        self._set("down")
        log.warning("tunnel %s dropped; the backends behind it are out of rotation", self.name)
        try:
            await self._hold_ports()
        finally:
            await _notify(self.on_down, self)
        return time.monotonic() - started

    async def _close_listeners(self) -> None:
        """The forwards' listeners closed: asyncssh closes them with their connection, but
        not one it was asked for after it had lost the connection, which would keep the port
        (and every later forward on it would fail).
        """
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()
        for listener in listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()

    async def _hold_ports(self) -> None:
        """Placeholders on every forward's port: connections are turned away at once."""
        loop = asyncio.get_running_loop()
        for name, port in self.ports.items():
            if name in self._placeholders:
                continue
            try:
                sock = self._held.pop(name, None) or _hold(port, self.name)
            except ConfigError as exc:  # (taken while the forward had it: tried again)
                raise TunnelError(str(exc), "the port is held again at the next try") from None
            self._placeholders[name] = await loop.create_server(_TurnAway, sock=sock)

    async def _release_placeholders(self) -> None:
        placeholders, self._placeholders = self._placeholders, {}
        for server in placeholders.values():
            server.close()
        for server in placeholders.values():
            await server.wait_closed()

    def _set(self, phase: State) -> None:
        if phase != self.phase:
            self.phase = phase
            self.since = time.time()
            if phase == "up":
                self.down_since = 0.0
            elif not self.down_since:
                self.down_since = self.since


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
        """The tunnel of a ``"tunnel/forward"`` reference."""
        return self.tunnels[reference.partition("/")[0]]

    async def start(self, patience: float = 5.0) -> None:
        self._tasks = [asyncio.create_task(t.run(), name=f"tunnel-{t.name}")
                       for t in self.tunnels.values()]
        await asyncio.gather(*(t.wait_first_attempt(patience) for t in self.tunnels.values()))

    async def close(self) -> None:
        await end_loops(self._tasks)
        await asyncio.gather(*(t.close() for t in self.tunnels.values()))

    def report(self) -> dict[str, dict[str, object]]:
        """For /health: states only (no hosts, no errors: /health needs no key)."""
        return {name: {"state": t.state, "since": int(t.since), "reconnects": t.reconnects}
                for name, t in self.tunnels.items()}


class _TurnAway(asyncio.Protocol):
    """What a held port does while its tunnel is down: refuse at once, say nothing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _hold(port: int, tunnel: str) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` (0: a free one), owned from now on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"tunnel {tunnel}: cannot listen on 127.0.0.1:{port} for a "
                          f"forward: {exc.strerror} (another program has the port?)") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _notify(listeners: list[Listener], tunnel: Tunnel) -> None:
    for listener in listeners:
        try:
            result = listener(tunnel)
            if result is not None:
                await result
        except Exception:
            log.exception("tunnel %s: a listener failed", tunnel.name)
