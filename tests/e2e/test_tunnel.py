"""Tunnels against real SSH servers on loopback: OpenSSH's sshd and asyncssh's own server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import openai
import pytest

from gateway.config import AlertRule, ForwardConfig, TunnelConfig
from gateway.keys import TUNNELS
from gateway.sim import SimModel, create_ollama_app, create_openai_app
from gateway.sim.fleet import DEFAULT_REPLY
from gateway.tunnel.manager import TunnelManager
from tests import ssh_peers
from tests.e2e.conftest import TUNNEL_MODEL
from tests.ssh_peers import AsyncSSHServer, Keys, Link, OpenSSHServer
from tests.support import (
    ServerThread,
    Sim,
    backend,
    free_port,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

USER = [{"role": "user", "content": "Hello"}]
MODEL = TUNNEL_MODEL  # what the workstation fixture serves


@pytest.fixture
def light() -> Iterator[Sim]:
    """A light model on the gateway's own server: the fallback tier."""
    server = ServerThread(lambda: create_openai_app([SimModel("smollm2:135m")],
                                                    flavor="llamacpp")).start()
    yield Sim(server, "llamacpp")
    server.stop()


def tunnel_config(keys: Keys, port: int, workstation: Sim, light: Sim | None = None,
                  **tunnel: Any) -> Any:
    backends = [backend("studio", "ollama", "", tunnel="studio/ollama",
                        timeouts={"connect": 1.0, "first_token": 2.0, "idle": 2.0})]
    if light is not None:
        backends.append(backend("light", "openai", light.api_url, tier="server"))
    settings = {"name": "studio", "host": "127.0.0.1", "port": port, "user": "root",
                "key_file": str(keys.client), "agent": False,
                "known_hosts": str(keys.known_hosts(port)), "keepalive": 1.0,
                "backoff_initial": 0.2, "backoff_max": 1.0,
                "forwards": [{"name": "ollama", "remote_port": workstation.server.port}],
                **tunnel}
    # A slow health watch: what happens at once must come from the tunnel's own signals.
    return gateway_config(*backends, tunnels=[settings], routing={"health_interval": 30.0})


def client(gateway: ServerThread) -> openai.OpenAI:
    return openai_client(gateway.url)


def health(gateway: ServerThread) -> dict[str, Any]:
    with urllib.request.urlopen(gateway.url + "/health", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


@pytest.mark.parametrize("server_kind", ["openssh", "asyncssh"])
def test_chat_through_the_tunnel_with_the_sdk_streaming(
    keys: Keys, workstation: Sim, server_kind: str
) -> None:
    server = OpenSSHServer(keys).start() if server_kind == "openssh" else \
        AsyncSSHServer(keys).start()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation))
    try:
        with client(gateway) as c:
            stream = c.chat.completions.create(model=MODEL, messages=USER, stream=True)
            text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            reply = c.chat.completions.create(model=MODEL, messages=USER)
        assert text == DEFAULT_REPLY == reply.choices[0].message.content
        assert len(workstation.requests("/api/chat")) == 2  # it went through the tunnel
        assert health(gateway)["tunnels"]["studio"]["state"] == "up"
    finally:
        gateway.stop()
        server.kill() if isinstance(server, OpenSSHServer) else server.stop()


def test_sshd_killed_then_restarted(keys: Keys, workstation: Sim, light: Sim) -> None:
    sshd = OpenSSHServer(keys).start()
    gateway = start_gateway(tunnel_config(keys, sshd.port, workstation, light))
    try:
        with client(gateway) as c:
            raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
            assert raw.headers["x-gateway-backend"] == "studio"
            sshd.kill()
            took = wait_until(lambda: not health(gateway)["backends"]["studio"]["ok"], 2.0,
                              "marking the backend behind the tunnel down")
            assert health(gateway)["tunnels"]["studio"]["state"] != "up"
            for _ in range(3):  # served by the server tier meanwhile, without waiting
                started = time.monotonic()
                raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
                assert raw.headers["x-gateway-backend"] == "light"
                assert raw.parse().choices[0].message.content == DEFAULT_REPLY
                assert time.monotonic() - started < 0.5
            sshd = OpenSSHServer(keys, port=sshd.port).start()

            def primary_again() -> bool:
                r = c.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
                return r.headers["x-gateway-backend"] == "studio"

            back = wait_until(primary_again, 5.0, "the primary serving again")
        print(f"down noticed in {took:.2f}s; primary back {back:.2f}s after sshd restarted")
    finally:
        gateway.stop()
        sshd.kill()


