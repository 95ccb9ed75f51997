"""The models that may answer a request, as the selector lists them and routing tries them:
a candidate, a route (the first candidates and the way to the fallbacks), and a learned
decision (kept until its outcome is known).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.routing.catalog import Deployment
from gateway.routing.features import Features

REQUESTED = "requested"  # the reason of the model the client named (not one picked for it)


@dataclass(slots=True)
class Candidate:
    """A model that may answer, its deployments, and why it is in the list."""

    name: str
    deployments: list[Deployment]
    reason: str

    @property
    def context_length(self) -> int:
        return max((d.model.context_length or 0 for d in self.deployments), default=0)


class Decision(NamedTuple):
    """A learned pick: what was known of the request when it was made, to learn from its
    outcome.
    """

    alias: str
    model: str
    x: Sequence[float]  # the request's features, as the policy's vector
    features: Features
    explanation: str
    candidates: tuple[str, ...] = ()  # those it chose among, in their static order


@dataclass(slots=True)
class Route:
    """The first candidates, the way to the fallbacks should they all fail, and the learned
    decision that ordered the first ones (None: their static order).
    """

    first: list[Candidate]
    fallbacks: Callable[[], list[Candidate]]
    decision: Decision | None = field(default=None)
