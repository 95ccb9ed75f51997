"""``gateway batches``: every batch not yet finished and the last ones that are, with their
progress, read from the task store the config names (what ``/admin/status`` shows too);
``gateway worker``: a process answering batch lines from Redis, on any host that reaches it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import time
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway.app import create_app
from gateway.config import DEFAULT_CONFIG, ConfigError, GatewayConfig, TasksConfig, load_config
from gateway.runtime import new_event_loop, signalled
from gateway.store import redis_problem, shown
from gateway.tasks.batches import Store
from gateway.tasks.local import LocalStore
from gateway.tasks.shared import RedisStore

log = logging.getLogger(__name__)

BAR = 24  # characters of a progress bar


def add_batches_command(commands: Any) -> None:
    batches = commands.add_parser("batches", help="the batches, with their progress")
    batches.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    batches.add_argument("--last", type=int, default=10,
                         help="finished batches shown (default: 10)")
    batches.set_defaults(run=_batches)
    worker = commands.add_parser(
        "worker", help="answer batch lines from the config's Redis, without serving HTTP "
        "(as many on as many hosts as the work needs)")
    worker.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    worker.set_defaults(run=_worker)


def _worker(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if config.tasks.queue != "redis":
        print('gateway worker: the config\'s [tasks] queue is "local" (the gateway\'s own '
              'worker answers it); set queue = "redis" to share the work', file=sys.stderr)
        return 2
    config = dataclasses.replace(config, tasks=dataclasses.replace(config.tasks, worker=True))
    loop = new_event_loop()
    try:
        loop.run_until_complete(_working(config))
    finally:
        loop.close()
    return 0


async def _working(config: GatewayConfig) -> None:
    """Every part of the gateway but its HTTP server: the pipeline, routing, the backends,
    the monitor, and the batch worker.
    """
    # A hang-up (logrotate's, a closed terminal's) is a clean stop too, not one that leaves
    # the lines it held for others to take back after their claims lapse.
    stop = signalled(signal.SIGHUP)
    runner = web.AppRunner(create_app(config))
    await runner.setup()  # (starts every service; no port is opened)
    try:
        log.info("gateway worker: answering batch lines from %s", shown(config.tasks.redis_url))
        await stop.wait()
    finally:
        await runner.cleanup()


def _batches(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(asyncio.run(listing(config.tasks, args.last)))
    return 0


async def listing(config: TasksConfig, last: int) -> str:
    store: Store = RedisStore(config.redis_url, config.visibility_timeout) \
        if config.queue == "redis" else \
        LocalStore(config.data_dir, config.visibility_timeout, claims=False)
    try:
        await store.start()
        batches = await store.recent_batches(last)
    except (RedisError, OSError) as exc:
        problem = await redis_problem(config.redis_url) or \
            f"Redis at {store.folder} does not answer ({type(exc).__name__})"
        raise ConfigError(f"tasks.redis_url: {problem}") from None
    finally:
        await store.close()
    if not batches:
        return f"no batches (in {store.folder})"
    return "\n".join(line(b) for b in batches)


def line(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    total, done = counts["total"], counts["completed"] + counts["failed"]
    filled = round(BAR * done / total) if total else 0
    bar = "#" * filled + "." * (BAR - filled)
    age = time.strftime("%Y-%m-%d %H:%M", time.localtime(batch["created_at"]))
    who = batch["tenant"] or "-"
    failed = f", {counts['failed']} failed" if counts["failed"] else ""
    return (f"{batch['id']}  {batch['status']:<11} [{bar}] {done}/{total}{failed}  "
            f"{batch['endpoint']}  {who}  {age}")
