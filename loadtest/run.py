"""Side-by-side benchmark: direct to the simulator, through the bare proxy, through the
gateway — all in one run, on the same machine, against the same simulated backend.

    .venv/bin/python -m loadtest            # writes loadtest/RESULTS.md

Load comes from wrk (C, one thread) so the generator costs little of the 2 cores;
streaming time to first token is measured by a Python client, one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "command-r-plus:104b"
REPLY = "The quick brown fox jumps over the lazy dog and the gateway keeps out of its way."
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say something short."}],
        "max_tokens": 64}
# What the plugins cost grows with the text they read: a prompt of about 2 KB of ordinary
# prose (no personal data, so nothing is redacted and the request goes on).
LONG_PROMPT = " ".join(
    f"Paragraph {i}: the service reads its settings at start-up, checks them, and then answers "
    f"requests until it is told to stop; each answer is logged with its duration." for i in
    range(12))
LONG_BODY = {**BODY, "messages": [{"role": "user", "content": LONG_PROMPT}]}
CACHED_BODY = {**BODY, "temperature": 0}  # deterministic: the cache keeps its answer
# The same question through the other front doors: (name, path, body, what marks the first
# token of its stream).
DOORS = [
    ("Responses API door (`/v1/responses`)", "/v1/responses",
     {"model": MODEL, "input": "Say something short.", "max_output_tokens": 64},
     b'"type":"response.output_text.delta"'),
    ("Anthropic door (`/v1/messages`)", "/v1/messages",
     {"model": MODEL, "max_tokens": 64, "messages": BODY["messages"]}, b'"text_delta"'),
    ("Ollama door (`/api/chat`)", "/api/chat",
     {"model": MODEL, "messages": BODY["messages"], "stream": False,
      "options": {"num_predict": 64}}, b'"content":"T'),
]
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "errors": %%d, "non2xx": %%d, ' ..
    '"p50": %%d, "p99": %%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Target:
    name: str
    url: str
    body: dict[str, Any]
    script: Path
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/chat/completions"
    first_token: bytes = b'"content":"'  # what marks the first token of its stream
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def add(self, key: str, sample: dict[str, float]) -> None:
        self.samples.setdefault(key, []).append(sample)

    def median(self, key: str, metric: str) -> float:
        return statistics.median(s[metric] for s in self.samples[key])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A free port for each name, no two the same (the system may offer a port twice)."""
    ports: dict[str, int] = {}
    for name in names:
        while (port := free_port()) in ports.values():
            pass
        ports[name] = port
    return ports


def wait_ready(url: str, timeout: float = 30,
               process: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``url`` answers; and ``process`` must be the one answering: alive, not a
    failed start beside another server that happens to hold the port.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited "
                               f"({process.returncode}): see its log")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, float]:
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s",
         str(script), url],
        capture_output=True, text=True, check=True,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    data = json.loads(line[len("RESULT "):])
    if data["errors"] or data["non2xx"]:
        raise RuntimeError(f"{url}: {data['errors']} socket errors, {data['non2xx']} non-2xx")
    return {
        "rps": data["requests"] / (data["duration_us"] / 1e6),
        "p50_ms": data["p50"] / 1000,
        "p99_ms": data["p99"] / 1000,
    }


async def ttft(url: str, body: dict[str, Any], requests: int, headers: dict[str, str],
               first_token: bytes) -> dict[str, float]:
    """Time to the first content token of a streamed answer, one request at a time."""
    payload = {**body, "stream": True}
    firsts: list[float] = []
    totals: list[float] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(requests):
            started = time.perf_counter()
            first = None
            async with http.post(url, json=payload, headers=headers) as response:
                async for line in response.content:
                    if first is None and first_token in line.replace(b" ", b""):
                        first = time.perf_counter() - started
            assert first is not None, "no content in the stream"
            firsts.append(first * 1000)
            totals.append((time.perf_counter() - started) * 1000)
    firsts.sort()
    return {"ttft_p50_ms": statistics.median(firsts),
            "ttft_p99_ms": firsts[int(len(firsts) * 0.99) - 1],
            "stream_p50_ms": statistics.median(totals)}


