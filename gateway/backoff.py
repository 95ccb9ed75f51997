"""Jittered exponential backoff, for retries of an upstream call and for reconnecting a tunnel."""

from __future__ import annotations

import random

MAX_DOUBLINGS = 32  # the delay stops growing long before this; past it, no overflow


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """The delay before try ``attempt`` (0-based) after a failure: ``initial`` doubled per
    attempt up to ``maximum``, then a random share of it between half and all, so clients
    that failed together do not come back together.
    """
    delay = min(maximum, initial * 2.0 ** min(attempt, MAX_DOUBLINGS))
    return random.uniform(delay / 2, delay)
