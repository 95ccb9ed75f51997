"""A batch on a deployment whose slots are known: how long its lines take, beside the same
requests asked one after another through the same gateway, in one run.

    .venv/bin/python -m loadtest.batch_share      # its section of loadtest/RESULTS.md

The simulated Ollama server answers each request after ``--latency`` seconds; the gateway
(``gateway serve``, the local task queue) knows the backend runs ``--parallel`` requests at
once, so batch lines may take ``[tasks] share`` (half) of those slots and interactive
requests the rest. The batch goes in through the openai SDK (a JSONL upload, then
``batches.create``) and is looked at every 20 ms until it is ``completed``. The lower bound
is the lines' latency spread over their share of the slots.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
import orjson

from loadtest.batches import write_section
from loadtest.litellm import stop
from loadtest.run import free_ports, start, wait_ready

HERE = Path(__file__).resolve().parent
SECTION = "## A batch on a deployment with known slots"
MODEL = "phi3.5:3.8b"


def _line(n: int) -> bytes:
    return orjson.dumps({"custom_id": f"line-{n}", "method": "POST",
                         "url": "/v1/chat/completions",
                         "body": {"model": MODEL, "max_tokens": 8, "messages": [
                             {"role": "user", "content": f"Question {n}"}]}})


def _batch_seconds(client: openai.OpenAI, lines: int) -> float:
    source = client.files.create(
        file=("lines.jsonl", io.BytesIO(b"\n".join(_line(n) for n in range(lines)))),
        purpose="batch")
    began = time.perf_counter()
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
    took = time.perf_counter() - began
    counts = batch.request_counts
    if batch.status != "completed" or counts is None or counts.completed != lines:
        raise RuntimeError(f"the batch ended {batch.status}: {counts}")
    return took


def _one_after_another(client: openai.OpenAI, lines: int) -> float:
    began = time.perf_counter()
    for n in range(lines):
        client.chat.completions.create(model=MODEL, max_tokens=8, messages=[
            {"role": "user", "content": f"Question {n} again"}])
    return time.perf_counter() - began


def run(lines: int, latency: float, parallel: int, rounds: int) -> tuple[float, float]:
    """Median seconds of the batch and of the same requests one after another."""
    ports = free_ports(("sim", "gateway"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "gateway.toml"
        config.write_text(
            f'[server]\nport = {ports["gateway"]}\n\n[tasks]\ndata_dir = "{work / "tasks"}"\n\n'
            f'[[backends]]\nname = "ollama"\nkind = "ollama"\n'
            f'url = "http://127.0.0.1:{ports["sim"]}"\nparallel = {parallel}\n')
        processes = [start([sys.executable, "-m", "gateway.sim", "ollama", "--port",
                            str(ports["sim"]), "--ttft", str(latency), "--tokens-per-s", "0"],
                           work / "sim.log")]
        try:
            wait_ready(f"http://127.0.0.1:{ports['sim']}/api/version", process=processes[0])
            processes.append(start([sys.executable, "-m", "gateway", "--log-level", "warning",
                                    "serve", "--config", str(config)], work / "gateway.log"))
            wait_ready(f"http://127.0.0.1:{ports['gateway']}/health", 60, processes[1])
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['gateway']}/v1",
                                   api_key="unused", max_retries=0, timeout=600)
            batch, sequential = [], []
            for _ in range(rounds):
                batch.append(_batch_seconds(client, lines))
                sequential.append(_one_after_another(client, lines))
            return statistics.median(batch), statistics.median(sequential)
        finally:
            stop(processes)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.batch_share",
                                     description=__doc__)
    parser.add_argument("--lines", type=int, default=24)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument("--parallel", type=int, default=2, help="the backend's slots")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    batch, sequential = run(args.lines, args.latency, args.parallel, args.rounds)
    share = max(1, args.parallel // 2)
    bound = args.lines * args.latency / share
    command = " ".join(["python -m loadtest.batch_share", *sys.argv[1:]])
    section = "\n".join([
        SECTION, "",
        f"Command: `.venv/bin/{command}`",
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python "
        f"{platform.python_version()}; medians of {args.rounds} rounds.)", "",
        f"The simulated Ollama answers each request in {args.latency * 1000:g} ms; the "
        f"gateway knows it runs {args.parallel} at once, so batch lines may take {share} "
        "of those slots (`[tasks] share`, half) and interactive requests the rest.", "",
        "| what | seconds |", "|---|---:|",
        f"| a batch of {args.lines} lines, from `batches.create` to `completed` | "
        f"{batch:.2f} |",
        f"| the same {args.lines} requests one after another | {sequential:.2f} |",
        f"| lower bound: {args.lines} x {args.latency * 1000:g} ms over {share} slot"
        f"{'s' if share > 1 else ''} | {bound:.2f} |", ""])
    print(section)
    write_section(args.out, section, SECTION)


if __name__ == "__main__":
    main()
