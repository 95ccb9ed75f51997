"""``gateway batches``: every batch not yet finished and the last ones that are, with their
progress, read from the task store the config names (what ``/admin/status`` shows too).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from gateway.config import DEFAULT_CONFIG, load_config
from gateway.tasks.local import LocalStore

BAR = 24  # characters of a progress bar


def add_batches_command(commands: Any) -> None:
    batches = commands.add_parser("batches", help="the batches, with their progress")
    batches.add_argument("--config", help=f"TOML config (default: {DEFAULT_CONFIG})")
    batches.add_argument("--last", type=int, default=10,
                         help="finished batches shown (default: 10)")
    batches.set_defaults(run=_batches)


def _batches(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(asyncio.run(listing(config.tasks.data_dir, config.tasks.visibility_timeout,
                              args.last)))
    return 0


async def listing(data_dir: str, visibility_timeout: float, last: int) -> str:
    store = LocalStore(data_dir, visibility_timeout, claims=False)
    await store.start()
    try:
        batches = await store.recent_batches(last)
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
