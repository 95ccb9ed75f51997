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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
UNRANKED = 4  # the place assumed for a model first heard of without one
FOLD_AT, FOLD_AFTER = 32, 1.0  # pending outcomes are folded in at 32, or after a second
RANKINGS = 1024  # orderings remembered between two folds
Shape = tuple[tuple[int, ...], tuple[int, ...]]  # (features that are 1, others not zero)
# A model's score for a shape: the mean and spread of its ones, the terms of each other
# feature (index, weight, spread across the ones), and of each pair of them.
Terms = tuple[float, float, list[tuple[int, float, float]], list[tuple[int, int, float]]]
BORDERED = DIMENSIONS + 1  # a model's sums: the features' and their products with the reward


class Panel:
    """One alias's models, each a linear estimate of the reward over the request's features
    (ridge regression). Outcomes are taken in as they come and folded in a few at a time,
    with numpy (a matrix inverse per model then, not per outcome); a request is scored in
    plain Python over its few features that are not zero, which for vectors this small is
    cheaper than a call into numpy. Old outcomes fade (each weighs ``1 - 1/memory`` less per
    outcome since): a model that changes is noticed, while the prior and the regularisation
    stay.

    Each model's sums are kept as one matrix, its features' (``A``, starting as the
    regularisation) bordered by their products with the reward (``b``, starting as the
    prior): one product of the outcomes' rows with themselves adds to both.
    """

    def __init__(self, strength: float, memory: int) -> None:
        self.lam = strength
        self.decay = 1.0 - 1.0 / memory
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.n: list[int] = []  # outcomes learned from, per model (those still pending too)
        self.sums = np.zeros((0, BORDERED, BORDERED))  # [[A, b], [., .]] per model
        self.start = np.zeros((0, BORDERED, BORDERED))  # ...before any outcome
        # What scoring reads, as plain lists: each model's weights and inverse matrix.
        self.theta: list[list[float]] = []
        self.inverse: list[list[list[float]]] = []
        self.pending: list[tuple[int, list[float]]] = []  # (model, [*x, reward])
        self.pending_since = 0.0
        self.total = 0  # outcomes learned from, all models together
        # Orderings worked out since outcomes were last folded in: (features, models) →
        # the ranking and the explanation of its first two (but for the samples).
        self.rankings: dict[tuple[float | str, ...], Ranked] = {}
        # Each model's scoring terms by shape of vector, until outcomes are next folded in.
        self.terms: dict[Shape, dict[int, Terms]] = {}

    def add(self, name: str, prior: float) -> int:
        """A model, its estimate starting at ``prior`` (as if ``strength`` requests had each
        earned that); its place.
        """
        start = np.zeros((1, BORDERED, BORDERED))
        start[0, :DIMENSIONS, :DIMENSIONS] = np.eye(DIMENSIONS) * self.lam
        start[0, 0, DIMENSIONS] = prior * self.lam
        self.sums = np.concatenate((self.sums, start))
        self.start = np.concatenate((self.start, start))
        self.theta.append([prior, *[0.0] * (DIMENSIONS - 1)])
        self.inverse.append((np.eye(DIMENSIONS) / self.lam).tolist())
        self.index[name] = len(self.names)
        self.names.append(name)
        self.n.append(0)
        self.rankings.clear()
        self.terms.clear()
        return self.index[name]

    def score(self, model: int, x: Sequence[float], shape: Shape) -> tuple[float, float]:
        """A model's expected reward for ``x`` (of that ``shape``), and how uncertain it
        still is: ``theta . x`` and ``sqrt(x . inverse . x)``, the parts that come from the
        features that are 1 worked out once per shape until the next fold (most of a
        vector is flags: only its length and turns vary from one request to the next).
        """
        known = self.terms.get(shape)
        if known is None:
            known = self.terms[shape] = {}
        terms = known.get(model)
        if terms is None:
            terms = known[model] = self._terms(model, shape)
        mean, spread, linear, square = terms
        for i, weight, across in linear:
            v = x[i]
            mean += weight * v
            spread += across * v
        for i, j, entry in square:
            spread += entry * x[i] * x[j]
        return mean, math.sqrt(spread) if spread > 0 else 0.0

    def _terms(self, model: int, shape: Shape) -> Terms:
        ones, scaled = shape
        theta, inverse = self.theta[model], self.inverse[model]
        return (sum(theta[i] for i in ones), sum(inverse[i][j] for i in ones for j in ones),
                [(s, theta[s], sum(inverse[i][s] + inverse[s][i] for i in ones))
                 for s in scaled],
                [(s, t, inverse[s][t]) for s in scaled for t in scaled])

    def rank(self, places: tuple[int, ...], x: Sequence[float], bonus: float
             ) -> list[tuple[int, float, float]]:
        """The models at ``places``, best first (ties: the static order): each one's
        position among them, mean and width.
        """
        shape = shape_of(x)
        scored = []
        for position, place in enumerate(places):
            mean, width = self.score(place, x, shape)
            scored.append((-mean - bonus * (width if width < 1.0 else 1.0), position, mean, width))
        scored.sort()  # (best first; ties: the static order)
        return [(position, mean, width) for _, position, mean, width in scored]

    def due(self) -> bool:
        """Whether what is pending should be folded in: enough is, or it waited long enough."""
        return bool(self.pending) and (len(self.pending) >= FOLD_AT or
                                       time.monotonic() - self.pending_since > FOLD_AFTER)

    def learn(self, model: int, x: Sequence[float], reward: float) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((model, [*x, reward]))
        self.n[model] += 1
        self.total += 1

    def fold(self) -> None:
        """Take the pending outcomes in: each model's old ones faded by as many steps."""
        pending, self.pending = self.pending, []
        self.rankings.clear()
        self.terms.clear()
        by_model: dict[int, list[list[float]]] = {}
        for model, row in pending:
            by_model.setdefault(model, []).append(row)
        for model, rows in by_model.items():
            z = np.array(rows, dtype=np.float64)
            sums, start = self.sums[model], self.start[model]
            sums -= start  # what was learned fades; the start stays
            sums *= self.decay ** len(rows)
            sums += start
            sums += z.T @ z
            self._refresh(model)

    def _refresh(self, model: int) -> None:
        sums = self.sums[model]
        inverse = np.linalg.inv(sums[:DIMENSIONS, :DIMENSIONS])
        self.inverse[model] = inverse.tolist()
        self.theta[model] = (inverse @ sums[:DIMENSIONS, DIMENSIONS]).tolist()

    def dump(self) -> list[dict[str, Any]]:
        """Each model's state, as numpy arrays of its own (``encode`` writes them)."""
        self.fold()
        d, sums, start = DIMENSIONS, self.sums, self.start
        return [{"model": name, "matrix": sums[i, :d, :d].copy(), "b": sums[i, :d, d].copy(),
                 "b0": start[i, :d, d].copy(), "n": self.n[i]}
                for i, name in enumerate(self.names)]

    def load(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            matrix = np.array(item["matrix"], dtype=float)
            b, b0 = np.array(item["b"], dtype=float), np.array(item["b0"], dtype=float)
            if matrix.shape != (DIMENSIONS, DIMENSIONS) or b.shape != (DIMENSIONS,) \
                    or b0.shape != (DIMENSIONS,):
                raise ValueError("a learned state of other dimensions")
            i = self.add(item["model"], 0.0)
            self.sums[i, :DIMENSIONS, :DIMENSIONS], self.sums[i, :DIMENSIONS, DIMENSIONS] = \
                matrix, b
            self.start[i, :DIMENSIONS, DIMENSIONS] = b0
            self._refresh(i)
            self.n[i] = int(item["n"])
            self.total += self.n[i]


class Ranked(NamedTuple):
    """A ranking of models (each one's position among them, mean and width; best first),
    and the explanation of its first two (to which the samples are added).
    """

    ranking: list[tuple[int, float, float]]
    explanation: str
    positions: tuple[int, ...]  # the ranking's, on their own


def shape_of(x: Sequence[float]) -> Shape:
    """Which of a vector's features are 1, and which others are not zero."""
    ones, scaled = [], []
    for i, v in enumerate(x):
        if v == 1.0:
            ones.append(i)
        elif v:
            scaled.append(i)
    return tuple(ones), tuple(scaled)


def _explain(names: tuple[str, ...], best: tuple[int, float, float],
             runner: tuple[int, float, float]) -> str:
    return (f"learned: {names[best[0]]} {best[1]:.2f}±{best[2]:.2f} > {names[runner[0]]} "
            f"{runner[1]:.2f}; ")


class LearnedOrder:
    """The learned ordering of an alias's picks (the selector's other ordering is the
    static priority itself).
    """

    def __init__(self, config: LearnedConfig) -> None:
        self._config = config
        self._panels: dict[str, Panel] = {}
        # Changed on the event loop, and read whole by the saving thread.
        self._lock = threading.RLock()
        self.changes = 0  # outcomes learned from, since start
        self._saved = 0  # ...when last saved

    def order(self, alias: str, picks: list[Candidate], req: ChatRequest | CompletionRequest,
              usable: Usable) -> tuple[list[Candidate], Decision | None]:
        """The picks in the order learned, those that can answer now first (exploration
        never picks one that cannot); with fewer than two that can, there is nothing to
        choose, and the static order stands.
        """
        if len(picks) < 2:
            return picks, None
        features = features_of(req)
        x = features.vector()
        names = tuple([c.name for c in picks])
        panel = self._panels.get(alias) or self._panel(alias)
        if panel.due():
            with self._lock:
                if panel.due():  # (unless the saving thread just did)
                    panel.fold()
        # The same features among the same models score the same until outcomes are folded
        # in: worked out once, then read (requests alike, until the next fold).
        key: tuple[float | str, ...] = (*x, *names)
        ranked = panel.rankings.get(key)
        if ranked is None:
            with self._lock:
                places = tuple(self._place(panel, name, rank) for rank, name in enumerate(names))
                ranking = panel.rank(places, x, self._config.exploration)
                ranked = Ranked(ranking, _explain(names, ranking[0], ranking[1]),
                                tuple([position for position, _, _ in ranking]))
                if len(panel.rankings) >= RANKINGS:
                    panel.rankings.clear()
                panel.rankings[key] = ranked
        samples = panel.total
        positions = ranked.positions
        can = [usable(picks[position]) for position in positions]
        if all(can):  # (nearly always)
            ordered = [picks[position] for position in positions]
            explanation, among = ranked.explanation, names
        else:
            ready = [i for i, ok in enumerate(can) if ok]
            if len(ready) < 2:
                return picks, None  # nothing to choose between
            ranking = ranked.ranking
            ordered = [picks[positions[i]] for i in ready] + \
                [picks[position] for position, ok in zip(positions, can, strict=True) if not ok]
            explanation = _explain(names, ranking[ready[0]], ranking[ready[1]])
            among = tuple(names[p] for p in sorted(positions[i] for i in ready))
        chosen = ordered[0]
        explanation += f"{samples} samples"
        ordered[0] = Candidate(chosen.name, chosen.deployments, explanation)
        return ordered, Decision(alias, chosen.name, x, features, explanation, among)

    def pick(self, alias: str, models: list[str], x: Sequence[float]) -> str:
        """Which of ``models`` (in their static order) it would pick for ``x`` (replaying
        outcomes offline: ``gateway router eval``).
        """
        panel = self._panel(alias)
        places = [self._place(panel, name, rank) for rank, name in enumerate(models)]
        shape = shape_of(x)
        bonus = self._config.exploration

        def score(rank: int) -> tuple[float, int]:
            mean, width = panel.score(places[rank], x, shape)
            return -(mean + bonus * min(width, 1.0)), rank

        with self._lock:
            if panel.due():
                panel.fold()
            return models[min(range(len(models)), key=score)]

    def learn(self, alias: str, model: str, x: Sequence[float], reward: float,
              rank: int | None = None, checked: bool = False) -> bool:
        """Learn from one outcome (``rank``: the model's place in the alias's static order,
        for its prior should this be the first heard of it); whether it could (an outcome
        of the wrong shape, or not a number, is not learned from; ``checked``: ``x`` is this
        process's own, made by ``Features.vector``).
        """
        if not math.isfinite(reward) or (not checked and not (
                isinstance(x, list | tuple) and len(x) == DIMENSIONS and
                all(isinstance(v, int | float) and math.isfinite(v) for v in x))):
            return False
        panel = self._panels.get(alias) or self._panel(alias)
        place = self._place(panel, model, rank)
        with self._lock:
            panel.learn(place, x, reward)
            self.changes += 1
        return True

    def _panel(self, alias: str) -> Panel:
        panel = self._panels.get(alias)
        if panel is None:
            with self._lock:
                panel = self._panels.setdefault(
                    alias, Panel(self._config.prior_strength, self._config.memory))
        return panel

    def _place(self, panel: Panel, model: str, rank: int | None) -> int:
        place = panel.index.get(model)
        if place is None:
            with self._lock:
                place = panel.index.get(model)
                if place is None:
                    prior = PRIOR_TOP - PRIOR_STEP * (rank if rank is not None else UNRANKED)
                    place = panel.add(model, prior)
        return place

    def samples(self) -> dict[str, dict[str, int]]:
        """Outcomes learned from, by alias and model."""
        return {alias: dict(zip(panel.names, panel.n, strict=True))
                for alias, panel in self._panels.items()}

    def save(self, path: Path) -> bool:
        """Write what was learned to ``path`` (whole or not at all), if anything changed
        since it was last written; whether it wrote.
        """
        if self.changes == self._saved:
            return False
        changes, state = self.changes, self.dump()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_bytes(encode(state))
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
                 sum(sum(p.n) for p in self._panels.values()), path)

    def dump(self) -> dict[str, Any]:
        with self._lock:
            return {"dimensions": DIMENSIONS, "aliases": {
                alias: panel.dump() for alias, panel in self._panels.items()}}

    def load(self, state: dict[str, Any]) -> None:
        if state.get("dimensions") != DIMENSIONS:
            raise ValueError("a learned state of other dimensions")
        panels = {}
        for alias, items in state["aliases"].items():
            panel = panels[alias] = Panel(self._config.prior_strength, self._config.memory)
            panel.load(items)
        with self._lock:
            self._panels = panels


def encode(state: dict[str, Any]) -> bytes:
    """A learned state (``LearnedOrder.dump``) as JSON."""
    return orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY)


def reward(quality: float, seconds: float, latency_cost: float) -> float:
    """What an outcome was worth: its quality (0 to 1) less its latency's cost."""
    return quality - latency_cost * seconds