def test_the_monitor_restores_the_tunnel_with_no_request_arriving(
    keys: Keys, workstation: Sim
) -> None:
    sshd = OpenSSHServer(keys).start()
    config = tunnel_config(keys, sshd.port, workstation)
    config = dataclasses.replace(config, monitor=dataclasses.replace(
        config.monitor, interval=0.2, resolve_after=0.0, group_window=0.0,
        alerts=(AlertRule("tunnel_down", after=0.3),)))
    gateway = start_gateway(config)

    def status() -> dict[str, Any]:
        with urllib.request.urlopen(gateway.url + "/admin/status", timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    try:
        assert status()["tunnels"]["studio"]["state"] == "up"
        asked = len(workstation.requests("/api/chat"))
        sshd.kill()
        wait_until(lambda: status()["alerts"]["firing"], 10, "the tunnel_down alert")
        assert not status()["ready"]
        sshd = OpenSSHServer(keys, port=sshd.port).start()
        wait_until(lambda: status()["tunnels"]["studio"]["state"] == "up" and status()["ready"],
                   15, "the tunnel restored")
        done = status()
        assert [a["target"] for a in done["healing"] if a["action"] == "reconnect_tunnel"
                and a["outcome"] == "ok"] == ["studio"]
        assert done["backends"]["studio"]["up"] is True
        wait_until(lambda: [n["status"] for n in status()["alerts"]["recent"]] ==
                   ["resolved", "firing"], 5, "the alert resolved")
        assert len(workstation.requests("/api/chat")) == asked  # no request was needed
    finally:
        gateway.stop()
        sshd.kill()


def test_a_stream_in_flight_when_the_tunnel_drops_is_rescued(
    keys: Keys, workstation: Sim, light: Sim
) -> None:
    workstation.fault(MODEL, tokens_per_s=20)  # ~1.5 s for the whole answer
    sshd = OpenSSHServer(keys).start()
    gateway = start_gateway(tunnel_config(keys, sshd.port, workstation, light))
    try:
        with client(gateway) as c:
            stream = c.chat.completions.create(model=MODEL, messages=USER, stream=True)
            pieces = []
            for chunk in stream:
                pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                if len(pieces) == 5:
                    sshd.kill()  # mid-answer
        assert "".join(pieces) == DEFAULT_REPLY  # whole, once: continued on the light model
        assert len(light.requests()) == 1
    finally:
        gateway.stop()
        sshd.kill()


def tunnel_error(gateway: ServerThread) -> tuple[str, str, str]:
    assert gateway.app is not None
    tunnel = gateway.app[TUNNELS].tunnels["studio"]
    wait_until(lambda: bool(tunnel.error), 5.0, "the first connection attempt")
    return tunnel.state, tunnel.error, tunnel.hint


def test_a_wrong_host_key_is_refused_with_a_clear_message(keys: Keys, workstation: Sim) -> None:
    impostor = AsyncSSHServer(keys, host_key=keys.other_host).start()
    gateway = start_gateway(tunnel_config(keys, impostor.port, workstation))
    try:
        state, error, hint = tunnel_error(gateway)
        assert state != "up"
        offered = asyncssh.read_private_key(str(keys.other_host))
        assert error == f"the host key of 127.0.0.1:{impostor.port} does not match the " \
            f"one in {keys.known_hosts(impostor.port)} (it offered " \
            f"{offered.get_fingerprint()})"
        assert "someone may be in the middle" in hint
        assert not workstation.requests()
    finally:
        gateway.stop()
        impostor.stop()


def test_an_unknown_host_key_is_refused_unless_accept_new(
    keys: Keys, workstation: Sim, tmp_path: Path
) -> None:
    server = AsyncSSHServer(keys).start()
    empty = tmp_path / "known_hosts"
    gateway = start_gateway(tunnel_config(keys, server.port, workstation,
                                          known_hosts=str(empty)))
    try:
        _, error, hint = tunnel_error(gateway)
        assert "is not known" in error and "ssh-keyscan" in hint and "accept-new" in hint
    finally:
        gateway.stop()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation,
                                          known_hosts=str(empty), host_key="accept-new"))
    try:
        with client(gateway) as c:
            assert c.chat.completions.create(model=MODEL, messages=USER).choices
        assert f"[127.0.0.1]:{server.port} ssh-ed25519 " in empty.read_text()
    finally:
        gateway.stop()
        server.stop()
    # The key is now on record: a server answering there with another key is refused.
    impostor = AsyncSSHServer(keys, host_key=keys.other_host)
    impostor.port = server.port
    impostor.start()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation,
                                          known_hosts=str(empty), host_key="accept-new"))
    try:
        _, error, _ = tunnel_error(gateway)
        assert "does not match" in error
    finally:
        gateway.stop()
    # ... also when the config names it otherwise: the key is on record for its address.
    known = empty.read_text()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation, host="localhost",
                                          known_hosts=str(empty), host_key="accept-new"))
    try:
        _, error, _ = tunnel_error(gateway)
        assert "does not match" in error
        assert empty.read_text() == known  # and it is not recorded
    finally:
        gateway.stop()
        impostor.stop()


