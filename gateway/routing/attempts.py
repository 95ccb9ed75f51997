"""The attempt plan of one request: which deployment to try next after what went wrong.

Bounded attempts; jittered exponential backoff for transient failures; ``Retry-After``
honoured up to a cap (a longer wait fails over instead), and a rate-limited deployment
rests that long rather than counting against its breaker; the same upstream model name on
every retry; a silent deployment (a timeout) failed over rather than retried; a
context-length error sent to a model with a larger window; a request a deployment cannot do
at all (its 501) taken elsewhere without counting against it; client errors and
content-policy rejections passed on untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.backoff import backoff
from gateway.config import RoutingConfig
from gateway.errors import UNSUPPORTED_BY_MODEL, GatewayError, RateLimited, Unavailable
from gateway.routing.balancer import Balancer, DeploymentState
from gateway.routing.candidates import REQUESTED, Candidate, Route
from gateway.routing.catalog import Deployment
from gateway.routing.dispositions import ELSEWHERE, counts_against, disposition, throttled
from gateway.telemetry import NO_SPAN, UPSTREAM, AnySpan, Instruments, Span

log = logging.getLogger(__name__)


class Lease:
    """One attempt on one deployment, holding one of its concurrency slots until released.
    Releasing it is safe on every path (twice is harmless), and a breaker trial that ended
    without a verdict (the client left) is handed back.
    """

    __slots__ = ("batch", "candidate", "counted", "deployment", "judged", "released", "span",
                 "started", "state", "told")

    def __init__(self, candidate: Candidate, deployment: Deployment,
                 state: DeploymentState) -> None:
        self.candidate = candidate
        self.deployment = deployment
        self.state = state
        self.started = time.monotonic()
        self.released = False
        self.judged = False
        self.batch = False  # a batch line's slot (DeploymentState.acquire_batch)
        self.span: AnySpan = NO_SPAN  # the attempt's, once it begins
        self.counted: Instruments | None = None  # (set when it begins)
        self.told = False  # its outcome counted: whole, failed, or left by the client

    @property
    def first_token_limit(self) -> float:
        """How long its first token may take: longer while the model is cold (its backend
        said it is not loaded, and it has not answered since), so the first request of the
        morning waits for the model to load rather than failing over while it does. Only
        Ollama says what it has loaded.
        """
        config = self.deployment.backend.config
        if self.cold:
            return max(config.first_token_limit, config.timeouts.first_token_cold)
        return config.first_token_limit

    @property
    def cold(self) -> bool:
        """Its backend said the model is not loaded, and it has not answered since."""
        return self.deployment.backend.config.kind == "ollama" and \
            not self.deployment.model.loaded and \
            self.state.observed_at <= self.deployment.listed_at  # (0: never answered)

    def answered(self) -> None:
        """The first token arrived (or a whole embedding): the deployment answers, and this
        is how fast it was.
        """
        self.judged = True
        self.state.breaker.answering()
        self.state.observe(time.monotonic() - self.started)

    def whole(self) -> None:
        """The answer came whole: the deployment's breaks in a row are over."""
        breaker = self.state.breaker
        if breaker.state == "closed":  # (not reopened meanwhile by others' failures)
            breaker.success()
        self._tell("ok")

    def _tell(self, outcome: str) -> None:
        """The attempt's outcome, counted once (an answer that began and then broke off
        is a failure, not an answer as well)."""
        if not self.told:
            self.told = True
            if self.counted is not None:
                self.counted.attempts.add((*_key(self.deployment), outcome))

    def failed(self, error: GatewayError, broke: bool = False) -> None:
        """The attempt failed; ``broke``: its answer had begun and broke off."""
        self.judged = True
        fault = counts_against(error)
        if fault:
            self.state.breaker.failure(broke)
        else:
            self.state.breaker.end_trial()
            if throttled(error):
                self.state.rest(error.retry_after, busy=error.code == "backend_busy")
        if fault and self.counted is not None and not self.told:
            self.counted.faults.add((self.deployment.backend.name,))
        self._tell(error.label)
        self.span.fail(error.message, error.label)
        self.span.set("gateway.disposition", disposition(error))

    def release(self) -> None:
        if not self.released:
            self.released = True
            if not self.judged:
                self.state.breaker.end_trial()
            self._tell("client_closed")  # (when nothing else was: the client left)
            self.state.release(self.batch)
            self.span.end()


