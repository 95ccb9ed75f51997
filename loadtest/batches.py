"""Batches on Redis: how soon an idle ``gateway worker`` picks up a queued line, and how
many lines a second 1, 2 and 4 worker processes answer — against the Ollama simulator and
a redis-server of the benchmark's own, both on loopback.

    .venv/bin/python -m loadtest.batches      # its section of loadtest/RESULTS.md

The benchmark is the API's side of the queue: it writes each batch's record in Redis
(``RedisStore.put_batch``, status ``in_progress``) and queues its lines in the stream the
workers read, as ``Batches.begin`` does after checking an uploaded file; the workers are
``gateway worker`` processes, each with the default ``[tasks]`` (8 lines at once).

- Pickup latency: single lines, one at a time, each queued only once the line before has
  its result and after a pause of ``--gap`` seconds or so (so the worker waits in its
  blocking ``XREADGROUP``), from the moment right before the ``XADD`` to the simulator's
  log entry of the upstream request (the time it was received, ``time.time()`` in both
  processes), matched by the line's message text.
- Throughput: a batch of ``--lines`` chat completions, from the first ``XADD`` until the
  batch has a result for every line (its ``remaining`` counter at 0), with the simulator
  answering at once and, optionally, after a simulated latency (``--latency``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from gateway.tasks.records import Line, batch_record, new_id
from gateway.tasks.shared import (
    STREAM,
    RedisStore,
    batch_keys,  # a batch's keys: (results, ..., remaining)
    encoded,  # the stream's line format
)
from loadtest.run import HERE, _start_redis, free_ports, start, wait_ready

MODEL = "phi3.5:3.8b"  # a simulated Ollama model without thinking: the plainest answer
SECTION = "## Batches: pickup latency and worker scaling"
CONCURRENCY = 8  # [tasks] concurrency: its default, lines each worker answers at once
POLL = 0.01  # seconds between looks at a batch's remaining lines
COLUMNS = ("workers", "upstream", "lines/s", "range", "vs fewest workers", "bound",
           "to completed ms", "CPU workers", "CPU sim", "CPU redis", "CPU bench", "CPU other",
           "steal")
WARM_UP = 20  # pickups sent first and not counted (connections, first-call paths)


def body(text: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16}


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile (p in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))]


# ---- CPU accounting: who used the two cores during a run (another process may too)

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float]:
    """CPU seconds the machine has been busy (all cores) and stolen by its hypervisor."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


