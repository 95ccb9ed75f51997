"""A thousand streams at once: each 200 tokens at a simulated 20 tokens a second, straight
to the simulator and through the gateway, in one run.

    .venv/bin/python -m loadtest.streams      # writes its section of loadtest/RESULTS.md

One aiohttp client (this process) opens ``--streams`` streams together and notes when each
chunk arrives; what the gateway adds is the difference between the two runs' delays between
chunks. The simulator, the gateway and this client share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from loadtest.batches import write_section
from loadtest.run import ROOT, free_ports, start, wait_ready

HERE = Path(__file__).resolve().parent
SECTION = "## A thousand streams"
MODEL = "command-r-plus:104b"  # one of the simulated MLX server's models
TOKENS, PACE = 200, 20.0  # per stream; tokens a second
REPLY = " ".join(f"word{i}" for i in range(TOKENS))
TARGET_MS = 5.0  # added inter-chunk delay, p99


@dataclass
class Run:
    name: str
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)  # time to the first chunk
    gaps_ms: list[float] = field(default_factory=list)  # between one chunk and the next
    seconds: float = 0.0

    def percentile(self, values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def one(http: aiohttp.ClientSession, url: str, run: Run, go: asyncio.Event) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": TOKENS + 50,
            "messages": [{"role": "user", "content": "Say it all."}]}
    await go.wait()
    sent = time.perf_counter()
    last = None
    try:
        async with http.post(url, json=body) as response:
            if response.status != 200:
                run.failed.append(f"HTTP {response.status}")
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                if last is None:
                    run.first_ms.append((now - sent) * 1000)
                else:
                    run.gaps_ms.append((now - last) * 1000)
                last = now
        run.completed += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        run.failed.append(type(exc).__name__)


async def drive(name: str, url: str, streams: int) -> Run:
    run = Run(name)
    go = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = [asyncio.create_task(one(http, url, run, go)) for _ in range(streams)]
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        run.seconds = time.perf_counter() - started
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="loadtest-streams-"))
    ports = free_ports(("sim", "gateway"))
    sim_url = f"http://127.0.0.1:{ports['sim']}/v1"
    config = work / "gateway.toml"
    config.write_text(f"""[server]
port = {ports['gateway']}

[tasks]
data_dir = "{work / 'data'}"

[[backends]]
name = "sim"
kind = "openai"
url = "{sim_url}"
max_connections = {args.streams + 100}
max_queue = {args.streams}
""")
    processes = [
        start([sys.executable, "-m", "gateway.sim", "mlx", "--port", str(ports["sim"]),
               "--reply", REPLY, "--tokens-per-s", str(PACE), "--ttft", "0"],
              work / "sim.log"),
        start([sys.executable, "-m", "gateway", "--log-level", "warning", "serve", "--config",
               str(config)], work / "gateway.log")]
    try:
        wait_ready(f"{sim_url}/models", process=processes[0])
        wait_ready(f"http://127.0.0.1:{ports['gateway']}/health", process=processes[1])
        runs = []
        for name, url in (("direct to the simulator", f"{sim_url}/chat/completions"),
                          ("through the gateway",
                           f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions")):
            asyncio.run(drive(name, url, 20))  # warm up
            runs.append(asyncio.run(drive(name, url, args.streams)))
            print(f"{name}: {runs[-1].completed} of {args.streams} completed in "
                  f"{runs[-1].seconds:.1f} s", file=sys.stderr)
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    direct, gateway = runs
    table = "\n".join([
        "| path | completed | failed | seconds | first chunk p50 ms | p99 | between chunks "
        "p50 ms | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r.name} | {r.completed:,} | {len(r.failed)} | {r.seconds:.1f} | "
          f"{r.percentile(r.first_ms, 50):.1f} | {r.percentile(r.first_ms, 99):.1f} | "
          f"{r.percentile(r.gaps_ms, 50):.1f} | {r.percentile(r.gaps_ms, 99):.1f} | "
          f"{max(r.gaps_ms):.1f} |" for r in runs)])
    added = gateway.percentile(gateway.gaps_ms, 99) - direct.percentile(direct.gaps_ms, 99)
    met = "met" if added <= TARGET_MS and gateway.completed == args.streams else "NOT met"
    command = f".venv/bin/python -m loadtest.streams --streams {args.streams}"
    report = "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        f"{args.streams:,} streams opened together, each {TOKENS} tokens from the simulated "
        f"MLX server at {PACE:g} tokens a second (a chunk every {1000 / PACE:g} ms, about "
        f"{TOKENS / PACE:g} s a stream), first straight to it, then through one gateway "
        f"process (its backend allowed {args.streams + 100} connections). One aiohttp "
        "client opens them all and notes each chunk's arrival.",
        table,
        f"- Through the gateway {gateway.completed:,} of {args.streams:,} streams completed "
        f"({', '.join(sorted(set(gateway.failed))) or 'none failed'}); the delay between "
        f"chunks at p99 is **{added:+.1f} ms** against straight to the simulator (target: "
        f"at most +{TARGET_MS:g} ms, all complete: {met}).",
    ]) + "\n"
    write_section(args.out, report, SECTION)
    print(report)


if __name__ == "__main__":
    main()
