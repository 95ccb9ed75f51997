"""Ids for requests and answers: unique, not secret — a per-process random part and a
counter (no system call per id).
"""

from __future__ import annotations

import itertools
import secrets

_PROCESS_ID = secrets.token_hex(6)
_COUNTER = itertools.count()


def unique_id() -> str:
    return f"{_PROCESS_ID}{next(_COUNTER):010x}"
