"""Side by side with LiteLLM: the same simulated upstream reached directly, through the bare
aiohttp proxy, through LiteLLM's proxy and through the gateway (plain, with the default
config's plugins, and routing an ``auto`` alias among two deployments) — in one run.

    .venv/bin/python -m loadtest.litellm       # a section of loadtest/RESULTS.md, a chart

LiteLLM is installed by this module into a virtualenv of its own (``loadtest/.litellm-venv``,
pinned version) and started with one worker on loopback, with a master key, no database and
no telemetry. Non-streaming load comes from wrk (``loadtest.run``'s helpers); streaming is
measured by a Python client, one request at a time, while the simulator paces its tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.config import DEFAULT_CONFIG
from loadtest.batches import cpu_of, machine_cpu, percentile, write_section
from loadtest.run import (
    BODY,
    HERE,
    REPLY,
    Target,
    _config,
    _target,
    ensure_wrk,
    free_ports,
    start,
    wait_ready,
    wrk,
)

LITELLM_VERSION = "1.108.7"
LITELLM_REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
LITELLM_VENV = HERE / ".litellm-venv"
LITELLM_KEY = "sk-loadtest-master-key"  # LiteLLM refuses to start without a master key
SECTION = "## Side by side with LiteLLM"
CHART = HERE / "litellm.png"
SIM_MODELS = "/v1/models"
# Every row sends the same request; temperature 0 makes the answer one the cache keeps, and
# the plugin rows ask for a miss each time (asked upstream, then stored).
REQUEST = {**BODY, "temperature": 0}
MISS = {"x-gateway-cache": "refresh"}
COLUMNS = ("path", "c=1 req/s", "c=1 p50 ms", "c=32 req/s", "c=32 p50 ms", "c=32 p99 ms",
           "stream TTFT p50 / p99 ms", "inter-chunk p50 / p99 ms")
WARM_UP_SECONDS = 2.0
WARM_UP_STREAMS = 5
STREAM_TIMEOUT = 30.0  # seconds for one streamed answer, so a stuck server cannot hang us
START_TIMEOUT = 180.0  # LiteLLM's start-up imports take a while on this machine


@dataclass
class Row:
    """One path through to the simulator: its wrk target, or why it has no numbers."""

    name: str
    short: str  # in the findings and on the chart
    target: Target | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.target is not None and not self.error

    def median(self, key: str, metric: str) -> float:
        assert self.target is not None
        return self.target.median(key, metric)


# ---- LiteLLM: install and configure


def install_litellm(venv: Path) -> Path:
    """The ``litellm`` command of a virtualenv with the pinned version, made when missing."""
    marker = venv / ".installed"
    if marker.exists() and marker.read_text().strip() == LITELLM_REQUIREMENT:
        return venv / "bin" / "litellm"
    print(f"installing {LITELLM_REQUIREMENT} into {venv}", file=sys.stderr)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", LITELLM_REQUIREMENT],
        capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stderr.splitlines()
                  if "ignored: it is neither a file nor a directory" not in line]
        raise RuntimeError(f"pip install {LITELLM_REQUIREMENT} failed "
                           f"({result.returncode}): {' / '.join(errors[-5:])}")
    marker.write_text(LITELLM_REQUIREMENT + "\n")
    return venv / "bin" / "litellm"


def litellm_config(models: list[str], sim_port: int) -> str:
    """LiteLLM's config.yaml: each simulated model as an OpenAI-compatible endpoint."""
    lines = ["model_list:"]
    for model in models:
        lines += [f"  - model_name: {json.dumps(model)}",
                  "    litellm_params:",
                  f"      model: {json.dumps('openai/' + model)}",
                  f"      api_base: \"http://127.0.0.1:{sim_port}/v1\"",
                  "      api_key: \"sk-simulator\""]
    lines += ["general_settings:", f"  master_key: {json.dumps(LITELLM_KEY)}"]
    return "\n".join(lines) + "\n"