class Attempts:
    """Hands out leases, one per attempt, in the order the rules above give."""

    def __init__(self, config: RoutingConfig, balancer: Balancer, route: Route,
                 instruments: Instruments, operation: str = "chat",
                 on_unreachable: Callable[[str], None] = lambda backend: None,
                 on_missing: Callable[[str], None] = lambda backend: None,
                 batch_share: float | None = None) -> None:
        self._config = config
        self._batch_share = batch_share  # a batch line's: the deployments' share it may take
        self._instruments = instruments
        self._operation = operation  # (as the GenAI conventions name it: chat, embeddings)
        self.span: AnySpan = NO_SPAN  # the routing's: each attempt's is a child of it
        self._on_unreachable = on_unreachable
        self._on_missing = on_missing  # (a backend without a model it listed)
        self._balancer = balancer
        self._candidates = list(route.first)
        self._more: Callable[[], list[Candidate]] | None = route.fallbacks
        self._tried: set[tuple[str, str]] = set()
        self._retries: dict[tuple[str, str], int] = {}
        self._current: Lease | None = None
        self._first_error: GatewayError | None = None
        self._first_from: tuple[str, str] | None = None  # the deployment that said it
        # The candidates (by name) an attempt on failed by the deployment's fault: not by
        # a rate limit, a full queue, or a request it could not do.
        self.at_fault: set[str] = set()
        # The first deployment found full, if one was (and where): what the model asked for
        # said, should what comes after be a fallback's refusal.
        self._busy: tuple[GatewayError, tuple[str, str]] | None = None
        self._batch_until: float | None = None  # when a batch line's waits for a slot end
        self.count = 0

    async def next(self, error: GatewayError | None = None, *, move_on: bool = False) -> Lease:
        """The next attempt's lease; raises the error that ends the request instead.
        ``move_on``: do not retry the deployment that just failed (a stream broke mid-way).
        """
        if error is not None:
            if self._current is not None and counts_against(error):
                self.at_fault.add(self._current.candidate.name)
            if self._first_error is None and error.code not in ELSEWHERE:
                if self._busy is not None and self._refusal(error) and \
                        self._busy[1][1] != _model_of(self._current):
                    self._first_error, self._first_from = self._busy
                else:
                    self._first_error = error
                    if self._current is not None:
                        self._first_from = _key(self._current.deployment)
            await self._after(error, move_on)
        while True:
            if self.count >= self._config.max_attempts:
                raise self._final(error)
            lease = self._retry_lease() or self._fresh_lease()
            if lease is None:
                raise self._final(error) if error or self._first_error \
                    else self._nothing_available()
            try:
                await self._acquire(lease)
            except RateLimited as busy:
                busy.code = "deployment_busy"
                self._busy = self._busy or (busy, _key(lease.deployment))
                self._tried.add(_key(lease.deployment))
                self._instruments.failovers.add((lease.deployment.backend.name, busy.label))
                error = self._first_error or busy
                continue
            return self._begin(lease)

    def _begin(self, lease: Lease) -> Lease:
        lease.state.breaker.claim()
        lease.started = time.monotonic()  # after any wait in line: that is not latency
        self.count += 1
        self._current = lease
        if self._instruments.enabled:
            lease.counted = self._instruments
        if isinstance(self.span, Span):
            deployment = lease.deployment
            lease.span = span = self.span.child(
                f"{self._operation} {deployment.model.name}", "client", {
                    "gen_ai.operation.name": self._operation,
                    "gen_ai.request.model": deployment.model.name,
                    "gen_ai.provider.name": deployment.backend.config.kind,
                    "gateway.backend": deployment.backend.name,
                    "gateway.attempt": self.count,
                    "gateway.route.reason": lease.candidate.reason})
            UPSTREAM.set(span.traceparent())  # what the backend's request carries
        if log.isEnabledFor(logging.DEBUG):
            log.debug("attempt %d: %s/%s (%s)", self.count, *_key(lease.deployment),
                      lease.candidate.reason)
        return lease

    async def again(self, lease: Lease, error: GatewayError) -> Lease:
        """Another attempt on the same deployment (a restart without prefill after the
        deployment refused one).
        """
        if self.count >= self._config.max_attempts:
            raise error
        fresh = Lease(lease.candidate, lease.deployment, lease.state)
        await self._acquire(fresh)
        return self._begin(fresh)

    async def _acquire(self, lease: Lease) -> None:
        if self._batch_share is None:
            # (a cold model's first answer, which those in line wait for, may take longer
            # than the line's own patience: as long as its first token is allowed to)
            await lease.state.acquire(max(self._config.queue_timeout, lease.first_token_limit)
                                      if lease.cold else self._config.queue_timeout)
        else:
            # One wait in all, however many deployments it is tried on: a line held past
            # its claim's visibility timeout would be claimed, and answered, again.
            now = time.monotonic()
            if self._batch_until is None:
                self._batch_until = now + self._config.queue_timeout
            await lease.state.acquire_batch(self._batch_share, self._batch_until - now)
            lease.batch = True

    async def _after(self, error: GatewayError, move_on: bool) -> None:
        kind = disposition(error)
        current = self._current
        if error.code == UNSUPPORTED_BY_MODEL and current is not None and \
                current.candidate.reason != REQUESTED:
            # a model picked for the client (an alias's, a fallback) that cannot do what was
            # asked (its capabilities were presumed, or described wrong): the next may
            kind = "failover"
        if kind == "propagate" and not self._refused_by_fallback(error):
            raise error
        if current is None:
            raise error
        if error.code == "backend_unreachable":
            self._on_unreachable(current.deployment.backend.name)
        elif error.status == 404:
            self._on_missing(current.deployment.backend.name)
        key = _key(current.deployment)
        used = self._retries.get(key, 0)
        if not move_on and kind in ("retry", "wait") and used < self._config.retries:
            delay = self._delay(kind, error, used)
            if delay is not None:
                self._retries[key] = used + 1
                self._instruments.retries.add((key[0], error.label))
                log.info("retrying %s/%s in %.2fs after: %s", *key, delay, error.message)
                await asyncio.sleep(delay)
                return  # _retry_lease picks the same deployment again
        self._tried.add(key)
        self._instruments.failovers.add((key[0], error.label))
        if kind == "bigger":  # only a model whose window is not known to be as small
            floor = current.candidate.context_length
            self._fall_back()
            self._candidates = [c for c in self._candidates if c is not current.candidate
                                and not (floor and 0 < c.context_length <= floor)]

    def _refused_by_fallback(self, error: GatewayError) -> bool:
        """Whether another model than the one that failed first (or was full) refused the
        request as a client error (a parameter it does not take): the client is not told
        that, as if its request were wrong, but what the model it asked for said
        (``_final``), once the rest are tried. A content-policy refusal is its answer all the
        same; a deployment of the same model refusing it says the request is wrong.
        """
        return (self._first_from is not None and self._refusal(error)
                and _model_of(self._current) != self._first_from[1])

    @staticmethod
    def _refusal(error: GatewayError) -> bool:
        """A client error: the request refused as it is (not a content-policy refusal,
        which is an answer)."""
        return disposition(error) == "propagate" and \
            error.code not in ("content_policy_violation", "rescue_diverged")

    def _delay(self, kind: str, error: GatewayError, used: int) -> float | None:
        if kind == "wait" and error.retry_after is not None:
            # A long Retry-After: better served elsewhere than waited for.
            return error.retry_after if error.retry_after <= self._config.retry_after_cap \
                else None
        return backoff(used, self._config.backoff_initial, self._config.backoff_max)

    def _retry_lease(self) -> Lease | None:
        current = self._current
        if current is None or _key(current.deployment) in self._tried:
            return None
        if not self._balancer.usable(current.deployment, time.monotonic()):
            self._tried.add(_key(current.deployment))
            return None
        return Lease(current.candidate, current.deployment, current.state)

    def _final(self, error: GatewayError | None) -> GatewayError:
        """The error the client sees when nothing is left: what the model asked for said,
        rather than what some fallback said about a request it was never meant for.
        """
        return self._first_error or error or Unavailable("No attempts left.", retry_after=1)

    def _nothing_available(self) -> GatewayError:
        now = time.monotonic()
        healthy = [self._balancer.state(d) for c in self._candidates for d in c.deployments
                   if self._balancer.usable(d, now)]
        if healthy:  # up, but every one full (queue included) or resting after a 429
            wait = min(s.rest_until - now if s.rest_until > now else s.latency or 1.0
                       for s in healthy)
            resting = [s for s in healthy if s.rest_until > now]
            if len(resting) == len(healthy):  # as its upstream said it, the first time
                if all(s.rest_busy for s in resting):
                    return Unavailable("Every deployment of this model is busy (its server's "
                                       "queue is full); retry shortly.",
                                       retry_after=max(1.0, wait), code="backend_busy")
                return RateLimited("Every deployment of this model is rate-limited upstream; "
                                   "retry after the wait it asked for.",
                                   retry_after=max(1.0, wait))
            return RateLimited("All deployments of this model are busy; retry shortly.",
                               retry_after=max(1.0, wait), code="deployment_busy")
        names = ", ".join(dict.fromkeys(c.name for c in self._candidates))
        if not any(c.deployments for c in self._candidates):  # a configured model not listed
            return Unavailable(f"No backend up now serves {names or 'this model'}.",
                               retry_after=5)
        down = sorted({d.backend.name for c in self._candidates for d in c.deployments
                       if self._balancer.is_down(d.backend.name)})
        detail = f" (down: {', '.join(down)})" if down else " (their circuit breakers are open)"
        return Unavailable(f"No deployment of {names} can answer right now{detail}.",
                           retry_after=self._config.breaker.cooldown)

    def _fresh_lease(self) -> Lease | None:
        while True:
            for candidate in self._candidates:
                untried = [d for d in candidate.deployments if _key(d) not in self._tried]
                if self._batch_share is not None and len(untried) > 1:  # one with room
                    share = self._batch_share
                    untried = [d for d in untried if not self._balancer.state(d)
                               .batch_waits(share)] or untried
                chosen = self._balancer.choose(untried)
                if chosen is not None:
                    return Lease(candidate, chosen, self._balancer.state(chosen))
            if not self._fall_back():
                return None

    def _fall_back(self) -> bool:
        """Add the fallbacks to the candidates (once); whether there were any to add."""
        if self._more is None:
            return False
        self._candidates += self._more()  # the first candidates are spent
        self._more = None
        return True


def _key(deployment: Deployment) -> tuple[str, str]:
    return deployment.backend.name, deployment.model.name


def _model_of(lease: Lease | None) -> str:
    return lease.deployment.model.name if lease is not None else ""
