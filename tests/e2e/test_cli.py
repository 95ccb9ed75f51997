"""The ``gateway`` command as a user runs it: serve, demo, models, keys; curl as the client."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from gateway.runtime import STOP_MARGIN
from tests.redis_peer import RedisServer
from tests.support import GATEWAY, GatewayProcess, Sim, free_port, wait_ready


def write_config(path: Path, ollama: Sim, mlx: Sim, extra: str = "") -> Path:
    path.write_text(f"""
[server]
host = "127.0.0.1"
shutdown_grace = 10.0
{extra}

[[backends]]
name = "ollama"
kind = "ollama"
url = "{ollama.api_url}"

[[backends]]
name = "mlx"
kind = "openai"
url = "{mlx.api_url}"
""")
    return path


def streamed(url: str, model: str) -> urllib.request.Request:
    """A streamed chat completion of ``model`` through the gateway at ``url``."""
    return urllib.request.Request(
        f"{url}/v1/chat/completions", method="POST",
        data=json.dumps({"model": model, "stream": True,
                         "messages": [{"role": "user", "content": "Hello"}]}).encode(),
        headers={"Content-Type": "application/json"})


@pytest.fixture
def served(
    tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim)
    process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/health", process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_curl_streams_server_sent_events(served: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = served
    body = json.dumps({"model": "qwq:32b", "stream": True,
                       "messages": [{"role": "user", "content": "Hello"}]})
    result = subprocess.run(
        ["curl", "-sN", "-D", "-", f"{url}/v1/chat/completions",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=30, check=True,
    )
    headers, _, events = result.stdout.partition("\n\n")  # text mode turned CRLF into LF
    assert "content-type: text/event-stream" in headers.lower()
    assert "x-request-id:" in headers.lower()
    data = [line for line in events.split("\n") if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_shutdown_lets_a_stream_in_flight_finish(
    served: tuple[str, subprocess.Popen[str]], ollama_sim: Sim
) -> None:
    url, process = served
    ollama_sim.fault("phi3.5:3.8b", tokens_per_s=20)  # about 1.5 s for the whole answer
    received: list[str] = []

    def read_stream() -> None:
        with urllib.request.urlopen(streamed(url, "phi3.5:3.8b"), timeout=30) as response:
            received.extend(line.decode() for line in response)

    reader = threading.Thread(target=read_stream)
    reader.start()
    time.sleep(0.5)  # the stream is under way
    process.send_signal(signal.SIGTERM)
    reader.join(timeout=30)
    assert process.wait(timeout=15) == 0
    assert "data: [DONE]\n" in received
    assert process.stdout is not None
    said = [line.split(": ", 1)[-1] for line in process.stdout.read().splitlines()
            if "gateway stop" in line]  # what an operator's log says of it
    assert len(said) == 2 and said[1] == "gateway stopped"
    assert said[0].startswith("gateway stopping: no new connections; requests in flight have")
    # New connections are refused once shutdown has begun.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=2)


def test_a_request_outliving_the_grace_is_ended_at_the_grace(tmp_path: Path, ollama_sim: Sim,
                                                             mlx_sim: Sim) -> None:
    """A stream longer than ``shutdown_grace``: the gateway stops once the grace is over
    (aiohttp's own shutdown waited it twice over).
    """
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim)
    config.write_text(config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 2.0"))
    ollama_sim.fault("phi3.5:3.8b", tokens_per_s=2)  # some 15 s for the whole answer
    gateway = GatewayProcess(config)
    try:
        with urllib.request.urlopen(streamed(gateway.url, "phi3.5:3.8b"),
                                    timeout=30) as response:
            response.readline()  # the stream is under way
            took = gateway.stopped_in(15)
    finally:
        output = gateway.stop()
    assert 2.0 <= took < 3.5, took
    assert "Traceback" not in output, output


def test_a_collector_that_is_away_does_not_hold_up_a_stop(tmp_path: Path, ollama_sim: Sim,
                                                          mlx_sim: Sim) -> None:
    """Spans waiting for an OTLP collector that does not answer: the stop waits a few
    seconds for them, not a retried export of every batch in turn (about 6 s each: 55 s
    for 4,000 requests, past systemd's 90 s with a full buffer).
    """
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim, extra=f"""
[telemetry]
traces = true
otlp_endpoint = "http://127.0.0.1:{free_port()}"
export_interval = 60.0
""")
    gateway = GatewayProcess(config)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        for _ in range(3000):  # 3,000 spans: six batches
            conn.request("GET", "/v1/models")
            conn.getresponse().read()
        conn.close()
        took = gateway.stopped_in(90)
    finally:
        output = gateway.stop()
    assert took < 15, took
    assert "spans not exported" in output, output[-2000:]


def test_a_collector_without_its_exporter_installed_is_a_config_error(
        tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim) -> None:
    """``./run-gateway`` installs no OTLP exporter: the README's [telemetry] snippet ended
    the gateway with a traceback."""
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim, extra="""
[telemetry]
otlp_endpoint = "http://127.0.0.1:4318"
""")
    without = ("import sys; sys.modules['opentelemetry.exporter.otlp.proto.http."
               "metric_exporter'] = None; from gateway.cli import main; "
               f"sys.exit(main(['serve', '--config', {str(config)!r}, '--port', "
               f"'{free_port()}']))")
    result = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "otlp_endpoint needs the OTLP exporter" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_on_a_command_that_waits_ends_it_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as silent:  # a Redis that takes the connection and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = tmp_path / "gateway.toml"
        config.write_text('[tenants]\nstore = "redis"\nredis_url = '
                          f'"redis://127.0.0.1:{silent.getsockname()[1]}/0"\n')
        process = subprocess.Popen([*GATEWAY, "keys", "list", "--config", str(config)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        said = process.stdout.readline()  # (it waits for Redis, and says so: then Ctrl-C)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
        output = said + output
    assert process.returncode == 130, output
    assert "Traceback" not in output, output


STUCK_PLUGIN = """
import asyncio

from plugins.base import BasePlugin


class NeverClosing(BasePlugin):
    def __init__(self, options):
        pass

    async def close(self):
        await asyncio.Event().wait()
"""


def test_a_stop_that_would_wait_for_ever_ends_the_gateway_anyway(
        tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim) -> None:
    """Something that never finishes stopping (here a plugin whose close never returns; in
    the field a background loop whose cancellation asyncio lost): the gateway ends
    ``STOP_MARGIN`` seconds past its grace, saying what it waited for, rather than living on
    serving nothing (a worker whose supervisor died is told to stop once).
    """
    (tmp_path / "stuck_plugin.py").write_text(STUCK_PLUGIN)
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim, extra="""
[[plugins]]
name = "stuck"
path = "stuck_plugin:NeverClosing"
""")
    config.write_text(config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 1.0"))
    port = free_port()
    process = subprocess.Popen(
        [*GATEWAY, "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)})
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        output = process.communicate(timeout=1.0 + STOP_MARGIN + 10)[0]
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 1, output
    assert 1.0 + STOP_MARGIN <= took < 1.0 + STOP_MARGIN + 3, took
    assert f"not stopped {1.0 + STOP_MARGIN:g} s after being told to; ending now" in output, output
    assert "NeverClosing.close" in output, output


def test_a_stop_while_it_starts_is_quiet(tmp_path: Path) -> None:
    """Ctrl-C while start-up waits for a backend that does not answer (it waits up to 10 s
    for the first look at the models): the gateway ends at once, without a traceback.
    """
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        config = tmp_path / "gateway.toml"
        config.write_text(f'[[backends]]\nname = "silent"\nkind = "ollama"\n'
                          f'url = "http://127.0.0.1:{silent.getsockname()[1]}"\n')
        process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config), "--port",
                                    str(free_port())], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)
        assert process.poll() is None  # still starting
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        output = process.communicate(timeout=15)[0]
    assert process.returncode == 0 and time.monotonic() - started < 3.0, output
    assert "Traceback" not in output and "was destroyed" not in output, output
    assert "gateway stopped before it was up" in output


def test_port_0_says_the_port_it_had(tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim) -> None:
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim)
    process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "gateway listening on" in line:
                break
        port = int(line.split("listening on http://127.0.0.1:")[1].split()[0])
        assert port != 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            assert answer.status == 200
    finally:
        process.terminate()
        process.communicate(timeout=15)


def test_models_command_lists_each_backends_models(
    tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim
) -> None:
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim)
    result = subprocess.run([*GATEWAY, "models", "--config", str(config)], capture_output=True,
                            text=True, timeout=30, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ollama  (ollama, primary,") and lines[0].endswith("up")
    llava = next(line for line in lines if "llava:7b" in line)
    assert "7.2B" in llava and "ctx    4096" in llava and "vision" in llava
    assert any("deepseek-r1-distill-llama:70b" in line for line in lines)


def test_models_command_shows_the_embedded_model_on_the_shipped_config() -> None:
    """On a fresh machine it said the light backend had no models and auto picked nothing,
    while a gateway on the same config answered auto with SmolLM2."""
    result = subprocess.run([*GATEWAY, "models"], capture_output=True, text=True, timeout=60,
                            check=True)
    lines = result.stdout.splitlines()
    light = lines.index(next(line for line in lines if line.startswith("light  (embedded")))
    assert lines[light].endswith("starts with the gateway (not started for this listing)")
    assert lines[light + 1].strip().startswith("smollm2:135m")
    assert not lines[light + 1].endswith("loaded")  # (it is not running)
    auto = next(line for line in lines if line.strip().startswith("auto "))
    assert "(nothing available)" not in auto, result.stdout  # (SmolLM2, or a local server's)


def test_models_command_shows_alias_picks_and_the_live_gateways_breakers(
    tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim
) -> None:
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim, f"port = {port}")
    process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            data=json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
                            ).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        result = subprocess.run([*GATEWAY, "models", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, check=True)
    finally:
        process.terminate()
        process.communicate(timeout=15)
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("qwq:32b") and line.endswith("breaker closed")
               for line in lines), result.stdout
    assert any(line.strip().startswith("auto ") and "→ qwq:32b" in line for line in lines)
    assert any(line.strip().startswith("auto:vision") and "→ llava:7b" in line for line in lines)


def test_models_command_asks_a_gateway_with_keys_with_the_admin_key(
    tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim
) -> None:
    port, admin, client = free_port(), "gw-admin-of-the-models-command", "gw-client-key"

    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim,
                          f'port = {port}\n\n[auth]\nkey_hashes = ["{digest(client)}"]\n'
                          f'admin_key_hashes = ["{digest(admin)}"]')
    process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process)
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            data=json.dumps({"model": "qwq:32b", "messages": [{"role": "user", "content": "hi"}]}
                            ).encode(), headers={"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {client}"}),
            timeout=10).read()
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_KEY"}
        without = subprocess.run([*GATEWAY, "models", "--config", str(config)], env=env,
                                 capture_output=True, text=True, timeout=30, check=True)
        keyed = subprocess.run([*GATEWAY, "models", "--config", str(config)],
                               env={**env, "GATEWAY_ADMIN_KEY": admin},
                               capture_output=True, text=True, timeout=30, check=True)
    finally:
        process.terminate()
        process.communicate(timeout=15)
    assert "set $GATEWAY_ADMIN_KEY to an admin key" in without.stdout, without.stdout
    assert "breaker closed" not in without.stdout
    assert "GATEWAY_ADMIN_KEY" not in keyed.stdout and "breaker states" not in keyed.stdout
    assert any(line.strip().startswith("qwq:32b") and line.endswith("breaker closed")
               for line in keyed.stdout.splitlines()), keyed.stdout


def test_models_command_reports_a_backend_that_is_down(tmp_path: Path) -> None:
    config = tmp_path / "down.toml"
    config.write_text(f'[[backends]]\nname = "gone"\nkind = "ollama"\n'
                      f'url = "http://127.0.0.1:{free_port()}"\n')
    result = subprocess.run([*GATEWAY, "models", "--config", str(config)], capture_output=True,
                            text=True, timeout=30, check=True)
    assert "gone" in result.stdout and "DOWN: cannot connect" in result.stdout


def test_keys_new_prints_a_key_and_its_config_block(tmp_path: Path, ollama_sim: Sim,
                                                    mlx_sim: Sim) -> None:
    result = subprocess.run([*GATEWAY, "keys", "new", "--name", "ci bot", "--rpm", "60",
                             "--models", "qwq:32b, auto:fast", "--expires", "30d"],
                            capture_output=True, text=True, timeout=30, check=True)
    pairs = (line.split(":", 1) for line in result.stdout.splitlines()[:2])
    fields = {k: v.strip() for k, v in pairs}
    assert fields["key"].startswith("gw-") and len(fields["key"]) > 40
    assert fields["hash"] == hashlib.sha256(fields["key"].encode()).hexdigest()
    block = result.stdout[result.stdout.index("[[keys]]"):]
    assert fields["key"] not in block  # only the hash goes in the config
    # The block, pasted into a config, is a key the gateway serves (and limits) at once.
    config = write_config(tmp_path / "keyed.toml", ollama_sim, mlx_sim)
    config.write_text(config.read_text() + "\n" + block)
    port = free_port()
    process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config), "--port",
                                str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/health", process)
        request = urllib.request.Request(
            url + "/v1/models", headers={"Authorization": f"Bearer {fields['key']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["x-ratelimit-limit-requests"] == "60"
            listed = {m["id"] for m in json.loads(response.read())["data"]}
        assert listed == {"qwq:32b", "auto:fast"}
        listing = subprocess.run([*GATEWAY, "keys", "list", "--config", str(config)],
                                 capture_output=True, text=True, timeout=30, check=True)
        row = next(line for line in listing.stdout.splitlines() if "ci bot" in line)
        assert "rpm 60" in row and "models qwq:32b|auto:fast" in row and row.endswith("active")
    finally:
        process.kill()
        process.communicate(timeout=10)


def test_output_piped_to_a_reader_that_leaves_is_no_traceback() -> None:
    """``gateway keys new | head -1``, or a reader gone before the first line."""
    result = subprocess.run(["bash", "-c", shlex.join([*GATEWAY, "keys", "new"]) + " | true"],
                            capture_output=True, text=True, timeout=30)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, \
        result.stderr


def test_keys_commands_say_what_is_wrong(tmp_path: Path) -> None:
    def keys(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GATEWAY, "keys", *args], capture_output=True, text=True,
                              timeout=30)

    refused = keys("new", "--rpm", "-1")
    assert refused.returncode == 2 and "rpm: expected an integer >= 0" in refused.stderr
    refused = keys("new", "--expires", "next tuesday")
    assert refused.returncode == 2 and "expires: expected a date" in refused.stderr
    refused = keys("new", "--expires", "2020-01-01")
    assert refused.returncode == 2 and "2020-01-01T00:00:00Z is past" in refused.stderr
    refused = keys("revoke", "key-1")  # the embedded config keeps keys in the config file
    assert refused.returncode == 2 and "edit their [[keys]] blocks" in refused.stderr
    config = tmp_path / "redis.toml"
    port = free_port()
    config.write_text(f'[tenants]\nstore = "redis"\nredis_url = '
                      f'"redis://:hunter2-secret@127.0.0.1:{port}/0"\n')
    refused = keys("list", "--config", str(config))
    assert refused.returncode == 2
    assert f"Redis at 127.0.0.1:{port}/0 does not answer" in refused.stderr
    assert "hunter2" not in refused.stdout + refused.stderr  # (never a password)
    config.write_text(config.read_text() + f'\n[[keys]]\nid = "taken"\nhash = "{"0" * 64}"\n')
    refused = keys("new", "--id", "taken", "--config", str(config))
    assert refused.returncode == 2 and "a key 'taken' exists already" in refused.stderr
    refused = keys("new", "--expires", "99999999999999999999d")
    assert refused.returncode == 2 and "expires: expected an integer" in refused.stderr


def test_non_loopback_without_keys_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([*GATEWAY, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without API keys" in result.stderr
    assert "--insecure-no-auth" in result.stderr


def test_config_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nport = "eighty"\n')
    result = subprocess.run([*GATEWAY, "serve", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert f"{config}: server.port: expected an integer, got a string" in result.stderr


@pytest.mark.parametrize(("text", "flags", "said"), [
    (b"\xff", [], "not text in UTF-8"),
    (b'[tenants]\nstore = "redis"\nredis_url = "http://127.0.0.1:6379"\n', [],
     "tenants.redis_url: expected a redis://, rediss:// or unix:// URL"),
    (b'[[plugins]]\nname = "cache"\n[plugins.options]\nbackend = "redis"\n'
     b'redis_url = "127.0.0.1:6379"\n', [], "redis_url: expected a redis://"),
    (b'[[backends]]\nname = "x"\nkind = "openai"\nurl = "http://127.0.0.1:99999/v1"\n', [],
     "backends[0].url: expected a host and a port 0-65535"),
    (b'[server]\nport = 4110\nalso_listen = ["127.0.0.1:4110"]\n', [],
     "also_listen[0]: 127.0.0.1:4110 is listened on already"),
    (b"", ["--log-level", "warning", "--port", "99999"], "--port: expected a TCP port 0-65535"),
    (b"", ["--host", "nosuchhost.invalid", "--insecure-no-auth"],
     "cannot listen on nosuchhost.invalid: no such address here"),
    (b'[tasks]\ndata_dir = "/proc/no-such/x"\n', [],
     "tasks.data_dir: cannot keep the batch queue in /proc/no-such/x"),
])
def test_mistakes_are_said_in_a_line_never_a_traceback(tmp_path: Path, text: bytes,
                                                        flags: list[str], said: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_bytes(text)
    result = subprocess.run([*GATEWAY, "serve", "--config", str(config), "--port",
                             str(free_port()), *flags], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_that_cannot_be_read_is_said_so(tmp_path: Path) -> None:
    folder = tmp_path / "gateway.toml"
    folder.mkdir()
    result = subprocess.run([*GATEWAY, "check", "--config", str(folder)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "cannot be read: Is a directory" in result.stderr


def test_check_fails_without_backends(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\nport = 4000\n')
    result = subprocess.run([*GATEWAY, "check", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1 and "no backends are configured" in result.stdout


def test_check_passes_when_the_gateway_can_serve_as_configured(tmp_path: Path) -> None:
    """On the shipped config, on a fresh machine (no Ollama, no MLX server: both optional),
    the light model answers: it exited 1 ("primary tier: 0 of 2"). A backend that must be
    there, down, fails it (it passed when no backend was of the primary tier), and so do
    an embedded model that cannot start and a Redis the config uses that does not answer.
    """
    def check(config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GATEWAY, "check", *(["--config", str(config)] if config else [])],
                              capture_output=True, text=True, timeout=60)

    shipped = check()
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert "backend light  (embedded, server, embedded)  OK: starts with the gateway" in \
        shipped.stdout
    down = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[backends]]\nname = "srv"\nkind = "openai"\ntier = "server"\n'
                      f'url = "http://127.0.0.1:{down}/v1"\n')
    result = check(config)
    assert result.returncode == 1 and "down, and not optional: srv" in result.stdout
    config.write_text('[[backends]]\nname = "light"\nkind = "embedded"\n'
                      f'model_path = "{tmp_path / "none.gguf"}"\n')
    result = check(config)
    assert result.returncode == 1 and "DOWN: cannot start: no model file at" in result.stdout
    config.write_text(f'[tenants]\nstore = "redis"\nredis_url = '
                      f'"redis://:hunter2@127.0.0.1:{down}/0"\n\n'
                      f'[[backends]]\nname = "light"\nkind = "embedded"\n')
    result = check(config)
    assert result.returncode == 1, result.stdout
    assert f"redis 127.0.0.1:{down}/0  (for [tenants])  DOWN" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


def test_a_redis_that_refuses_the_password_is_said_to(tmp_path: Path) -> None:
    """(It was "Redis does not answer", and only a log line said why.)"""
    with RedisServer() as redis:
        redis.command("CONFIG", "SET", "requirepass", "right-one")
        config = tmp_path / "gateway.toml"
        for password in ("", ":wrong-one@"):  # none where one is wanted, or a wrong one
            said = "refuses to let the gateway in: check the user and password in the URL"
            url = redis.url.replace("redis://", "redis://" + password)
            config.write_text(f'[tenants]\nstore = "redis"\nredis_url = "{url}"\n')
            result = subprocess.run([*GATEWAY, "keys", "list", "--config", str(config)],
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 2 and said in result.stderr, result.stderr
            assert "wrong-one" not in result.stdout + result.stderr


def test_demo_serves_the_simulated_fleet() -> None:
    port = free_port()
    process = subprocess.Popen([*GATEWAY, "demo", "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            ids = [m["id"] for m in json.loads(r.read())["data"]]
        assert {"qwq:32b", "command-r-plus:104b"} <= set(ids)
        # The Python example it prints works as pasted into a shell.
        assert process.stdout is not None
        printed: list[str] = []
        for line in process.stdout:
            printed.append(line)
            if printed[-1].strip() == "PY":
                break
        example = "".join(printed[max(i for i, x in enumerate(printed) if "<<'PY'" in x):])
        venv = str(Path(sys.executable).parent)
        pasted = subprocess.run(["bash", "-c", example], capture_output=True, text=True,
                                timeout=30, env={**os.environ, "PATH": venv + ":" +
                                                 os.environ.get("PATH", "")})
        assert pasted.returncode == 0 and pasted.stdout.strip(), pasted.stderr
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    output = "".join(printed) + output
    assert "curl" in output and 'base_url="http://127.0.0.1:' in output


def test_a_second_demo_is_a_clear_refusal() -> None:
    with socket.socket() as taken:  # as a demo already running holds it
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 21434))
        taken.listen()
        result = subprocess.run([*GATEWAY, "demo", "--port", str(free_port())],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "address already in use (is another gateway demo running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_a_cache_whose_redis_does_not_answer(tmp_path: Path) -> None:
    config = tmp_path / "cache.toml"
    port = free_port()
    redis_url = f"redis://:hunter2-secret@127.0.0.1:{port}/0"
    config.write_text(f'[[backends]]\nname = "gone"\nkind = "ollama"\noptional = true\n'
                      f'url = "http://127.0.0.1:{free_port()}"\n\n'
                      f'[[plugins]]\nname = "safety"\n\n'
                      f'[[plugins]]\nname = "cache"\n[plugins.options]\nbackend = "redis"\n'
                      f'redis_url = "{redis_url}"\n')
    result = subprocess.run([*GATEWAY, "check", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert "plugin safety  OK" in result.stdout
    assert "plugin cache  DEGRADED" in result.stdout
    assert f"Redis at 127.0.0.1:{port}/0 does not answer" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr  # (never a password)
    # The report says it all: the log adds only warnings (not "cannot connect" again).
    assert " INFO " not in result.stderr, result.stderr


def test_also_listen_serves_ollamas_address_too(tmp_path: Path, ollama_sim: Sim,
                                                mlx_sim: Sim) -> None:
    main, ollama_port = free_port(), free_port()
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim,
                          extra=f'also_listen = ["127.0.0.1:{ollama_port}"]')
    process = subprocess.Popen([*GATEWAY, "serve", "--config", str(config), "--port", str(main)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{main}/health", process)
        client = ollama.Client(host=f"127.0.0.1:{ollama_port}")  # as OLLAMA_HOST may say
        try:
            assert "qwq:32b" in [m.model for m in client.list().models]
        finally:
            client.close()
    finally:
        process.terminate()
        process.communicate(timeout=15)


@pytest.mark.parametrize("which", ["main", "also_listen"])
def test_an_address_in_use_is_a_clear_refusal(tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim,
                                              which: str) -> None:
    """Said in one line, before any backend starts (a second ./run-gateway beside the first
    printed a traceback).
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        main = port if which == "main" else free_port()
        extra = "" if which == "main" else f'also_listen = ["127.0.0.1:{port}"]'
        config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim, extra=extra)
        result = subprocess.run([*GATEWAY, "serve", "--config", str(config), "--port",
                                 str(main)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr and "catalog" not in result.stderr


def test_log_level_debug_shows_each_request_and_attempt(tmp_path: Path, ollama_sim: Sim,
                                                        mlx_sim: Sim) -> None:
    port = free_port()
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim)
    process = subprocess.Popen([*GATEWAY, "--log-level", "debug", "serve", "--config",
                                str(config), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
            data=json.dumps({"model": "qwq:32b", "messages": [
                {"role": "user", "content": "Hello"}]}).encode(),
            headers={"Content-Type": "application/json", "x-request-id": "trace-7",
                     "Authorization": "Bearer sk-not-for-the-log"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    debug = [line for line in output.splitlines() if " DEBUG " in line]
    assert any("trace-7 POST /v1/chat/completions: 200" in line for line in debug), output
    assert any("attempt 1: ollama/qwq:32b" in line for line in debug), output
    assert "sk-not-for-the-log" not in output


def test_check_warns_of_a_configured_model_its_backend_does_not_list(
    tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim
) -> None:
    config = write_config(tmp_path / "gateway.toml", ollama_sim, mlx_sim)
    config.write_text(config.read_text() + '\n[[models]]\nname = "coder"\n'
                      'deployments = [{backend = "ollama", model = "qwen2.5-coder:23b"}]\n'
                      'fallbacks = ["qwq:32b"]\n\n'
                      # an alias's list with a typo (its requests were 503s, unsaid), and
                      # one naming an alias (never picked)
                      '[aliases."mine"]\npriority = {ollama = ["qwen2.5-coder:32", "auto:fast"]}\n')
    result = subprocess.run([*GATEWAY, "check", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("WARNING [[models]] 'coder': backend 'ollama' does not list the model "
            "'qwen2.5-coder:23b' (did you mean 'qwen2.5-coder:32b'?); requests for it go to the "
            "fallbacks") in result.stdout
    assert ("WARNING [aliases.'mine'] priority.ollama: no backend that answers lists "
            "'qwen2.5-coder:32' (did you mean 'qwen2.5-coder:32b'?)") in result.stdout
    assert ("WARNING [aliases.'mine'] priority.ollama names the alias 'auto:fast'"
            in result.stdout)


def test_router_export_and_eval(tmp_path: Path, ollama_sim: Sim) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[routing]\npolicy = "learned"\n\n[[backends]]\nname = "studio"\n'
                      f'kind = "ollama"\nurl = "{ollama_sim.api_url}"\n\n'
                      f'[tasks]\ndata_dir = "{tmp_path / "data"}"\n')
    gateway = GatewayProcess(config)
    try:
        for n in range(12):
            body = json.dumps({"model": "auto", "messages": [
                {"role": "user", "content": f"Tell me about {n}."}]}).encode()
            request = urllib.request.Request(gateway.url + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.headers["x-gateway-route"].startswith("learned: ")
        exported = tmp_path / "outcomes.jsonl"
        subprocess.run([*GATEWAY, "router", "export", "--config", str(config), "--url",
                        gateway.url, "--output", str(exported)], check=True, timeout=30)
    finally:
        gateway.stop()
    outcomes = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(outcomes) == 12 and all(o["alias"] == "auto" and o["chosen"] for o in outcomes)
    assert all("prompt" not in o and "messages" not in o for o in outcomes)  # no text kept
    result = subprocess.run([*GATEWAY, "router", "eval", str(exported)], capture_output=True,
                            text=True, timeout=30, check=True)
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in result.stdout.splitlines()[1:]}
    assert rows[("auto", "logged")][0] == "12"
    assert 0 < int(rows[("auto", "learned")][0]) <= 12
    assert int(rows[("auto", "priority")][0]) <= 12


def test_run_gateway_starts_again_without_the_network_and_reads_paths_where_it_runs(
        tmp_path: Path, ollama_sim: Sim, mlx_sim: Sim) -> None:
    """``./run-gateway`` installed the project on every start (pip, which needs PyPI to
    build the editable install: no restart during an outage), and ran from its own folder,
    so ``--config my.toml`` named a file there, not where the operator stood.
    """
    root = Path(__file__).resolve().parents[2]
    # What run-gateway installs is in the suite's .venv already (run-tests puts in .[dev]
    # and the model): it is said so, as a first run of its own would leave it.
    (root / ".venv" / ".run-gateway-installed").touch()
    write_config(tmp_path / "mine.toml", ollama_sim, mlx_sim)
    port = free_port()
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/"}
    process = subprocess.Popen([str(root / "run-gateway"), "--config", "mine.toml",
                                "--port", str(port)], cwd=tmp_path, env=offline,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            names = {m["id"] for m in json.loads(r.read())["data"]}
        assert "qwq:32b" in names  # the simulators of mine.toml, the config where it ran
    finally:
        process.terminate()
        process.communicate(timeout=30)