def start_litellm(command: Path, config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """LiteLLM's proxy, one worker on loopback: nothing fetched, sent home or stored."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "LITELLM_", "OPENAI_"))}
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled price list, no download
        "LITELLM_TELEMETRY_DISABLED": "true",
        "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
        "DISABLE_ADMIN_UI": "true",
        "LITELLM_LOG": "WARNING",  # as the gateway's --log-level warning: no access log
    })
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
             "--num_workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=config.parent, env=env)


# ---- the gateway's configs


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are written alike


def default_plugins() -> tuple[list[str], str]:
    """The default config's plugins: their names, and the TOML that declares them."""
    plugins: list[dict[str, Any]] = tomllib.loads(DEFAULT_CONFIG.read_text()).get("plugins", [])
    blocks = []
    for plugin in plugins:
        block = [f'[[plugins]]\nname = "{plugin["name"]}"']
        if plugin.get("options"):
            block.append("[plugins.options]")
            block += [f"{k} = {_toml_value(v)}" for k, v in plugin["options"].items()]
        blocks.append("\n".join(block) + "\n")
    return [p["name"] for p in plugins], "\n".join(blocks)


# ---- the simulators


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until something listens on ``port`` (the bare proxy has no health route)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited ({process.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def sim_models(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{SIM_MODELS}", timeout=5) as response:
        return [m["id"] for m in json.load(response)["data"]]


def set_pace(ports: list[int], models: list[str], tokens_per_s: float | None) -> None:
    """Pace every model of the simulators (their per-model ``tokens_per_s`` knob), or, with
    None, answer at once again.
    """
    for port in ports:
        if tokens_per_s is None:
            requests = [urllib.request.Request(f"http://127.0.0.1:{port}/_sim/faults",
                                               method="DELETE")]
        else:
            body = json.dumps({"tokens_per_s": tokens_per_s}).encode()
            requests = [urllib.request.Request(f"http://127.0.0.1:{port}/_sim/faults/{m}",
                                               data=body, method="PUT") for m in models]
        for request in requests:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()


# ---- streaming: time to first token and between chunks


def content_event(line: bytes) -> bool:
    """Whether an SSE line is a chunk carrying answer text."""
    line = line.strip()
    if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
        return False
    event = json.loads(line[5:])
    return any((choice.get("delta") or {}).get("content")
               for choice in event.get("choices") or [])


async def stream(url: str, body: dict[str, Any], headers: dict[str, str],
                 requests: int) -> dict[str, float]:
    """Streamed answers one after the other: time to the first chunk with text, and the
    delays between consecutive chunks with text (all answers' together).
    """
    firsts: list[float] = []
    gaps: list[float] = []
    chunks: list[int] = []
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for _ in range(requests):
            started = time.perf_counter()
            arrivals: list[float] = []
            async with http.post(url, json={**body, "stream": True},
                                 headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}: "
                                       f"{(await response.text())[:200]}")
                async for line in response.content:
                    if content_event(line):
                        arrivals.append(time.perf_counter())
            if not arrivals:
                raise RuntimeError(f"{url}: no content in the stream")
            firsts.append((arrivals[0] - started) * 1000)
            gaps += [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
            chunks.append(len(arrivals))
    return {"ttft_p50_ms": percentile(firsts, 50), "ttft_p99_ms": percentile(firsts, 99),
            "gap_p50_ms": percentile(gaps, 50), "gap_p99_ms": percentile(gaps, 99),
            "chunks": statistics.median(chunks)}


# ---- the run


class Usage:
    """CPU used while the benchmark runs, in cores (seconds a second): by its servers, by
    itself and its finished wrk runs, and by anything else on the machine (a shared machine:
    another process's load makes every row slower).
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._start = self._read()
        self._wall = time.perf_counter()

    def _read(self) -> dict[str, float]:
        own = os.times()
        busy, steal = machine_cpu()
        return {"servers": sum(cpu_of(pid) for pid in self.pids),
                "benchmark": own.user + own.system + own.children_user + own.children_system,
                "machine": busy, "steal": steal}

    def cores(self) -> dict[str, float]:
        end, wall = self._read(), time.perf_counter() - self._wall
        used = {name: (end[name] - self._start[name]) / wall for name in end}
        used["other"] = max(0.0, used["machine"] - used["servers"] - used["benchmark"])
        return used


def measure(row: Row, what: str, seconds: float, stream_requests: int) -> None:
    """One measurement of a row: "load" (wrk at c=1 and c=32), "stream", or "warm-up"
    (both, briefly, not kept). A failure takes the row out of the rest of the run, with the
    reason.
    """
    target = row.target
    if target is None or row.error:
        return
    try:
        if what == "load":
            target.add("c1", wrk(target.url, 1, seconds, target.script))
            target.add("c32", wrk(target.url, 32, seconds, target.script))
        elif what == "stream":
            target.add("stream", asyncio.run(stream(target.url, target.body, target.headers,
                                                    stream_requests)))
        else:
            wrk(target.url, 8, seconds, target.script)
            asyncio.run(stream(target.url, target.body, target.headers, stream_requests))
    except (RuntimeError, ValueError, TimeoutError, subprocess.CalledProcessError,
            aiohttp.ClientError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        row.error = f"{what}: {type(exc).__name__}: {detail}"
        print(f"{row.name}: {row.error}", file=sys.stderr)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(seconds: float, rounds: int, stream_requests: int, pace: float, venv: Path,
        out: Path, chart: Path) -> str:
    began = time.monotonic()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="loadtest-litellm-"))
    litellm_error = ""
    try:
        litellm = install_litellm(venv)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        litellm_error = f"install: {exc}"
    ports = free_ports(("sim", "sim2", "proxy", "litellm", "gateway", "plugins", "routed"))
    sims = {name: f"http://127.0.0.1:{ports[name]}/v1" for name in ("sim", "sim2")}
    plugin_names, plugins = default_plugins()
    configs = {
        "gateway": _config(ports["gateway"], {"sim": sims["sim"]}),
        "plugins": _config(ports["plugins"], {"sim": sims["sim"]}, plugins),
        "routed": _config(ports["routed"], {"host-a": sims["sim"], "host-b": sims["sim2"]},
                          plugins),
    }
    python = sys.executable
    processes = [start([python, "-m", "gateway.sim", "openai", "--port", str(ports[name]),
                        "--reply", REPLY], work / f"{name}.log") for name in ("sim", "sim2")]
    processes.append(start([python, str(HERE / "bare_proxy.py"), "--upstream",
                            f"http://127.0.0.1:{ports['sim']}", "--port", str(ports["proxy"])],
                           work / "proxy.log"))
    try:
        for name in ("sim", "sim2"):
            wait_ready(f"http://127.0.0.1:{ports[name]}/health")
        wait_port(ports["proxy"], processes[-1])
        models = sim_models(ports["sim"])
        for name, text in configs.items():
            (work / f"{name}.toml").write_text(text)
            processes.append(start([python, "-m", "gateway", "--log-level", "warning", "serve",
                                    "--config", str(work / f"{name}.toml")], work / f"{name}.log"))
            wait_ready(f"http://127.0.0.1:{ports[name]}/health", process=processes[-1])
            time.sleep(0.3)  # a process that lost its port exits right after start-up
            if processes[-1].poll() is not None:
                raise RuntimeError(f"the {name} gateway exited: see {work / name}.log")
        if not litellm_error:
            (work / "litellm.yaml").write_text(litellm_config(models, ports["sim"]))
            processes.append(start_litellm(litellm, work / "litellm.yaml", ports["litellm"],
                                           work / "litellm.log"))
            try:
                wait_ready(f"http://127.0.0.1:{ports['litellm']}/health/liveliness",
                           START_TIMEOUT, processes[-1])
            except RuntimeError as exc:
                log = (work / "litellm.log").read_text(errors="replace").strip().splitlines()
                litellm_error = f"start: {exc}: {' / '.join(log[-5:])}"
        listed = " + ".join(plugin_names)
        rows = [
            Row("direct to simulator", "direct",
                _target("direct", ports["sim"], REQUEST, work)),
            Row("bare aiohttp proxy", "bare proxy",
                _target("bare", ports["proxy"], REQUEST, work)),
            Row(f"LiteLLM proxy {LITELLM_VERSION}, 1 worker", "LiteLLM",
                None if litellm_error else _target(
                    "litellm", ports["litellm"], REQUEST, work,
                    {"Authorization": f"Bearer {LITELLM_KEY}"}), litellm_error),
            Row("gateway, no plugins", "gateway",
                _target("gateway", ports["gateway"], REQUEST, work)),
            Row(f"gateway + {listed} (cache miss)", "gateway + plugins",
                _target("plugins", ports["plugins"], REQUEST, work, MISS)),
            Row(f"gateway, routed `auto` among 2 deployments, + {listed} (cache miss)",
                "gateway routed + plugins",
                _target("routed", ports["routed"], {**REQUEST, "model": "auto"}, work, MISS)),
        ]
        sim_ports = [ports["sim"], ports["sim2"]]
        usage = Usage([process.pid for process in processes])
        for row in rows:  # warm up connections, caches and first-call paths
            print(f"warm-up: {row.name}", file=sys.stderr)
            measure(row, "warm-up", WARM_UP_SECONDS, WARM_UP_STREAMS)
        for round_ in range(rounds):  # interleaved, so drift in the machine hits all alike
            for row in rows:
                print(f"round {round_ + 1}/{rounds}: {row.name}: wrk", file=sys.stderr)
                measure(row, "load", seconds, stream_requests)
            set_pace(sim_ports, models, pace)
            try:
                for row in rows:
                    print(f"round {round_ + 1}/{rounds}: {row.name}: streams", file=sys.stderr)
                    measure(row, "stream", seconds, stream_requests)
            finally:
                set_pace(sim_ports, models, None)
        cores = usage.cores()
    finally:
        stop(processes)
    minutes = (time.monotonic() - began) / 60
    plot(rows, chart)
    section = render(rows, plugin_names, seconds, rounds, stream_requests, pace, minutes,
                     cores, os.path.relpath(chart, out.parent))
    write_section(out, section, SECTION)
    print(f"logs: {work}", file=sys.stderr)
    return section


# ---- the report


def _cell(row: Row, key: str, metric: str, digits: int) -> str:
    return f"{row.median(key, metric):,.{digits}f}" if row.ok else "—"


def render(rows: list[Row], plugin_names: list[str], seconds: float, rounds: int,
           stream_requests: int, pace: float, minutes: float, cores: dict[str, float],
           chart: str) -> str:
    """The section: how it was measured, the table, and what the numbers say."""
    direct, bare, litellm, plain, plugged, routed = rows
    table = []
    for row in rows:
        name = row.name if row.ok else f"{row.name} (failed: see below)"
        table.append(" | ".join([
            f"| {name}", _cell(row, "c1", "rps", 0), _cell(row, "c1", "p50_ms", 3),
            _cell(row, "c32", "rps", 0), _cell(row, "c32", "p50_ms", 2),
            _cell(row, "c32", "p99_ms", 2),
            f"{_cell(row, 'stream', 'ttft_p50_ms', 2)} / {_cell(row, 'stream', 'ttft_p99_ms', 2)}",
            f"{_cell(row, 'stream', 'gap_p50_ms', 2)} / {_cell(row, 'stream', 'gap_p99_ms', 2)} |",
        ]))

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def share(row: Row) -> float:
        return row.median("c32", "rps") / bare.median("c32", "rps")

    findings = []
    if plugged.ok and bare.ok:
        findings.append(f"- Gateway with plugins at c=32: **{share(plugged):.1%} of the bare "
                        f"proxy's throughput** (target ≥ 70%: {verdict(share(plugged) >= 0.7)}).")
    if plain.ok and bare.ok:
        findings.append(f"- Gateway without plugins at c=32: **{share(plain):.1%} of the bare "
                        f"proxy's throughput** (target ≥ 90%: {verdict(share(plain) >= 0.9)}).")
    if plugged.ok and litellm.ok:
        times = plugged.median("c32", "rps") / litellm.median("c32", "rps")
        line = (f"- Gateway with plugins against LiteLLM at c=32: **{times:,.1f} times its "
                f"throughput** (target ≥ 50 times: {verdict(times >= 50)})")
        if plain.ok:
            line += (f"; without plugins "
                     f"{plain.median('c32', 'rps') / litellm.median('c32', 'rps'):,.1f} times")
        findings.append(line + ".")
    else:
        findings.append("- Gateway with plugins against LiteLLM: no number, LiteLLM's row "
                        "failed (target ≥ 50 times: NOT met, unmeasured).")
    if plugged.ok and direct.ok:
        added = plugged.median("c1", "p50_ms") - direct.median("c1", "p50_ms")
        others = "; ".join(
            f"{r.short} {r.median('c1', 'p50_ms') - direct.median('c1', 'p50_ms'):.3f} ms"
            for r in (bare, litellm, plain) if r.ok)
        findings.append(f"- Gateway with plugins, added p50 at c=1 over direct: **{added:.3f} "
                        f"ms** (target ≤ 0.5 ms: {verdict(added <= 0.5)}); for comparison, "
                        f"{others}.")
    if routed.ok and plugged.ok:
        findings.append(f"- Routing the `auto` alias among two deployments, plugins on: "
                        f"{share(routed):.1%} of the bare proxy at c=32 "
                        f"({routed.median('c32', 'rps') / plugged.median('c32', 'rps'):.1%} of "
                        "the same gateway naming the model).")
    streamed = [r for r in rows if r.ok]
    if direct.ok:
        base = direct.median("stream", "ttft_p50_ms")
        ttfts = "; ".join(f"{r.short} {r.median('stream', 'ttft_p50_ms') - base:+.2f} ms"
                          for r in streamed if r is not direct)
        findings.append(f"- Streaming, added time to first token over direct (p50): {ttfts}.")
        chunks = ", ".join(f"{r.short} {r.median('stream', 'chunks'):g}" for r in streamed)
        findings.append(f"- Chunks with text per answer (median): {chunks} (the simulator "
                        f"sends {len(REPLY.split())}, {1000 / pace:g} ms apart: an inter-chunk "
                        "p50 near that means the path relays each chunk as it comes).")
    busy = (f"- While the paths were measured the servers used {cores['servers']:.2f} cores, "
            f"the benchmark and wrk {cores['benchmark']:.2f}, other processes on the machine "
            f"{cores['other']:.2f}, and the hypervisor took {cores['steal']:.2f} (steal)")
    if cores["other"] + cores["steal"] >= 0.1:
        busy += ("; that load was not the benchmark's own: every row ran slower for it, and "
                 "the rows measured while it was heaviest the most")
    findings.append(busy + ".")
    failures = [f"- **{r.name}** failed: {r.error}" for r in rows if r.error]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    prose = [
        f"""({when}, {_machine()}; the run took {minutes:.1f} minutes, LiteLLM's start-up
        included.)""",
        f"""{len(rows)} paths to the same simulated OpenAI-compatible server (`python -m
        gateway.sim openai`, a {len(REPLY.split())}-word reply; a second simulator process for
        the routed row's second deployment), each a server process of its own on loopback:
        directly; `loadtest/bare_proxy.py`; LiteLLM's proxy (`{LITELLM_REQUIREMENT}` in its own
        virtualenv, `--num_workers 1`, a master key sent as `Authorization: Bearer`, no
        database, telemetry off, the local cost map, warnings only in its log); and `python -m
        gateway serve` (one process, `--log-level warning`): without plugins, with the default
        config's plugins ({", ".join(plugin_names)}; every request sent with `x-gateway-cache:
        refresh`, so each is a cache miss: asked upstream and stored), and with them while
        routing `auto` among the same model on the two simulators. Each request is the same
        chat completion (`max_tokens` 64, temperature 0).""",
        f"""Non-streaming: wrk (one thread, `--timeout 10s`) for {seconds:g} s at 1 and at 32
        connections, against the simulator answering at once, so the numbers are the path's
        own cost (the gateway asks for a stream, which the simulator then writes in one
        write, the bare proxy and LiteLLM for the whole answer). Streaming:
        {stream_requests} sequential requests per path and round from an aiohttp client,
        while the simulator paces its tokens at {pace:g} tokens/s
        ({1000 / pace:g} ms apart, no time to first token of its own); time to first token is
        to the first chunk with text, inter-chunk delay is between consecutive chunks with
        text (p50 and p99 over all of a round's answers). Medians of {rounds} rounds, the
        paths interleaved in each.""",
    ]
    header = [f"| {' | '.join(COLUMNS)} |", f"|---|{'---:|' * (len(COLUMNS) - 1)}"]
    return "\n\n".join([
        SECTION,
        f"Command: `.venv/bin/python -m loadtest.litellm --seconds {seconds:g} --rounds "
        f"{rounds} --stream-requests {stream_requests} --pace {pace:g}`\n" + _fill(prose[0]),
        *(_fill(p) for p in prose[1:]),
        "\n".join(header + table),
        "\n".join(_fill(line) for line in findings + failures),
        f"![c=32 throughput per path]({chart})",
    ]) + "\n"


def _fill(text: str) -> str:
    """A paragraph (or a bullet: its lines after the first indented) in lines of 92."""
    return textwrap.fill(" ".join(text.split()), 92, break_on_hyphens=False,
                         break_long_words=False,
                         subsequent_indent="  " if text.startswith("- ") else "")


def _machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = " (" + line.split(":", 1)[1].strip() + ")"
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores{model}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def plot(rows: list[Row], path: Path) -> None:
    """A bar per path: its median throughput at c=32 (a failed path: an empty bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.short for row in rows][::-1]
    values = [row.median("c32", "rps") if row.ok else 0.0 for row in rows][::-1]
    colours = ["tab:gray" if "gateway" not in n else "tab:blue" for n in names]
    colours = ["tab:orange" if n.startswith("LiteLLM") else c for n, c in
               zip(names, colours, strict=True)]
    figure, axes = plt.subplots(figsize=(9, 3.8), dpi=110)
    bars = axes.barh(range(len(values)), values, color=colours)
    axes.set_yticks(range(len(values)), names, fontsize=9)
    for bar, value in zip(bars, values, strict=True):
        axes.text(bar.get_width() + max(values) * 0.01, bar.get_y() + bar.get_height() / 2,
                  f"{value:,.0f}" if value else "failed", va="center", fontsize=8)
    axes.set_xlim(0, max(values) * 1.15 or 1)
    axes.set_xlabel("requests per second at 32 connections (median of the rounds)")
    axes.set_title(f"Same simulated upstream, one process per path, {os.cpu_count()} cores")
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.litellm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--stream-requests", type=int, default=50,
                        help="sequential streamed requests per path and round")
    parser.add_argument("--pace", type=float, default=100.0,
                        help="the simulator's tokens per second while streaming")
    parser.add_argument("--venv", type=Path, default=LITELLM_VENV,
                        help="LiteLLM's virtualenv (made when missing)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--chart", type=Path, default=CHART)
    args = parser.parse_args()
    print(run(args.seconds, args.rounds, args.stream_requests, args.pace, args.venv, args.out,
              args.chart))


if __name__ == "__main__":
    main()
