"""Queued work: the Files and Batch APIs, and the workers that answer batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from gateway.config.serving import redis_url_problem

QueueKind = Literal["local", "redis"]



@dataclass(frozen=True, slots=True)
class TasksConfig:
    """``queue = "local"`` (the default) keeps files, batches and their queue in
    ``data_dir`` (an SQLite database beside the files), for one gateway process, surviving
    restarts. ``queue = "redis"`` keeps them in Redis, where the workers of every gateway
    process and of ``gateway worker`` on any host take lines from one stream.

    ``concurrency``: lines one process answers at once; ``share``: the part of each
    deployment's ``max_concurrency`` batch lines may take, so interactive requests always
    find room; ``visibility_timeout``: seconds after which a line a worker claimed and never
    finished (the worker died) is given to another.
    """

    queue: QueueKind = "local"
    redis_url: str = "redis://127.0.0.1:6379/0"
    data_dir: str = "~/.local/share/hybrid-gateway"
    worker: bool = True  # run a worker inside `gateway serve`
    concurrency: int = 8
    share: float = 0.5
    max_file_bytes: int = 100 * 1024 * 1024  # an upload is held whole while it arrives
    max_lines: int = 50_000
    visibility_timeout: float = 300.0
    retry_initial: float = 1.0  # a line no backend can answer now waits, then again
    retry_max: float = 60.0

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.concurrency < 1:
            yield "concurrency", "expected at least 1"
        if not 0.0 < self.share <= 1.0:
            yield "share", "expected a share above 0, at most 1 (0.5: half)"
        if self.max_file_bytes < 1:
            yield "max_file_bytes", "expected a positive size"
        if self.max_lines < 1:
            yield "max_lines", "expected a positive number"
        if self.visibility_timeout <= 0:
            yield "visibility_timeout", "expected seconds > 0"
        for key in ("retry_initial", "retry_max"):  # (0: a line retried without a pause)
            if getattr(self, key) <= 0:
                yield key, "expected seconds > 0"
        if self.queue == "redis" and (problem := redis_url_problem(self.redis_url)):
            yield "redis_url", problem
