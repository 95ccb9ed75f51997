"""The other direction: ``gateway tunnel-agent`` runs on the workstation, connects to the
gateway server's sshd and asks it to listen on ``localhost:N`` for the workstation's
services (Ollama on 11434, MLX on 11435), keeping the forwards up with the same backoff as
the gateway's own tunnels. The gateway then sees them as ordinary local backends.
It can print a launchd plist or a systemd unit that starts it at boot.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import asyncssh

from gateway.backoff import backoff
from gateway.config import TunnelConfig
from gateway.runtime import end_loops
from gateway.tunnel.ssh import TunnelError, connect, keep_connected, make_interactive

log = logging.getLogger(__name__)

DEFAULT_FORWARDS = ("11434", "11435")  # Ollama and the MLX server, same ports on the server
LABEL = "io.hybrid-gateway.tunnel-agent"
ASK_AGAIN_FIRST = 2.0  # seconds before a forward the server refused is asked for again


@dataclass(frozen=True, slots=True)
class RemoteForward:
    """The server's ``127.0.0.1:listen_port`` → this machine's ``local_host:local_port``."""

    listen_port: int
    local_host: str
    local_port: int

    @classmethod
    def parse(cls, text: str) -> RemoteForward:
        """``"11434"``, ``"21434:11434"`` or ``"21434:127.0.0.1:11434"``."""
        parts = text.split(":")
        try:
            if len(parts) == 1:
                return cls(int(parts[0]), "127.0.0.1", int(parts[0]))
            if len(parts) == 2:
                return cls(int(parts[0]), "127.0.0.1", int(parts[1]))
            if len(parts) == 3:
                return cls(int(parts[0]), parts[1], int(parts[2]))
        except ValueError:
            pass
        raise ValueError(f"not a forward: {text!r} (expected SERVER_PORT[:HOST]:LOCAL_PORT)")

    def __str__(self) -> str:
        return f"server 127.0.0.1:{self.listen_port} → {self.local_host}:{self.local_port}"


def parse_forwards(texts: Sequence[str]) -> list[RemoteForward]:
    """Each ``--forward``; a server port given twice is a mistake (the server refuses it
    the second time)."""
    forwards = [RemoteForward.parse(text) for text in texts]
    ports = [forward.listen_port for forward in forwards]
    twice = sorted({port for port in ports if ports.count(port) > 1})
    if twice:
        raise ValueError(f"server port {twice[0]} is forwarded twice; give each port once")
    return forwards


class ReverseAgent:
    """Keeps remote forwards on the server for as long as it runs, reconnecting with
    jittered backoff when the link drops.
    """

    def __init__(self, ssh: TunnelConfig, forwards: list[RemoteForward]) -> None:
        self.ssh = ssh
        self.forwards = forwards
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Keep the forwards up for as long as the agent runs."""
        await keep_connected(self.ssh, self._session, lambda exc: None, "tunnel agent")

    async def _session(self) -> float:
        """Connect and keep the forwards until the link drops; how long it was up."""
        return await self._serve(await connect(self.ssh))

    async def _serve(self, connection: asyncssh.SSHClientConnection) -> float:
        try:
            await make_interactive(connection, self.ssh)
            refused = await self._request(connection, self.forwards)
            if len(refused) == len(self.forwards):
                raise refused[0][1]
            for _, exc in refused:  # (the others are up meanwhile)
                log.warning("tunnel agent: %s; asking again until it can", exc)
            log.info("tunnel agent: up: %s", "; ".join(
                str(f) for f in self.forwards if f not in dict(refused)))
            self.connected.set()
            started = time.monotonic()
            asking = [asyncio.create_task(self._ask_again(connection, [f for f, _ in refused]),
                                          name="tunnel agent: refused forwards")] if refused else []
            try:
                await connection.wait_closed()
            finally:
                await end_loops(asking)
            log.warning("tunnel agent: the connection to %s dropped", self.ssh.host)
            return time.monotonic() - started
        finally:
            self.connected.clear()
            connection.close()

    async def _request(self, connection: asyncssh.SSHClientConnection,
                       forwards: list[RemoteForward]) -> list[tuple[RemoteForward, TunnelError]]:
        """Asks the server to listen for each forward; those it refused, and why."""
        refused = []
        for forward in forwards:
            try:
                await connection.forward_remote_port(
                    "127.0.0.1", forward.listen_port, forward.local_host, forward.local_port)
            except (asyncssh.Error, asyncssh.ChannelListenError) as exc:
                # (a refusal is a ChannelListenError, which is no asyncssh.Error)
                reason = getattr(exc, "reason", None) or str(exc)
                refused.append((forward, TunnelError(
                    f"the server refused to listen on port {forward.listen_port}: {reason}",
                    "is AllowTcpForwarding on in sshd_config, and the port free on the "
                    "server? (an old session of this agent may still hold it until sshd's "
                    "ClientAliveInterval notices it is gone)")))
        return refused

    async def _ask_again(self, connection: asyncssh.SSHClientConnection,
                         refused: list[RemoteForward]) -> None:
        """The forwards the server refused, asked for again while the others are up (a port
        an old session held is freed once sshd notices that session is gone).
        """
        attempt = 0
        while refused:
            await asyncio.sleep(backoff(attempt, ASK_AGAIN_FIRST, self.ssh.backoff_max))
            attempt += 1
            still = dict(await self._request(connection, refused))
            for forward in refused:
                if forward not in still:
                    log.info("tunnel agent: up: %s", forward)
            refused = list(still)