def _config(port: int, backends: dict[str, str], plugins: str = "") -> str:
    sections = [f'[server]\nport = {port}\n']
    sections += [f'[[backends]]\nname = "{name}"\nkind = "openai"\nurl = "{url}"\n'
                 for name, url in backends.items()]
    return "\n".join([*sections, plugins])


CHECKED = '[[plugins]]\nname = "safety"\n\n[[plugins]]\nname = "qa"\n'
CACHED = '[[plugins]]\nname = "cache"\n'


def _redis_cache(url: str) -> str:
    return f'{CACHED}[plugins.options]\nbackend = "redis"\nredis_url = "{url}"\n'


def _start_redis() -> Any:
    """A Redis server of the benchmark's own on a free port (the tests' helper)."""
    sys.path.insert(0, str(ROOT))
    from tests.redis_peer import RedisServer

    return RedisServer().start()


def _start_sshd(work: Path) -> Any:
    """A real sshd on loopback (the tunnel tests' own), installed when missing."""
    if not Path("/usr/sbin/sshd").exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    sys.path.insert(0, str(ROOT))
    from tests.ssh_peers import OpenSSHServer, make_keys

    return OpenSSHServer(make_keys(work / "ssh")).start()


def _tunneled_config(port: int, sim_port: int, sshd: Any, work: Path) -> str:
    keys = sshd.keys
    return f"""[server]
port = {port}

[[tunnels]]
name = "studio"
host = "127.0.0.1"
port = {sshd.port}
user = "root"
key_file = "{keys.client}"
agent = false
known_hosts = "{keys.known_hosts(sshd.port)}"
forwards = [{{ name = "sim", remote_port = {sim_port} }}]

[[backends]]
name = "sim"
kind = "openai"
tunnel = "studio/sim"
"""


def _target(name: str, port: int, body: dict[str, Any], work: Path,
            headers: dict[str, str] | None = None, path: str = "/v1/chat/completions",
            first_token: bytes = b'"content":"') -> Target:
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    script = work / f"post-{port}-{len(list(work.glob('post-*')))}.lua"
    script.write_text(WRK_SCRIPT % (json.dumps(body), extra))
    return Target(name, f"http://127.0.0.1:{port}{path}", body, script, headers or {},
                  path, first_token)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which("wrk"):
        raise SystemExit("loadtest needs wrk: apt-get install -y wrk")