class Meter:
    """CPU used by each group of processes while a run lasts, in cores (seconds a second)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start = self._read()
        self._wall = time.perf_counter()

    def _read(self) -> dict[str, float]:
        seconds = {name: sum(cpu_of(pid) for pid in pids) for name, pids in self.groups.items()}
        own = os.times()
        seconds["benchmark"] = own.user + own.system
        seconds["machine"], seconds["steal"] = machine_cpu()
        return seconds

    def cores(self) -> dict[str, float]:
        end, wall = self._read(), time.perf_counter() - self._wall
        used = {name: (end[name] - self._start[name]) / wall for name in end}
        ours = sum(v for k, v in used.items() if k not in ("machine", "steal"))
        used["other"] = max(0.0, used["machine"] - ours)  # whatever else ran meanwhile
        return used


# ---- the processes and the queue


@dataclass
class Bench:
    work: Path
    sim_url: str
    store: RedisStore
    redis: Any  # (redis.asyncio, loosely typed)
    http: aiohttp.ClientSession
    redis_pid: int
    sim_pid: int
    config: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> dict[str, list[int]]:
        return {"workers": [w.pid for w in self.workers], "simulator": [self.sim_pid],
                "redis": [self.redis_pid]}

    async def add_workers(self, count: int) -> None:
        """Start ``gateway worker`` processes until ``count`` run, and wait until each
        waits for lines (its backends discovered, its blocking ``XREADGROUP`` sent).
        """
        while len(self.workers) < count:
            log = self.work / f"worker-{len(self.workers) + 1}.log"
            self.workers.append(start([sys.executable, "-m", "gateway", "--log-level",
                                       "warning", "worker", "--config", str(self.config)], log))
        deadline = time.monotonic() + 60
        while True:
            for worker in self.workers:
                if worker.poll() is not None:
                    raise RuntimeError(f"a gateway worker exited ({worker.returncode}): see "
                                       f"its log in {self.work}")
            # (A consumer blocked on an empty stream is not listed by XINFO CONSUMERS yet:
            # the clients waiting in XREADGROUP are counted instead; no other client reads.)
            clients = await self.redis.client_list()
            if sum(1 for c in clients if c.get("cmd") == "xreadgroup") >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway workers did not start: see {self.work}")
            await asyncio.sleep(0.1)

    async def new_batch(self, total: int) -> str:
        """A batch in progress, as ``Batches.begin`` leaves it (its lines not yet queued)."""
        batch_id = new_id("batch_")
        record = batch_record(batch_id, "loadtest", "/v1/chat/completions",
                              new_id("file-"), "24h", None)
        record.update(status="in_progress", in_progress_at=int(time.time()),
                      request_counts={"total": total, "completed": 0, "failed": 0})
        await self.store.put_batch(record)
        return batch_id

    async def upstream_latency(self, seconds: float) -> None:
        """The simulator waits this long before answering each request (0: at once)."""
        async with self.http.put(f"{self.sim_url}/_sim/faults/{MODEL}",
                                 json={"latency": seconds}) as response:
            response.raise_for_status()

    async def sim_log(self, clear: bool = False) -> list[dict[str, Any]]:
        """The simulator's log of requests, or (``clear``) an empty one from now on."""
        async with self.http.request("DELETE" if clear else "GET",
                                     f"{self.sim_url}/_sim/requests") as response:
            response.raise_for_status()
            return [] if clear else list(await response.json())

    async def wait_answered(self, batch_id: str) -> None:
        async def answered() -> bool:
            return not await self.store.remaining(batch_id)

        await until(answered)

    async def counts(self, batch_id: str) -> dict[str, Any]:
        record = await self.store.batch(batch_id)
        assert record is not None
        return record


async def until(check: Callable[[], Awaitable[bool]], every: float = POLL) -> None:
    """Until ``check()`` is true, looked at every so often (a counter in Redis cannot be
    waited on; a look is one round trip).
    """
    while not await check():  # noqa: ASYNC110
        await asyncio.sleep(every)


def asked(entry: dict[str, Any]) -> str:
    """The text of an upstream request's last message (how a line is recognised)."""
    messages = (entry.get("payload") or {}).get("messages") or [{}]
    return str(messages[-1].get("content", ""))


# ---- the measurements


@dataclass
class Pickup:
    latencies_ms: list[float]
    xadd_ms: list[float]  # the benchmark's XADD, call to reply
    ping_ms: list[float]  # a PING after the same pause: a round trip on this machine, idle


