"""Memory soak: many mixed requests through one gateway process, its memory sampled.

    .venv/bin/python -m loadtest.soak      # 200,000 requests; writes loadtest/RESULTS.md

The mix: whole answers, streams, cache hits, errors (an unknown model, a body that is not
JSON) and clients that hang up mid-stream, from one aiohttp client keeping ``--concurrency``
requests in flight, against the simulated Ollama server (a process of its own; one model
paced, so that a hang-up falls mid-stream). The gateway's resident memory (VmRSS) and open
files are read from /proc every ``--sample`` requests. After the warm-up (the first tenth)
the resident memory may grow by less than 10% (the target).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from loadtest.batches import write_section
from loadtest.run import ROOT, free_ports, start, wait_ready

HERE = Path(__file__).resolve().parent
SECTION = "## Memory soak"
FAST, PACED = "qwen2.5-coder:32b", "phi3.5:3.8b"  # the simulator's; the second is paced
KINDS = {"whole": 0.40, "stream": 0.30, "cached": 0.15, "unknown model": 0.05,
         "bad body": 0.05}  # the rest of the mix besides the hang-ups
GROWTH_TARGET = 0.10


@dataclass
class Sample:
    requests: int
    seconds: float
    rss_mib: float
    files: int


@dataclass
class Soak:
    requests: int
    hang_ups: int
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def warm(self) -> Sample:
        """The first sample at or after the warm-up (a tenth of the requests)."""
        return next(s for s in self.samples if s.requests >= self.requests // 10)

    def growth(self) -> float:
        warm = self.warm()
        return self.samples[-1].rss_mib / warm.rss_mib - 1


def proc(pid: int) -> tuple[float, int]:
    """A process's resident memory in MiB, and its open files."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def plan(requests: int, hang_ups: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=requests - hang_ups)
    kinds += ["hang up"] * hang_ups
    rng.shuffle(kinds)
    return kinds


async def one(http: aiohttp.ClientSession, url: str, kind: str, n: int) -> str:
    chat = {"model": FAST, "messages": [{"role": "user", "content": f"Question {n}"}],
            "max_tokens": 32}
    if kind == "cached":
        chat = {**chat, "temperature": 0, "messages": [
            {"role": "user", "content": f"A question asked often ({n % 100})"}]}
    elif kind == "unknown model":
        chat = {**chat, "model": "no-such-model:1b"}
    elif kind == "stream":
        chat = {**chat, "stream": True}
    elif kind == "hang up":
        chat = {**chat, "model": PACED, "stream": True}
    elif kind == "bad body":
        async with http.post(url, data=b"{not json",
                             headers={"Content-Type": "application/json"}) as response:
            await response.read()
            return f"{kind} {response.status}"
    async with http.post(url, json=chat) as response:
        if kind == "hang up":
            await response.content.readline()  # the first event: then the client leaves
            response.close()
        else:
            await response.read()
        return f"{kind} {response.status}"


async def drive(soak: Soak, url: str, pid: int, every: int, seed: int) -> None:
    kinds = plan(soak.requests, soak.hang_ups, seed)
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(kinds):
        queue.put_nowait(item)
    done = 0
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=soak.concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                n, kind = queue.get_nowait()
                try:
                    soak.outcomes[await one(http, url, kind, n)] += 1
                except aiohttp.ClientError as exc:
                    soak.outcomes[f"{kind} {type(exc).__name__}"] += 1
                done += 1
                if done % every == 0:
                    rss, files = proc(pid)
                    soak.samples.append(Sample(done, time.monotonic() - started, rss, files))
                    print(f"soak: {done:,} requests, RSS {rss:.1f} MiB, {files} open files",
                          file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(soak.concurrency)))
    soak.seconds = time.monotonic() - started