def run(seconds: float, rounds: int, stream_requests: int, out: Path) -> str:
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="loadtest-"))
    ports = free_ports(("sim", "sim2", "proxy", "gateway", "routed", "tunneled", "checked",
                        "cached", "redis_cached", "quiet", "traced"))
    sims = {name: f"http://127.0.0.1:{ports[name]}/v1" for name in ("sim", "sim2")}
    (work / "gateway.toml").write_text(_config(ports["gateway"], {"sim": sims["sim"]}))
    (work / "routed.toml").write_text(_config(ports["routed"], {"host-a": sims["sim"],
                                                                 "host-b": sims["sim2"]}))
    (work / "quiet.toml").write_text(_config(ports["quiet"], {"sim": sims["sim"]},
                                             "[telemetry]\nmetrics = false\n"))
    (work / "traced.toml").write_text(_config(ports["traced"], {"sim": sims["sim"]},
                                              "[telemetry]\ntraces = true\n"))
    redis = _start_redis()
    (work / "checked.toml").write_text(_config(ports["checked"], {"sim": sims["sim"]}, CHECKED))
    (work / "cached.toml").write_text(_config(ports["cached"], {"sim": sims["sim"]}, CACHED))
    (work / "redis_cached.toml").write_text(_config(ports["redis_cached"], {"sim": sims["sim"]},
                                                    _redis_cache(redis.url)))
    sshd = _start_sshd(work)
    (work / "tunneled.toml").write_text(_tunneled_config(ports["tunneled"], ports["sim"],
                                                         sshd, work))
    python = sys.executable
    processes = [
        start([python, "-m", "gateway.sim", "openai", "--port", str(ports[name]), "--reply",
               REPLY], work / f"{name}.log") for name in ("sim", "sim2")
    ]
    processes.append(start([python, str(HERE / "bare_proxy.py"), "--upstream",
                            f"http://127.0.0.1:{ports['sim']}", "--port", str(ports["proxy"])],
                           work / "proxy.log"))
    try:
        for name in ("sim", "sim2"):
            wait_ready(f"http://127.0.0.1:{ports[name]}/health")
        for name in ("gateway", "routed", "tunneled", "checked", "cached", "redis_cached",
                     "quiet", "traced"):
            processes.append(start([python, "-m", "gateway", "--log-level", "warning", "serve",
                                    "--config", str(work / f"{name}.toml")], work / f"{name}.log"))
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", process=processes[-1])
            time.sleep(0.3)  # a process that lost its port exits right after start-up
            if processes[-1].poll() is not None:
                raise RuntimeError(f"the {name} gateway exited: see {work / name}.log")
        routed = {**BODY, "model": "auto"}
        targets = [
            _target("direct to simulator", ports["sim"], BODY, work),
            _target("bare aiohttp proxy", ports["proxy"], BODY, work),
            _target("gateway", ports["gateway"], BODY, work),
            _target("gateway, routed: `auto`, 2 deployments, breakers", ports["routed"],
                    routed, work),
            _target("gateway through an SSH tunnel (OpenSSH sshd)", ports["tunneled"], BODY,
                    work),
            _target("gateway, 2 KB prompt", ports["gateway"], LONG_BODY, work),
            _target("gateway + safety + QA, 2 KB prompt", ports["checked"], LONG_BODY, work),
            _target("gateway + cache (memory): miss", ports["cached"], CACHED_BODY, work,
                    {"x-gateway-cache": "refresh"}),
            _target("gateway + cache (memory): hit", ports["cached"], CACHED_BODY, work),
            _target("gateway + cache (Redis): miss", ports["redis_cached"], CACHED_BODY, work,
                    {"x-gateway-cache": "refresh"}),
            _target("gateway + cache (Redis): hit", ports["redis_cached"], CACHED_BODY, work),
            _target("gateway, telemetry off (`metrics = false`)", ports["quiet"], BODY, work),
            _target("gateway, metrics and traces (every request sampled, spans kept for an "
                    "exporter)", ports["traced"], BODY, work),
            *(_target(f"gateway, {name}", ports["gateway"], body, work, path=path,
                      first_token=first) for name, path, body, first in DOORS),
        ]
        for target in targets:  # warm up connections, caches and the JIT-less interpreter
            wrk(target.url, 8, 2, target.script)
        for round_ in range(rounds):
            for target in targets:  # interleaved, so drift in the machine hits all alike
                print(f"round {round_ + 1}/{rounds}: {target.name}", file=sys.stderr)
                target.add("c1", wrk(target.url, 1, seconds, target.script))
                target.add("c32", wrk(target.url, 32, seconds, target.script))
                target.add("stream", asyncio.run(ttft(target.url, target.body, stream_requests,
                                                      target.headers, target.first_token)))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
        sshd.kill()
        redis.kill()
    report = render(targets, seconds, rounds, stream_requests)
    out.write_text(report + _history(out, targets))
    return report


HISTORY = "## Earlier runs"


def _history(out: Path, targets: list[Target]) -> str:
    """The summary line of every run so far: this machine's speed varies from hour to hour
    (it is a shared virtual machine), and one run is one sample.
    """
    old = out.read_text().split(HISTORY, 1)[1].strip().splitlines() if out.exists() and \
        HISTORY in out.read_text() else []
    direct, bare, gateway, routed = targets[:4]
    line = (f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: gateway "
            f"{gateway.median('c32', 'rps') / bare.median('c32', 'rps'):.0%} of the bare proxy "
            f"at c=32 (routed {routed.median('c32', 'rps') / bare.median('c32', 'rps'):.0%}); "
            f"bare proxy {bare.median('c32', 'rps'):,.0f} req/s; gateway adds "
            f"{gateway.median('c1', 'p50_ms') - direct.median('c1', 'p50_ms'):.3f} ms p50 at c=1")
    return f"\n{HISTORY}\n\n" + "\n".join([line, *old]) + "\n"