async def pickup(bench: Bench, samples: int, gap: float) -> Pickup:
    """Lines queued one at a time to an idle worker: enqueue → upstream request."""
    total = WARM_UP + samples
    batch_id = await bench.new_batch(total)
    # The batch's count of lines to answer, for all of them at once (as ``enqueue`` would
    # for a whole batch): the batch stays in progress until the last one is answered.
    await bench.redis.incrby(batch_keys(batch_id)[2], total)
    await bench.sim_log(clear=True)
    sent: dict[str, float] = {}
    xadd_ms: list[float] = []
    for n in range(total):
        async def idle(n: int = n) -> bool:  # the line before answered
            return await bench.store.remaining(batch_id) <= total - n

        await until(idle, every=0.002)
        await asyncio.sleep(random.uniform(0.5 * gap, 1.5 * gap))  # idle in XREADGROUP
        text = f"pickup {batch_id} {n}"
        data = encoded(Line(batch_id, n + 1, f"line-{n}", body(text)))
        queued = time.time()
        await bench.redis.xadd(STREAM, {"line": data})
        xadd_ms.append((time.time() - queued) * 1000)
        if n >= WARM_UP:
            sent[text] = queued
    await bench.wait_answered(batch_id)
    arrived = {asked(e): float(e["t"]) for e in await bench.sim_log()}
    missing = set(sent) - set(arrived)
    if missing:
        raise RuntimeError(f"{len(missing)} pickups never reached the simulator")
    ping_ms = []
    for _ in range(min(samples, 100)):
        await asyncio.sleep(random.uniform(0.5 * gap, 1.5 * gap))
        pinged = time.time()
        await bench.redis.ping()
        ping_ms.append((time.time() - pinged) * 1000)
    return Pickup([(arrived[text] - queued) * 1000 for text, queued in sent.items()],
                  xadd_ms[WARM_UP:], ping_ms)


@dataclass
class Run:
    workers: int
    latency: float
    lines: int
    answered_s: float  # first XADD → a result for every line
    completed_s: float  # ... → the batch completed (its output file written)
    cores: dict[str, float]

    @property
    def rate(self) -> float:
        return self.lines / self.answered_s


async def throughput(bench: Bench, lines: int, latency: float) -> Run:
    """One batch of ``lines``: lines a second until every one has its result."""
    batch_id = await bench.new_batch(lines)
    tag = batch_id[-8:]
    queue = [Line(batch_id, n + 1, f"line-{n}", body(f"{tag} {n}")) for n in range(lines)]
    await bench.sim_log(clear=True)
    meter = Meter(bench.pids())
    started = time.perf_counter()
    await bench.store.enqueue(queue)
    await bench.wait_answered(batch_id)
    answered = time.perf_counter() - started

    async def settled() -> bool:
        return bool((await bench.counts(batch_id))["status"] == "completed")

    await until(settled)
    completed = time.perf_counter() - started
    record = await bench.counts(batch_id)
    cores = meter.cores()
    counts = record["request_counts"]
    upstream = sum(1 for e in await bench.sim_log() if asked(e).startswith(tag))
    if (counts["completed"], counts["failed"], upstream) != (lines, 0, lines):
        raise RuntimeError(f"batch {batch_id}: {counts}, {upstream} upstream requests for "
                           f"{lines} lines")
    return Run(len(bench.workers), latency, lines, answered, completed, cores)


async def warm_up(bench: Bench) -> None:
    """A small batch through the workers' first-time paths (connections, first calls)."""
    batch_id = await bench.new_batch(CONCURRENCY * len(bench.workers) * 2)
    await bench.store.enqueue([Line(batch_id, n + 1, f"warm-{n}", body(f"warm {n}"))
                               for n in range(CONCURRENCY * len(bench.workers) * 2)])
    await bench.wait_answered(batch_id)


async def measure(bench: Bench, workers: list[int], lines: int, latencies: list[float],
                  rounds: int, pickups: int, gap: float) -> tuple[Pickup, list[Run]]:
    await bench.store.start()  # (the consumer group)
    await bench.add_workers(1)
    await warm_up(bench)
    print(f"pickup latency: {pickups} lines, one at a time", file=sys.stderr)
    picked = await pickup(bench, pickups, gap)
    runs: list[Run] = []
    for count in workers:
        await bench.add_workers(count)
        for latency in latencies:
            await bench.upstream_latency(latency)
            await warm_up(bench)
            for round_ in range(rounds):
                run = await throughput(bench, lines, latency)
                print(f"{count} worker(s), upstream {latency * 1000:g} ms, round {round_ + 1}/"
                      f"{rounds}: {run.rate:,.0f} lines/s", file=sys.stderr)
                runs.append(run)
    await bench.upstream_latency(0)
    return picked, runs


