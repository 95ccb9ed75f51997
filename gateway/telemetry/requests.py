"""The request log: one JSON line per request answered — when, who (the key's id), the
front door, the model asked for and the one that answered, the backend, attempts, how the
route was chosen, status, time taken, tokens, cache — and never a prompt, an answer or a
key. To a file (appended, line-buffered, so ``tail -f`` and log shippers see each request
as it ends; opened again on SIGHUP, as logrotate's postrotate sends) or to standard output.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import orjson

log = logging.getLogger(__name__)


class RequestLog:
    def __init__(self, target: str) -> None:
        self.target = target
        self._out: IO[bytes] | None = None

    def open(self) -> None:
        if not self.target or self._out is not None:
            return
        if self.target == "-":
            self._out = sys.stdout.buffer
            return
        try:
            self._out = open(self.target, "ab", buffering=0)  # noqa: SIM115 (kept open)
        except OSError as exc:
            log.error("request log: cannot open %s: %s; requests are not logged",
                      self.target, exc.strerror)

    def write(self, record: dict[str, Any]) -> None:
        if self._out is None:
            return
        try:
            self._out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            if self.target == "-":
                self._out.flush()  # a line as each request ends, not when a buffer fills
        except (OSError, ValueError) as exc:
            log.error("request log: writing to %s failed: %s; no longer logging requests",
                      self.target, exc)
            self._out = None

    def reopen(self) -> None:
        """Open the file again by its name (SIGHUP, after logrotate moved it away): the
        lines went on to the moved file, and none to a new one.
        """
        if self.target and self.target != "-":
            self.close()
            self.open()
            log.info("request log: reopened %s", self.target)

    def close(self) -> None:
        out, self._out = self._out, None
        if out is not None and self.target != "-":
            out.close()
        elif out is not None:
            out.flush()
