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
from typing import Any

import numpy as np
import orjson

from gateway.config import LearnedConfig
from gateway.protocol.openai import ChatRequest, CompletionRequest
from gateway.routing.candidates import Candidate, Decision
from gateway.routing.features import DIMENSIONS, FLAGS, LENGTH, TURNS, features_of
from gateway.routing.ordering import Usable

log = logging.getLogger(__name__)

PRIOR_TOP = 0.6  # the prior estimate of an alias's first choice...
PRIOR_STEP = 0.05  # ...and how much lower each next one starts
UNRANKED = 4  # the place assumed for a model first heard of without one
FOLD_AT, FOLD_AFTER = 32, 1.0  # pending outcomes are folded in at 32, or after a second
SHAPES = 256  # shapes of vector whose coefficients are kept (worked out again at each fold)
BORDERED = DIMENSIONS + 1  # a model's sums: the features' and their products with the reward
# A vector's shape: all but its two graded features, length and turns (the vector is its
# bias, those two, then flags).
Shape = tuple[float, ...]
# A model's estimate for the vectors of one shape, as a function of their length l and
# turns t: mean = c + a l + b t, spread (the width squared) = q + pl l + pt t + ll l² +
# lt l t + tt t²: (c, a, b, q, pl, pt, ll, lt, tt).
Coefficients = tuple[float, float, float, float, float, float, float, float, float]


