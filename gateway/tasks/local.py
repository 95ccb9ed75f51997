"""The local task store: files on disk in the data directory, and their records, the
batches, the queue of lines and the results in one SQLite database beside them (the
standard library's; every change one transaction, so a batch survives a restart or a
crash at any point). For one gateway process; ``redis`` serves several.

A line is claimed by setting who holds it and when; finishing it writes its result and
deletes it in one transaction, so it is done exactly once. Lines claimed by a process that
is gone are claimed again after the visibility timeout (at start-up at once: this process
is the only one).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.config import ConfigError
from gateway.tasks.records import Line

T = TypeVar("T")
DOWN = (sqlite3.OperationalError,)  # the database is locked or its disk is full

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, tenant TEXT, doc TEXT);
CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, tenant TEXT, doc TEXT);
CREATE TABLE IF NOT EXISTS lines (batch TEXT, n INTEGER, custom_id TEXT, body TEXT,
    holder TEXT, claimed_at REAL, due REAL, PRIMARY KEY (batch, n));
CREATE INDEX IF NOT EXISTS lines_due ON lines (holder, due);
CREATE TABLE IF NOT EXISTS results (batch TEXT, n INTEGER, custom_id TEXT, ok INTEGER,
    line TEXT, PRIMARY KEY (batch, custom_id));
CREATE TABLE IF NOT EXISTS custom_ids (batch TEXT PRIMARY KEY, ids TEXT);
"""


