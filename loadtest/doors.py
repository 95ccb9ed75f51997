"""What each front door costs, in instructions per request counted by callgrind: the same
question through ``/v1/chat/completions``, ``/v1/responses``, ``/v1/messages`` and
``/api/chat`` of one gateway process, and through the bare proxy, in the same run; and what
a key's limits and the telemetry add to a chat request, each in a gateway process of its own.

    .venv/bin/python -m loadtest.doors        # writes loadtest/DOORS.md

Instruction counts, unlike times, do not move with this machine's speed, which drifts by
half within a minute (it is a shared virtual machine): a difference of a few percent
between two doors shows only this way. Each process runs under ``valgrind --tool=callgrind``
(about fifty times slower), its counters zeroed before and read after a batch of
sequential requests; every batch is run twice and the lower count kept.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.run import (
    BODY,
    HERE,
    MODEL,
    REPLY,
    _config,
    _start_redis,
    free_ports,
    start,
    wait_ready,
)

DOORS: dict[str, tuple[str, dict[str, Any]]] = {
    "`/v1/chat/completions` (OpenAI)": ("/v1/chat/completions", BODY),
    "`/v1/responses` (Responses API, stored)": (
        "/v1/responses", {"model": MODEL, "input": "Say something short.",
                          "max_output_tokens": 64}),
    "`/v1/messages` (Anthropic)": (
        "/v1/messages", {"model": MODEL, "max_tokens": 64, "messages": BODY["messages"]}),
    "`/api/chat` (Ollama)": (
        "/api/chat", {"model": MODEL, "messages": BODY["messages"], "stream": False,
                      "options": {"num_predict": 64}}),
}
LIMIT = 0.10  # each door: at most this much more than /v1/chat/completions
KEY = "gw-loadtest-key-with-limits-000000"
# A key whose every rate limit is counted on each request (none is ever reached).
KEYED = f'''
[[keys]]
id = "loadtest"
hash = "{hashlib.sha256(KEY.encode()).hexdigest()}"
rpm = 1000000000
tpm = 1000000000
concurrency = 1000
'''
LIMITED = {"memory": "with a key's limits counted in memory",
           "redis": "with a key's limits counted in Redis (one Lua script to admit, one to "
                    "settle)"}
# The same chat request with telemetry off, with metrics (the default) and with metrics and
# traces: each process's ``[telemetry]`` section, what the row says, and what it must cost less
# than over telemetry off (None: the baseline). Traces have no exporter: every request's spans are
# made and queued, and dropped when the queue is flushed.
TELEMETRY: dict[str, tuple[str, str, float | None]] = {
    "off": ("metrics = false\ntraces = false\n", "telemetry off (`metrics = false`)", None),
    "metrics": ("metrics = true\ntraces = false\n", "with metrics (the default)", 0.05),
    "traced": ("metrics = true\ntraces = true\nsample_ratio = 1.0\n",
               "with metrics and traces (every request sampled, no exporter)", 0.15),
}


class Counted:
    """A server process under callgrind, whose counters are read around batches."""

    def __init__(self, args: list[str], work: Path, name: str) -> None:
        self.work, self.name = work, name
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/{name}.%p", *args],
            stdout=(work / f"{name}.log").open("w"), stderr=subprocess.STDOUT, cwd=work)

    def per_request(self, port: int, path: str, body: dict[str, Any] | list[dict[str, Any]],
                    requests: int, key: str = "") -> float:
        subprocess.run(["callgrind_control", "-z", str(self.process.pid)], check=True,
                       capture_output=True)
        _send(port, path, body, requests, key)
        subprocess.run(["callgrind_control", "-d", str(self.process.pid)], check=True,
                       capture_output=True)
        dump = max(glob.glob(f"{self.work}/{self.name}.{self.process.pid}.*"),
                   key=os.path.getmtime)
        with open(dump) as lines:
            total = next(int(line.split()[1]) for line in lines
                         if line.startswith(("totals:", "summary:")))
        return total / requests

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=300)


def _send(port: int, path: str, body: dict[str, Any] | list[dict[str, Any]], requests: int,
          key: str = "") -> None:
    """Sequential requests on one kept-alive connection, each answered 200 (``body``: one
    for all, or several sent in turn).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = [json.dumps(each).encode() for each in (body if isinstance(body, list) else [body])]
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        for i in range(requests):
            connection.request("POST", path, data[i % len(data)], headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
    finally:
        connection.close()


def run(requests: int, out: Path) -> str:
    if not shutil.which("valgrind"):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        else:
            raise SystemExit("loadtest.doors needs valgrind: apt-get install -y valgrind")
    work = Path(tempfile.mkdtemp(prefix="loadtest-doors-"))
    ports = free_ports(("sim", "proxy", "gateway", "memory", "redis", *TELEMETRY))
    upstream = {"sim": f"http://127.0.0.1:{ports['sim']}/v1"}
    (work / "gateway.toml").write_text(_config(ports["gateway"], upstream))
    redis = _start_redis()
    (work / "memory.toml").write_text(_config(ports["memory"], upstream, KEYED))
    (work / "redis.toml").write_text(_config(ports["redis"], upstream, KEYED + f'''
[tenants]
store = "redis"
redis_url = "{redis.url}"
timeout = 5.0
'''))
    for name, (section, _, _) in TELEMETRY.items():
        (work / f"{name}.toml").write_text(_config(ports[name], upstream,
                                                   f"[telemetry]\n{section}"))
    python = sys.executable
    sim = start([python, "-m", "gateway.sim", "openai", "--port", str(ports["sim"]), "--reply",
                 REPLY], work / "sim.log")
    counted: list[Counted] = []
    try:
        wait_ready(f"http://127.0.0.1:{ports['sim']}/health")
        proxy = Counted([python, str(HERE / "bare_proxy.py"), "--upstream",
                         f"http://127.0.0.1:{ports['sim']}", "--port", str(ports["proxy"])],
                        work, "proxy")
        gateway = Counted([python, "-m", "gateway", "--log-level", "warning", "serve",
                           "--config", str(work / "gateway.toml")], work, "gateway")
        limited = {store: Counted([python, "-m", "gateway", "--log-level", "warning", "serve",
                                   "--config", str(work / f"{store}.toml")], work, store)
                   for store in LIMITED}
        observed = {name: Counted([python, "-m", "gateway", "--log-level", "warning", "serve",
                                   "--config", str(work / f"{name}.toml")], work, name)
                    for name in TELEMETRY}
        counted = [proxy, gateway, *limited.values(), *observed.values()]
        for name, each in (("gateway", gateway), *limited.items(), *observed.items()):
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", timeout=600,
                       process=each.process)
        for path, body in DOORS.values():  # warm up: imports, connections, caches
            _send(ports["gateway"], path, body, 20)
        for store in LIMITED:
            _send(ports[store], "/v1/chat/completions", BODY, 20, KEY)
        for name in TELEMETRY:
            _send(ports[name], "/v1/chat/completions", BODY, 20)
        _send(ports["proxy"], "/v1/chat/completions", BODY, 20)
        counts: dict[str, float] = {}
        for _ in range(2):
            bare = proxy.per_request(ports["proxy"], "/v1/chat/completions", BODY, requests)
            counts["bare"] = min(counts.get("bare", bare), bare)
            for name, (path, body) in DOORS.items():
                count = gateway.per_request(ports["gateway"], path, body, requests)
                counts[name] = min(counts.get(name, count), count)
            for store, each in limited.items():
                count = each.per_request(ports[store], "/v1/chat/completions", BODY, requests,
                                         KEY)
                counts[store] = min(counts.get(store, count), count)
            for name, each in observed.items():
                count = each.per_request(ports[name], "/v1/chat/completions", BODY, requests)
                counts[name] = min(counts.get(name, count), count)
    finally:
        for each in counted:
            each.stop()
        sim.terminate()
        sim.wait(timeout=10)
        redis.kill()
    report = render(counts, requests)
    out.write_text(report)
    return report


