"""System calls per request, for each kind of request: strace counts the calls of the
gateway process (and of the bare proxy, for the same requests) while wrk sends requests one
at a time.

    .venv/bin/python -m loadtest.syscalls     # writes its section of loadtest/RESULTS.md

A count does not drift with the machine's speed as a time does, and a call more on every
request is a turn of the event loop more (a task woken through the loop's own wake-up, say).
The gateway runs with the default config's plugins in front of the simulated
OpenAI-compatible server answering at once; strace (installed with apt-get when missing)
attaches to the server process for each row only.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.batches import write_section
from loadtest.litellm import MISS, default_plugins, wait_port
from loadtest.run import (
    BODY,
    CACHED_BODY,
    DOORS,
    HERE,
    REPLY,
    _config,
    _target,
    ensure_wrk,
    free_ports,
    start,
    wait_ready,
    wrk,
)

SECTION = "## System calls per request"
SHOWN = ("read", "write", "epoll_pwait", "getpid")  # the calls every request makes


def ensure_strace() -> str:
    if not shutil.which("strace") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("strace")
    if found is None:
        raise SystemExit("loadtest.syscalls needs strace: apt-get install -y strace")
    return found


def counted(strace: str, pid: int, url: str, script: Path, seconds: float
            ) -> collections.Counter[str]:
    """The calls of process ``pid`` (all its threads) per request, wrk sending one at a time."""
    with tempfile.NamedTemporaryFile(suffix=".strace") as out:
        tracer = subprocess.Popen([strace, "-c", "-f", "-o", out.name, "-p", str(pid)],
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        requests = wrk(url, 1, seconds, script)["rps"] * seconds
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
        calls: collections.Counter[str] = collections.Counter()
        for line in Path(out.name).read_text().splitlines():
            parts = line.split()  # % time, seconds, usecs/call, calls, [errors,] syscall
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
    return collections.Counter({name: n / requests for name, n in calls.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    ensure_wrk()
    strace = ensure_strace()
    work = Path(tempfile.mkdtemp(prefix="loadtest-syscalls-"))
    ports = free_ports(("sim", "proxy", "gateway"))
    sim = f"http://127.0.0.1:{ports['sim']}"
    (work / "gateway.toml").write_text(_config(ports["gateway"], {"sim": sim + "/v1"},
                                               default_plugins()[1]))
    python = sys.executable
    processes = {
        "sim": start([python, "-m", "gateway.sim", "openai", "--port", str(ports["sim"]),
                      "--reply", REPLY], work / "sim.log"),
        "proxy": start([python, str(HERE / "bare_proxy.py"), "--upstream", sim, "--port",
                        str(ports["proxy"])], work / "proxy.log"),
        "gateway": start([python, "-m", "gateway", "--log-level", "warning", "serve",
                          "--config", str(work / "gateway.toml")], work / "gateway.log"),
    }
    streamed = {**BODY, "stream": True}
    rows: list[tuple[str, str, dict[str, Any], str, dict[str, str] | None]] = [
        ("bare proxy", "proxy", BODY, "/v1/chat/completions", None),
        ("bare proxy, streamed", "proxy", streamed, "/v1/chat/completions", None),
        ("gateway + plugins (cache miss)", "gateway", BODY, "/v1/chat/completions", MISS),
        ("gateway + plugins (cache miss), streamed", "gateway", streamed,
         "/v1/chat/completions", MISS),
        ("gateway + plugins, cache hit", "gateway", CACHED_BODY, "/v1/chat/completions", None),
        ("gateway + plugins, cache hit, streamed", "gateway", {**CACHED_BODY, "stream": True},
         "/v1/chat/completions", None),
        *((f"gateway + plugins, {door.split(' (')[0]}{how}", "gateway", body | extra, path,
           MISS)
          for door, path, body, _ in DOORS
          for how, extra in (("", {}), (", streamed", {"stream": True}))),
    ]
    try:
        wait_ready(sim + "/health")
        wait_port(ports["proxy"], processes["proxy"])
        wait_ready(f"http://127.0.0.1:{ports['gateway']}/health",
                   process=processes["gateway"])
        lines = []
        for name, server, body, path, headers in rows:
            target = _target(server, ports[server], body, work, headers, path=path)
            wrk(target.url, 1, 1, target.script)  # warm up
            calls = counted(strace, processes[server].pid, target.url, target.script,
                            args.seconds)
            rest = sum(n for call, n in calls.items() if call not in SHOWN)
            lines.append(f"| {name} | {sum(calls.values()):.1f} | " +
                         " | ".join(f"{calls[call]:.2f}" for call in SHOWN) + f" | {rest:.2f} |")
            print(lines[-1], flush=True)
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=10)
    command = f".venv/bin/python -m loadtest.syscalls --seconds {args.seconds:g}"
    report = "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.)",
        "The server process's system calls (every thread's) per request, counted by strace "
        f"while wrk sent requests one at a time for {args.seconds:g} s, against the "
        "simulated OpenAI-compatible server answering at once (the gateway asks it for a "
        "stream). A request needs a read and a write on each side, and the event loop's "
        "waits for them; `getpid` is asyncio asking which loop runs (`asyncio.timeout`, "
        "`get_running_loop`). A streamed answer writes each chunk as it comes.",
        "| path | calls per request | " + " | ".join(SHOWN) + " | others |\n"
        "|---|---:|" + "---:|" * (len(SHOWN) + 1) + "\n" + "\n".join(lines),
    ]) + "\n"
    write_section(args.out, report, SECTION)
    print(report)


if __name__ == "__main__":
    main()