def run(lines: int, workers: list[int], latencies: list[float], rounds: int, pickups: int,
        gap: float, out: Path) -> str:
    work = Path(tempfile.mkdtemp(prefix="loadtest-batches-"))
    port = free_ports(("sim",))["sim"]
    sim_url = f"http://127.0.0.1:{port}"
    redis = _start_redis()
    config = work / "worker.toml"
    config.write_text(f'[[backends]]\nname = "sim"\nkind = "ollama"\nurl = "{sim_url}"\n\n'
                      f'[tasks]\nqueue = "redis"\nredis_url = "{redis.url}"\n')
    started: list[subprocess.Popen[bytes]] = []  # the workers, as they are started

    async def main(sim_pid: int) -> tuple[Pickup, list[Run]]:
        store = RedisStore(redis.url, visibility_timeout=300.0)
        client: Any = aioredis.from_url(redis.url)
        async with aiohttp.ClientSession() as http:
            bench = Bench(work, sim_url, store, client, http, redis.process.pid, sim_pid,
                          config, started)
            try:
                return await measure(bench, workers, lines, latencies, rounds, pickups, gap)
            finally:
                await store.close()
                await client.aclose()

    sim: subprocess.Popen[bytes] | None = None
    try:
        sim = start([sys.executable, "-m", "gateway.sim", "ollama", "--port", str(port)],
                    work / "sim.log")
        wait_ready(f"{sim_url}/api/version", process=sim)
        picked, runs = asyncio.run(main(sim.pid))
    finally:
        processes = [*started, *([sim] if sim is not None else [])]
        for process in processes:  # each by its own PID
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        redis.kill()
        shutil.rmtree(redis.folder, ignore_errors=True)
    report = render(picked, runs, lines, workers, latencies, rounds, pickups, gap)
    write_section(out, report)
    shutil.rmtree(work, ignore_errors=True)
    return report


# ---- the report


@dataclass
class Setting:
    """The runs of one number of workers at one upstream latency."""

    workers: int
    latency: float
    runs: list[Run]

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    def cores(self, name: str) -> float:
        return statistics.median(r.cores[name] for r in self.runs)

    def ours(self) -> float:
        return sum(self.cores(k) for k in ("workers", "simulator", "redis", "benchmark"))

    @property
    def bound(self) -> float:
        """Lines a second the workers' concurrency allows at this latency (0: none)."""
        return self.workers * CONCURRENCY / self.latency if self.latency else 0.0