class LocalStore:
    def __init__(self, data_dir: str, visibility_timeout: float, claims: bool = True) -> None:
        """``claims``: this process's workers claim lines (a reader, such as the CLI, does
        not, and leaves the lines the gateway holds alone).
        """
        self.folder = Path(os.path.expanduser(data_dir))
        self._claims = claims
        self._timeout = visibility_timeout
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()  # lines were queued (or put back)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"tasks.data_dir: cannot keep the batch queue in {self.folder}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None

    def _open(self) -> None:
        (self.folder / "files").mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.folder / "tasks.sqlite3", check_same_thread=False,
                             isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a finished line is on disk when it says so
        db.executescript(SCHEMA)
        if self._claims:
            db.execute("UPDATE lines SET holder = NULL")  # their holder was this process,
            # before: one gateway process owns a local queue
        self._db = db

    async def close(self) -> None:
        def close() -> None:
            with self._lock:  # (after any call still running in a thread)
                if self._db is not None:
                    self._db.close()
                    self._db = None
        await asyncio.to_thread(close)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            assert self._db is not None, "start() first"
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
        return await asyncio.to_thread(locked)

    # ---- files

    async def save_file(self, record: dict[str, Any], content: bytes) -> None:
        path = self.folder / "files" / record["id"]

        def write() -> None:
            with open(path, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
        await asyncio.to_thread(write)
        await self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?)",
            (record["id"], record["tenant"], orjson.dumps(record))))

    async def file(self, file_id: str) -> dict[str, Any] | None:
        row = await self._run(lambda db: db.execute(
            "SELECT doc FROM files WHERE id = ?", (file_id,)).fetchone())
        return orjson.loads(row[0]) if row else None

    async def files(self, tenant: str) -> list[dict[str, Any]]:
        rows = await self._run(lambda db: db.execute(
            "SELECT doc FROM files WHERE tenant = ?", (tenant,)).fetchall())
        return [orjson.loads(r[0]) for r in rows]

    async def content(self, file_id: str) -> bytes | None:
        path = self.folder / "files" / file_id
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            return None

    async def delete_file(self, file_id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM files WHERE id = ?", (file_id,)))
        (self.folder / "files" / file_id).unlink(missing_ok=True)

    # ---- batches

    async def put_batch(self, record: dict[str, Any]) -> None:
        await self._run(lambda db: db.execute(
            "INSERT OR REPLACE INTO batches VALUES (?, ?, ?)",
            (record["id"], record["tenant"], orjson.dumps(record))))

    async def batch(self, batch_id: str) -> dict[str, Any] | None:
        def read(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return _counted(db, orjson.loads(row[0])) if row else None
        return await self._run(read)

    async def batches(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's batches, newest first."""
        def read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute("SELECT doc FROM batches WHERE tenant = ? ORDER BY rowid DESC",
                              (tenant,)).fetchall()
            return [_counted(db, orjson.loads(r[0])) for r in rows]
        return await self._run(read)

    async def recent_batches(self, finished: int = 10) -> list[dict[str, Any]]:
        """Every batch not yet finished and the last ``finished`` that are, newest first,
        whoever's they are (for the operator).
        """
        def read(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(
                "SELECT doc FROM batches WHERE json_extract(doc, '$.status') NOT IN "
                "('completed', 'failed', 'expired', 'cancelled') UNION ALL SELECT * FROM "
                "(SELECT doc FROM batches WHERE json_extract(doc, '$.status') IN ('completed', "
                "'failed', 'expired', 'cancelled') ORDER BY rowid DESC LIMIT ?)",
                (finished,)).fetchall()
            batches = [_counted(db, orjson.loads(r[0])) for r in rows]
            return sorted(batches, key=lambda b: b["created_at"], reverse=True)
        return await self._run(read)

    async def change_batch(self, batch_id: str, changes: dict[str, Any],
                           when: tuple[str, ...] = (), match: dict[str, Any] | None = None
                           ) -> dict[str, Any] | None:
        """Apply ``changes`` if the batch's status is one of ``when`` (any, if empty) and its
        fields are as ``match`` says; the batch as it is then, or None when it was not
        changed.
        """
        def change(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return None
            record = orjson.loads(row[0])
            if (when and record["status"] not in when) or \
                    any(record.get(k) != v for k, v in (match or {}).items()):
                return None
            record.update(changes)
            db.execute("UPDATE batches SET doc = ? WHERE id = ?",
                       (orjson.dumps(record), batch_id))
            return _counted(db, record)
        return await self._run(change)

    # ---- the queue

    async def enqueue(self, lines: list[Line], total: int | None = None) -> None:
        """``lines`` queued (a line's count is its row: ``total`` is for the Redis store's)."""
        await self._run(lambda db: db.executemany(
            "INSERT OR IGNORE INTO lines VALUES (?, ?, ?, ?, NULL, 0, 0)",
            [(x.batch, x.n, x.custom_id, orjson.dumps(x.body)) for x in lines]))
        self._arrived.set()

    async def claim(self, holder: str, count: int, wait: float) -> list[Line]:
        """Up to ``count`` lines that are due, waiting up to ``wait`` seconds for some."""
        deadline = time.monotonic() + wait
        while True:
            self._arrived.clear()
            lines = await self._run(lambda db: self._claim(db, holder, count))
            left = deadline - time.monotonic()
            if lines or left <= 0:
                return lines
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):  # (due times pass too)
                    await self._arrived.wait()

    def _claim(self, db: sqlite3.Connection, holder: str, count: int) -> list[Line]:
        now = time.time()
        rows = db.execute(
            "SELECT batch, n, custom_id, body FROM lines WHERE due <= ? AND (holder IS NULL "
            "OR claimed_at < ?) ORDER BY due, rowid LIMIT ?",
            (now, now - self._timeout, count)).fetchall()
        db.executemany("UPDATE lines SET holder = ?, claimed_at = ? WHERE batch = ? AND n = ?",
                       [(holder, now, r[0], r[1]) for r in rows])
        return [Line(r[0], r[1], r[2], orjson.loads(r[3])) for r in rows]

    async def keep(self, line: Line, holder: str) -> None:
        """The claim on a line still at work renewed (from now, the visibility timeout)."""
        await self._run(lambda db: db.execute(
            "UPDATE lines SET claimed_at = ? WHERE batch = ? AND n = ? AND holder = ?",
            (time.time(), line.batch, line.n, holder)))

    async def finish(self, line: Line, ok: bool, result: dict[str, Any]) -> None:
        """The line's result kept (once, however often it is finished) and the line gone."""
        def done(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                       (line.batch, line.n, line.custom_id, int(ok), orjson.dumps(result)))
            db.execute("DELETE FROM lines WHERE batch = ? AND n = ?", (line.batch, line.n))
        await self._run(done)

    async def discard(self, line: Line) -> None:
        """The line is not to be answered (its batch was cancelled)."""
        await self._run(lambda db: db.execute(
            "DELETE FROM lines WHERE batch = ? AND n = ?", (line.batch, line.n)))

    async def put_back(self, line: Line, delay: float) -> None:
        """Not now: the line is due again in ``delay`` seconds, for any worker."""
        await self._run(lambda db: db.execute(
            "UPDATE lines SET holder = NULL, due = ? WHERE batch = ? AND n = ?",
            (time.time() + delay, line.batch, line.n)))
        self._arrived.set()

    async def drop_lines(self, batch_id: str) -> None:
        """The batch's lines no worker holds now are not answered (cancelled, expired)."""
        await self._run(lambda db: db.execute(
            "DELETE FROM lines WHERE batch = ? AND holder IS NULL", (batch_id,)))

    async def keep_ids(self, batch_id: str, ids: list[str]) -> None:
        """A batch's custom_ids, in order: what an expired batch's error file lists as not
        answered, its input file deleted or not.
        """
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO custom_ids VALUES (?, ?)",
                                              (batch_id, orjson.dumps(ids))))

    async def ids(self, batch_id: str) -> list[str] | None:
        row = await self._run(lambda db: db.execute(
            "SELECT ids FROM custom_ids WHERE batch = ?", (batch_id,)).fetchone())
        return orjson.loads(row[0]) if row else None

    async def remaining(self, batch_id: str) -> int:
        row = await self._run(lambda db: db.execute(
            "SELECT count(*) FROM lines WHERE batch = ?", (batch_id,)).fetchone())
        return int(row[0])

    async def results(self, batch_id: str) -> list[tuple[bool, dict[str, Any]]]:
        rows = await self._run(lambda db: db.execute(
            "SELECT ok, line FROM results WHERE batch = ? ORDER BY n", (batch_id,)).fetchall())
        return [(bool(r[0]), orjson.loads(r[1])) for r in rows]


def _counted(db: sqlite3.Connection, record: dict[str, Any]) -> dict[str, Any]:
    """The batch with its request counts as the results say now."""
    if record["status"] not in ("validating", "failed"):
        ok, failed = db.execute(
            "SELECT coalesce(sum(ok), 0), count(*) - coalesce(sum(ok), 0) FROM results "
            "WHERE batch = ?", (record["id"],)).fetchone()
        record["request_counts"] = {**record["request_counts"], "completed": ok,
                                    "failed": failed}
    return record