def render(counts: dict[str, float], requests: int) -> str:
    chat = counts[next(iter(DOORS))]
    rows = [f"| bare aiohttp proxy (`loadtest/bare_proxy.py`), chat | {counts['bare']:,.0f} | "
            f"{counts['bare'] / chat:.2f} | |"]
    for name in DOORS:
        over = counts[name] / chat - 1
        verdict = "" if name == next(iter(DOORS)) else \
            f"{over:+.1%} over chat ({_met(over, LIMIT)})"
        rows.append(f"| gateway, {name} | {counts[name]:,.0f} | {counts[name] / chat:.2f} | "
                    f"{verdict} |")
    for store, what in LIMITED.items():
        rows.append(f"| gateway, `/v1/chat/completions` {what} | {counts[store]:,.0f} | "
                    f"{counts[store] / chat:.2f} | {counts[store] / chat - 1:+.1%} over chat |")
    off = counts[next(iter(TELEMETRY))]
    for name, (_, what, limit) in TELEMETRY.items():
        over = counts[name] / off - 1
        verdict = "the baseline of the next two" if limit is None else \
            f"{over:+.1%} over telemetry off ({_met(over, limit, under=True)})"
        rows.append(f"| gateway, `/v1/chat/completions` {what} | {counts[name]:,.0f} | "
                    f"{counts[name] / chat:.2f} | {verdict} |")
    return f"""# What each front door costs

Command: `.venv/bin/python -m loadtest.doors --requests {requests}`
({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python {platform.python_version()},
valgrind's callgrind; {requests} sequential requests per batch on one connection, each batch
twice, the lower count kept).

The same question (a 17-word answer from the simulated OpenAI-compatible server, not
streamed) through each front door of one gateway process, and through the bare proxy, all in
one run. Instructions per request include everything the process does for it: HTTP in and
out, parsing, routing, the upstream call, encoding; the Responses API door also stores the
response (its default). The last rows are the same chat request from a key with limits on
requests and tokens per minute and on requests at once, in a gateway process of its own:
what admitting and settling it costs (for Redis, this process's side only; the scripts run
in the benchmark's own redis-server). The three rows after them are the same chat request
with telemetry off, with metrics (the default, as in the chat row's process, which also
answers the other doors) and with metrics and traces (a span for the request, for the
routing and for the upstream attempt, every request sampled, no exporter: the spans are
made and queued, then dropped), each in a gateway process of its own: what telemetry costs
over the same process with none.

| path | instructions per request | against the gateway's chat | over its baseline (target) |
|---|---:|---:|---|
{chr(10).join(rows)}
"""


def _met(over: float, limit: float, under: bool = False) -> str:
    """The target and whether ``over`` meets it: at most ``limit``, or less (``under``)."""
    met = over < limit if under else over <= limit
    return f"target: {'under' if under else 'at most'} {limit:.0%}, {'met' if met else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.doors", description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "DOORS.md")
    args = parser.parse_args()
    print(run(args.requests, args.out))


if __name__ == "__main__":
    main()
