"""The ordering seam of the selector: how an alias's picks are put in order. Two orderings
answer it: the static priority lists as they are (``Priority``), and what was learned from
outcomes (``learned.LearnedOrder``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.protocol.openai import ChatRequest, CompletionRequest
from gateway.routing.candidates import Candidate, Decision

Usable = Callable[[Candidate], bool]  # whether a candidate can take a request now


class Ordering(Protocol):
    def order(self, alias: str, picks: list[Candidate], req: ChatRequest | CompletionRequest,
              usable: Usable) -> tuple[list[Candidate], Decision | None]:
        """The picks (static priority first, each meeting the request's needs), best first,
        and the decision to learn from (None: nothing was chosen by learning).
        """
        ...


class Priority:
    """The static priority lists, as they are."""

    def order(self, alias: str, picks: list[Candidate], req: ChatRequest | CompletionRequest,
              usable: Usable) -> tuple[list[Candidate], Decision | None]:
        return picks, None
