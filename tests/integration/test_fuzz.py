"""Fuzzing every front door (hypothesis, a few thousand cases, the same ones every run): no
body, however absurd, gets a 5xx, an error not in its door's shape, a stream left unended
or a hang. ``python -m loadtest.fuzz`` runs many more.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import JSON, Prober, check, door_bodies
from tests.support import Sim, backend, gateway_config, start_gateway

BODIES = door_bodies()
CASES = settings(max_examples=250, derandomize=True, database=None, deadline=None,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def prober(ollama_sim: Sim, mlx_sim: Sim) -> Iterator[Prober]:
    """A gateway with the shipped plugins in front of both simulators, and its prober."""
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        backend("mlx", "openai", mlx_sim.api_url),
        plugins=[{"name": "safety"}, {"name": "qa"}, {"name": "cache"}]))
    prober = Prober(server.port)
    yield prober
    prober.close()
    server.stop()


@pytest.mark.parametrize("path", list(BODIES))
def test_a_door_answers_every_body_properly(path: str, prober: Prober) -> None:
    @CASES
    @given(body=BODIES[path])
    def one(body: dict[str, object]) -> None:
        check(path, prober.send(path, json.dumps(body).encode()))

    one()


@CASES
@given(path=st.sampled_from(list(BODIES)), body=st.one_of(JSON, st.binary(max_size=64)))
def test_a_door_answers_any_bytes_properly(path: str, body: object, prober: Prober) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    check(path, prober.send(path, raw))
