"""The workstation's reverse-tunnel agent and `gateway check`, as a user runs them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import TUNNEL_MODEL
from tests.ssh_peers import AsyncSSHServer, Keys, OpenSSHServer
from tests.support import (
    Sim,
    backend,
    free_port,
    gateway_config,
    start_gateway,
    wait_until,
)

GATEWAY = [sys.executable, "-m", "gateway"]
MODEL = TUNNEL_MODEL  # what the workstation fixture serves


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def run_agent(keys: Keys, sshd: OpenSSHServer, listen: int,
              workstation: Sim, *more: int) -> subprocess.Popen[str]:
    """``gateway tunnel-agent`` asking ``sshd`` to listen on ``listen`` (and each port of
    ``more``) for the workstation.
    """
    forwards = [arg for port in (listen, *more)
                for arg in ("--forward", f"{port}:127.0.0.1:{workstation.server.port}")]
    return subprocess.Popen(
        [*GATEWAY, "tunnel-agent", "--server", f"root@127.0.0.1:{sshd.port}",
         "--key", str(keys.client), "--no-agent",
         "--known-hosts", str(keys.known_hosts(sshd.port)), *forwards],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_reverse_agent_keeps_its_forward_through_an_sshd_restart(
    keys: Keys, workstation: Sim
) -> None:
    sshd = OpenSSHServer(keys).start()
    listen = free_port()  # on the "server" side: where the gateway will find the workstation
    agent = run_agent(keys, sshd, listen, workstation)
    server_side = f"http://127.0.0.1:{listen}"
    gateway = None
    try:
        wait_until(lambda: answers(server_side), 10, "the forward appearing on the server")
        gateway = start_gateway(gateway_config(backend("studio", "ollama", server_side)))
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as c:
            reply = c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content
        sshd.kill()
        wait_until(lambda: not answers(server_side), 5, "the forward going with sshd")
        sshd = OpenSSHServer(keys, port=sshd.port).start()
        back = wait_until(lambda: answers(server_side), 10, "the forward coming back")
        print(f"forward back {back:.2f}s after sshd restarted")
    finally:
        if gateway is not None:
            gateway.stop()
        agent.terminate()
        output, _ = agent.communicate(timeout=10)
        sshd.kill()
    assert "tunnel agent: up" in output and "dropped" in output


def test_reverse_agent_says_why_the_server_refused_its_port(keys: Keys, workstation: Sim
                                                            ) -> None:
    """The port is taken on the server (its own Ollama, or the agent's old session that sshd
    has not yet noticed is gone): the agent said so with a traceback on every try, never
    with its own words.
    """
    sshd = OpenSSHServer(keys).start()
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    agent = run_agent(keys, sshd, port, workstation)
    try:
        time.sleep(4)
    finally:
        agent.terminate()
        output, _ = agent.communicate(timeout=10)
        taken.close()
        sshd.kill()
    assert f"the server refused to listen on port {port}" in output, output
    assert "ClientAliveInterval" in output and "Traceback" not in output


def test_reverse_agent_keeps_the_forwards_it_got_and_asks_again_for_a_refused_one(
        keys: Keys, workstation: Sim) -> None:
    """One forward's port is taken on the server (the agent's old session holds it until
    sshd notices that session is gone), another's is free: the free one serves at once (a
    refusal dropped them all, and the agent redialled for ever), and the refused one comes
    up once its port is free.
    """
    sshd = OpenSSHServer(keys).start()
    taken = socket.create_server(("127.0.0.1", 0))
    busy, free = taken.getsockname()[1], free_port()
    agent = run_agent(keys, sshd, busy, workstation, free)
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{free}"), 10, "the free port's forward")
        taken.close()
        wait_until(lambda: answers(f"http://127.0.0.1:{busy}"), 15,
                   "the refused forward, once its port is free")
        assert answers(f"http://127.0.0.1:{free}")
    finally:
        agent.terminate()
        output, _ = agent.communicate(timeout=10)
        taken.close()
        sshd.kill()
    assert f"the server refused to listen on port {busy}" in output, output
    assert "asking again until it can" in output and "Traceback" not in output, output
    assert "dropped" not in output, output  # (one session all along)

@pytest.mark.parametrize("flag", ["--print-systemd", "--print-launchd"])
def test_agent_prints_a_boot_unit_with_the_users_arguments(flag: str, tmp_path: Path) -> None:
    args = ["--server", "me@gateway.example:2222", "--key", "id_ed25519",
            "--forward", "11434", "--accept-new", "--password-env", "GW_PASS"]
    result = subprocess.run([*GATEWAY, "--log-level", "debug", "tunnel-agent", *args, flag],
                            capture_output=True, text=True, timeout=30, check=True,
                            cwd=tmp_path)
    expected = [sys.executable, "-m", "gateway", "--log-level", "debug", "tunnel-agent",
                "--server", "me@gateway.example:2222", "--key", str(tmp_path / "id_ed25519"),
                "--password-env", "GW_PASS"]
    if flag == "--print-systemd":
        exec_line = next(line for line in result.stdout.splitlines()
                         if line.startswith("ExecStart="))
        assert exec_line.startswith("ExecStart=" + " ".join(expected))
        assert "--accept-new" in exec_line and "--forward 11434:127.0.0.1:11434" in exec_line
        assert "Restart=always" in result.stdout
    else:
        strings = [line.strip()[len("<string>"):-len("</string>")]
                   for line in result.stdout.splitlines() if line.strip().startswith("<string>")]
        assert strings[1:1 + len(expected)] == expected  # [0] is the label
        assert "<key>KeepAlive</key>" in result.stdout
    assert "--print-" not in result.stdout
    # Settings are checked as a config's [[tunnels]] are: a unit that loops for ever on a
    # keepalive of -1 is not written.
    for bad, said in ((["--keepalive", "-1"], "--keepalive: expected seconds > 0"),
                      (["--keepalive", "nan"], "--keepalive: expected seconds > 0"),
                      (["--password-env", "hunter2!"], "--password-env: expected the name")):
        result = subprocess.run([*GATEWAY, "tunnel-agent", *args, *bad, flag],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert "ExecStart" not in result.stdout and "hunter2" not in result.stderr


def write_check_config(path: Path, keys: Keys, port: int, remote_port: int,
                       extra: str = "", known_hosts: Path | None = None) -> Path:
    path.write_text(f"""