def render(targets: list[Target], seconds: float, rounds: int, stream_requests: int) -> str:
    (direct, bare, gateway, routed, tunneled, long, checked, miss, hit, redis_miss, redis_hit,
     quiet, traced, *doors) = targets
    rows = []
    for t in targets:
        rows.append(
            f"| {t.name} | {t.median('c1', 'rps'):,.0f} | {t.median('c1', 'p50_ms'):.3f} | "
            f"{t.median('c1', 'p99_ms'):.3f} | {t.median('c32', 'rps'):,.0f} | "
            f"{t.median('c32', 'p50_ms'):.2f} | {t.median('c32', 'p99_ms'):.2f} | "
            f"{t.median('stream', 'ttft_p50_ms'):.3f} | {t.median('stream', 'ttft_p99_ms'):.3f} |")
    throughput = gateway.median("c32", "rps") / bare.median("c32", "rps")
    routed_share = routed.median("c32", "rps") / bare.median("c32", "rps")
    tunnel_share = tunneled.median("c32", "rps") / gateway.median("c32", "rps")
    tunnel_ttft = tunneled.median("stream", "ttft_p50_ms") - \
        gateway.median("stream", "ttft_p50_ms")
    added = gateway.median("c1", "p50_ms") - direct.median("c1", "p50_ms")
    added_bare = bare.median("c1", "p50_ms") - direct.median("c1", "p50_ms")
    added_ttft = gateway.median("stream", "ttft_p50_ms") - direct.median("stream", "ttft_p50_ms")
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    # What the plugins add to each request, in milliseconds of the machine's time: the
    # difference of the inverse throughputs at c=32 (the server saturated).
    per_request = lambda t, base: 1000 / t.median("c32", "rps") - 1000 / base.median(  # noqa
        "c32", "rps")
    return f"""# Gateway benchmark

Command: `.venv/bin/python -m loadtest --seconds {seconds:g} --rounds {rounds}`
({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores,
Python {platform.python_version()}, load from wrk with one thread; medians of {rounds}
interleaved rounds of {seconds:g} s each; streaming: {stream_requests} sequential requests
per round).

Every row answers the same request from a simulated OpenAI-compatible server
(`python -m gateway.sim openai`, a {len(REPLY.split())}-word reply, no pacing): directly,
through `loadtest/bare_proxy.py` (forward the body, relay the answer), and through the
gateway (parse and validate, resolve the model, translate, re-encode; it asks for a stream,
which the simulator writes in one write, and collects it). All three servers run
on uvloop; the gateway also keeps its start-up objects out of the garbage collector's full
passes (`gc.freeze()`, gateway/app.py), which the bare proxy does not.

| path | c=1 req/s | c=1 p50 ms | c=1 p99 ms | c=32 req/s | c=32 p50 ms | c=32 p99 ms | stream TTFT p50 ms | stream TTFT p99 ms |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- Gateway throughput at c=32: **{throughput:.1%} of the bare proxy** (target ≥ 80%: {verdict(throughput >= 0.8)}).
- Gateway added p50 latency at c=1: **{added:.3f} ms over direct** (target ≤ 1 ms: {verdict(added <= 1.0)}); the bare proxy adds {added_bare:.3f} ms.
- Gateway added time to first token: {added_ttft:.3f} ms over direct.
- With the full routing path (the `auto` alias picking among two deployments of the same
  model on two simulator processes, power-of-two-choices, breakers): **{routed_share:.1%} of
  the bare proxy's throughput** at c=32.
- Through an SSH tunnel (the gateway's own, asyncssh, to OpenSSH's sshd on loopback, then
  to the same simulator): {tunnel_share:.1%} of the gateway's direct throughput at c=32, and
  {tunnel_ttft:+.3f} ms time to first token against the same backend direct.
- Safety checker and quality assurance on a 2 KB prompt: {checked.median("c32", "rps") /
  long.median("c32", "rps"):.1%} of the plain gateway's throughput at c=32, that is
  **{per_request(checked, long):.3f} ms per request**; p50 at c=1
  {checked.median("c1", "p50_ms") - long.median("c1", "p50_ms"):+.3f} ms.
- Cache hits (in memory): **{hit.median("c32", "rps"):,.0f} req/s at c=32**,
  {hit.median("c32", "rps") / miss.median("c32", "rps"):.1f} times the rate of cache misses (every request
  sent with `x-gateway-cache: refresh`: asked upstream and stored) and
  {hit.median("c32", "rps") / bare.median("c32", "rps"):.1%} of the bare proxy; p50 at c=1
  {hit.median("c1", "p50_ms"):.3f} ms against {miss.median("c1", "p50_ms"):.3f} ms for a miss
  and {bare.median("c1", "p50_ms"):.3f} ms through the bare proxy.
- Cache hits from Redis (the benchmark's own redis-server on loopback):
  {redis_hit.median("c32", "rps"):,.0f} req/s at c=32, {redis_hit.median("c32", "rps") /
  redis_miss.median("c32", "rps"):.1f} times its misses, {redis_hit.median("c32", "rps") /
  bare.median("c32", "rps"):.1%} of the bare proxy; p50 at c=1 {redis_hit.median("c1",
  "p50_ms"):.3f} ms (miss {redis_miss.median("c1", "p50_ms"):.3f} ms).

{_telemetry(quiet, gateway, traced)}

{_doors(gateway, doors)}

The simulator answers at once, so a cache hit here saves only the upstream hop; against a
model that takes seconds per answer, a hit saves those seconds.
"""


