"""One worker against two: ``gateway serve --workers N`` at concurrency 32, in one run.

    .venv/bin/python -m loadtest.workers      # writes its section of loadtest/RESULTS.md

Against the same simulated OpenAI-compatible server (``python -m gateway.sim openai``, a
17-word reply), wrk (one thread) drives, in interleaved rounds: the bare proxy, the gateway
with one worker and with two (each worker a process of its own on the one port). The load
generator, the simulator and the workers share the machine's cores, so on 2 cores a second
worker has at most what the others leave it: the table says what each used. Both gateways
keep their batch queue and share health through the benchmark's own redis-server, as
several workers must.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest.batches import Meter, write_section
from loadtest.run import (
    BODY,
    REPLY,
    ROOT,
    _config,
    _start_redis,
    _target,
    ensure_wrk,
    free_ports,
    start,
    wait_ready,
    wrk,
)

HERE = Path(__file__).resolve().parent
SECTION = "## One worker or two"


def children(pid: int) -> list[int]:
    """The worker processes of a supervising ``gateway serve``."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listed:
            found += [int(child) for child in listed.read().split()]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="loadtest-workers-"))
    ports = free_ports(("sim", "proxy", "one", "two"))
    sim_url = f"http://127.0.0.1:{ports['sim']}/v1"
    processes = {
        "sim": start([sys.executable, "-m", "gateway.sim", "openai", "--port",
                      str(ports["sim"]), "--reply", REPLY], work / "sim.log"),
        "proxy": start([sys.executable, "loadtest/bare_proxy.py", "--port",
                        str(ports["proxy"]), "--upstream", f"http://127.0.0.1:{ports['sim']}"],
                       work / "proxy.log")}
    redis = _start_redis()  # (several workers keep their batch queue there)
    shared = f'[tasks]\nqueue = "redis"\nredis_url = "{redis.url}"\n\n' \
             f'[routing]\nredis_url = "{redis.url}"\n'
    for name, workers in (("one", 1), ("two", 2)):
        config = work / f"{name}.toml"
        config.write_text(_config(ports[name], {"sim": sim_url}) + "\n" + shared)
        processes[name] = start([sys.executable, "-m", "gateway", "--log-level", "warning",
                                 "serve", "--config", str(config), "--workers", str(workers)],
                                work / f"{name}.log")
    rows = {"proxy": "bare aiohttp proxy", "one": "gateway, 1 worker",
            "two": "gateway, 2 workers (`--workers 2`)"}
    rps: dict[str, list[float]] = {name: [] for name in rows}
    cores: dict[str, dict[str, float]] = {}
    try:
        wait_ready(f"http://127.0.0.1:{ports['sim']}/v1/models", process=processes["sim"])
        targets = {}
        for name in rows:
            if name != "proxy":  # (which answers POST alone)
                wait_ready(f"http://127.0.0.1:{ports[name]}/health", process=processes[name])
            targets[name] = _target(rows[name], ports[name], BODY, work)
            wrk(targets[name].url, 32, 1, targets[name].script)  # warm up
        for _ in range(args.rounds):
            for name, target in targets.items():
                pids = [processes[name].pid, *children(processes[name].pid)]
                meter = Meter({"server": pids, "simulator": [processes["sim"].pid]})
                rps[name].append(wrk(target.url, 32, args.seconds, target.script)["rps"])
                cores[name] = meter.cores()
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
        redis.kill()
    median = {name: statistics.median(values) for name, values in rps.items()}
    table = "\n".join([
        "| path | c=32 req/s (median) | rounds | cores: server | simulator | load generator "
        "and the rest |", "|---|---:|---|---:|---:|---:|",
        *(f"| {rows[n]} | {median[n]:,.0f} | {', '.join(f'{v:,.0f}' for v in rps[n])} | "
          f"{cores[n]['server']:.2f} | {cores[n]['simulator']:.2f} | "
          f"{cores[n]['machine'] - cores[n]['server'] - cores[n]['simulator']:.2f} |"
          for n in rows)])
    command = f".venv/bin/python -m loadtest.workers --seconds {args.seconds:g} " \
              f"--rounds {args.rounds}"
    report = "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(),
        table,
        f"- Two workers: **{median['two'] / median['one']:.2f} times** one worker's "
        f"throughput, {median['two'] / median['proxy']:.1%} of the bare proxy's (one worker: "
        f"{median['one'] / median['proxy']:.1%}).",
    ]) + "\n"
    write_section(args.out, report, SECTION)
    print(report)


if __name__ == "__main__":
    main()
