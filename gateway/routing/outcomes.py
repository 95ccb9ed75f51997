"""What became of each routed request: the features of the request, the model and backend
that answered, and how it went (QA's verdict, an error, latency, time to first token,
tokens per second, escalations, the client's feedback). The newest are kept in memory, by
request id: the learned policy learns from them, feedback finds its request there, and
``gateway router export`` writes them out as JSON lines.
"""

from __future__ import annotations

import collections
import time
from typing import Any


class Outcomes:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_id: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def add(self, record: dict[str, Any]) -> None:
        """Keep an outcome, under its tenant and request id (a request id is the client's
        to choose: another tenant's, alike, is another outcome).
        """
        request_id = record.get("id") or f"anonymous-{time.monotonic_ns()}"
        self._by_id[_key(record.get("tenant", ""), request_id)] = record
        if len(self._by_id) > self._limit:
            self._by_id.popitem(last=False)

    def get(self, tenant: str, request_id: str) -> dict[str, Any] | None:
        return self._by_id.get(_key(tenant, request_id))

    def all(self) -> list[dict[str, Any]]:
        """Every outcome kept, oldest first."""
        return list(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)


def _key(tenant: str, request_id: str) -> str:
    return f"{tenant}\n{request_id}"