def _telemetry(off: Target, metrics: Target, traced: Target) -> str:
    """What metrics (the default) and traces cost over a gateway with telemetry off."""
    lines = []
    for name, t, limit in (("metrics (the default: the `gateway` row)", metrics, 0.05),
                           ("metrics and traces at 100%", traced, 0.15)):
        per_request = off.median("c32", "rps") / t.median("c32", "rps") - 1
        latency = t.median("c1", "p50_ms") / off.median("c1", "p50_ms") - 1
        ok = "met" if max(per_request, latency) < limit else "NOT met"
        lines.append(f"  {name}: {per_request:+.1%} time per request at c=32, {latency:+.1%} "
                     f"p50 at c=1 (target: under {limit:.0%}: {ok}).")
    return "\n".join(["- Telemetry, against the same gateway with it off "
                      f"({off.median('c32', 'rps'):,.0f} req/s at c=32):", *lines,
                      "  (Differences of about 10% are within this machine's noise from one "
                      "5 s run to the next; `loadtest/DOORS.md` counts the instructions each "
                      "costs per request, which do not drift.)"])


def _doors(chat: Target, doors: list[Target]) -> str:
    """What each other front door costs over ``/v1/chat/completions`` for the same question
    on the same gateway: per request at c=32 (inverse throughputs) and p50 at c=1.
    """
    lines = ["- The other front doors, against `/v1/chat/completions` on the same gateway "
             "in this run (target: at most 10% more):"]
    for door in doors:
        per_request = chat.median("c32", "rps") / door.median("c32", "rps") - 1
        latency = door.median("c1", "p50_ms") / chat.median("c1", "p50_ms") - 1
        ttft = door.median("stream", "ttft_p50_ms") / chat.median("stream", "ttft_p50_ms") - 1
        ok = "met" if max(per_request, latency) <= 0.10 else "NOT met"
        lines.append(f"  {door.name.removeprefix('gateway, ')}: {per_request:+.1%} time per "
                     f"request at c=32, {latency:+.1%} p50 at c=1, {ttft:+.1%} time to first "
                     f"token ({ok}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    print(run(args.seconds, args.rounds, args.stream_requests, args.out))


if __name__ == "__main__":
    main()
