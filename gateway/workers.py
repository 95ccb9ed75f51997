"""``gateway serve --workers N``: N gateway processes serving the same port (each socket
bound with SO_REUSEPORT, so the kernel spreads new connections among them). Each worker is
a whole gateway of its own; what they share is what a Redis holds for them (``[routing]
redis_url``: breakers and backends found down; ``[routing.learned] redis_url``; a Redis
cache and tenants' store). This process only supervises: it starts the workers, starts one
again if it dies, and on SIGINT or SIGTERM passes the signal on and waits for them to finish
their requests in flight.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from types import FrameType

log = logging.getLogger("gateway")

STARTING = 10.0  # a worker that ends sooner than this after starting could not start
RESTART_AFTER = 1.0  # seconds before a worker that died is started again
WORKER_HEADER = "x-gateway-worker"  # each answer's, naming the worker (its PID)


def supervise(command: list[str], workers: int, grace: float) -> int:
    """Run ``workers`` copies of ``command`` (a ``gateway serve`` that binds with
    SO_REUSEPORT) until signalled; an exit code (a worker that could not start ends them
    all with its own).
    """
    stopping: list[int] = []

    def stop(signum: int, _: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    code = 0
    try:
        for number in range(workers):
            running[number] = (subprocess.Popen(command), time.monotonic())
        log.info("gateway: %d workers (pids %s)", workers,
                 ", ".join(str(process.pid) for process, _ in running.values()))
        while not stopping and not code:
            time.sleep(0.2)
            for number, (process, started) in list(running.items()):
                ended = process.poll()
                if ended is None or stopping:
                    continue
                if time.monotonic() - started < STARTING:
                    log.error("gateway: worker %d could not start (exit code %s); stopping",
                              number + 1, ended)
                    code = ended or 1
                    break
                log.warning("gateway: worker %d (pid %d) ended (exit code %s); starting it "
                            "again", number + 1, process.pid, ended)
                time.sleep(RESTART_AFTER)
                running[number] = (subprocess.Popen(command), time.monotonic())
    finally:
        _stop_all([process for process, _ in running.values()], grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _stop_all(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to each worker still running; those not done after their grace period and a
    margin are killed.
    """
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace + 10
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("gateway: worker pid %d did not stop in time; killed", process.pid)
            process.kill()
            process.wait()
