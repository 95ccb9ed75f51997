"""A large batch does not slow the IDE down: interactive requests sent while a batch runs
keep the latency they have on an idle gateway (p50 within 20%), because batch lines take
only ``[tasks] share`` of each deployment and never wait in its line.

The gateway and the simulator run in processes of their own, as an operator runs them, so
the test's client shares no interpreter with either.
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai

from tests.support import GatewayProcess, Sim, free_port, openai_client, wait_ready, wait_until

PER_REQUEST = 0.05  # the simulated model's seconds per answer


def p50(api: openai.OpenAI, prompts: list[str]) -> float:
    took = []
    for prompt in prompts:  # one after another, as a person at an IDE asks
        started = time.perf_counter()
        api.chat.completions.create(model="qwq:32b", max_tokens=8,
                                    messages=[{"role": "user", "content": prompt}])
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def batch_line(n: int) -> dict[str, Any]:
    return {"custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "qwq:32b", "messages": [{"role": "user", "content": f"{n}"}],
                     "max_tokens": 8}}


def test_interactive_latency_holds_during_a_large_batch(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway.sim", "ollama", "--port",
                                str(port)], stdout=subprocess.DEVNULL, text=True)
    gateway = None
    try:
        sim = Sim(SimpleNamespace(url=f"http://127.0.0.1:{port}"), "ollama")  # type: ignore[arg-type]
        wait_ready(sim.url + "/api/version", process)
        sim.fault("qwq:32b", latency=PER_REQUEST, reply="fine")
        config = tmp_path / "gateway.toml"  # a model that answers two at a time (as Ollama
        # with OLLAMA_NUM_PARALLEL=2); the worker would run 8 lines at once if it could
        config.write_text(f'[[backends]]\nname = "studio"\nkind = "ollama"\n'
                          f'url = "{sim.api_url}"\nmax_concurrency = 2\n\n'
                          f'[tasks]\ndata_dir = "{tmp_path / "data"}"\nshare = 0.5\n')
        gateway = GatewayProcess(config)
        api = openai_client(gateway.url)
        p50(api, [f"warm-up {n}" for n in range(5)])
        idle = p50(api, [f"idle question {n}" for n in range(40)])  # (no two alike: no hits)

        content = b"".join(json.dumps(batch_line(n)).encode() + b"\n" for n in range(1000))
        source = api.files.create(file=("big.jsonl", io.BytesIO(content)), purpose="batch")
        batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")

        def busy() -> bool:
            counts = api.batches.retrieve(batch.id).request_counts
            return counts is not None and counts.completed >= 20

        wait_until(busy, 30, "the batch under way")
        during = p50(api, [f"busy question {n}" for n in range(40)])
        still = api.batches.retrieve(batch.id)
        assert still.status == "in_progress", "the batch ended before the measurement did"
        assert still.request_counts is not None and still.request_counts.completed < 1000
        assert during <= idle * 1.2, f"p50 {during * 1000:.1f} ms during the batch, " \
                                     f"{idle * 1000:.1f} ms idle"
        api.batches.cancel(batch.id)
    finally:
        if gateway is not None:
            gateway.stop()
        process.terminate()
        process.wait(timeout=10)