def test_a_wrong_password_is_refused_and_never_shown(
    keys: Keys, workstation: Sim, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # asyncssh's own messages included
    server = AsyncSSHServer(keys).start()
    monkeypatch.setenv("STUDIO_PASSWORD", "hunter2-not-the-password")
    gateway = start_gateway(tunnel_config(keys, server.port, workstation, key_file="",
                                          password_env="STUDIO_PASSWORD"))
    try:
        _state, error, hint = tunnel_error(gateway)
        assert error == f"root@127.0.0.1:{server.port} refused to authenticate 'root'"
        assert "password from $STUDIO_PASSWORD" in hint
        shown = error + hint + json.dumps(health(gateway)) + caplog.text
        assert "hunter2" not in shown
    finally:
        gateway.stop()
    monkeypatch.setenv("STUDIO_PASSWORD", ssh_peers.PASSWORD)
    gateway = start_gateway(tunnel_config(keys, server.port, workstation, key_file="",
                                          password_env="STUDIO_PASSWORD"))
    try:
        with client(gateway) as c:
            assert c.chat.completions.create(model=MODEL, messages=USER).choices
    finally:
        gateway.stop()
        server.stop()


def test_a_key_ssh_keygen_wrote_with_a_passphrase_is_used(
    keys: Keys, workstation: Sim, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """ssh-keygen writes OpenSSH's own format, whose passphrase takes bcrypt to open (it was
    not installed: every passphrase, right or wrong, was "cannot use the key").
    """
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "open sesame 42", "-f", str(key)],
                   check=True)
    with keys.authorized_keys.open("a") as authorized:
        authorized.write(key.with_suffix(".pub").read_text())
    server = OpenSSHServer(keys).start()
    caplog.set_level(logging.DEBUG)
    try:
        monkeypatch.setenv("STUDIO_KEY_PASSPHRASE", "not it")
        gateway = start_gateway(tunnel_config(keys, server.port, workstation, key_file=str(key),
                                              key_passphrase_env="STUDIO_KEY_PASSPHRASE"))
        try:
            _state, error, hint = tunnel_error(gateway)
            assert error.startswith(f"cannot use the key {key}") and "bcrypt" not in error
            assert "key_passphrase_env" in hint and "not it" not in error + hint + caplog.text
        finally:
            gateway.stop()
        monkeypatch.setenv("STUDIO_KEY_PASSPHRASE", "open sesame 42")
        gateway = start_gateway(tunnel_config(keys, server.port, workstation, key_file=str(key),
                                              key_passphrase_env="STUDIO_KEY_PASSPHRASE"))
        try:
            with client(gateway) as c:
                answer = c.chat.completions.create(model=MODEL, messages=USER)
            assert answer.choices[0].message.content == DEFAULT_REPLY
            assert "open sesame" not in caplog.text
        finally:
            gateway.stop()
    finally:
        server.kill()


async def test_a_stop_while_the_tunnels_up_listeners_run_closes_the_link(
        keys: Keys, workstation: Sim) -> None:
    """The gateway stopped while it probed the backends behind a tunnel just up: the SSH
    session stayed open, and the forward's port went on taking connections.
    """
    server = AsyncSSHServer(keys).start()
    manager = TunnelManager((TunnelConfig(
        name="studio", host="127.0.0.1", port=server.port, user="root",
        key_file=str(keys.client), agent=False, known_hosts=str(keys.known_hosts(server.port)),
        forwards=(ForwardConfig(name="ollama", remote_port=workstation.server.port),)),))
    tunnel = manager.tunnels["studio"]
    probing = asyncio.Event()

    async def probe(_tunnel: object) -> None:  # (the app's probe of the backends behind it)
        probing.set()
        await asyncio.sleep(30)

    tunnel.on_up.append(probe)
    try:
        await manager.start(patience=5)
        await asyncio.wait_for(probing.wait(), 5)
        await manager.close()
        await asyncio.sleep(0.5)
        assert [c for c in server._connections if not c.is_closed()] == []
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", tunnel.ports["ollama"])) != 0
    finally:
        server.stop()


