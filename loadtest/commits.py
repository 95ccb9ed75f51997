"""The gateway at other commits beside this checkout's, in one run: what a change did to its
throughput and CPU, free of the machine's drift from one run to the next.

    .venv/bin/python -m loadtest.commits 1954f44 HEAD            # plain
    .venv/bin/python -m loadtest.commits 1954f44 HEAD --plugins  # default plugins, misses

Each commit is checked out in a git worktree of its own (in a temporary folder, removed
after) and served by this checkout's virtualenv, in front of one simulated OpenAI-compatible
server (``python -m gateway.sim openai``, a 17-word reply); the bare proxy runs beside them.
wrk (one thread, c=32, or ``--connections``) drives them in interleaved rounds, and the
simulator directly; CPU per request is each process's CPU time over the requests it
answered; the latency each adds is its p50 over direct's (at ``--connections 1``, the
issue's added latency). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtest.batches import cpu_of
from loadtest.litellm import MISS, default_plugins
from loadtest.run import (
    BODY,
    HERE,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commits", nargs="+", help="commits to compare (HEAD: this checkout's)")
    parser.add_argument("--plugins", action="store_true",
                        help="the default config's plugins on, every request a cache miss")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="loadtest-commits-") as folder:
        work = Path(folder)
        trees = [_worktree(commit, work / f"tree-{i}") for i, commit in enumerate(args.commits)]
        try:
            _compare(args, trees, work)
        finally:
            for tree in trees:
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                    str(tree)], check=False, capture_output=True)


def _worktree(commit: str, path: Path) -> Path:
    if commit == "HEAD":
        return ROOT
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path),
                    commit], check=True)
    return path


def _compare(args: argparse.Namespace, trees: list[Path], work: Path) -> None:
    names = ["sim", "proxy", *(f"gateway-{i}" for i in range(len(trees)))]
    ports = free_ports(tuple(names))
    sim = f"http://127.0.0.1:{ports['sim']}"
    plugins = default_plugins()[1] if args.plugins else ""
    python = sys.executable
    processes = {
        "sim": start([python, "-m", "gateway.sim", "openai", "--port", str(ports["sim"]),
                      "--reply", REPLY], work / "sim.log"),
        "proxy": start([python, str(HERE / "bare_proxy.py"), "--upstream", sim, "--port",
                        str(ports["proxy"])], work / "proxy.log"),
    }
    try:
        wait_ready(sim + "/health")
        for i, tree in enumerate(trees):
            name = f"gateway-{i}"
            (work / f"{name}.toml").write_text(_config(ports[name], {"sim": sim + "/v1"},
                                                       plugins))
            with (work / f"{name}.log").open("ab") as log:
                processes[name] = subprocess.Popen(
                    [python, "-m", "gateway", "--log-level", "warning", "serve", "--config",
                     str(work / f"{name}.toml")], stdout=log, stderr=subprocess.STDOUT,
                    cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", process=processes[name])
        headers = MISS if args.plugins else None
        targets = {"direct": _target("direct", ports["sim"], BODY, work),
                   "proxy": _target("proxy", ports["proxy"], BODY, work)} | {
            f"gateway-{i}": _target(f"gateway-{i}", ports[f"gateway-{i}"], BODY, work, headers)
            for i in range(len(trees))}
        for target in targets.values():  # warm up
            wrk(target.url, args.connections, 1, target.script)
        rates: dict[str, list[float]] = {name: [] for name in targets}
        p50s: dict[str, list[float]] = {name: [] for name in targets}
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, target in targets.items():
                pid = processes["sim" if name == "direct" else name].pid
                before = cpu_of(pid), cpu_of(processes["sim"].pid)
                result = wrk(target.url, args.connections, args.seconds, target.script)
                after = cpu_of(pid), cpu_of(processes["sim"].pid)
                rate = result["rps"]
                answered = rate * args.seconds
                rates[name].append(rate)
                p50s[name].append(result["p50_ms"])
                cpu[name].append(((after[0] - before[0]) / answered * 1e6,
                                  (after[1] - before[1]) / answered * 1e6))
        _report(args, rates, p50s, cpu)
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait()


def _report(args: argparse.Namespace, rates: dict[str, list[float]],
            p50s: dict[str, list[float]], cpu: dict[str, list[tuple[float, float]]]) -> None:
    bare = statistics.median(rates["proxy"])
    direct = statistics.median(p50s["direct"])
    c = args.connections
    print(f"| path | c={c} req/s (median of {args.rounds}) | share of bare | p50 ms | added "
          "p50 ms | CPU µs per request | simulator CPU µs per request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = {"direct": "direct to the simulator", "proxy": "bare aiohttp proxy"} | {
        f"gateway-{i}": f"gateway at {commit}" + (" + plugins" if args.plugins else "")
        for i, commit in enumerate(args.commits)}
    for name, label in labels.items():
        rate = statistics.median(rates[name])
        own = statistics.median(u[0] for u in cpu[name])
        sim = statistics.median(u[1] for u in cpu[name])
        p50 = statistics.median(p50s[name])
        added = "" if name == "direct" else f"{p50 - direct:+.3f}"
        print(f"| {label} | {rate:,.0f} | {100 * rate / bare:.1f}% | {p50:.3f} | {added} | "
              f"{own:.0f} | {sim:.0f} |")


if __name__ == "__main__":
    main()
