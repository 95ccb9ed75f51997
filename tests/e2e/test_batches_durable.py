"""Batches survive what operators meet: the gateway killed (kill -9) in the middle of a
batch and started again on the same data directory finishes it; one of two ``gateway
worker`` processes on Redis killed mid-batch leaves its lines to the other; Redis itself
killed mid-batch and started again (its append-only file on) loses none; every line
answered once.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import openai

from gateway.sim import create_ollama_app
from tests.integration.conftest import host_models
from tests.redis_peer import RedisServer
from tests.support import GATEWAY, GatewayProcess, ServerThread, Sim, openai_client, wait_until

LINES = 120


def line(n: int) -> dict[str, Any]:
    return {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "qwq:32b", "messages": [{"role": "user", "content": f"{n}"}],
                     "max_tokens": 16}}


def batch_of(api: openai.OpenAI, lines: int) -> str:
    """A batch of ``lines`` chat completions, made through the API; its id."""
    content = b"".join(json.dumps(line(n)).encode() + b"\n" for n in range(lines))
    source = api.files.create(file=("work.jsonl", io.BytesIO(content)), purpose="batch")
    return api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                              completion_window="24h").id


def under_way(api: openai.OpenAI, batch_id: str, done: int, of: int) -> None:
    """Wait until ``done`` lines are answered, and make sure the batch is not over."""
    def some_done() -> bool:
        counts = api.batches.retrieve(batch_id).request_counts
        return counts is not None and counts.completed >= done

    wait_until(some_done, 60, "some lines answered")
    counts = api.batches.retrieve(batch_id).request_counts
    assert counts is not None and counts.completed < of  # in the middle


def every_line_once(api: openai.OpenAI, batch_id: str, lines: int) -> None:
    """Wait for the batch to complete; every line answered, each exactly once."""
    deadline = time.monotonic() + 90
    while (done := api.batches.retrieve(batch_id)).status != "completed":
        assert time.monotonic() < deadline, done
        time.sleep(0.2)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (lines, lines, 0)
    text = api.files.content(done.output_file_id).text  # type: ignore[arg-type]
    ids = [json.loads(x)["custom_id"] for x in text.splitlines()]
    assert sorted(ids) == sorted(f"line-{n}" for n in range(lines))  # each exactly once


def test_a_gateway_killed_mid_batch_finishes_it_when_started_again(tmp_path: Path) -> None:
    sim = Sim(ServerThread(lambda: create_ollama_app(host_models())).start(), "ollama")
    sim.fault("qwq:32b", latency=0.2)  # 120 lines, 8 at once, 0.2 s each: 3 s or so
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[backends]]\nname = "studio"\nkind = "ollama"\n'
                      f'url = "{sim.api_url}"\n\n[tasks]\ndata_dir = "{tmp_path / "data"}"\n')
    gateway = GatewayProcess(config)
    try:
        api = openai_client(gateway.url)
        batch_id = batch_of(api, LINES)

        under_way(api, batch_id, 10, LINES)  # killed in the middle
        gateway.process.send_signal(signal.SIGKILL)  # no shutdown, no goodbye
        gateway.stop()  # (collects it)
        gateway = GatewayProcess(config)  # the same data directory
        api = openai_client(gateway.url)
        every_line_once(api, batch_id, LINES)
        listed = subprocess.run([*GATEWAY, "batches", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, check=True).stdout
        assert f"{batch_id}  completed   [{'#' * 24}] {LINES}/{LINES}" in listed
    finally:
        gateway.stop()
        sim.server.stop()


def redis_config(path: Path, sim: Sim, redis: RedisServer, worker: bool,
                 visibility: float = 2.0) -> Path:
    path.write_text(f'[[backends]]\nname = "studio"\nkind = "ollama"\nurl = "{sim.api_url}"\n\n'
                    f'[tasks]\nqueue = "redis"\nredis_url = "{redis.url}"\n'
                    f'worker = {str(worker).lower()}\nvisibility_timeout = {visibility}\n')
    return path


def test_a_gateway_stopped_mid_batch_puts_its_lines_back_at_once(tmp_path: Path) -> None:
    """A stop (SIGTERM, a deploy) puts the lines at work back in the queue: started again,
    the gateway answers them now, not once their claims lapse (the visibility timeout,
    five minutes by default).
    """
    sim = Sim(ServerThread(lambda: create_ollama_app(host_models())).start(), "ollama")
    sim.fault("qwq:32b", latency=0.5)
    with RedisServer() as redis:
        config = redis_config(tmp_path / "gateway.toml", sim, redis, worker=True,
                              visibility=60.0)
        gateway = GatewayProcess(config)
        try:
            api = openai_client(gateway.url)
            batch_id = batch_of(api, 40)
            under_way(api, batch_id, 8, 40)
            gateway.stop()  # SIGTERM, lines at work
            gateway = GatewayProcess(config)
            started = time.monotonic()
            api = openai_client(gateway.url)
            every_line_once(api, batch_id, 40)
            assert time.monotonic() - started < 30  # (not the 60 s of their claims)
        finally:
            gateway.stop()
            sim.server.stop()


def test_a_worker_killed_mid_batch_leaves_its_lines_to_the_other(tmp_path: Path) -> None:
    sim = Sim(ServerThread(lambda: create_ollama_app(host_models())).start(), "ollama")
    sim.fault("qwq:32b", latency=0.05)
    with RedisServer() as redis:
        config = redis_config(tmp_path / "gateway.toml", sim, redis, worker=False)
        gateway = GatewayProcess(config)  # the API only: the workers answer
        workers = [subprocess.Popen([*GATEWAY, "worker", "--config", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(2)]
        try:
            api = openai_client(gateway.url)
            batch_id = batch_of(api, 500)

            under_way(api, batch_id, 50, 500)  # killed in the middle
            workers[0].send_signal(signal.SIGKILL)  # mid-line, its claims unacknowledged
            workers[0].wait(timeout=10)
            every_line_once(api, batch_id, 500)
            # Nothing of the batch stays in the queue (its stream kept every line before).
            assert redis.command("XLEN", "gw:{tasks}:lines") == b":0"
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
                worker.wait(timeout=20)
            gateway.stop()
            sim.server.stop()


def test_a_worker_hung_up_on_stops_as_it_stops_when_told(tmp_path: Path) -> None:
    """SIGHUP (logrotate's, a closed terminal's) ended it on the spot (exit 129): its lines
    at work waited out their claims before another took them."""
    sim = Sim(ServerThread(lambda: create_ollama_app(host_models())).start(), "ollama")
    with RedisServer() as redis:
        config = redis_config(tmp_path / "gateway.toml", sim, redis, worker=False)
        worker = subprocess.Popen([*GATEWAY, "worker", "--config", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert worker.stdout is not None
            for line in worker.stdout:  # (up: it says where it takes lines from)
                if "answering batch lines" in line:
                    break
            worker.send_signal(signal.SIGHUP)
            worker.communicate(timeout=30)
            assert worker.returncode == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate(timeout=10)
            sim.server.stop()


def test_redis_restarted_mid_batch_loses_no_line(tmp_path: Path) -> None:
    sim = Sim(ServerThread(lambda: create_ollama_app(host_models())).start(), "ollama")
    sim.fault("qwq:32b", latency=0.05)
    with RedisServer(appendonly=True) as redis:
        config = redis_config(tmp_path / "gateway.toml", sim, redis, worker=True)
        gateway = GatewayProcess(config)  # its own worker, and one apart
        worker = subprocess.Popen([*GATEWAY, "worker", "--config", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            api = openai_client(gateway.url)
            batch_id = batch_of(api, 300)

            under_way(api, batch_id, 40, 300)
            redis.kill()  # gone mid-batch, as in a crash
            try:
                api.batches.retrieve(batch_id)
                raise AssertionError("the batch was read from a Redis that is down")
            except openai.APIStatusError as exc:  # said plainly, to be tried again
                assert exc.status_code == 503
                assert exc.response.headers.get("retry-after") == "1"
            time.sleep(1.0)
            redis.start()  # the same port and folder: its append-only file read back
            every_line_once(api, batch_id, 300)
            assert worker.poll() is None  # the worker apart waited for Redis, and goes on
        finally:
            if worker.poll() is None:
                worker.terminate()
            worker.wait(timeout=20)
            gateway.stop()
            sim.server.stop()