class Panel:
    """One alias's models, each a linear estimate of the reward over the request's features
    (ridge regression). Outcomes are taken in as they come and folded in a few at a time,
    with numpy: the changed models' matrices inverted together, then each shape of vector
    seen lately worked out for every model, so that a request is scored in plain Python
    from a few numbers per model. Old outcomes fade (each weighs ``1 - 1/memory`` less per
    outcome of its model since, and ``1 - 1/(2 * memory * models)`` less per outcome of
    the alias): a model that changes is noticed, and one passed over is tried again in time,
    while the prior and the regularisation stay.

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
        self.theta = np.zeros((0, DIMENSIONS))  # the weights, A⁻¹ b
        self.inverse = np.zeros((0, DIMENSIONS, DIMENSIONS))  # A⁻¹
        # What scoring reads: by shape of vector, each model's coefficients.
        self.shapes: dict[Shape, list[Coefficients]] = {}
        self.places: dict[tuple[str, ...], tuple[int, ...]] = {}  # (picks' names → places)
        self.pending: list[tuple[int, Sequence[float], float]] = []  # (model, x, reward)
        self.pending_since = 0.0
        self.total = 0  # outcomes learned from, all models together

    def add(self, name: str, prior: float) -> int:
        """A model, its estimate starting at ``prior`` (as if ``strength`` requests had each
        earned that); its place.
        """
        start = np.zeros((1, BORDERED, BORDERED))
        start[0, :DIMENSIONS, :DIMENSIONS] = np.eye(DIMENSIONS) * self.lam
        start[0, 0, DIMENSIONS] = prior * self.lam
        self.sums = np.concatenate((self.sums, start))
        self.start = np.concatenate((self.start, start))
        self.theta = np.concatenate((self.theta, np.zeros((1, DIMENSIONS))))
        self.inverse = np.concatenate((self.inverse, np.zeros((1, DIMENSIONS, DIMENSIONS))))
        place = self.index[name] = len(self.names)
        self.names.append(name)
        self.n.append(0)
        self._refresh([place])
        return place

    def table(self, shape: Shape) -> list[Coefficients]:
        """Each model's coefficients for vectors of ``shape`` (worked out if new)."""
        table = self.shapes.get(shape)
        if table is None:
            if len(self.shapes) >= SHAPES:
                self.shapes.clear()
            table = self.shapes[shape] = self._coefficients([shape])[shape]
        return table

    def rank(self, table: list[Coefficients], places: Sequence[int], x: Sequence[float],
             bonus: float) -> list[tuple[int, float, float]]:
        """The models at ``places``, best first (ties: the static order), for ``x`` of the
        shape whose ``table`` it is: each one's position among them, mean and width (the
        mean ``theta . x`` and the width ``sqrt(x . inverse . x)``, from the coefficients).
        """
        length, turns = x[LENGTH], x[TURNS]
        length2, both, turns2 = length * length, length * turns, turns * turns
        scored = []
        for position, place in enumerate(places):
            c, a, b, q, pl, pt, ll, lt, tt = table[place]
            mean = c + a * length + b * turns
            spread = q + pl * length + pt * turns + ll * length2 + lt * both + tt * turns2
            width = math.sqrt(spread) if spread > 0.0 else 0.0
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
        self.pending.append((model, x, reward))
        self.n[model] += 1
        self.total += 1

    def fold(self) -> None:
        """Take the pending outcomes in: each model's old ones faded by as many steps, and
        every model's a little for each outcome of the others: a model no longer picked goes
        back towards its prior, its doubt growing, so it is tried again (one that had a bad
        spell is not given up for good on what it did then).
        """
        pending, self.pending = self.pending, []
        if not pending:
            return
        by_model: dict[int, list[float]] = {}  # each model's outcomes: [*x, reward] in a row
        for model, x, reward in pending:
            flat = by_model.get(model)
            if flat is None:
                flat = by_model[model] = []
            flat.extend(x)
            flat.append(reward)
        sums, start = self.sums, self.start
        sums -= start  # what was learned fades; the start stays
        # every model's a little with each outcome of the alias (half as fast as with its
        # own, were the outcomes shared out evenly: faster, and what was learned of models
        # rarely picked is forgotten too soon), a model's own more with each of its own
        sums *= (1.0 - (1.0 - self.decay) / (2 * len(self.names))) ** len(pending)
        for model, flat in by_model.items():
            sums[model] *= self.decay ** (len(flat) // BORDERED)
        sums += start
        for model, flat in by_model.items():
            z = np.array(flat).reshape(-1, BORDERED)
            sums[model] += z.T @ z
        self._refresh(list(range(len(self.names))))

    def _refresh(self, models: list[int]) -> None:
        """The estimates of ``models`` from their sums (their matrices inverted together),
        then the coefficients of the shapes seen lately.
        """
        sums = self.sums[models]
        inverse = np.linalg.inv(sums[:, :DIMENSIONS, :DIMENSIONS])
        self.inverse[models] = inverse
        self.theta[models] = (inverse @ sums[:, :DIMENSIONS, DIMENSIONS, None])[..., 0]
        self.shapes = self._coefficients(list(self.shapes))

    def _coefficients(self, shapes: list[Shape]) -> dict[Shape, list[Coefficients]]:
        """Each model's coefficients for each shape, all at once: with ``u`` the shape's
        vector at length and turns 0, ``c = theta . u``, ``q = u . inverse . u``, and
        ``pl``, ``pt`` twice ``inverse . u`` at length and turns.
        """
        if not shapes:
            return {}
        base = np.array([(*shape[:LENGTH], 0.0, 0.0, *shape[LENGTH:]) for shape in shapes]).T
        theta, inverse = self.theta, self.inverse
        spread = inverse @ base  # (model, feature, shape)
        c, q = (theta @ base).tolist(), (spread * base).sum(axis=1).tolist()
        pl, pt = (2 * spread[:, LENGTH]).tolist(), (2 * spread[:, TURNS]).tolist()
        a, b = theta[:, LENGTH].tolist(), theta[:, TURNS].tolist()
        ll, tt = inverse[:, LENGTH, LENGTH].tolist(), inverse[:, TURNS, TURNS].tolist()
        lt = (2 * inverse[:, LENGTH, TURNS]).tolist()
        return {shape: [(c[m][s], a[m], b[m], q[m][s], pl[m][s], pt[m][s], ll[m], lt[m], tt[m])
                        for m in range(len(a))] for s, shape in enumerate(shapes)}

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
            self._refresh([i])
            self.n[i] = int(item["n"])
            self.total += self.n[i]


def shape_of(x: tuple[float, ...]) -> Shape:
    """All of a vector but its length and turns."""
    return x[:LENGTH] + x[FLAGS:]


def _explain(names: Sequence[str], best: tuple[int, float, float],
             runner: tuple[int, float, float], samples: int) -> str:
    return (f"learned: {names[best[0]]} {best[1]:.2f}+/-{best[2]:.2f} > {names[runner[0]]} "
            f"{runner[1]:.2f}; {samples} samples")


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
        places = panel.places.get(names)
        shape = shape_of(x)
        table = panel.shapes.get(shape)
        if places is None or table is None:
            with self._lock:
                if places is None:
                    places = panel.places[names] = tuple(
                        self._place(panel, name, rank) for rank, name in enumerate(names))
                table = panel.table(shape)
        ranking = panel.rank(table, places, x, self._config.exploration)
        can = [usable(picks[position]) for position, _, _ in ranking]
        if all(can):  # (nearly always)
            ordered = [picks[position] for position, _, _ in ranking]
            first, second, among = ranking[0], ranking[1], names
        else:
            ready = [each for each, ok in zip(ranking, can, strict=True) if ok]
            if len(ready) < 2:
                return picks, None  # nothing to choose between
            ordered = [picks[position] for position, _, _ in ready] + \
                [picks[position] for (position, _, _), ok in zip(ranking, can, strict=True)
                 if not ok]
            first, second = ready[0], ready[1]
            among = tuple(names[position] for position in sorted(p for p, _, _ in ready))
        explanation = _explain(names, first, second, panel.total)
        chosen = ordered[0]
        ordered[0] = Candidate(chosen.name, chosen.deployments, explanation)
        return ordered, Decision(alias, chosen.name, x, features, explanation, among)

    def pick(self, alias: str, models: list[str], x: Sequence[float]) -> str:
        """Which of ``models`` (in their static order) it would pick for ``x`` (replaying
        outcomes offline: ``gateway router eval``).
        """
        panel = self._panel(alias)
        places = [self._place(panel, name, rank) for rank, name in enumerate(models)]
        vector = tuple(x)
        with self._lock:
            if panel.due():
                panel.fold()
            table = panel.table(shape_of(vector))
            return models[panel.rank(table, places, vector, self._config.exploration)[0][0]]

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
        except (OSError, ValueError) as exc:
            log.warning("learned routing: cannot read %s (%s); starting from the priority "
                        "lists", path, exc)
            return
        log.info("learned routing: %d outcomes learned before, from %s",
                 sum(sum(p.n) for p in self._panels.values()), path)

    def dump(self) -> dict[str, Any]:
        with self._lock:
            return {"dimensions": DIMENSIONS, "aliases": {
                alias: panel.dump() for alias, panel in self._panels.items()}}

    def load(self, state: Any) -> None:
        """What ``dump`` wrote, learned again; ValueError for anything else (a file or a
        snapshot damaged, or of another version), and nothing changed.
        """
        try:
            if state.get("dimensions") != DIMENSIONS:
                raise ValueError("a learned state of other dimensions")
            panels = {}
            for alias, items in state["aliases"].items():
                panel = panels[alias] = Panel(self._config.prior_strength, self._config.memory)
                panel.load(items)
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a learned state ({type(exc).__name__}: {exc})") from None
        with self._lock:
            self._panels = panels


def encode(state: dict[str, Any]) -> bytes:
    """A learned state (``LearnedOrder.dump``) as JSON."""
    return orjson.dumps(state, option=orjson.OPT_SERIALIZE_NUMPY)


def reward(quality: float, seconds: float, latency_cost: float) -> float:
    """What an outcome was worth: its quality (0 to 1) less its latency's cost."""
    return quality - latency_cost * seconds
