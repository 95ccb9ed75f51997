"""Files and batches as OpenAI's API shows them, and the checks of a batch's input file.

A batch's input is JSONL, one request a line: ``{"custom_id": "...", "method": "POST",
"url": "/v1/chat/completions", "body": {...}}``. The whole file is checked before any
work starts; what is wrong is said OpenAI's way, an ``errors`` list of ``{code, message,
param, line}``.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
WINDOWS = {"24h": 24 * 3600.0}  # OpenAI takes only "24h"
PURPOSES = ("batch", "user_data", "batch_output")
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_ERRORS = 100  # validation errors reported at most (the first ones)


def new_id(prefix: str) -> str:
    """An id that sorts as its record was made (the time, then chance): a list stays in
    order within a second, and a page's ``after`` still places itself once its record is
    deleted (a clean-up loop over ``files.list``).
    """
    return f"{prefix}{time.time_ns():016x}{secrets.token_hex(6)}"


def file_record(file_id: str, tenant: str, filename: str, purpose: str, size: int
                ) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None, "tenant": tenant}


# Whose it is, what that key may do, and the gateway's own notes.
PRIVATE = frozenset({"tenant", "models", "cache_scope", "expiring", "queued", "requeued_at"})


def shown(record: dict[str, Any]) -> dict[str, Any]:
    """A file or batch as the API shows it (without whose it is)."""
    return {k: v for k, v in record.items() if k not in PRIVATE}


def batch_record(batch_id: str, tenant: str, endpoint: str, input_file_id: str,
                 window: str, metadata: dict[str, str] | None) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
        "input_file_id": input_file_id, "completion_window": window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now,
        "in_progress_at": None, "expires_at": now + int(WINDOWS[window]),
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata, "tenant": tenant,
    }


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a batch."""

    batch: str
    n: int  # its place in the input file, from 1
    custom_id: str
    body: dict[str, Any]
    ref: str = ""  # the queue's handle of it, once claimed (a Redis stream entry's id)
    # How often it was put back to be tried again, and of those for a timeout: carried
    # with it on a queue that several processes share, whichever of them claims it next.
    tries: int = 0
    timeouts: int = 0


def check_input(content: bytes, batch: str, endpoint: str, max_lines: int
                ) -> tuple[list[Line], list[dict[str, Any]]]:
    """The batch's lines, or the errors that fail it (OpenAI's ``errors.data``)."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(code: str, message: str, n: int | None, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": n})

    content = content.removeprefix(b"\xef\xbb\xbf")  # (a BOM, as Windows editors write
    # one, is no part of the first line)
    requests = sum(1 for raw in _lines(content) if raw.strip())  # (blank lines ask nothing)
    if requests > max_lines:
        error("too_many_requests", f"The input file has {requests} requests; a batch may "
              f"have at most {max_lines}.", None)
        return [], errors
    for n, raw in enumerate(_lines(content), start=1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            error("invalid_json_line", "This line is not valid JSON.", n)
            continue
        if not isinstance(item, dict):
            error("invalid_request", "Each line must be a JSON object.", n)
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            error("missing_required_parameter", "Each line needs a custom_id string.", n,
                  "custom_id")
        elif custom_id in seen:
            error("duplicate_custom_id", f"The custom_id {custom_id!r} is used more than "
                  "once; each line needs its own.", n, "custom_id")
        else:
            seen.add(custom_id)
        if item.get("method", "POST") != "POST":
            error("invalid_method", "The method must be POST.", n, "method")
        if item.get("url") != endpoint:
            error("mismatched_endpoint" if item.get("url") in ENDPOINTS else "invalid_url",
                  f"The url must be the batch's endpoint, {endpoint}.", n, "url")
        body = item.get("body")
        if not isinstance(body, dict):
            error("missing_required_parameter", "Each line needs a JSON object body.", n,
                  "body")
        elif not isinstance(body.get("model"), str):
            error("missing_required_parameter", "The body needs a model.", n, "body.model")
        if not errors and isinstance(custom_id, str) and isinstance(body, dict):
            lines.append(Line(batch, n, custom_id, body))
    if not lines and not errors:
        error("empty_file", "The input file has no requests.", None)
    return ([] if errors else lines), errors


_BREAK = re.compile(rb"\r\n|\r|\n")


def _lines(content: bytes) -> Iterator[bytes]:
    """``content.splitlines()`` one at a time: a 100 MB file's lines, all at once, took as
    much again while it was checked.
    """
    start, end = 0, len(content)
    if b"\r" not in content:  # (most files: a quicker look for the end of each line)
        while start < end:
            stop = content.find(b"\n", start)
            if stop < 0:
                yield content[start:]
                return
            yield content[start:stop]
            start = stop + 1
        return
    while start < end:
        found = _BREAK.search(content, start)
        if found is None:
            yield content[start:]
            return
        yield content[start:found.start()]
        start = found.end()
