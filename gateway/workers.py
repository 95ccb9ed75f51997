"""``gateway serve --workers N``: N gateway processes serving the same port (each socket
bound with SO_REUSEPORT, so the kernel spreads new connections among them). Each worker is
a whole gateway of its own; what they share is what a Redis holds for them (``[routing]
redis_url``: breakers and backends found down; ``[routing.learned] redis_url``; ``[tasks]
queue = "redis"``; a Redis cache and tenants' store). This process only supervises: it
starts the workers, starts one again if it dies (waiting longer each time it keeps dying),
and on SIGINT or SIGTERM passes the signal on and waits for them to finish their requests
in flight. A worker ends with it, should it be killed. ``/metrics`` on any worker answers
for all of them (``gateway.telemetry.workers``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from types import FrameType

from aiohttp import web

from gateway.keys import TELEMETRY
from gateway.runtime import STOP_MARGIN
from gateway.telemetry.workers import WorkerMetrics

log = logging.getLogger("gateway")

STARTING = 10.0  # a worker's first start that ends sooner than this: it cannot start
RESTART_AFTER, RESTART_MAX = 1.0, 30.0  # seconds before a dead worker is started again
KILL_AFTER = 2.0  # seconds past a worker's own deadline to stop (STOP_MARGIN) it is killed
SETTLED = 60.0  # a worker that lived this long starts again at the shortest wait
WORKER_HEADER = "x-gateway-worker"  # each answer's: which worker (1 to N) gave it
WORKER_ENV, SUPERVISOR_ENV = "GATEWAY_WORKER", "GATEWAY_SUPERVISOR"
METRICS_ENV = "GATEWAY_METRICS_DIR"  # where the workers leave their metrics for each other
METRICS_PREFIX = "gw-metrics-"  # that folder's name: this, the supervisor's pid, a dash
PR_SET_PDEATHSIG = 1


class Worker:
    def __init__(self, number: int, command: list[str], hangups: bool = False) -> None:
        self.number = number
        self.command = command
        self.hangups = hangups  # SIGHUP is passed on to it: ignored until it handles it
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.starts = 0
        self.wait = RESTART_AFTER  # before the next restart
        self.due = 0.0  # when it is to be started again (0: running or not yet started)

    def start(self, metrics: str) -> None:
        env = {**os.environ, WORKER_ENV: str(self.number), SUPERVISOR_ENV: str(os.getpid()),
               METRICS_ENV: metrics}
        # SIGHUP (logrotate's) ignored until it is handled: one passed on as a worker
        # starts up would end it.
        self.process = subprocess.Popen(self.command, env=env,
                                        preexec_fn=_hangups_ignored if self.hangups else None)
        self.started = time.monotonic()
        self.starts += 1
        self.due = 0.0


def supervise(command: list[str], workers: int, grace: float, hangups: bool = False) -> int:
    """Run ``workers`` copies of ``command`` (a ``gateway serve`` that binds with
    SO_REUSEPORT) until signalled; an exit code (a worker that could not start at all ends
    them all with its own). ``hangups``: SIGHUP is passed on to them (each reopens its
    request log), where it would end them all.
    """
    stopping: list[int] = []

    def stop(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)

    crew = [Worker(number, command, hangups) for number in range(1, workers + 1)]

    def pass_on(signum: int, _: FrameType | None) -> None:  # SIGHUP: reopen the request log
        for worker in crew:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if hangups:
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, pass_on)
    _sweep_metrics(tempfile.gettempdir())
    metrics = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    code = 0
    try:
        for worker in crew:
            worker.start(metrics)
        log.info("gateway: %d workers (pids %s)", workers,
                 ", ".join(str(w.process.pid) for w in crew if w.process))
        while not stopping and not code:
            time.sleep(0.2)
            code = _tend(crew, stopping, metrics)
    finally:
        _stop_all([w.process for w in crew if w.process is not None], grace)
        shutil.rmtree(metrics, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _hangups_ignored() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (kept through exec, until handled)


def _sweep_metrics(folder: str) -> None:
    """Remove the metrics folders of supervisors that are gone without cleaning up (killed
    with SIGKILL, say): each folder's name holds its supervisor's process id. Nothing here
    may keep the gateway from starting.
    """
    try:
        for entry in os.scandir(folder):
            found = _METRICS_NAME.fullmatch(entry.name)
            if found and entry.is_dir(follow_symlinks=False) and not _alive(int(found[1])):
                shutil.rmtree(entry.path, ignore_errors=True)
    except OSError as exc:
        log.warning("gateway: could not look for old metrics folders in %s: %s", folder, exc)


_METRICS_NAME = re.compile(re.escape(METRICS_PREFIX) + r"([0-9]{1,9})-[a-z0-9_]+")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # another user's
    return True


def _tend(crew: list[Worker], stopping: list[int], metrics: str) -> int:
    """Start again each worker that died, once its wait is over; an exit code if one could
    not start at all (0: none).
    """
    now = time.monotonic()
    for worker in crew:
        if stopping:
            return 0
        if worker.due:
            if now >= worker.due:
                worker.start(metrics)
            continue
        assert worker.process is not None
        ended = worker.process.poll()
        if ended is None:
            continue
        code = ended if ended >= 0 else 128 - ended  # (killed by a signal: 128 + its number)
        lived = now - worker.started
        if worker.starts == 1 and lived < STARTING:
            log.error("gateway: worker %d could not start (exit code %s); stopping",
                      worker.number, code)
            return code or 1
        worker.wait = RESTART_AFTER if lived > SETTLED else min(RESTART_MAX, worker.wait * 2)
        log.warning("gateway: worker %d (pid %d) ended (exit code %s) after %.0f s; starting "
                    "it again in %.0f s", worker.number, worker.process.pid, code, lived,
                    worker.wait)
        worker.due = now + worker.wait
    return 0


def _stop_all(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to each worker still running; those not done after their grace period and a
    margin are killed.
    """
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace + STOP_MARGIN + KILL_AFTER
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("gateway: worker pid %d did not stop in time; killed", process.pid)
            process.kill()
            process.wait()


def as_worker(app: web.Application) -> None:
    """This process is one of the workers: it ends with its supervisor, and ``app`` names it
    in each answer.
    """
    _end_with_supervisor()
    number = os.environ.get(WORKER_ENV, "1")

    async def name_worker(_: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = number

    app.on_response_prepare.append(name_worker)
    folder = os.environ.get(METRICS_ENV)
    if folder and app[TELEMETRY].metrics.enabled:
        shared = WorkerMetrics(app[TELEMETRY].metrics, folder, number)
        shared.attach()

        async def metrics_of_all(_: web.Application) -> AsyncIterator[None]:
            shared.start()
            yield
            await shared.close()

        app.cleanup_ctx.append(metrics_of_all)


def _end_with_supervisor() -> None:
    """Be sent SIGTERM when the supervisor dies (on Linux), and stop now if it already has:
    a worker left behind would go on serving the port beside new ones.
    """
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0"))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if supervisor and os.getppid() != supervisor:
        raise SystemExit(0)
