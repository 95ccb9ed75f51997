"""Circuit breakers and deployment slots: the state routing keeps per deployment."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from gateway.config import RoutingConfig
from gateway.errors import (
    InvalidRequest,
    NotFound,
    RateLimited,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.protocol.units import ModelInfo
from gateway.routing.attempts import Attempts
from gateway.routing.balancer import Balancer, DeploymentState
from gateway.routing.breaker import CircuitBreaker
from gateway.routing.candidates import Candidate, Route
from gateway.routing.catalog import Deployment
from gateway.routing.connections import Connections
from gateway.routing.dispositions import disposition
from gateway.telemetry import Instruments
from gateway.telemetry.metrics import Metrics


def test_answers_that_begin_and_break_off_open_it_and_a_trial_that_begins_closes_it() -> None:
    """An answer's first token ends the failures before it, not the breaks: a deployment
    whose every answer begins and breaks off opens its breaker; a whole answer ends them.
    A trial that begins forgets the failures that opened it: one more failure of another
    request does not open it again at once.
    """
    breaker = CircuitBreaker(failures=3, cooldown=0.05)
    for _ in range(3):
        breaker.answering()
        breaker.failure(broke=True)
    assert breaker.state == "open"
    breaker.closed_elsewhere()
    breaker.answering()
    breaker.failure(broke=True)
    breaker.success()  # one came whole
    breaker.answering()
    breaker.failure(broke=True)
    breaker.answering()
    breaker.failure(broke=True)
    assert breaker.state == "closed"

    for _ in range(3):
        breaker.failure()
    assert breaker.state == "open"
    time.sleep(0.06)
    breaker.claim()  # the trial
    breaker.answering()
    breaker.failure()  # another request's
    assert breaker.state == "closed"


def test_opens_after_consecutive_failures_and_lets_one_trial_through_after_cooldown() -> None:
    breaker = CircuitBreaker(failures=2, cooldown=0.05)
    breaker.failure()
    breaker.success()  # a success in between resets the count
    breaker.failure()
    assert breaker.state == "closed" and breaker.available()
    breaker.failure()
    assert breaker.state == "open" and not breaker.available()
    time.sleep(0.06)
    assert breaker.available()
    breaker.claim()
    assert breaker.state == "half_open" and not breaker.available()  # one trial at a time
    breaker.failure()
    assert breaker.state == "open" and not breaker.available()  # the trial failed
    time.sleep(0.06)
    breaker.claim()
    breaker.success()
    assert breaker.state == "closed" and breaker.available()


def test_a_backend_known_down_trips_and_a_recovered_one_is_tried_at_once() -> None:
    """A breaker open only because its backend was down closes when the backend is back:
    left half-open, with no request to be its trial, it showed degraded for good. One its
    own failures opened gets its one trial at once.
    """
    breaker = CircuitBreaker(failures=3, cooldown=60)
    breaker.trip()
    assert not breaker.available()
    breaker.retry_now()
    assert breaker.available() and breaker.state == "closed"
    for _ in range(3):
        breaker.failure()
    breaker.trip()  # (and then its backend went down too)
    breaker.retry_now()
    assert breaker.available() and breaker.state == "half_open"
    breaker.claim()
    assert not breaker.available()  # one trial at a time


@pytest.mark.parametrize(("error", "expected"), [
    (UpstreamTimeout("slow"), "failover"),
    (UpstreamError("refused", code="backend_unreachable"), "failover"),
    (UpstreamError("reset"), "retry"),
    (RateLimited("slow down", retry_after=2), "wait"),
    (Unavailable("busy"), "wait"),
    (RateLimited("full", code="deployment_busy"), "failover"),
    (InvalidRequest("too long", code="context_length_exceeded"), "bigger"),
    (InvalidRequest("no", code="content_policy_violation"), "propagate"),
    (InvalidRequest("bad field"), "propagate"),
    (NotFound("gone", code="model_not_found"), "failover"),
])
def test_what_each_error_means_for_the_next_attempt(error: Exception, expected: str) -> None:
    assert disposition(error) == expected  # type: ignore[arg-type]


async def test_a_full_deployment_queues_then_refuses() -> None:
    state = DeploymentState(limit=1, max_queue=1, breaker=CircuitBreaker(3, 1))
    await state.acquire(1)
    waiting = asyncio.create_task(state.acquire(1))
    await asyncio.sleep(0.01)
    assert not waiting.done() and len(state.waiters) == 1
    with pytest.raises(RateLimited):
        await state.acquire(1)  # the queue is full too
    state.release()  # the slot goes straight to the one waiting
    await waiting
    assert state.in_flight == 1 and not state.waiters


async def test_waiting_too_long_is_a_429_and_a_cancelled_waiter_leaves_the_line() -> None:
    state = DeploymentState(limit=1, max_queue=5, breaker=CircuitBreaker(3, 1))
    await state.acquire(1)
    with pytest.raises(RateLimited) as caught:
        await state.acquire(0.05)
    assert caught.value.retry_after is not None
    waiter = asyncio.create_task(state.acquire(5))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not state.waiters
    state.release()
    assert state.in_flight == 0


async def test_batch_lines_wait_their_share_behind_interactive_requests_in_turn() -> None:
    state = DeploymentState(limit=2, max_queue=5, breaker=CircuitBreaker(3, 1))
    await state.acquire_batch(0.5, 1)  # the share: 1 of the 2 slots
    second = asyncio.create_task(state.acquire_batch(0.5, 5))
    await asyncio.sleep(0.01)
    assert not second.done() and state.in_flight == 1  # the other slot is left free
    await state.acquire(1)  # for an interactive request, at once
    interactive = asyncio.create_task(state.acquire(5))
    await asyncio.sleep(0.01)
    state.release(batch=True)  # the slot goes to the interactive request waiting
    await interactive
    assert not second.done()
    newcomer = asyncio.create_task(state.acquire_batch(0.5, 5))  # runs before the one woken
    state.release()
    state.release()  # room for one batch line: the one that waited, not the newcomer
    await second
    await asyncio.sleep(0.01)
    assert not newcomer.done() and state.batch_in_flight == 1
    state.release(batch=True)
    await newcomer
    with pytest.raises(RateLimited):  # out of patience
        await state.acquire_batch(0.5, 0.05)
    assert state.batch_in_flight == 1 and not state.batch_waiters and not state.batch_woken


async def test_the_models_of_a_backend_take_turns_at_its_connections() -> None:
    """Each deployment's slots were its own: two models on a backend with one connection
    had two requests on it at once, and the second waited for the connection in the
    backends' pool, where its wait counted against its first-token limit.
    """
    connections = Connections(1)
    one, other = (DeploymentState(limit=1, max_queue=5, breaker=CircuitBreaker(3, 1),
                                  connections=connections) for _ in range(2))
    await one.acquire(1)
    assert not other.free() and other.can_queue()
    waiting = asyncio.create_task(other.acquire(5))
    await asyncio.sleep(0.01)
    assert not waiting.done() and other.in_flight == 1  # its own slot, not the connection
    third = DeploymentState(limit=1, max_queue=5, breaker=CircuitBreaker(3, 1),
                            connections=connections)
    with pytest.raises(RateLimited):  # out of patience: its slot goes back too
        await third.acquire_batch(0.5, 0.05)
    assert (third.in_flight, third.batch_in_flight) == (0, 0)
    one.release()  # the connection goes to the one waiting for it
    await waiting
    assert (one.in_flight, other.in_flight, connections.in_flight) == (0, 1, 1)
    cancelled = asyncio.create_task(one.acquire(5))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert one.in_flight == 0 and not connections.waiters
    other.release()
    assert connections.in_flight == 0 and one.free()


async def test_a_batch_line_waits_one_queue_timeout_in_all_however_many_deployments() -> None:
    """A line's claim on the queue expires (the visibility timeout): however many
    deployments it is tried on, its waits for their shares add up to one queue_timeout.
    """
    config = RoutingConfig(queue_timeout=0.4)
    balancer = Balancer(config, lambda backend: (2, 8))  # 2 slots: a batch share of 1 each
    deployments = [Deployment(SimpleNamespace(name=name, tier="primary"), ModelInfo("m", name))  # type: ignore[arg-type]
                   for name in ("a", "b", "c")]
    for deployment in deployments:
        await balancer.state(deployment).acquire_batch(0.5, 1)  # every share taken
    route = Route([Candidate("m", deployments, "test")], list)
    attempts = Attempts(config, balancer, route, Instruments(Metrics(enabled=False)),
                        batch_share=0.5)
    began = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        await attempts.next()
    took = time.monotonic() - began
    assert caught.value.code == "deployment_busy"
    assert 0.35 < took < 1.0, f"waited {took:.2f} s in all"  # not 0.4 s on each: 1.2 s
    assert all(not balancer.state(d).batch_waiters for d in deployments)


def test_other_processes_hear_of_an_opening_and_of_a_trial_closing_it_only() -> None:
    told: list[bool] = []
    breaker = CircuitBreaker(failures=2, cooldown=10.0)
    breaker.on_change = told.append
    breaker.failure()
    breaker.failure()  # opens
    breaker.failure()  # (already open: nothing new)
    assert told == [True]
    breaker.success()  # a request sent before it opened, answering late: closes it here...
    assert breaker.state == "closed" and told == [True]  # ...but says nothing to the others
    breaker.failure()
    breaker.failure()
    breaker.opened_at -= 10.0  # the cool-down is over
    breaker.claim()  # the one trial
    breaker.success()
    assert told == [True, True, False]


def test_a_breaker_opened_elsewhere_waits_out_what_remains_of_its_cool_down() -> None:
    breaker = CircuitBreaker(failures=2, cooldown=10.0)
    breaker.opened_elsewhere(remaining=3.0)
    now = time.monotonic()
    assert breaker.state == "open"
    assert not breaker.available(now + 2.9)
    assert breaker.available(now + 3.1)


async def test_when_every_deployment_is_full_new_requests_line_up_where_the_wait_is_shortest(
) -> None:
    """Two deployments, one slot each, both answering; one a little faster. The requests
    that must wait are spread by the wait each line means (those in it included): they all
    queued on the faster one, the 30th for some 30 s, the other's line empty.
    """
    balancer = Balancer(RoutingConfig(), lambda backend: (1, 64))
    fast, slow = (Deployment(SimpleNamespace(name=name, tier="primary"),  # type: ignore[arg-type]
                             ModelInfo("m", name)) for name in ("fast", "slow"))
    balancer.state(fast).observe(1.0)
    balancer.state(slow).observe(1.2)
    for deployment in (fast, slow):
        await balancer.state(deployment).acquire(1)
    waiting = []
    for _ in range(30):
        chosen = balancer.choose([fast, slow])
        assert chosen is not None
        waiting.append(asyncio.create_task(balancer.state(chosen).acquire(600)))
        await asyncio.sleep(0)
    lines = [len(balancer.state(d).waiters) for d in (fast, slow)]
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert lines[0] >= lines[1] >= 10, lines  # (about 1.2 to 1)