def render(picked: Pickup, runs: list[Run], lines: int, workers: list[int],
           latencies: list[float], rounds: int, pickups: int, gap: float) -> str:
    ms = picked.latencies_ms
    command = (f".venv/bin/python -m loadtest.batches --lines {lines} --workers "
               f"{','.join(map(str, workers))} --latency {','.join(f'{x:g}' for x in latencies)} "
               f"--rounds {rounds} --pickups {pickups} --gap {gap:g}")
    table = {(latency, count): Setting(count, latency, [
        r for r in runs if r.workers == count and r.latency == latency])
        for latency in latencies for count in workers}
    rows = []
    for (latency, count), setting in table.items():
        base = table[latency, workers[0]].rate
        these = setting.runs
        rows.append(
            f"| {count} | {latency * 1000:g} ms | **{setting.rate:,.0f}** | "
            f"{min(r.rate for r in these):,.0f} to {max(r.rate for r in these):,.0f} | "
            f"{setting.rate / base:.2f}x | {f'{setting.bound:,.0f}' if latency else '-'} | "
            f"{statistics.median(r.completed_s - r.answered_s for r in these) * 1000:.0f} | " +
            " | ".join(f"{setting.cores(k):.2f}" for k in
                       ("workers", "simulator", "redis", "benchmark", "other", "steal")) + " |")
    grid = "\n".join([f"| {' | '.join(COLUMNS)} |", "|" + "---:|" * len(COLUMNS), *rows])
    other = max(r.cores["other"] for r in runs)
    disturbed = (f"Something else on the machine used up to {other:.2f} cores during a run "
                 "(the \"CPU other\" column): the rows where it is high are disturbed."
                 if other > 0.15 else f"Nothing else on the machine used more than "
                 f"{other:.2f} cores during any run.")
    pickup_ms = statistics.median(ms)
    prose = [
        f"""The simulated Ollama server (`python -m gateway.sim ollama`, model `{MODEL}`), a
        redis-server of the benchmark's own and each `gateway worker` (`[tasks] queue =
        "redis"`, the default concurrency of {CONCURRENCY} lines per process) are processes
        of their own on loopback; the benchmark writes each batch's record and queues its
        lines in the stream itself (`RedisStore`), as the API does once it has checked an
        uploaded file.""",
        f"""**Pickup latency** (one worker, idle: waiting in its blocking `XREADGROUP`): from
        right before the `XADD` of a single line to the simulator receiving the upstream
        request, {len(ms)} lines one at a time, each sent once the one before had its result
        and after a pause of {gap * 500:g} to {gap * 1500:g} ms ({WARM_UP} more sent first,
        not counted): **p50 {pickup_ms:.2f} ms, p99 {percentile(ms, 99):.2f} ms** (min
        {min(ms):.2f}, mean {statistics.fmean(ms):.2f}, max {max(ms):.2f} ms). That is Redis
        waking the blocked read, the worker reading the batch's record and counts (two round
        trips), the pipeline and routing, and the HTTP request to the simulator up to its
        handler. For scale, on this machine after the same pauses: a Redis `PING` took
        {statistics.median(picked.ping_ms):.2f} ms p50 from the benchmark, and its `XADD` of
        the line {statistics.median(picked.xadd_ms):.2f} ms (a processor that was idle takes
        a while to wake, on this virtual machine). A worker that looked for lines every 10 s
        instead (the design before the blocking read) would leave a line queued while it is
        idle waiting 5 s on average and up to 10 s: about {5000 / pickup_ms:,.0f} times this
        p50.""",
        f"""**Throughput**: a batch of {lines:,} chat completions, from the first `XADD` until
        every line has its result (the batch's `remaining` counter at 0); the median of
        {rounds} runs each (and the range), after a small warm-up batch; every run checked:
        {lines:,} completed, none failed, {lines:,} upstream requests (none answered twice).
        "Upstream": the simulator's added latency per request (0: it answers at once);
        "bound": what the workers' concurrency allows at that latency (workers x
        {CONCURRENCY} / latency); "to completed": from the last result until the batch is
        `completed`, its output file written (looked at every {POLL * 1000:g} ms). CPU in
        cores (CPU seconds per second of the run, from `/proc`): the workers together, the
        simulator, Redis, the benchmark, anything else on the machine ("other") and time the
        hypervisor took ("steal").""",
    ]
    return "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores shared by everything below, Python "
        f"{platform.python_version()}.)",
        *(_fill(" ".join(p.split())) for p in prose),
        grid,
        _reading(table, workers, latencies) + "\n" +
        _fill("- " + disturbed),
    ]) + "\n"


