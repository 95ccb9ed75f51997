"""Real SSH servers on loopback for the tunnel tests: OpenSSH's ``sshd`` (its own config, a free
port, generated host and client keys) and asyncssh's own server, in a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

SSHD = "/usr/sbin/sshd"
PASSWORD = "correct horse battery staple"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Keys:
    folder: Path
    client: Path  # private key file (OpenSSH format, mode 600)
    host: Path  # the server's host key
    other_host: Path  # a host key nobody trusts: a server that is not who it claims
    authorized_keys: Path

    def known_hosts(self, port: int, host_key: Path | None = None) -> Path:
        """A known_hosts file that trusts ``host_key`` (default: the host key) on the port."""
        key = asyncssh.read_private_key(str(host_key or self.host))
        path = self.folder / f"known_hosts-{port}-{(host_key or self.host).name}"
        path.write_text(f"[127.0.0.1]:{port} {key.export_public_key().decode().strip()}\n")
        return path


def make_keys(folder: Path) -> Keys:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("client", "host", "other_host"):
        key = asyncssh.generate_private_key("ssh-ed25519")
        path = folder / f"{name}_ed25519"
        key.write_private_key(str(path))
        path.chmod(0o600)
        key.write_public_key(str(path) + ".pub")
        paths[name] = path
    authorized = folder / "authorized_keys"
    authorized.write_text(Path(str(paths["client"]) + ".pub").read_text())
    return Keys(folder, paths["client"], paths["host"], paths["other_host"], authorized)


class OpenSSHServer:
    """``sshd -D`` with its own config; ``kill()`` takes it down with every session it
    forked, as a crash of the machine's sshd would.
    """

    def __init__(self, keys: Keys, port: int | None = None, forwarding: str = "yes") -> None:
        self.keys = keys
        self.port = port or free_port()
        self.forwarding = forwarding  # sshd_config's AllowTcpForwarding
        self.config = keys.folder / f"sshd_config-{self.port}"
        self.log = keys.folder / f"sshd-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OpenSSHServer:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation
        self.config.write_text(f"""
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.keys.host}
PidFile {self.keys.folder}/sshd-{self.port}.pid
AuthorizedKeysFile {self.keys.authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin yes
UsePAM no
StrictModes no
AllowTcpForwarding {self.forwarding}
GatewayPorts no
ClientAliveInterval 2
LogLevel VERBOSE
""")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        _wait_for_port(self.port, self.process, self.log)
        return self

    def kill(self) -> None:
        if self.process is not None:
            _kill_tree(self.process.pid)
            self.process.wait(timeout=10)
            self.process = None


class AsyncSSHServer:
    """asyncssh's own server: key and password auth, local and remote forwarding allowed.
    Runs in a thread with its own event loop. ``hang_ups``: on its first connections, this
    many, it hangs up right after the login (a restart or a blip at that moment).
    """

    def __init__(self, keys: Keys, host_key: Path | None = None, hang_ups: int = 0) -> None:
        self.keys = keys
        self.hang_ups = hang_ups
        self.host_key = host_key or keys.host
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncssh.SSHAcceptor | None = None
        self._connections: list[asyncssh.SSHServerConnection] = []
        self.sessions: list[tuple[str | None, str | None]] = []  # (terminal type, command)

    def start(self) -> AsyncSSHServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        connections = self._connections
        hang_ups = self.hang_ups

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                connections.append(conn)
                self.conn = conn

            def auth_completed(self) -> None:
                if len(connections) <= hang_ups:
                    self.conn.abort()

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return password == PASSWORD

            def connection_requested(self, *args: object) -> bool:
                return True  # local forwards (direct-tcpip)

            def server_requested(self, *args: object) -> bool:
                return True  # remote forwards

        sessions = self.sessions

        async def session(process: asyncssh.SSHServerProcess[str]) -> None:
            sessions.append((process.get_terminal_type(), process.command))
            async for _ in process.stdin:  # like `cat`: until the client goes
                pass
            process.exit(0)

        self._server = await asyncssh.create_server(
            Server, "127.0.0.1", self.port, server_host_keys=[str(self.host_key)],
            authorized_client_keys=str(self.keys.authorized_keys), process_factory=session)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for conn in self._connections:
                conn.abort()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on {port}: {log.read_text()[-2000:]}")


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and every process it started (sshd's sessions run in sessions of their
    own, out of reach of a process-group signal).
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    doomed, stack = [], [pid]
    while stack:
        current = stack.pop()
        doomed.append(current)
        stack.extend(children.get(current, []))
    for victim in reversed(doomed):
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


class Link:
    """A TCP relay to ``port`` that can go silent (``black_hole()``): bytes stop moving both
    ways and no connection is closed, as a network that drops everything does. Runs on the
    test's event loop.
    """

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.silent = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> Link:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def black_hole(self) -> None:
        self.silent.set()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        their_reader, their_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, their_writer]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if self.silent.is_set():
                    await asyncio.Event().wait()  # (lost, and nothing more: ever)
                sink.write(data)
                await sink.drain()

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(pump(reader, their_writer), pump(their_reader, writer))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._relays:
            task.cancel()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
