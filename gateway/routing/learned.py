"""Learned routing: which of the models an alias may pick answers a request best, learned
from how requests like it went (a contextual bandit, LinUCB: one small linear model per
alias and model, over the request's features).

A model's estimate starts at the alias's static priority (the prior: a fresh gateway picks
as the priority lists say) and moves with each outcome: the answer's quality (QA's verdict,
an error, the client's feedback) less the cost of its latency (the alias's
``latency_cost`` per second). The pick is the best estimate plus a bounded bonus for what is
still uncertain (exploration), among the models that can take the request now: a model
that is down or lacks what the request needs is never picked to explore.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway.config import LearnedConfig
from gateway.protocol.openai import ChatRequest, CompletionRequest
from gateway.routing.candidates import Candidate, Decision
from gateway.routing.features import DIMENSIONS, features_of
from gateway.routing.ordering import Usable

log = logging.getLogger(__name__)

PRIOR_TOP = 0.6  # the prior estimate of an alias's first choice...
PRIOR_STEP = 0.05  # ...and how much lower each next one starts
FADE_EVERY = 16  # outcomes between two fadings of the old ones
UNRANKED = 4  # the place assumed for a model first heard of without one


class Arm:
    """One model's linear estimate of the reward, for one alias: ridge regression over the
    request's features, its inverse kept up to date one outcome at a time
    (Sherman-Morrison). Old outcomes fade (each weighs ``1 - 1/memory`` less per outcome
    since, applied every ``FADE_EVERY``): a model that changes is noticed, while the prior
    and the regularisation stay as they were.
    """

    __slots__ = ("b", "b0", "fade", "inverse", "lam", "matrix", "n", "theta")

    def __init__(self, prior: float, strength: float, memory: int) -> None:
        self.lam = strength
        self.b0 = np.zeros(DIMENSIONS)
        self.b0[0] = prior * strength  # as if ``strength`` requests had each earned ``prior``
        self.matrix = np.eye(DIMENSIONS) * strength
        self.inverse = np.eye(DIMENSIONS) / strength
        self.b = self.b0.copy()
        self.theta = self.inverse @ self.b
        self.fade = (1.0 - 1.0 / memory) ** FADE_EVERY
        self.n = 0

    def estimate(self, x: np.ndarray) -> tuple[float, float]:
        """The expected reward for ``x``, and how uncertain it is still."""
        return float(self.theta @ x), math.sqrt(max(0.0, float(x @ self.inverse @ x)))

    def update(self, x: np.ndarray, reward: float) -> None:
        self.n += 1
        self.matrix += np.outer(x, x)
        self.b += reward * x
        if self.n % FADE_EVERY == 0:
            prior = np.eye(DIMENSIONS) * self.lam
            self.matrix = prior + (self.matrix - prior) * self.fade
            self.b = self.b0 + (self.b - self.b0) * self.fade
            self.inverse = np.asarray(np.linalg.inv(self.matrix), dtype=float)
        else:
            ix = self.inverse @ x
            self.inverse -= np.outer(ix, ix) / (1.0 + float(x @ ix))
        self.theta = self.inverse @ self.b

    def dump(self) -> dict[str, Any]:
        return {"matrix": self.matrix.tolist(), "b": self.b.tolist(), "b0": self.b0.tolist(),
                "lam": self.lam, "fade": self.fade, "n": self.n}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Arm:
        arm = cls.__new__(cls)
        arm.matrix = np.array(data["matrix"], dtype=float)
        arm.b = np.array(data["b"], dtype=float)
        arm.b0 = np.array(data["b0"], dtype=float)
        if arm.matrix.shape != (DIMENSIONS, DIMENSIONS) or arm.b.shape != (DIMENSIONS,):
            raise ValueError("a learned state of other dimensions")
        arm.lam, arm.fade, arm.n = float(data["lam"]), float(data["fade"]), int(data["n"])
        arm.inverse = np.asarray(np.linalg.inv(arm.matrix), dtype=float)
        arm.theta = arm.inverse @ arm.b
        return arm


class LearnedOrder:
    """The learned ordering of an alias's picks (the selector's other ordering is the
    static priority itself).
    """

    def __init__(self, config: LearnedConfig) -> None:
        self._config = config
        self._arms: dict[tuple[str, str], Arm] = {}
        # Arms are added and changed on the event loop, and read whole by the saving thread.
        self._lock = threading.RLock()
        self.changes = 0  # outcomes learned from, since start
        self._saved = 0  # ...when last saved

    def order(self, alias: str, picks: list[Candidate], req: ChatRequest | CompletionRequest,
              usable: Usable) -> tuple[list[Candidate], Decision | None]:
        """The picks, best first by what was learned; those that cannot answer now after
        the rest, in their static order.
        """
        ready = {id(c) for c in picks if usable(c)}
        if len(ready) < 2:
            return picks, None  # nothing to choose between
        features = features_of(req)
        x = features.vector()
        scored = []
        for rank, candidate in enumerate(picks):
            if id(candidate) in ready:
                arm = self._arm(alias, candidate.name, rank)
                mean, width = arm.estimate(x)
                bonus = self._config.exploration * min(width, 1.0)
                scored.append((mean + bonus, mean, width, rank, candidate))
        scored.sort(key=lambda s: (-s[0], s[3]))
        (_, mean, width, _, best), (_, runner_mean, _, _, runner) = scored[0], scored[1]
        samples = sum(arm.n for (a, _), arm in self._arms.items() if a == alias)
        explanation = (f"learned: {best.name} {mean:.2f}±{width:.2f} > {runner.name} "
                       f"{runner_mean:.2f}; {samples} samples")
        first = Candidate(best.name, best.deployments, explanation)
        ordered = [first, *(s[4] for s in scored[1:]),
                   *(c for c in picks if id(c) not in ready)]
        return ordered, Decision(alias, best.name, x, features.as_dict(), explanation,
                                 tuple(s[4].name for s in sorted(scored, key=lambda s: s[3])))

    def pick(self, alias: str, models: list[str], x: np.ndarray) -> str:
        """Which of ``models`` (in their static order) it would pick for ``x`` (replaying
        outcomes offline: ``gateway router eval``).
        """
        def score(rank: int) -> tuple[float, int]:
            mean, width = self._arm(alias, models[rank], rank).estimate(x)
            return -(mean + self._config.exploration * min(width, 1.0)), rank
        return models[min(range(len(models)), key=score)]

    def learn(self, alias: str, model: str, x: np.ndarray, reward: float,
              rank: int | None = None) -> bool:
        """Learn from one outcome (``rank``: the model's place in the alias's static order,
        for its prior should this be the first heard of it); whether it could (an outcome
        of the wrong shape, or not a number, is not learned from).
        """
        if x.shape != (DIMENSIONS,) or not (np.isfinite(x).all() and math.isfinite(reward)):
            return False
        with self._lock:
            self._arm(alias, model, rank).update(x, reward)
            self.changes += 1
        return True

    def _arm(self, alias: str, model: str, rank: int | None) -> Arm:
        arm = self._arms.get((alias, model))
        if arm is None:
            prior = PRIOR_TOP - PRIOR_STEP * (rank if rank is not None else UNRANKED)
            with self._lock:
                arm = self._arms.setdefault((alias, model), Arm(
                    prior, self._config.prior_strength, self._config.memory))
        return arm

    def samples(self) -> dict[str, dict[str, int]]:
        """Outcomes learned from, by alias and model."""
        out: dict[str, dict[str, int]] = {}
        for (alias, model), arm in self._arms.items():
            out.setdefault(alias, {})[model] = arm.n
        return out

    def save(self, path: Path) -> bool:
        """Write what was learned to ``path`` (whole or not at all), if anything changed
        since it was last written; whether it wrote.
        """
        if self.changes == self._saved:
            return False
        changes, state = self.changes, self.dump()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(orjson.dumps(state))
        os.replace(partial, path)
        self._saved = changes
        return True

    def restore(self, path: Path) -> None:
        """What was learned before, from ``path`` (a missing or unreadable file: nothing)."""
        try:
            self.load(orjson.loads(path.read_bytes()))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("learned routing: cannot read %s (%s); starting from the priority "
                        "lists", path, exc)
            return
        log.info("learned routing: %d outcomes learned before, from %s",
                 sum(arm.n for arm in self._arms.values()), path)

    def dump(self) -> dict[str, Any]:
        with self._lock:
            return {"dimensions": DIMENSIONS,
                    "arms": [{"alias": a, "model": m, **arm.dump()}
                             for (a, m), arm in self._arms.items()]}

    def load(self, state: dict[str, Any]) -> None:
        if state.get("dimensions") != DIMENSIONS:
            raise ValueError("a learned state of other dimensions")
        arms = {(item["alias"], item["model"]): Arm.load(item) for item in state["arms"]}
        with self._lock:
            self._arms = arms


def reward(quality: float, seconds: float, latency_cost: float) -> float:
    """What an outcome was worth: its quality (0 to 1) less its latency's cost."""
    return quality - latency_cost * seconds
