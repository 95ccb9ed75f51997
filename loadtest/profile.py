"""Where a gateway request's time goes, and a streamed chunk's, stage by stage: py-spy
samples the gateway process while wrk keeps 32 requests in flight, and then while a thousand
streams run.

    .venv/bin/python -m loadtest.profile     # writes its section of loadtest/RESULTS.md

The gateway runs with the default config's plugins (every request a cache miss) in front of
the simulated OpenAI-compatible server answering at once (requests), then of the simulated
MLX server pacing its tokens (streams, relayed by the bare proxy too, for what a chunk costs
it); py-spy (installed into the virtualenv when missing) samples its stacks 200 times a
second. Each sample is charged to the innermost stage its
stack is in (a plugin before the pipeline around it, say), by the files of its frames.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.batches import write_section
from loadtest.litellm import default_plugins, wait_port
from loadtest.run import (
    BODY,
    REPLY,
    ROOT,
    _config,
    _target,
    ensure_wrk,
    free_ports,
    start,
    wait_ready,
    wrk,
)
from loadtest.streams import PACE, TOKENS, drive, gateway_config
from loadtest.streams import REPLY as STREAM_REPLY

HERE = Path(__file__).resolve().parent
SECTION = "## Where the time goes"
# Stages: a sample goes to the stage of the innermost frame of its stack that bears one of
# a stage's marks (a frame's file and function, as py-spy writes them); for one frame, the
# first stage listed whose mark it bears.
STAGES = [
    ("safety checker (plugin)", ("plugins/safety",)),
    ("quality assurance (plugin)", ("plugins/qa",)),
    ("cache (plugin)", ("plugins/cache", "gateway/store")),
    ("reading the upstream's stream (SSE decoding)", ("gateway/protocol/sse",)),
    ("translating requests and answers (gateway/protocol)", ("gateway/protocol/",)),
    ("asking the upstream (the backends' HTTP client)", ("gateway/backends/client",
                                                         "httptools")),
    ("the backend adapters (gateway/backends)", ("gateway/backends/",)),
    ("routing (selection, balancing, breakers, failover)", ("gateway/routing/",)),
    ("metrics and traces", ("gateway/telemetry/", "opentelemetry")),
    ("the pipeline (plugins' order, verdicts, records)", ("gateway/pipeline/",)),
    ("the front door (parsing and answering in OpenAI's shape)", ("gateway/doors/",)),
    ("HTTP middlewares (auth, request ids, limits, logs)", ("gateway/http/",)),
    ("aiohttp's server (parsing requests, writing responses)", ("aiohttp/",)),
    ("JSON (orjson)", ("orjson",)),
]
REST = "the event loop (uvloop) and the rest"
RATE = 200  # samples a second


def ensure_py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return found


def stage_of(stack: str) -> str:
    for frame in reversed(stack.split(";")):  # (the innermost last)
        for name, marks in STAGES:
            if any(mark in frame for mark in marks):
                return name
    return REST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--streams", type=int, default=1000,
                        help="streams open together for the second table")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    ensure_wrk()
    spy = ensure_py_spy()
    work = Path(tempfile.mkdtemp(prefix="loadtest-profile-"))
    names, plugins = default_plugins()
    result, requests = _requests(spy, work, plugins, args.seconds)
    chunks = _streams(spy, work, plugins, args.streams)
    busy = sum(requests.values())  # (py-spy leaves out a thread that waits)
    working = min(1.0, busy / (RATE * args.seconds))  # of the time, the process worked
    per_request = {name: count / busy * working * 1e6 / result["rps"]
                   for name, count in requests.items()}
    sampled = sum(chunks.shares.values())
    per_chunk = {name: count / sampled * chunks.gateway_us for name, count in
                 chunks.shares.items()}
    table = "\n".join([
        "| stage | share of the gateway's work | µs per request | µs per streamed chunk |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {requests[name] / busy:.1%} | {per_request.get(name, 0):.0f} | "
          f"{per_chunk.get(name, 0):.1f} |"
          for name in [*(name for name, _ in STAGES), REST]
          if requests[name] or chunks.shares[name]),
        f"| **all** | | **{sum(per_request.values()):.0f}** | "
        f"**{chunks.gateway_us:.1f}** |"])
    command = (f".venv/bin/python -m loadtest.profile --seconds {args.seconds:g} "
               f"--streams {args.streams}")
    report = "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        f"The gateway with the default config's plugins ({', '.join(names)}; every request "
        f"a cache miss), sampled by py-spy {RATE} times a second. Requests: at concurrency "
        f"32 against the simulated OpenAI-compatible server answering at once, "
        f"{result['rps']:,.0f} requests a second; the process was at work {working:.0%} of "
        f"the time ({busy:,} samples). Streams: {args.streams:,} streams open together, each "
        f"{TOKENS} tokens at {PACE:g} tokens a second from the simulated MLX server "
        f"({sampled:,} samples); the gateway spent {chunks.gateway_us:.1f} µs of CPU a chunk "
        f"(from /proc), and the bare proxy, relaying the same streams right after, "
        f"{chunks.bare_us:.1f}. Each sample is charged to the innermost stage its stack is "
        "in; a stage's µs is its share of the samples times the CPU time per request (at "
        "this load) or per chunk, so each column adds up to that time.",
        table,
    ]) + "\n"
    write_section(args.out, report, SECTION)
    print(report)


def _shares(raw: Path) -> collections.Counter[str]:
    shares: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        shares[stage_of(stack)] += int(count)
    return shares


def _sample(spy: str, pid: int, raw: Path, seconds: float) -> subprocess.Popen[bytes]:
    sampler = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
         "--output", str(raw), "--duration", str(int(seconds) + 1), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return sampler


def _requests(spy: str, work: Path, plugins: str, seconds: float
              ) -> tuple[dict[str, float], collections.Counter[str]]:
    """wrk's result at c=32 and the samples' stages."""
    ports = free_ports(("sim", "gateway"))
    config = work / "gateway.toml"
    config.write_text(_config(ports["gateway"], {"sim": f"http://127.0.0.1:{ports['sim']}/v1"},
                              plugins))
    processes = [
        start([sys.executable, "-m", "gateway.sim", "openai", "--port", str(ports["sim"]),
               "--reply", REPLY], work / "sim.log"),
        start([sys.executable, "-m", "gateway", "--log-level", "warning", "serve", "--config",
               str(config)], work / "gateway.log")]
    raw = work / "gateway.folded"
    try:
        wait_ready(f"http://127.0.0.1:{ports['sim']}/health", process=processes[0])
        wait_ready(f"http://127.0.0.1:{ports['gateway']}/health", process=processes[1])
        target = _target("gateway", ports["gateway"], BODY, work,
                         headers={"x-gateway-cache": "refresh"})
        wrk(target.url, 32, 2, target.script)  # warm up
        sampler = _sample(spy, processes[1].pid, raw, seconds)
        result = wrk(target.url, 32, seconds, target.script)
        sampler.wait(timeout=seconds + 60)
    finally:
        _stop(processes)
    return result, _shares(raw)


@dataclass
class Chunks:
    shares: collections.Counter[str]
    gateway_us: float  # CPU a chunk
    bare_us: float


def _streams(spy: str, work: Path, plugins: str, streams: int) -> Chunks:
    """The samples' stages while ``streams`` streams run, and what a chunk cost the gateway
    and then the bare proxy.
    """
    ports = free_ports(("sim", "gateway", "proxy"))
    sim_url = f"http://127.0.0.1:{ports['sim']}/v1"
    config = work / "streams.toml"
    config.write_text(gateway_config(ports["gateway"], sim_url, streams, work / "streams",
                                     plugins))
    processes = [
        start([sys.executable, "-m", "gateway.sim", "mlx", "--port", str(ports["sim"]),
               "--reply", STREAM_REPLY, "--tokens-per-s", str(PACE), "--ttft", "0"],
              work / "streams-sim.log"),
        start([sys.executable, "-m", "gateway", "--log-level", "warning", "serve", "--config",
               str(config)], work / "streams-gateway.log"),
        start([sys.executable, "loadtest/bare_proxy.py", "--upstream",
               f"http://127.0.0.1:{ports['sim']}", "--port", str(ports["proxy"])],
              work / "streams-proxy.log")]
    raw = work / "streams.folded"
    gateway = f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions"
    bare = f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions"
    try:
        wait_ready(f"{sim_url}/models", process=processes[0])
        wait_ready(f"http://127.0.0.1:{ports['gateway']}/health", process=processes[1])
        wait_port(ports["proxy"], processes[2])
        asyncio.run(drive("warm-up", gateway, 20))
        sampler = _sample(spy, processes[1].pid, raw, TOKENS / PACE)
        through = asyncio.run(drive("the gateway", gateway, streams, processes[1].pid))
        sampler.wait(timeout=TOKENS / PACE + 60)
        asyncio.run(drive("warm-up", bare, 20))
        direct = asyncio.run(drive("the bare proxy", bare, streams, processes[2].pid))
    finally:
        _stop(processes)
    for run in (through, direct):
        if run.failed or run.cpu_us is None:
            raise SystemExit(f"{run.name}: {len(run.failed)} streams failed")
    assert through.cpu_us is not None and direct.cpu_us is not None
    return Chunks(_shares(raw), through.cpu_us, direct.cpu_us)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
