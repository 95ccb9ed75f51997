"""``gateway serve --workers 2`` as an operator runs it: two processes on one port, sharing
one Redis (the test's own redis-server) for the cache and for breakers, in front of two
simulated Ollama hosts that both serve the same model. Each request goes out on a new
connection, as clients' do, so the kernel spreads them over both workers; each answer names
the worker that gave it (``x-gateway-worker``).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.sim import create_ollama_app, seed_fleet
from gateway.workers import STARTING, WORKER_HEADER
from tests.redis_peer import RedisServer
from tests.support import GATEWAY, ServerThread, Sim, free_port, wait_ready, wait_until

MODEL, CACHED = "qwen2.5-coder:32b", "qwq:32b"  # both on both hosts


def call(port: int, method: str, path: str, body: Any = None,
         connection: http.client.HTTPConnection | None = None
         ) -> tuple[str, dict[str, str], Any]:
    """(worker, headers, JSON) of one request, on ``connection`` or a new one."""
    own = connection is None
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
        assert response.status == 200, data
        headers = {k.lower(): v for k, v in response.getheaders()}
        return headers[WORKER_HEADER], headers, data
    finally:
        if own:
            conn.close()


def until_another(port: int, than: str, method: str, path: str, body: Any = None
                  ) -> tuple[str, dict[str, str], Any]:
    """The first answer, on new connections, from a worker other than ``than``."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = call(port, method, path, body)
        if answer[0] != than:
            return answer
    raise AssertionError("every connection went to the same worker")


def test_two_workers_serve_one_port_and_share_the_cache_and_breakers(
    tmp_path: Path, ollama_sim: Sim
) -> None:
    with RedisServer() as redis, \
            ServerThread(lambda: create_ollama_app(seed_fleet()["ollama"])) as other:
        second = Sim(other, "ollama")
        # The first host fails every answer for MODEL from the start.
        ollama_sim.fault(MODEL, status=500)
        config = tmp_path / "gateway.toml"
        config.write_text(f"""
[tasks]
queue = "redis"
redis_url = "{redis.url}"

[routing]
redis_url = "{redis.url}"
retries = 0

[routing.breaker]
failures = 2
cooldown = 60.0

[[backends]]
name = "first"
kind = "ollama"
url = "{ollama_sim.api_url}"

[[backends]]
name = "second"
kind = "ollama"
url = "{second.api_url}"

[[plugins]]
name = "cache"

[plugins.options]
backend = "redis"
redis_url = "{redis.url}"
""")
        with two_workers(config) as (port, _):
            one, _, _ = call(port, "GET", "/health")
            two, _, _ = until_another(port, one, "GET", "/health")  # both serve
            assert one != two
            # A second group on the port is refused, as one process is (it joined the
            # first's SO_REUSEPORT group: answers came from either config's workers)
            again = subprocess.run([*GATEWAY, "serve", "--config", str(config), "--port",
                                    str(port), "--workers", "2"],
                                   capture_output=True, text=True, timeout=30)
            assert again.returncode == 2 and "Address already in use" in again.stderr, \
                again.stderr

            # An answer cached through one worker is a hit through the other.
            question = {"model": CACHED, "temperature": 0,
                        "messages": [{"role": "user", "content": "Name a river."}]}
            first, headers, answer = call(port, "POST", "/v1/chat/completions", question)
            assert headers["x-gateway-cache"] == "miss"
            _, headers, again = until_another(port, first, "POST", "/v1/chat/completions",
                                              question)
            assert headers["x-gateway-cache"] == "hit"
            assert again["choices"] == answer["choices"]

            # A breaker opened through one worker keeps the other's traffic off too.
            kept = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # one worker
            try:
                for n in range(20):  # each fails over to the second host, and is answered
                    worker, _, _ = call(port, "POST", "/v1/chat/completions", {
                        "model": MODEL, "messages": [{"role": "user", "content": f"No. {n}"}]},
                        connection=kept)
                    _, _, health = call(port, "GET", "/health", connection=kept)
                    if health["deployments"][f"first/{MODEL}"]["breaker"] == "open":
                        break
            finally:
                kept.close()
            assert health["deployments"][f"first/{MODEL}"]["breaker"] == "open"
            deadline = time.monotonic() + 10
            while True:
                _, _, health = until_another(port, worker, "GET", "/health")
                if health["deployments"].get(f"first/{MODEL}", {}).get("breaker") == "open":
                    break
                assert time.monotonic() < deadline, health["deployments"]
                time.sleep(0.1)
            ollama_sim.clear()
            for n in range(6):  # whichever worker takes them: none goes to the first host
                call(port, "POST", "/v1/chat/completions", {
                    "model": MODEL, "messages": [{"role": "user", "content": f"Again {n}"}]})
            assert ollama_sim.requests("/api/chat") == []