async def test_a_link_gone_silent_is_dropped_when_a_backend_behind_it_stops_answering(
        keys: Keys, workstation: Sim) -> None:
    """A network that drops everything: the backend's probe times out, and the requests
    waiting on the link waited for three missed keepalives (20 s by default). Asked at once,
    a silent link is dropped within seconds; one that answers is kept.
    """
    server = AsyncSSHServer(keys).start()
    link = await Link(server.port).start()
    manager = TunnelManager((TunnelConfig(
        name="studio", host="127.0.0.1", port=link.port, user="root",
        key_file=str(keys.client), agent=False, known_hosts=str(keys.known_hosts(link.port)),
        keepalive=60.0,
        forwards=(ForwardConfig(name="ollama", remote_port=workstation.server.port),)),))
    tunnel = manager.tunnels["studio"]
    try:
        await manager.start(patience=5)
        assert tunnel.connected
        await tunnel.check_link()
        assert tunnel.connected  # (it answered)
        link.black_hole()
        dropped = asyncio.Event()
        tunnel.on_down.append(lambda _tunnel: dropped.set())
        started = time.monotonic()
        await tunnel.check_link()
        await asyncio.wait_for(dropped.wait(), 10)
        assert time.monotonic() - started < 4
    finally:
        await manager.close()
        await link.stop()
        server.stop()


def test_a_link_lost_as_the_tunnel_is_set_up_is_dialled_again(
        keys: Keys, workstation: Sim) -> None:
    """The server hangs up right after the login, once (restarting, or a blip at that
    moment). The forward set up on the lost connection used to keep its port, every later
    try failed on it, and the tunnel never came back. It is dialled again, and carries
    requests.
    """
    server = AsyncSSHServer(keys, hang_ups=1).start()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation))
    try:
        wait_until(lambda: health(gateway)["tunnels"]["studio"]["state"] == "up", 10.0,
                   "the tunnel up")
        with client(gateway) as c:
            answer = c.chat.completions.create(model=MODEL, messages=USER)
        assert answer.choices[0].message.content == DEFAULT_REPLY
        assert len(server._connections) == 2
    finally:
        gateway.stop()
        server.stop()


def test_health_lists_the_tunnel_states(keys: Keys, workstation: Sim) -> None:
    server = AsyncSSHServer(keys).start()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation))
    try:
        states = health(gateway)["tunnels"]
        assert states["studio"]["state"] == "up" and states["studio"]["reconnects"] == 0
        assert health(gateway)["backends"]["studio"]["tunnel"] == "studio"  # the one it is behind
        server.stop()
        wait_until(lambda: health(gateway)["tunnels"]["studio"]["state"] != "up", 3.0,
                   "the tunnel leaving the up state")
        assert health(gateway)["tunnels"]["studio"]["reconnects"] == 1
    finally:
        gateway.stop()


def test_degraded_when_the_service_behind_the_tunnel_is_down(keys: Keys) -> None:
    server = AsyncSSHServer(keys).start()
    nothing = Sim(ServerThread(lambda: create_ollama_app([])), "ollama")  # never started
    nothing.server.port = free_port()
    gateway = start_gateway(tunnel_config(keys, server.port, nothing))
    try:
        wait_until(lambda: health(gateway)["tunnels"]["studio"]["state"] == "degraded", 5.0,
                   "noticing the service behind the tunnel is down")
        assert health(gateway)["backends"]["studio"]["ok"] is False
    finally:
        gateway.stop()
        server.stop()


def test_the_tunnel_holds_a_pty_session_so_sshd_sends_without_delay(
    keys: Keys, workstation: Sim
) -> None:
    server = AsyncSSHServer(keys).start()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation))
    try:
        assert server.sessions == [("dumb", "cat")]
    finally:
        gateway.stop()
        server.stop()
    server = AsyncSSHServer(keys).start()
    gateway = start_gateway(tunnel_config(keys, server.port, workstation, interactive=False))
    try:
        with client(gateway) as c:
            assert c.chat.completions.create(model=MODEL, messages=USER).choices
        assert server.sessions == []
    finally:
        gateway.stop()
        server.stop()


def test_the_users_own_ssh_setup_is_not_consulted(
    keys: Keys, workstation: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A home whose ssh config would trust anything, and whose known_hosts trusts an
    # impostor: strict checking against the configured (missing) file must still refuse.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile none\n")
    impostor = AsyncSSHServer(keys, host_key=keys.other_host).start()
    (home / ".ssh" / "known_hosts").write_text(
        keys.known_hosts(impostor.port, keys.other_host).read_text())
    monkeypatch.setenv("HOME", str(home))
    gateway = start_gateway(tunnel_config(keys, impostor.port, workstation,
                                          known_hosts=str(tmp_path / "missing")))
    try:
        _, error, _ = tunnel_error(gateway)
        assert "is not known" in error
        assert not workstation.requests()
    finally:
        gateway.stop()
        impostor.stop()
