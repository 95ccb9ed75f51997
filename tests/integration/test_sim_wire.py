"""The simulated OpenAI-compatible servers stream as PROTOCOLS.md says the real ones do,
whether they send an answer at once (the head and every event in one write) or at a model's
pace (each event as its token comes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.sim import create_openai_app, seed_fleet
from tests.support import ServerThread, Sim

MODEL = "command-r-plus:104b"
BODY = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Say something."}]}


@pytest.fixture(scope="module")
def llamacpp_sim() -> Iterator[Sim]:
    with ServerThread(lambda: create_openai_app(seed_fleet()["mlx"], flavor="llamacpp")) \
            as server:
        yield Sim(server, "llamacpp")


def streamed(sim: Sim, *, paced: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """The stream's events, each without its id and creation time (checked to be the same
    in every event and then set aside), and the raw lines that are not events.
    """
    sim.clear()
    if paced:
        sim.fault(MODEL, tokens_per_s=2000)
    events, other = [], []
    with httpx.Client() as client, \
            client.stream("POST", sim.api_url + "/chat/completions", json=BODY) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line.removeprefix("data: ")))
            elif line:
                other.append(line)
    assert len({(e["id"], e["created"]) for e in events}) == 1
    return [{k: v for k, v in e.items() if k not in ("id", "created")} for e in events], other


@pytest.mark.parametrize("paced", [False, True], ids=["at once", "paced"])
def test_an_mlx_stream_repeats_the_role_and_ends_with_a_usage_chunk(mlx_sim: Sim,
                                                                     paced: bool) -> None:
    events, other = streamed(mlx_sim, paced=paced)
    *pieces, finish, usage = events
    assert len(pieces) > 3 and other == ["data: [DONE]"]
    assert all(e["choices"][0]["delta"]["role"] == "assistant" for e in [*pieces, finish])
    assert [e["choices"][0]["finish_reason"] for e in pieces] == [None] * len(pieces)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["object"] == "chat.completion" and usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == len(pieces)


@pytest.mark.parametrize("paced", [False, True], ids=["at once", "paced"])
def test_a_llamacpp_stream_gives_the_role_once(llamacpp_sim: Sim, paced: bool) -> None:
    events, _ = streamed(llamacpp_sim, paced=paced)
    *pieces, finish, usage = events
    assert pieces[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in e["choices"][0]["delta"] for e in [*pieces[1:], finish])
    assert usage["object"] == "chat.completion.chunk" and usage["choices"] == []


@pytest.mark.parametrize("flavor", ["mlx", "llamacpp"])
def test_an_answer_sent_at_once_is_the_one_sent_at_a_pace(mlx_sim: Sim, llamacpp_sim: Sim,
                                                          flavor: str) -> None:
    sim = mlx_sim if flavor == "mlx" else llamacpp_sim
    assert streamed(sim, paced=False) == streamed(sim, paced=True)