def test_workers_without_a_shared_queue_or_on_port_0_are_refused(tmp_path: Path,
                                                                 ollama_sim: Sim) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[backends]]\nname = "first"\nkind = "ollama"\n'
                      f'url = "{ollama_sim.api_url}"\n')
    for port, said in ((free_port(), 'needs [tasks] queue = "redis"'),
                       (0, "needs a port of its own")):
        result = subprocess.run([*GATEWAY, "serve", "--config", str(config), "--port",
                                 str(port), "--workers", "2"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and said in result.stderr, result.stderr
    # A tunnel's forward pinned to a port: each worker's tunnel would want it.
    config.write_text(config.read_text() + '[tasks]\nqueue = "redis"\n'
                      '[[tunnels]]\nname = "studio"\nhost = "127.0.0.1"\nuser = "me"\n'
                      '[[tunnels.forwards]]\nname = "ollama"\nremote_port = 11434\n'
                      f'local_port = {free_port()}\n')
    result = subprocess.run([*GATEWAY, "serve", "--config", str(config), "--port",
                             str(free_port()), "--workers", "2"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "studio/ollama" in result.stderr and \
        "local_port = 0" in result.stderr, result.stderr


def test_an_alert_seen_by_both_workers_reaches_its_sink_once(tmp_path: Path,
                                                             ollama_sim: Sim) -> None:
    """Both workers watch the same fleet and see the same backend down: the notice goes
    out from the one that claims it first in their Redis (each sent it, and the operator
    had every alert twice).
    """
    received: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    with RedisServer() as redis:
        config = tmp_path / "gateway.toml"
        config.write_text(f"""
[tasks]
queue = "redis"
redis_url = "{redis.url}"

[monitor]
interval = 0.2
group_window = 0.0

[[monitor.alerts]]
kind = "backend_down"

[[monitor.sinks]]
kind = "webhook"
url = "http://127.0.0.1:{hook.server_address[1]}/hook"

[[backends]]
name = "up"
kind = "ollama"
url = "{ollama_sim.api_url}"

[[backends]]
name = "gone"
kind = "ollama"
url = "http://127.0.0.1:{free_port()}"
""")
        try:
            with two_workers(config) as (port, _):
                until_another(port, call(port, "GET", "/health")[0], "GET", "/health")
                wait_until(lambda: received, 10, "the alert")
                time.sleep(2.0)  # (ten rounds of both monitors)
        finally:
            hook.shutdown()
            hook.server_close()
    alerts = [(a["status"], a["rule"]) for notice in received for a in notice["alerts"]]
    assert alerts == [("firing", "backend_down")], received


def test_metrics_through_any_worker_count_every_workers_requests(
        tmp_path: Path, ollama_sim: Sim) -> None:
    """``/metrics`` and ``/admin/status`` answer for the host: whichever worker a scrape
    reaches counts every worker's requests, and a worker killed and started again does not
    take its counts away.
    """
    with RedisServer() as redis:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[tasks]\nqueue = "redis"\nredis_url = "{redis.url}"\n\n'
                          f'[[backends]]\nname = "first"\nkind = "ollama"\n'
                          f'url = "{ollama_sim.api_url}"\n')
        with two_workers(config) as (port, supervisor):
            answered: list[str] = []
            while len(answered) < 30 or len(set(answered)) < 2:  # (until both took some)
                assert len(answered) < 300, "every connection went to the same worker"
                answered.append(call(port, "POST", "/v1/chat/completions", {
                    "model": CACHED,
                    "messages": [{"role": "user", "content": f"No. {len(answered)}"}]})[0])
            sent = len(answered)

            def every_scrape_counts(total: int) -> bool:
                said: dict[str, tuple[float, float]] = {}
                deadline = time.monotonic() + 10
                while len(said) < 2 and time.monotonic() < deadline:
                    worker, counts = scrape(port)
                    said[worker] = counts
                return len(said) == 2 and all(c == (total, total) for c in said.values())

            wait_until(lambda: every_scrape_counts(sent), 10, "every worker counting them all")

            def every_status_counts(total: int) -> bool:
                """The traffic on /admin/status (and the dashboard) is the host's, too: it
                showed the answering worker's half."""
                said: dict[str, float] = {}
                deadline = time.monotonic() + 10
                while len(said) < 2 and time.monotonic() < deadline:
                    worker, _, status = call(port, "GET", "/admin/status")
                    said[worker] = (status["traffic"] or {}).get("requests", 0)
                return len(said) == 2 and all(n == total for n in said.values())

            wait_until(lambda: every_status_counts(sent), 10, "every status counting them all")

            victim = worker_pids(supervisor.pid)[0]
            # (a worker that dies within its first STARTING seconds could not start: all stop)
            time.sleep(max(0.0, STARTING + 0.5 - age(victim)))
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: len(worker_pids(supervisor.pid)) == 2 and
                       victim not in worker_pids(supervisor.pid), 15, "the worker started again")
            wait_ready(f"http://127.0.0.1:{port}/health", supervisor)
            assert every_scrape_counts(sent)  # the new worker goes on from the old one's counts


def test_sighup_reopens_the_request_log_in_every_worker(tmp_path: Path,
                                                       ollama_sim: Sim) -> None:
    """logrotate moves the file and sends SIGHUP: each worker goes on in a new file of the
    name. (The lines went on into the moved file, and SIGHUP ended the gateway.)
    """
    log, moved = tmp_path / "requests.jsonl", tmp_path / "requests.jsonl.1"
    with RedisServer() as redis:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[tasks]\nqueue = "redis"\nredis_url = "{redis.url}"\n\n'
                          f'[telemetry]\nrequest_log = "{log}"\n\n'
                          f'[[backends]]\nname = "first"\nkind = "ollama"\n'
                          f'url = "{ollama_sim.api_url}"\n')

        def ask(n: int) -> str:
            return call(port, "POST", "/v1/chat/completions", {
                "model": MODEL, "messages": [{"role": "user", "content": f"No. {n}"}]})[0]

        with two_workers(config) as (port, supervisor):
            for n in range(4):
                ask(n)
            wait_until(lambda: len(log.read_text().splitlines()) == 4, 5, "4 lines logged")
            log.rename(moved)
            supervisor.send_signal(signal.SIGHUP)
            wait_until(log.exists, 5, "a new log file")
            time.sleep(0.5)  # (both workers have it)
            workers = {ask(n) for n in range(4, 40)}
            assert len(workers) == 2, "every connection went to the same worker"
            wait_until(lambda: len(log.read_text().splitlines()) == 36, 5, "36 lines logged")
            assert len(moved.read_text().splitlines()) == 4
            assert supervisor.poll() is None


def test_a_killed_supervisors_metrics_folder_goes_at_the_next_start(
        tmp_path: Path, ollama_sim: Sim) -> None:
    """The folder where workers leave their metrics for each other is removed when they
    stop; a supervisor killed outright (SIGKILL, the OOM killer) cannot, and the next one
    to start removes it.
    """
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    with RedisServer() as redis:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[server]\nshutdown_grace = 1.0\n\n'  # (its workers end soon)
                          f'[tasks]\nqueue = "redis"\nredis_url = "{redis.url}"\n\n'
                          f'[[backends]]\nname = "first"\nkind = "ollama"\n'
                          f'url = "{ollama_sim.api_url}"\n')
        port = free_port()
        killed = subprocess.Popen([*GATEWAY, "serve", "--config", str(config), "--port",
                                   str(port), "--workers", "2"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", killed)
            workers = worker_pids(killed.pid)
        finally:
            killed.kill()
            killed.wait()
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 60,
                   "its workers ending with it")
        left = [p.name for p in temp.iterdir()]
        assert left == [f"gw-metrics-{killed.pid}-{left[0].rsplit('-', 1)[1]}"], left
        kept = {f"gw-metrics-{os.getpid()}-alive", "gw-metrics-99999999999-x", "gw-metrics-²-x"}
        for name in kept:  # a live supervisor's, and names no supervisor gives
            (temp / name).mkdir()
        with two_workers(config, env) as (_, supervisor):
            now = {p.name for p in temp.iterdir()} - kept
            assert len(now) == 1 and now.pop().startswith(f"gw-metrics-{supervisor.pid}-")
        assert {p.name for p in temp.iterdir()} == kept


@contextlib.contextmanager
def two_workers(config: Path, env: dict[str, str] | None = None
                ) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """``gateway serve --workers 2`` on a port of its own, ready; stopped (SIGTERM) after,
    and it must have stopped cleanly.
    """
    port = free_port()
    supervisor = subprocess.Popen(
        [*GATEWAY, "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", supervisor)
        yield port, supervisor
    finally:
        supervisor.terminate()
        output = supervisor.communicate(timeout=60)[0]
    assert supervisor.returncode == 0, output


def scrape(port: int) -> tuple[str, tuple[float, float]]:
    """Which worker answered ``/metrics`` on a new connection, and the chat requests
    answered 200 and the durations recorded that it counts (scrapes count themselves too).
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        worker = response.getheader(WORKER_HEADER) or ""
    finally:
        conn.close()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    requests = sum(s.value for s in samples if s.name == "gateway_requests_total"
                   and s.labels["door"] == "openai" and s.labels["status"] == "200")
    durations = sum(s.value for s in samples if s.labels.get("door") == "openai"
                    and s.name == "gen_ai_client_operation_duration_seconds_count")
    return worker, (requests, durations)


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def age(pid: int) -> float:
    """Seconds since process ``pid`` started."""
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - started / os.sysconf("SC_CLK_TCK")