def run(args: argparse.Namespace) -> Soak:
    work = Path(tempfile.mkdtemp(prefix="loadtest-soak-"))
    ports = free_ports(("sim", "gateway"))
    sim = start([sys.executable, "-m", "gateway.sim", "ollama", "--port", str(ports["sim"])],
                work / "sim.log")
    gateway = None
    try:
        wait_ready(f"http://127.0.0.1:{ports['sim']}/api/version", process=sim)
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['sim']}/_sim/faults/{PACED}", method="PUT",
            data=json.dumps({"tokens_per_s": 100}).encode(),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=5).close()
        config = work / "gateway.toml"
        config.write_text(f"""[server]
port = {ports['gateway']}

[tasks]
data_dir = "{work / 'data'}"

[[backends]]
name = "sim"
kind = "ollama"
url = "http://127.0.0.1:{ports['sim']}"

[[plugins]]
name = "cache"
""")
        gateway = start([sys.executable, "-m", "gateway", "--log-level", "warning", "serve",
                         "--config", str(config)], work / "gateway.log")
        wait_ready(f"http://127.0.0.1:{ports['gateway']}/health", process=gateway)
        soak = Soak(args.requests, args.hang_ups, args.concurrency)
        rss, files = proc(gateway.pid)
        soak.samples.append(Sample(0, 0.0, rss, files))
        asyncio.run(drive(soak, f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions",
                          gateway.pid, args.sample, args.seed))
        time.sleep(2)  # the last hang-ups' upstream requests end
        rss, files = proc(gateway.pid)
        soak.samples.append(Sample(soak.requests, soak.seconds + 2, rss, files))
        return soak
    finally:
        for process in (gateway, sim):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)


def plot(soak: Soak, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4), dpi=110)
    axis.plot([s.requests for s in soak.samples], [s.rss_mib for s in soak.samples],
              color="tab:blue", label="gateway resident memory (MiB)")
    warm = soak.warm()
    axis.axvline(warm.requests, color="grey", linestyle=":", label="end of the warm-up")
    axis.axhline(warm.rss_mib * (1 + GROWTH_TARGET), color="tab:red", linestyle="--",
                 linewidth=0.8, label="warm-up + 10% (the target's bound)")
    axis.set_xlabel("requests")
    axis.set_ylabel("MiB")
    axis.set_ylim(bottom=0)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def render(soak: Soak, args: argparse.Namespace, picture: Path) -> str:
    warm, last = soak.warm(), soak.samples[-1]
    peak = max(s.rss_mib for s in soak.samples if s.requests >= warm.requests)
    met = "met" if soak.growth() < GROWTH_TARGET else "NOT met"
    step = max(1, len(soak.samples) // 10)
    rows = [soak.samples[0], *soak.samples[1:-1:step], last]
    table = "\n".join([
        "| requests | seconds | RSS MiB | open files |", "|---:|---:|---:|---:|",
        *(f"| {s.requests:,} | {s.seconds:.0f} | {s.rss_mib:.1f} | {s.files} |"
          for s in rows)])
    outcomes = ", ".join(f"{kind}: {count:,}" for kind, count in sorted(soak.outcomes.items()))
    command = (f".venv/bin/python -m loadtest.soak --requests {args.requests} --hang-ups "
               f"{args.hang_ups} --concurrency {args.concurrency} --sample {args.sample}")
    return "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        f"One `gateway serve` process (the cache plugin in memory) in front of the simulated "
        f"Ollama server; {soak.requests:,} requests from one aiohttp client, "
        f"{soak.concurrency} at once: whole answers, streams, cache hits (100 questions asked "
        f"again and again), errors and {soak.hang_ups:,} clients hanging up mid-stream (on a "
        f"model paced at 100 tokens a second). Outcomes (kind, status): {outcomes}. "
        f"{soak.requests / soak.seconds:,.0f} requests a second.",
        table,
        f"- Resident memory after the warm-up ({warm.requests:,} requests): "
        f"{warm.rss_mib:.1f} MiB; at the end {last.rss_mib:.1f} MiB, that is "
        f"**{soak.growth():+.1%}** (target: under +10%, {met}); the highest after the "
        f"warm-up {peak:.1f} MiB.\n"
        f"- Open files: {warm.files} after the warm-up, {last.files} at the end.",
        f"![The gateway's resident memory over the soak]({picture.name})",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--hang-ups", type=int, default=10_000,
                        help="of the requests, clients that hang up mid-stream")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sample", type=int, default=5000, help="requests between samples")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    soak = run(args)
    picture = args.out.parent / "soak.png"
    plot(soak, picture)
    report = render(soak, args, picture)
    write_section(args.out, report, SECTION)
    print(report)


if __name__ == "__main__":
    main()
