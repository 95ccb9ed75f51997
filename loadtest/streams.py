"""A thousand streams at once: each 200 tokens at a simulated 20 tokens a second, straight
to the simulator, through the bare proxy, and through the gateway without and with the
default config's plugins, in one run.

    .venv/bin/python -m loadtest.streams      # writes its section of loadtest/RESULTS.md

One aiohttp client (this process, its garbage collector held while the streams run) opens
``--streams`` streams together and notes when each chunk arrives; what a proxy adds is the
difference between its run's delays between chunks and those straight to the simulator in
the same round. The simulator, the proxies and this client share the machine's cores, so
what a proxy costs a chunk (its CPU time, from /proc) is reported too. Every stream asks its
own question, so the cache answers none of them. The paths take turns for ``--rounds``
rounds; the table has each figure's median over them (a p99 of delays moves a lot from one
run to the next here).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
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
    gap_ends_ms: list[float] = field(default_factory=list)  # when each gap ended (from go)
    started: float = 0.0  # when the streams were let go (perf_counter)
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
                    run.gap_ends_ms.append((now - run.started) * 1000)
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
        gc.collect()
        gc.disable()  # (a collection here would hold every stream's next chunk at once)
        try:
            run.started = time.perf_counter()
            go.set()
            await asyncio.gather(*tasks)
            run.seconds = time.perf_counter() - run.started
        finally:
            gc.enable()
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
    parser.add_argument("--rounds", type=int, default=3)
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
        rounds: list[list[Run]] = []
        for round_ in range(args.rounds):
            runs = []
            for name, key, url in paths:
                proxy = None if key == "sim" else processes[key].pid
                asyncio.run(drive(name, url, 20))  # warm up
                runs.append(asyncio.run(drive(name, url, args.streams, proxy)))
                print(f"round {round_ + 1}: {name}: {runs[-1].completed} of {args.streams} "
                      f"completed in {runs[-1].seconds:.1f} s", file=sys.stderr)
            rounds.append(runs)
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    section = report(rounds, args.streams, listed)
    write_section(args.out, section, SECTION)
    print(section)


class Summary:
    """One path's figures over the rounds: medians, but for what completed and failed."""

    def __init__(self, runs: list[Run], directs: list[Run]) -> None:
        median = statistics.median
        self.name = runs[0].name
        self.completed = sum(r.completed for r in runs)
        self.failed = [f for r in runs for f in r.failed]
        self.first_p50 = median(percentile(r.first_ms, 50) for r in runs)
        self.first_p99 = median(percentile(r.first_ms, 99) for r in runs)
        self.gap_p50 = median(percentile(r.gaps_ms, 50) for r in runs)
        self.gap_p99 = median(percentile(r.gaps_ms, 99) for r in runs)
        self.gap_max = max(max(r.gaps_ms) for r in runs)
        self.added = [percentile(r.gaps_ms, 99) - percentile(d.gaps_ms, 99)  # each round's
                      for r, d in zip(runs, directs, strict=True)]
        # Of the delays longer than straight to the simulator's p99, the share that came
        # while streams were still being opened (before the last one's first chunk).
        self.opening = median(_while_opening(r, percentile(d.gaps_ms, 99))
                              for r, d in zip(runs, directs, strict=True))
        used = [r.cpu_us for r in runs if r.cpu_us is not None]
        self.cpu_us = median(used) if used else None

    def added_cell(self) -> str:
        each = ", ".join(f"{a:+.1f}" for a in self.added)
        return f"{statistics.median(self.added):+.1f} ({each})"


def _while_opening(run: Run, over: float) -> float:
    opened = max(run.first_ms)
    slow = [end for gap, end in zip(run.gaps_ms, run.gap_ends_ms, strict=True) if gap > over]
    return sum(end <= opened for end in slow) / len(slow) if slow else 0.0


def report(rounds: list[list[Run]], streams: int, listed: str) -> str:
    directs = [runs[0] for runs in rounds]
    direct, bare, plain, plugged = (Summary([runs[i] for runs in rounds], directs)
                                    for i in range(4))
    total = streams * len(rounds)
    table = "\n".join([
        "| path | completed | failed | first chunk p50 ms | p99 | between chunks p50 ms | "
        "p99 | max | p99 added (each round) | slow ones while opening | "
        "proxy CPU a chunk, µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {s.name} | {s.completed:,} | {len(s.failed)} | {s.first_p50:.1f} | "
          f"{s.first_p99:.1f} | {s.gap_p50:.1f} | {s.gap_p99:.1f} | {s.gap_max:.1f} | "
          f"{'' if s is direct else s.added_cell()} | {s.opening:.0%} | "
          f"{'' if s.cpu_us is None else f'{s.cpu_us:.0f}'} |"
          for s in (direct, bare, plain, plugged))])
    findings = []
    for path in (plugged, plain):
        added = statistics.median(path.added)
        met = added <= TARGET_MS and path.completed == total
        failed = ", ".join(sorted(set(path.failed))) or "none failed"
        findings.append(
            f"- Through {path.name}: {path.completed:,} of {total:,} streams completed "
            f"({failed}); the delay between chunks at p99 is **{added:+.1f} ms** against "
            f"straight to the simulator, the median of {len(rounds)} rounds (target: at most "
            f"+{TARGET_MS:g} ms, all complete: {'met' if met else 'NOT met'}).")
    findings.append(
        f"- The bare proxy, in the same rounds, adds {statistics.median(bare.added):+.1f} ms "
        f"at p99 and spends {bare.cpu_us:.0f} µs of CPU a chunk; the gateway "
        f"{plain.cpu_us:.0f} µs, with {listed} {plugged.cpu_us:.0f} µs. Every chunk costs "
        "each proxy a read and a write on a socket; on these two cores the simulator and "
        "the client need the same time the proxy takes, so what a proxy spends a chunk "
        "comes back as delay.")
    findings.append(
        f"- Slow ones while opening: of the delays between chunks longer than straight to "
        f"the simulator's p99 (in the same round), the share that came while streams were "
        f"still being opened, before the last one's first chunk: the gateway "
        f"{plain.opening:.0%}, the bare proxy {bare.opening:.0%}."
        + (" What a request costs the gateway before its first chunk (its routing, the "
           "plugins, the call upstream) is spent while the streams already flowing wait."
           if plain.opening >= 0.5 else ""))
    command = (f".venv/bin/python -m loadtest.streams --streams {streams} "
               f"--rounds {len(rounds)}")
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
        f"chunk's arrival (its own garbage collector held meanwhile, so that its pauses "
        f"are not counted as a path's). The paths take turns, {len(rounds)} rounds; each "
        "figure is the median of the rounds' (completed and failed: their sum; max: the largest).",
        table,
        "\n".join(findings),
    ]) + "\n"


if __name__ == "__main__":
    main()
