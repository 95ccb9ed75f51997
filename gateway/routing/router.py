"""The one place that decides which backend serves a request."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from gateway.backends.base import Backend
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, InvalidRequest
from gateway.protocol.openai import ChatRequest, CompletionRequest, EmbeddingRequest
from gateway.protocol.units import Chunk, EmbeddingResult
from gateway.routing.attempts import Attempts
from gateway.routing.balancer import Balancer
from gateway.routing.candidates import REQUESTED, Candidate, Route
from gateway.routing.catalog import Deployment, ModelCatalog
from gateway.routing.failover import RoutedAnswer
from gateway.routing.features import features_of
from gateway.routing.learned import reward
from gateway.routing.learning_link import LearningLink
from gateway.routing.outcomes import Outcomes
from gateway.routing.selector import Needs, Selector
from gateway.telemetry import Instruments, current_span


class Router:
    def __init__(self, config: GatewayConfig, backends: dict[str, Backend],
                 catalog: ModelCatalog, instruments: Instruments) -> None:
        self.config = config
        self.instruments = instruments
        self.catalog = catalog
        self.selector = Selector(catalog, config)
        self.backends = backends
        specs = {b.name: b for b in config.backends}

        def limits(name: str) -> tuple[int, int]:
            """``max_concurrency``, else what the backend runs at once (its ``parallel``, or
            a llama.cpp server's slots), and never more than its connections (which the
            balancer's ``Connections`` keep for all of its models together).
            """
            spec, backend = specs.get(name), backends.get(name)
            if spec is None:
                return 0, 64
            runs = spec.max_concurrency or (backend.capacity if backend else 0)
            return min(runs or spec.max_connections, spec.max_connections), spec.max_queue

        self.balancer = Balancer(
            config.routing, limits,
            lambda name: specs[name].max_connections if name in specs else 0)
        catalog.on_change.append(self.balancer.relimit)
        learned = config.routing.learned
        self.outcomes = Outcomes(learned.outcomes)
        # Learning shared with every process through Redis, when configured.
        self.link = LearningLink(learned.redis_url, self.selector.learned, learned.outcomes) \
            if learned.redis_url and self.selector.learned is not None else None
        # Told when a connection to a backend is refused (the health watcher listens).
        self.on_unreachable: Callable[[str], None] = lambda backend: None
        # Told of a backend that says it has not got a model it listed (ModelCatalog.stale).
        self.on_missing: Callable[[str], None] = lambda backend: None

    def answer(self, req: ChatRequest | CompletionRequest, allowed: tuple[str, ...] = (),
               batch: bool = False) -> RoutedAnswer:
        """The routed answer to a chat or text completion; ``await .start()`` runs it.
        ``allowed``: the only models that may answer besides the one asked for (none: any);
        ``batch``: a batch line's, which takes only its share of each deployment.
        """
        return self._answer(req, self.selector.route(req, allowed, self._answers_now), batch)

    def _answers_now(self, candidate: Candidate) -> bool:
        now = time.monotonic()
        for deployment in candidate.deployments:  # noqa: SIM110 (a generator costs more)
            if self.balancer.takes(deployment, now):
                return True
        return False

    def escalate(self, req: ChatRequest | CompletionRequest, than: Deployment,
                 why: str, allowed: tuple[str, ...] = (), batch: bool = False
                 ) -> RoutedAnswer | None:
        """The answer of a stronger model than ``than``, or None when there is none."""
        stronger = self.selector.stronger(req, than, why, allowed)
        # (Not the alias's pick again: its first answer was, and the escalation is counted.)
        return self._answer(req, Route(stronger, list), batch, picked=False) \
            if stronger else None

    def _answer(self, req: ChatRequest | CompletionRequest, route: Route, batch: bool,
                picked: bool = True) -> RoutedAnswer:
        def opener(deployment: Deployment, prefill: str | None, sent: int
                   ) -> AsyncGenerator[Chunk]:
            ask = _continuing(req, prefill, sent) if prefill else req
            backend, model = deployment.backend, deployment.model.name
            if isinstance(ask, ChatRequest):
                return backend.chat(ask, model)
            return backend.complete(ask, model)

        operation = "chat" if isinstance(req, ChatRequest) else "text_completion"
        attempts = Attempts(self.config.routing, self.balancer, route, self.instruments,
                            operation, self.on_unreachable, self.on_missing,
                            self.config.tasks.share if batch else None)
        alias = req.model if picked and self.selector.is_alias(req.model) else ""
        return RoutedAnswer(attempts, opener, self.instruments, alias=alias,
                            streamed=req.stream, rescue=self.config.routing.rescue,
                            decision=route.decision)

    def record(self, req: ChatRequest | CompletionRequest, outcome: dict[str, Any],
               routed: RoutedAnswer | None, quality: float | None) -> None:
        """Keep a request's outcome, and learn from it when a learned pick routed it
        (``quality``: 0 to 1; None: nothing to learn, the request itself was at fault).
        The chosen model earns the quality only if it answered: a fallback's answer means
        the chosen one failed; by its own fault, it earns nothing, and otherwise (its
        upstream's rate limit, its queue full) nothing is learned of it.
        """
        decision = routed.decision if routed is not None else None
        if decision is None:
            outcome["features"] = features_of(req).as_dict()
        else:
            outcome.update(features=decision.features.as_dict(), chosen=decision.model,
                           candidates=decision.candidates, x=decision.x)
            cost = self.selector.latency_cost(decision.alias)
            answered = outcome.get("model") == decision.model
            if quality is not None and self.selector.learned is not None and cost is not None \
                    and (answered or routed is None or routed.failed_by_fault(decision.model)):
                earned = quality if answered else 0.0
                value = reward(earned, outcome.get("latency_ms", 0) / 1000, cost)
                outcome["reward"] = value
                self._learn(decision.alias, decision.model, decision.x, value,
                            decision.candidates, checked=True)
        self.outcomes.add(outcome)
        if self.link is not None:
            self.link.outcome(outcome)

    def _learn(self, alias: str, model: str, x: Sequence[float], value: float,
               candidates: Sequence[str], checked: bool = False) -> None:
        """Learned from here, or (sharing through Redis) by every process alike, this one
        too, as the outcome comes back from the stream they all read.
        """
        rank = candidates.index(model) if model in candidates else None
        if self.link is not None:
            self.link.learned(alias, model, x, value, rank)
        elif self.selector.learned is not None:
            self.selector.learned.learn(alias, model, x, value, rank, checked)

    async def feedback(self, request_id: str, tenant: str, score: float
                       ) -> tuple[dict[str, Any], bool] | None:
        """A client's word on an answer (0: bad … 1: good), learned from once as another
        outcome of the same request (a later word replaces the one kept, but is not learned
        from again); the outcome and whether it was learned from now, or None when this
        tenant has none by that id.
        """
        outcome = self.outcomes.get(tenant, request_id)
        if outcome is None and self.link is not None:
            outcome = await self.link.find(tenant, request_id)  # (kept by another process)
        if outcome is None:
            return None
        first = outcome.get("feedback") is None  # (as kept here; Redis, for all)
        if first and self.link is not None:
            first = await self.link.first_word(tenant, request_id) is not False
        outcome["feedback"] = score
        chosen, alias = outcome.get("chosen"), outcome.get("alias", "")
        cost = self.selector.latency_cost(alias)
        learns = first and self.selector.learned is not None and cost is not None and \
            bool(chosen) and chosen == outcome.get("model") and bool(outcome.get("x"))
        if learns:
            assert cost is not None and chosen is not None
            value = reward(score, outcome.get("latency_ms", 0) / 1000, cost)
            self._learn(alias, chosen, list(outcome["x"]), value,
                        outcome.get("candidates") or ())
        if self.link is not None:
            self.link.rated(outcome)
        return outcome, learns

    async def all_outcomes(self) -> list[dict[str, Any]]:
        """The outcomes kept (every process's, when they share Redis), oldest first."""
        return await self.link.all() if self.link is not None else self.outcomes.all()

    async def embed(self, req: EmbeddingRequest, batch: bool = False
                    ) -> tuple[EmbeddingResult, Deployment, int]:
        """Embeddings, failing over only among deployments of the model asked for: another
        model's vectors would not be comparable.
        """
        if self.selector.is_alias(req.model):
            raise InvalidRequest(
                f"{req.model!r} picks among models for chat; ask for embeddings by a model's "
                "own name (vectors from different models cannot be compared).",
                param="model", code="model_not_supported")
        candidate = Candidate(req.model, self.catalog.resolve(req.model), REQUESTED)
        attempts = Attempts(self.config.routing, self.balancer, Route([candidate], list),
                            self.instruments, "embeddings", self.on_unreachable, self.on_missing,
                            self.config.tasks.share if batch else None)
        attempts.span = current_span()
        error: GatewayError | None = None
        while True:
            lease = await attempts.next(error)
            try:
                result = await lease.deployment.backend.embed(req, lease.deployment.model.name)
            except GatewayError as exc:
                lease.failed(exc)
                error = exc.kept()
                continue
            else:
                lease.answered()
                lease.whole()
            finally:
                lease.release()
            return result, lease.deployment, attempts.count

    def picks(self) -> dict[str, tuple[str, Deployment] | None]:
        """What each alias sends a plain request to now: its best model that has a usable
        deployment, and that deployment (None: nothing it could pick is up).
        """
        now = time.monotonic()
        out: dict[str, tuple[str, Deployment] | None] = {}
        for alias in self.selector.aliases(available=False):
            out[alias] = next(((c.reason, d) for c in self.selector.alias_picks(alias, Needs())
                               for d in c.deployments if self.balancer.takes(d, now)), None)
        return out

    def usable(self) -> list[Deployment]:
        """Every deployment that can take a request now (its backend up, its breaker
        letting traffic through).
        """
        now = time.monotonic()
        seen: set[tuple[str, str]] = set()
        out = []
        for name in self.catalog.names():
            for d in self.catalog.deployments(name):
                key = (d.backend.name, d.model.name)
                if key not in seen and self.balancer.usable(d, now):
                    seen.add(key)
                    out.append(d)
        return out


def _continuing(req: ChatRequest | CompletionRequest, text: str, sent: int
                ) -> ChatRequest | CompletionRequest:
    """The request asking a model to continue ``text`` (already sent to the client, in about
    ``sent`` tokens) instead of starting over.
    """
    limit = req.sampling.max_tokens
    sampling = req.sampling if limit is None else \
        dataclasses.replace(req.sampling, max_tokens=max(1, limit - sent))
    body = dict(req.body)
    if limit is not None:
        body["max_tokens"] = sampling.max_tokens
        body.pop("max_completion_tokens", None)
    if isinstance(req, ChatRequest):
        messages = [*req.messages, {"role": "assistant", "content": text}]
        body["messages"] = messages
        return dataclasses.replace(req, body=body, messages=messages, sampling=sampling)
    body["prompt"] = req.prompt + text
    return dataclasses.replace(req, body=body, prompt=body["prompt"], sampling=sampling)