[[tunnels]]
name = "studio"
host = "127.0.0.1"
port = {port}
user = "root"
agent = false
known_hosts = "{known_hosts or keys.known_hosts(port)}"
connect_timeout = 3.0
{extra}
forwards = [{{ name = "ollama", remote_port = {remote_port} }}]

[[backends]]
name = "studio"
kind = "ollama"
tunnel = "studio/ollama"
""")
    return path


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, "check", "--config", str(config)], capture_output=True,
                          text=True, timeout=60)


def test_check_reports_a_working_tunnel(keys: Keys, workstation: Sim, tmp_path: Path) -> None:
    server = AsyncSSHServer(keys).start()
    try:
        result = run_check(write_check_config(tmp_path / "g.toml", keys, server.port,
                                              workstation.server.port,
                                              f'key_file = "{keys.client}"'))
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tunnel studio  root@127.0.0.1:{server.port}  up" in result.stdout
    assert "backend studio  (ollama, primary, via tunnel studio/ollama)  OK" in result.stdout


def test_check_explains_an_unknown_host_key(keys: Keys, workstation: Sim,
                                            tmp_path: Path) -> None:
    server = AsyncSSHServer(keys).start()
    try:
        result = run_check(write_check_config(tmp_path / "g.toml", keys, server.port,
                                              workstation.server.port,
                                              f'key_file = "{keys.client}"',
                                              known_hosts=tmp_path / "empty"))
    finally:
        server.stop()
    assert result.returncode == 1
    assert "is not known" in result.stdout and "ssh-keyscan -p" in result.stdout
    assert "the tunnel studio is down" in result.stdout


def test_check_explains_a_service_down_behind_the_tunnel(keys: Keys, tmp_path: Path) -> None:
    server = AsyncSSHServer(keys).start()
    try:
        result = run_check(write_check_config(tmp_path / "g.toml", keys, server.port,
                                              free_port(), f'key_file = "{keys.client}"'))
    finally:
        server.stop()
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].endswith("  up")
    assert "the service behind the tunnel is down: is Ollama (ollama serve) running on " \
        "127.0.0.1" in result.stdout


def test_check_tells_an_sshd_that_forbids_forwarding_from_a_service_down(
        keys: Keys, workstation: Sim, tmp_path: Path) -> None:
    """(It said "is Ollama running?" of an Ollama that was, behind an sshd whose
    AllowTcpForwarding is no.)"""
    server = OpenSSHServer(keys, forwarding="no").start()
    try:
        result = run_check(write_check_config(tmp_path / "g.toml", keys, server.port,
                                              workstation.server.port,
                                              f'key_file = "{keys.client}"'))
    finally:
        server.kill()
    assert result.returncode == 1
    assert "sshd on 127.0.0.1 forbids forwarding to 127.0.0.1:" in result.stdout
    assert "AllowTcpForwarding yes" in result.stdout and "is Ollama" not in result.stdout


def test_check_explains_refused_credentials_without_showing_them(
    keys: Keys, workstation: Sim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = AsyncSSHServer(keys).start()
    monkeypatch.setenv("STUDIO_PASSWORD", "swordfish-wrong")
    try:
        result = run_check(write_check_config(tmp_path / "g.toml", keys, server.port,
                                              workstation.server.port,
                                              'password_env = "STUDIO_PASSWORD"'))
    finally:
        server.stop()
    assert result.returncode == 1
    assert "refused to authenticate 'root'" in result.stdout
    assert "swordfish" not in result.stdout + result.stderr
    assert "password from $STUDIO_PASSWORD" in result.stdout


def test_models_command_lists_what_is_behind_a_tunnel(
    keys: Keys, workstation: Sim, tmp_path: Path
) -> None:
    server = AsyncSSHServer(keys).start()
    try:
        config = write_check_config(tmp_path / "g.toml", keys, server.port,
                                    workstation.server.port, f'key_file = "{keys.client}"')
        result = subprocess.run([*GATEWAY, "models", "--config", str(config)],
                                capture_output=True, text=True, timeout=60, check=True)
    finally:
        server.stop()
    lines = result.stdout.splitlines()
    assert lines[0].startswith("studio  (ollama, primary, via tunnel studio/ollama)  up")
    assert lines[1].strip().startswith(MODEL)
