"""A thousand streams at once: each 200 tokens at a simulated 20 tokens a second, straight
to the simulator, through the bare proxy, and through the gateway without and with the
default config's plugins, in one run.

    .venv/bin/python -m loadtest.streams      # writes its section of loadtest/RESULTS.md

One aiohttp client (this process) opens ``--streams`` streams together and notes when each
chunk arrives; what a proxy adds is the difference between its run's delays between chunks
and those straight to the simulator. The simulator, the proxies and this client share the
machine's cores, so what a proxy costs a chunk (its CPU time, from /proc) is reported too.
Every stream asks its own question, so the cache answers none of them.
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

from loadtest.batches import cpu_of, percentile, write_section
from loadtest.litellm import default_plugins, wait_port
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
    cpu_us: float | None = None  # the proxy's CPU time a chunk (None: no proxy)


async def one(http: aiohttp.ClientSession, url: str, question: str, run: Run,
              go: asyncio.Event) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": TOKENS + 50,
            "messages": [{"role": "user", "content": question}]}
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


async def drive(name: str, url: str, streams: int, proxy: int | None = None) -> Run:
    """``streams`` streams opened together; ``proxy``: the pid whose CPU time is counted."""
    run = Run(name)
    go = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    tag = time.monotonic_ns()  # a question of its own for every stream of every run
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = [asyncio.create_task(one(http, url, f"Say it all. ({tag}.{i})", run, go))
                 for i in range(streams)]
        await asyncio.sleep(0.1)
        cpu = cpu_of(proxy) if proxy else 0.0
        started = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        run.seconds = time.perf_counter() - started
        if proxy:
            chunks = len(run.gaps_ms) + len(run.first_ms)
            run.cpu_us = (cpu_of(proxy) - cpu) / max(1, chunks) * 1e6
    return run


def gateway_config(port: int, sim_url: str, streams: int, data: Path, plugins: str) -> str:
    return f"""[server]
port = {port}

[tasks]
data_dir = "{data}"

[[backends]]
name = "sim"
kind = "openai"
url = "{sim_url}"
max_connections = {streams + 100}
max_queue = {streams}

{plugins}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    work = Path(tempfile.mkdtemp(prefix="loadtest-streams-"))
    ports = free_ports(("sim", "proxy", "gateway", "plugins"))
    sim_url = f"http://127.0.0.1:{ports['sim']}/v1"
    plugin_names, plugins = default_plugins()
    processes = {"sim": start(
        [sys.executable, "-m", "gateway.sim", "mlx", "--port", str(ports["sim"]), "--reply",
         REPLY, "--tokens-per-s", str(PACE), "--ttft", "0"], work / "sim.log")}
    processes["proxy"] = start(
        [sys.executable, "loadtest/bare_proxy.py", "--upstream",
         f"http://127.0.0.1:{ports['sim']}", "--port", str(ports["proxy"])], work / "proxy.log")
    for name, declared in (("gateway", ""), ("plugins", plugins)):
        config = work / f"{name}.toml"
        config.write_text(gateway_config(ports[name], sim_url, args.streams, work / name,
                                         declared))
        processes[name] = start([sys.executable, "-m", "gateway", "--log-level", "warning",
                                 "serve", "--config", str(config)], work / f"{name}.log")
    listed = ", ".join(plugin_names)
    paths = [("direct to the simulator", "sim", f"{sim_url}/chat/completions"),
             ("the bare proxy", "proxy",
              f"http://127.0.0.1:{ports['proxy']}/v1/chat/completions"),
             ("the gateway", "gateway",
              f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions"),
             (f"the gateway + {listed}", "plugins",
              f"http://127.0.0.1:{ports['plugins']}/v1/chat/completions")]
    try:
        wait_ready(f"{sim_url}/models", process=processes["sim"])
        wait_port(ports["proxy"], processes["proxy"])
        for name in ("gateway", "plugins"):
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", process=processes[name])
        runs = []
        for name, key, url in paths:
            proxy = None if key == "sim" else processes[key].pid
            asyncio.run(drive(name, url, 20))  # warm up
            runs.append(asyncio.run(drive(name, url, args.streams, proxy)))
            print(f"{name}: {runs[-1].completed} of {args.streams} completed in "
                  f"{runs[-1].seconds:.1f} s", file=sys.stderr)
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    write_section(args.out, report(runs, args.streams, listed), SECTION)
    print(report(runs, args.streams, listed))


def report(runs: list[Run], streams: int, listed: str) -> str:
    direct, bare, plain, plugged = runs

    def added(run: Run) -> float:
        return percentile(run.gaps_ms, 99) - percentile(direct.gaps_ms, 99)

    def cpu(run: Run) -> str:
        return "" if run.cpu_us is None else f"{run.cpu_us:.0f}"

    table = "\n".join([
        "| path | completed | failed | seconds | first chunk p50 ms | p99 | between chunks "
        "p50 ms | p99 | max | p99 added | proxy CPU a chunk, µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r.name} | {r.completed:,} | {len(r.failed)} | {r.seconds:.1f} | "
          f"{percentile(r.first_ms, 50):.1f} | {percentile(r.first_ms, 99):.1f} | "
          f"{percentile(r.gaps_ms, 50):.1f} | {percentile(r.gaps_ms, 99):.1f} | "
          f"{max(r.gaps_ms):.1f} | {'' if r is direct else f'{added(r):+.1f}'} | {cpu(r)} |"
          for r in runs)])
    findings = []
    for run in (plugged, plain):
        met = added(run) <= TARGET_MS and run.completed == streams
        failed = ", ".join(sorted(set(run.failed))) or "none failed"
        findings.append(
            f"- Through {run.name}: {run.completed:,} of {streams:,} streams completed "
            f"({failed}); the delay between chunks at p99 is **{added(run):+.1f} ms** "
            f"against straight to the simulator (target: at most +{TARGET_MS:g} ms, all "
            f"complete: {'met' if met else 'NOT met'}).")
    findings.append(
        f"- The bare proxy, in the same run, adds {added(bare):+.1f} ms at p99 and spends "
        f"{bare.cpu_us:.0f} µs of CPU a chunk; the gateway {plain.cpu_us:.0f} µs, with "
        f"{listed} {plugged.cpu_us:.0f} µs. Every chunk costs each proxy a read and a "
        "write on a socket; on these two cores the simulator and the client need the same "
        "time the proxy takes, so what a proxy spends a chunk comes back as delay.")
    command = f".venv/bin/python -m loadtest.streams --streams {streams}"
    return "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        f"{streams:,} streams opened together, each {TOKENS} tokens from the simulated "
        f"MLX server at {PACE:g} tokens a second (a chunk every {1000 / PACE:g} ms, about "
        f"{TOKENS / PACE:g} s a stream): straight to it, through the bare proxy, and "
        f"through one gateway process without plugins and with the default config's "
        f"({listed}; every question a cache miss); the gateway's backend allows "
        f"{streams + 100} connections. One aiohttp client opens them all and notes each "
        "chunk's arrival.",
        table,
        "\n".join(findings),
    ]) + "\n"


if __name__ == "__main__":
    main()
