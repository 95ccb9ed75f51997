"""Where a gateway request's time goes, stage by stage: py-spy samples the gateway process
while wrk keeps 32 requests in flight.

    .venv/bin/python -m loadtest.profile     # writes its section of loadtest/RESULTS.md

The gateway runs with the default config's plugins (every request a cache miss) in front of
the simulated OpenAI-compatible server; py-spy (installed into the virtualenv when missing)
samples its stacks 200 times a second. Each sample is charged to the innermost stage its
stack is in (a plugin before the pipeline around it, say), by the files of its frames.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.batches import write_section
from loadtest.litellm import default_plugins
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
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    ensure_wrk()
    spy = ensure_py_spy()
    work = Path(tempfile.mkdtemp(prefix="loadtest-profile-"))
    ports = free_ports(("sim", "gateway"))
    names, plugins = default_plugins()
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
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(processes[1].pid), "--rate", "200", "--format", "raw",
             "--output", str(raw), "--duration", str(int(args.seconds) + 1), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        result = wrk(target.url, 32, args.seconds, target.script)
        sampler.wait(timeout=args.seconds + 60)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    shares: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        shares[stage_of(stack)] += int(count)
    busy = sum(shares.values())  # (py-spy leaves out a thread that waits)
    working = min(1.0, busy / (200 * args.seconds))  # of the time, the process worked
    table = "\n".join([
        "| stage | share of the gateway's work | µs per request |",
        "|---|---:|---:|",
        *(f"| {name} | {shares[name] / busy:.1%} | "
          f"{shares[name] / busy * working * 1e6 / result['rps']:.0f} |"
          for name in [*(name for name, _ in STAGES), REST] if shares[name])])
    command = f".venv/bin/python -m loadtest.profile --seconds {args.seconds:g}"
    report = "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        f"The gateway with the default config's plugins ({', '.join(names)}; every request "
        "a cache miss) at concurrency 32, sampled by py-spy 200 times a second: "
        f"{result['rps']:,.0f} requests a second; the process was at work {working:.0%} of "
        f"the time ({busy:,} samples). Each sample is charged to the innermost stage its "
        "stack is in; µs per request is the stage's share of the time the process worked, "
        "over the requests it answered, so the column adds up to the CPU time per request "
        "at this load.",
        table,
    ]) + "\n"
    write_section(args.out, report, SECTION)
    print(report)


if __name__ == "__main__":
    main()