def arguments(ssh: TunnelConfig, forwards: list[RemoteForward]) -> list[str]:
    """The command-line arguments that run an agent with these settings."""
    server = f"[{ssh.host}]" if ":" in ssh.host else ssh.host
    out = ["--server", f"{ssh.user}@{server}:{ssh.port}"]
    for flag, value in (("--key", ssh.key_file), ("--key-passphrase-env",
                                                   ssh.key_passphrase_env),
                        ("--password-env", ssh.password_env),
                        ("--known-hosts", ssh.known_hosts)):
        if value:
            out += [flag, value]
    out += [flag for flag, on in (("--no-agent", not ssh.agent),
                                  ("--accept-new", ssh.host_key == "accept-new"),
                                  ("--no-interactive", not ssh.interactive)) if on]
    out += ["--keepalive", f"{ssh.keepalive:g}"]
    for forward in forwards:
        out += ["--forward", f"{forward.listen_port}:{forward.local_host}:{forward.local_port}"]
    return out


def unit(ssh: TunnelConfig, forwards: list[RemoteForward], log_level: str,
         kind: str) -> str:
    """A systemd unit or a launchd plist that starts the agent at boot."""
    command = [sys.executable, "-m", "gateway", "--log-level", log_level, "tunnel-agent",
               *arguments(ssh, forwards)]
    return systemd_unit(command) if kind == "systemd" else launchd_plist(command)


def systemd_unit(command: list[str]) -> str:
    # systemd expands % specifiers and $ variables in ExecStart: escape both.
    line = shlex.join(command).replace("%", "%%").replace("$", "$$")
    return f"""[Unit]
Description=Hybrid gateway reverse tunnel (the workstation's models, served on the gateway)

[Service]
ExecStart={line}
Restart=always
RestartSec=5
# A password or key passphrase goes in an environment file, never on the command line:
# EnvironmentFile=%h/.config/hybrid-gateway/tunnel-agent.env
# On the server, sshd_config's ClientAliveInterval 15 frees the ports of a session whose
# network dropped; without it the agent's new session is refused them for hours.

[Install]
WantedBy=default.target
# As a user unit: systemctl --user enable --now gateway-tunnel-agent; and, to run without a
# login session, loginctl enable-linger $USER.
"""


def launchd_plist(command: list[str]) -> str:
    program = "\n".join(f"    <string>{escape(a)}</string>" for a in command)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key>
  <string>{LABEL}</string>
  <key>ProgramArguments</key>
  <array>
{program}
  </array>
  <key>RunAtLoad</key>
  <true/>
  <key>KeepAlive</key>
  <true/>
  <key>StandardErrorPath</key>
  <string>{escape(str(Path.home() / "Library" / "Logs" / (LABEL + ".log")))}</string>
</dict>
</plist>
"""
