"""The small parts of the tunnels: backoff, forward specs, messages, known_hosts lines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest

from gateway.backoff import backoff
from gateway.config import ConfigError, TunnelConfig, parse_config
from gateway.tunnel import ssh
from gateway.tunnel.agent import RemoteForward, arguments, parse_forwards
from gateway.tunnel.ssh import TunnelError, _append_line, explain

TUNNEL = TunnelConfig(name="studio", host="studio.local", user="me", port=2222,
                      key_file="/k", password_env="PW", backoff_initial=0.5, backoff_max=30)


def test_backoff_grows_jittered_and_stays_bounded_forever() -> None:
    assert 0.25 <= backoff(0, 0.5, 30.0) <= 0.5
    assert 2.0 <= backoff(3, 0.5, 30.0) <= 4.0
    for attempt in (10, 1024, 10**6):  # hours of an unreachable host: no overflow
        assert 15.0 <= backoff(attempt, 0.5, 30.0) <= 30.0


@pytest.mark.parametrize(("text", "forward"), [
    ("11434", RemoteForward(11434, "127.0.0.1", 11434)),
    ("21434:11434", RemoteForward(21434, "127.0.0.1", 11434)),
    ("21434:10.0.0.5:11434", RemoteForward(21434, "10.0.0.5", 11434)),
])
def test_forward_specs(text: str, forward: RemoteForward) -> None:
    assert RemoteForward.parse(text) == forward


@pytest.mark.parametrize("text", ["", "x", "1:2:3:4", "a:b"])
def test_bad_forward_specs_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a forward"):
        RemoteForward.parse(text)


def test_a_server_port_forwarded_twice_is_refused() -> None:
    """The server refused the second, and the agent asked for it again for ever."""
    with pytest.raises(ValueError, match="server port 11434 is forwarded twice"):
        parse_forwards(["11434", "21434", "11434:127.0.0.1:8080"])
    assert len(parse_forwards(["11434", "21434:11434"])) == 2


def test_agent_arguments_round_trip_the_settings() -> None:
    args = arguments(TUNNEL, [RemoteForward(11434, "127.0.0.1", 11434)])
    assert args[:2] == ["--server", "me@studio.local:2222"]
    assert "--password-env" in args and "PW" in args and "--forward" in args
    v6 = arguments(TunnelConfig(name="a", host="::1", user="me"), [])
    assert v6[:2] == ["--server", "me@[::1]:22"]


@pytest.mark.parametrize(("error", "message", "hint"), [
    (ConnectionRefusedError(), "connection to studio.local:2222 refused", "sshd running"),
    (TimeoutError(), "no answer from studio.local:2222 within 10s", "host up"),
    (asyncssh.PermissionDenied("no"), "me@studio.local:2222 refused to authenticate 'me'",
     "tried: key /k, ssh-agent, password from $PW"),
    (PermissionError(13, "Permission denied", "/k"), "cannot read /k: Permission denied",
     "key_file"),
])
def test_failures_are_explained(error: Exception, message: str, hint: str) -> None:
    explained = explain(error, TUNNEL, Path("/nonexistent/known_hosts"))
    assert explained.message == message and hint in explained.hint


def test_a_known_hosts_line_is_never_glued_to_the_last_one(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("otherhost ssh-ed25519 AAAA")  # no newline at the end
    _append_line(path, "[studio]:2222 ssh-ed25519 BBBB")
    _append_line(path, "studio ssh-ed25519 CCCC")
    assert path.read_text().splitlines() == [
        "otherhost ssh-ed25519 AAAA", "[studio]:2222 ssh-ed25519 BBBB", "studio ssh-ed25519 CCCC"]


@pytest.mark.parametrize(("tunnel", "message"), [
    ({"port": 0}, "tunnels[0].port: expected a TCP port 1-65535"),
    ({"backoff_initial": 60}, "tunnels[0].backoff_initial: expected at most backoff_max"),
    ({"password_env": "hunter2 secret"},
     "tunnels[0].password_env: expected the name of an environment variable"),
    ({"password": "hunter2"}, "tunnels[0].password: unknown key"),
    ({"forwards": [{"name": "o", "remote_port": 0}]},
     "tunnels[0].forwards[0].remote_port: expected a TCP port 1-65535"),
    ({"forwards": [{"name": "o", "remote_port": 1, "local_port": 4000}]},
     "tunnels[0].forwards[0].local_port: port 4000 is already used by the gateway"),
])
def test_tunnel_config_mistakes_are_named(tunnel: dict[str, object], message: str) -> None:
    document = {"tunnels": [{"name": "t", "host": "h", "user": "u", **tunnel}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(document, source="x.toml")
    assert str(caught.value).startswith("x.toml: " + message)
    assert "hunter2" not in str(caught.value)


def test_a_backend_must_name_an_existing_forward() -> None:
    with pytest.raises(ConfigError, match=r"backends\[0\]\.tunnel: no tunnel forward 't/x'"):
        parse_config({"tunnels": [{"name": "t", "host": "h", "user": "u",
                                   "forwards": [{"name": "o", "remote_port": 1}]}],
                      "backends": [{"name": "b", "kind": "ollama", "tunnel": "t/x"}]})


def test_the_backoff_starts_over_only_after_a_link_that_was_up_long_enough(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    tried: list[int] = []
    monkeypatch.setattr(ssh, "backoff", lambda attempt, *_: tried.append(attempt) or 0.0)
    # Failures (however slow), a link up briefly, one up for backoff_max, one more failure.
    outcomes: list[float | Exception] = [TunnelError("refused"), TunnelError("refused"),
                                         TunnelError("timed out"), 1.0, TUNNEL.backoff_max,
                                         TunnelError("refused")]

    async def session() -> float:
        if not outcomes:
            raise asyncio.CancelledError  # the gateway is stopping
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    failures: list[Exception] = []
    with caplog.at_level("DEBUG", logger="gateway.tunnel.ssh"), \
            pytest.raises(asyncio.CancelledError):
        asyncio.run(ssh.keep_connected(TUNNEL, session, failures.append, "test"))
    assert tried == [0, 1, 2, 3, 0, 1]
    assert len(failures) == 4
    # Each failure logged as it happens; one repeated while it lasts only at DEBUG.
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "test: refused"), ("DEBUG", "test: refused"),
        ("WARNING", "test: timed out"), ("WARNING", "test: refused")]