def _reading(table: dict[tuple[float, int], Setting], workers: list[int],
             latencies: list[float]) -> str:
    """What limits each case, from the numbers of this run."""
    cores = os.cpu_count() or 1
    notes = []
    if 0 in latencies:
        one, top = table[0, workers[0]], table[0, workers[-1]]
        busiest = max((table[0, n] for n in workers), key=lambda s: s.ours())
        per_line = {k: one.cores(k) / one.rate * 1000 for k in ("workers", "simulator", "redis")}
        redis_alone = top.rate / max(top.cores("redis"), 1e-9)
        notes.append(
            f"- Upstream answering at once, the work is CPU: {_workers(one.workers)} answered "
            f"{one.rate:,.0f} lines/s, the workers using {one.cores('workers'):.2f} cores (a "
            f"worker is one Python process, one event loop); each line cost "
            f"{one.ours() / one.rate * 1000:.2f} ms of CPU in all (workers "
            f"{per_line['workers']:.2f}, simulator {per_line['simulator']:.2f}, Redis "
            f"{per_line['redis']:.2f}). {_workers(top.workers)} answered "
            f"{top.rate / one.rate:.2f}x as many, not {top.workers / one.workers:g}x: the "
            f"benchmark's processes kept up to {busiest.ours():.2f} of the {cores} cores busy, "
            f"and more workers on this machine only share the same cores with the simulator "
            f"and Redis. Workers on hosts of their own would not; Redis, at "
            f"{top.cores('redis') / top.rate * 1000:.3f} ms of CPU per line, would answer "
            f"about {redis_alone:,.0f} lines/s on one core of its own before it became the "
            f"limit (an estimate from its CPU use here, not measured).")
    for latency in (x for x in latencies if x):
        parts = [f"{_workers(n)} {table[latency, n].rate:,.0f} lines/s "
                 f"({table[latency, n].rate / table[latency, n].bound:.0%} of the bound)"
                 for n in workers]
        one, top = table[latency, workers[0]], table[latency, workers[-1]]
        cycle = one.workers * CONCURRENCY / one.rate * 1000  # ms a worker's slot spends a line
        notes.append(
            f"- Upstream taking {latency * 1000:g} ms, each worker is bound by its "
            f"{CONCURRENCY} lines at once, and throughput grows with the workers: "
            f"{', '.join(parts)}; the processes kept {top.ours():.2f} of the {cores} cores "
            f"busy at {_workers(top.workers)}. With {_workers(one.workers)}, each of its "
            f"{CONCURRENCY} slots took {cycle:.1f} ms a line: the upstream's "
            f"{latency * 1000:g} ms and {cycle - latency * 1000:.1f} ms of the line's own: the "
            f"worker's pipeline and its eight Redis round trips one after the other "
            f"(claiming: the due-lines script, XAUTOCLAIM, XREADGROUP; the batch's record and "
            f"its counts; the result and its XACK; the count of lines remaining).")
    return "\n".join(_fill(note) for note in notes)


def _fill(text: str) -> str:
    """A paragraph (or a bullet: its lines after the first indented) in lines of 92."""
    return textwrap.fill(text, 92, subsequent_indent="  " if text.startswith("- ") else "",
                         break_on_hyphens=False, break_long_words=False)


def _workers(count: int) -> str:
    return f"{count} worker{'s' if count > 1 else ''}"


def write_section(out: Path, section: str, heading: str = SECTION) -> None:
    """Put the section (which starts with ``heading``) in ``out`` in place of its last
    version, or at the end (after "Earlier runs", where ``python -m loadtest`` keeps what
    follows when it rewrites the file); the rest of the file stays as it is.
    """
    text = out.read_text() if out.exists() else ""
    if heading in text:
        before, after = text.split(heading, 1)
        rest = after.split("\n## ", 1)
        text = before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section if text else section
    out.write_text(text)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.batches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000, help="lines of each batch")
    parser.add_argument("--workers", default="1,2,4", help="worker processes, one run each")
    parser.add_argument("--latency", default="0,0.05",
                        help="the simulator's added seconds per request, one run each")
    parser.add_argument("--rounds", type=int, default=3, help="batches per setting")
    parser.add_argument("--pickups", type=int, default=300, help="pickup latency samples")
    parser.add_argument("--gap", type=float, default=0.04,
                        help="mean pause in seconds before each pickup line")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    workers = sorted(int(x) for x in args.workers.split(","))
    print(run(args.lines, workers, floats(args.latency), args.rounds, args.pickups, args.gap,
              args.out))


if __name__ == "__main__":
    main()
