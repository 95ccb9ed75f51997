"""Learned routing through the gateway, as a client sees it: the route header explains each
learned pick, feedback on an answer (``POST /v1/feedback`` by its ``x-request-id``) changes
later picks, what was learned outlives a restart, and the operator can export every
outcome; a key can rate only its own answers.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.keys import ROUTER
from tests.integration.conftest import FAST, Fleet
from tests.redis_peer import RedisCluster, RedisServer
from tests.support import (
    ServerThread,
    backend,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

KEYS = {"alice": "gw-alice-key-of-the-learning-tests", "bob": "gw-bob-key-of-the-learning-tests"}
ALIAS = "auto:pair"  # two models the fleet has, equally good as far as QA can tell
PAIR = ("qwq:32b", "qwen2.5-coder:32b")
ADMIN = "gw-admin-key-of-the-learning-tests"


def learning_gateway(fleet: Fleet, state: Path, **learned: Any) -> ServerThread:
    return start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        keys=[{"id": name, "hash": hashlib.sha256(key.encode()).hexdigest()}
              for name, key in KEYS.items()],
        auth={"admin_key_hashes": [hashlib.sha256(ADMIN.encode()).hexdigest()]},
        aliases={ALIAS: {"priority": {"ollama": list(PAIR)}, "policy": "learned"}},
        routing={"learned": {"state_file": str(state), **learned}}))


@pytest.fixture
def gateway(fleet: Fleet, tmp_path: Path) -> Iterator[ServerThread]:
    server = learning_gateway(fleet, tmp_path / "learned.json")
    yield server
    server.stop()


def client(server: ServerThread, who: str = "alice") -> openai.OpenAI:
    return openai_client(server.url, KEYS[who])


def ask(api: openai.OpenAI, n: int = 0) -> tuple[str, str, str]:
    """The model that answered, the route header, the request id."""
    raw = api.chat.completions.with_raw_response.create(
        model=ALIAS, messages=[{"role": "user", "content": f"Tell me about the number {n}."}])
    answer = raw.parse()
    return answer.model, raw.headers["x-gateway-route"], raw.headers["x-request-id"]


def rate(server: ServerThread, request_id: str, who: str = "alice", **verdict: Any
         ) -> dict[str, Any]:
    request = urllib.request.Request(
        server.url + "/v1/feedback", method="POST",
        data=json.dumps({"request_id": request_id, **verdict}).encode(),
        headers={"Authorization": f"Bearer {KEYS[who]}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def test_a_learned_pick_explains_itself(gateway: ServerThread) -> None:
    model, route, _ = ask(client(gateway))
    assert model == PAIR[0]  # a fresh gateway picks as the priority lists say
    assert route.startswith(f"learned: {PAIR[0]} 0.60+/-") and f"> {PAIR[1]} 0.55" in route
    assert route.endswith("; 0 samples")
    _, route, _ = ask(client(gateway), 1)
    assert route.endswith("; 1 samples")


@pytest.mark.parametrize("feedback", [True, False])
def test_feedback_changes_later_picks(gateway: ServerThread, feedback: bool) -> None:
    api = client(gateway)
    picks = []
    for n in range(40):
        model, _, request_id = ask(api, n)
        picks.append(model)
        if not feedback:
            continue
        if model == PAIR[0]:  # the user keeps saying the first model's answers are bad
            result = rate(gateway, request_id, thumbs="down")
            assert result == {"object": "feedback", "request_id": request_id, "score": 0.0,
                              "model": PAIR[0], "learned": True}
        else:
            rate(gateway, request_id, score=1)
    assert picks[0] == PAIR[0]
    if feedback:
        assert PAIR[0] not in picks[-10:], picks
    else:  # QA passes both alike: both keep being picked
        assert PAIR[0] in picks[-10:] and PAIR[1] in picks[-10:], picks


def test_an_answer_counts_once_however_often_it_is_rated(gateway: ServerThread) -> None:
    _, _, request_id = ask(client(gateway))
    assert rate(gateway, request_id, thumbs="down")["learned"] is True
    for _ in range(3):  # a rating repeated (or changed) is kept, not learned from again
        assert rate(gateway, request_id, thumbs="up")["learned"] is False
    _, route, _ = ask(client(gateway), 1)
    assert route.endswith("; 2 samples")  # the first answer and its one rating


def test_a_request_id_another_key_uses_too_is_another_answer(gateway: ServerThread) -> None:
    for who in ("alice", "bob"):  # both send the same x-request-id
        client(gateway, who).chat.completions.create(
            model=ALIAS, messages=[{"role": "user", "content": f"I am {who}."}],
            extra_headers={"x-request-id": "shared-id-1"})
    assert rate(gateway, "shared-id-1", "alice", score=1)["learned"] is True
    assert rate(gateway, "shared-id-1", "bob", score=0)["learned"] is True  # bob's own


def test_a_key_rates_only_its_own_answers(gateway: ServerThread) -> None:
    _, _, request_id = ask(client(gateway, "alice"))
    for who, body in (("bob", {"thumbs": "up"}), ("alice", {"request_id": "req_nope"})):
        with pytest.raises(openai.NotFoundError) as caught:
            client(gateway, who).post("/feedback", cast_to=object,
                                      body={"request_id": request_id, "thumbs": "up", **body})
        assert caught.value.code == "request_not_found"
    for wrong in ({"thumbs": "sideways"}, {"score": 7}, {"score": True}, {}):
        with pytest.raises(openai.BadRequestError) as bad:
            client(gateway).post("/feedback", cast_to=object,
                                 body={"request_id": request_id, **wrong})
        assert bad.value.code == "invalid_value" or bad.value.status_code == 400


def test_what_was_learned_outlives_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    state = tmp_path / "learned.json"
    server = learning_gateway(fleet, state)
    try:
        for n in range(6):
            ask(client(server), n)
    finally:
        server.stop()
    assert state.exists()
    server = learning_gateway(fleet, state)
    try:
        _, route, _ = ask(client(server))
        assert route.endswith("; 6 samples"), route
    finally:
        server.stop()


def test_the_operator_exports_every_outcome(gateway: ServerThread, fleet: Fleet) -> None:
    ids = [ask(client(gateway), n)[2] for n in range(3)]
    rate(gateway, ids[1], thumbs="up")
    request = urllib.request.Request(gateway.url + "/admin/router/outcomes",
                                     headers={"Authorization": f"Bearer {ADMIN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.read().splitlines()]
    by_id = {o["id"]: o for o in lines}
    assert set(ids) <= set(by_id)
    for request_id in ids:
        outcome = by_id[request_id]
        assert outcome["tenant"] == "alice" and outcome["alias"] == ALIAS
        assert outcome["model"] == outcome["chosen"] in PAIR and outcome["ok"] is True
        assert outcome["backend"] == "primary" and outcome["qa"] == "pass"
        assert outcome["features"]["kind"] == "chat" and len(outcome["x"]) == 13
        assert outcome["latency_ms"] > 0 and outcome["ttft_ms"] > 0 and "reward" in outcome
    assert by_id[ids[1]]["feedback"] == 1.0 and by_id[ids[0]]["feedback"] is None


def samples(server: ServerThread) -> int:
    _, route, _ = ask(client(server), 99)
    return int(route.rsplit("; ", 1)[1].split()[0])


def test_two_processes_sharing_redis_learn_from_each_other(fleet: Fleet,
                                                           tmp_path: Path) -> None:
    with RedisServer() as redis:
        def shared() -> ServerThread:
            return learning_gateway(fleet, tmp_path / "unused.json", redis_url=redis.url)

        one, two = shared(), shared()
        try:
            ids = [ask(client(one), n)[2] for n in range(8)]
            # (each ask of `samples` is learned from too, where it was asked)
            wait_until(lambda: samples(two) >= 8, 10, "the other process learning of them")
            assert rate(two, ids[0], thumbs="down")["learned"] is True  # found via Redis
            # A second word, through the process that answered, is kept, not learned from
            # again (that process's own record of it had no word yet).
            assert rate(one, ids[0], thumbs="up")["learned"] is False
            with pytest.raises(openai.NotFoundError):  # and still only for its own key
                client(two, "bob").post("/feedback", cast_to=object,
                                        body={"request_id": ids[1], "thumbs": "up"})
            request = urllib.request.Request(two.url + "/admin/router/outcomes",
                                             headers={"Authorization": f"Bearer {ADMIN}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                exported = [json.loads(line) for line in response.read().splitlines()]
            assert set(ids) <= {o["id"] for o in exported}  # every process's outcomes
            before = samples(one)
        finally:
            one.stop()
            two.stop()
        assert not (tmp_path / "unused.json").exists()  # kept in Redis, not a file
        again = shared()  # every process restarted: what they learned is in Redis
        try:
            assert samples(again) >= before
        finally:
            again.stop()


def test_a_word_said_while_redis_was_away_is_not_learned_from_again(fleet: Fleet,
                                                                    tmp_path: Path) -> None:
    """Whether a word is the first was what Redis said, over what the process knew: one
    said while Redis was away, said again once it was back, was learned from twice; and
    on a stalled Redis a word waited 15 s for the answer.
    """
    with RedisServer() as redis:
        server = learning_gateway(fleet, tmp_path / "unused.json", redis_url=redis.url)
        try:
            first, second = (ask(client(server), n)[2] for n in range(2))
            redis.kill()
            assert rate(server, first, thumbs="down")["learned"] is True
            redis.restart()
            assert rate(server, first, thumbs="up")["learned"] is False
            assert redis.process is not None
            redis.process.send_signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                assert rate(server, second, thumbs="up")["learned"] is True
                took = time.monotonic() - began
            finally:
                redis.process.send_signal(signal.SIGCONT)
            assert took < 3, f"the word took {took:.1f} s"
        finally:
            server.stop()


def test_it_learns_which_model_answers_which_kind_from_qa(fleet: Fleet, tmp_path: Path) -> None:
    # The first model fails QA on code (loops, empty answers), the second on chat.
    fleet.primary.skills(PAIR[0], {"code": 0.1})
    fleet.primary.skills(PAIR[1], {"chat": 0.1})
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        plugins=[{"name": "qa", "options": {"escalate": False}}],
        aliases={ALIAS: {"priority": {"ollama": list(PAIR)}, "policy": "learned"}},
        routing={"learned": {"state_file": str(tmp_path / "learned.json")}}))
    api = openai_client(server.url)
    asks = {"code": "Write a Python function that adds {n} to a number.",
            "chat": "Tell me something nice about the number {n}."}
    picked: list[tuple[str, str, str]] = []
    try:
        for n in range(160):
            kind = ("code", "chat")[n % 2]
            raw = api.chat.completions.with_raw_response.create(model=ALIAS, messages=[
                {"role": "user", "content": asks[kind].format(n=n)}])
            picked.append((kind, raw.parse().model, raw.headers["x-gateway-qa"]))
    finally:
        server.stop()
    assert any(qa.startswith("fail") for _, _, qa in picked[:40])  # what it learned from
    late = picked[-40:]
    assert sum(model == PAIR[1] for kind, model, _ in late if kind == "code") >= 17
    assert sum(model == PAIR[0] for kind, model, _ in late if kind == "chat") >= 17


def test_exploring_never_picks_a_model_without_what_the_request_needs(
    fleet: Fleet, tmp_path: Path
) -> None:
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        aliases={"auto:small-first": {"priority": {"ollama": ["tiny-ctx:1b", "qwq:32b"]},
                                      "policy": "learned"}},
        routing={"learned": {"exploration": 2.0,  # as curious as it may be
                             "state_file": str(tmp_path / "learned.json")}}))
    api = openai_client(server.url)
    tool = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
    try:
        for n in range(20):  # tiny-ctx:1b cannot call tools (its backend says so)
            answer = api.chat.completions.create(
                model="auto:small-first", tools=[tool],  # type: ignore[list-item]
                messages=[{"role": "user", "content": f"What time is it, {n}?"}])
            assert answer.model == "qwq:32b"
    finally:
        server.stop()
    assert not [r for r in fleet.primary.requests("/api/chat") if r["model"] == "tiny-ctx:1b"]


def test_a_stream_that_ends_early_is_kept_not_learned_from(gateway: ServerThread,
                                                           fleet: Fleet) -> None:
    fleet.primary.fault(PAIR[0], tokens_per_s=5)  # slow: the client leaves after a token
    with client(gateway).chat.completions.with_streaming_response.create(
            model=ALIAS, stream=True, messages=[{"role": "user", "content": "Go on."}]) as raw:
        request_id = raw.headers["x-request-id"]
        next(raw.iter_lines())
    wait_until(lambda: gateway.call(lambda: gateway.app[ROUTER].outcomes.get(
        "alice", request_id)) is not None, 5, "the outcome kept")
    outcome = gateway.call(lambda: gateway.app[ROUTER].outcomes.get("alice", request_id))
    assert (outcome["ok"], outcome["error"], outcome["model"]) == (
        False, "stream_ended_early", PAIR[0])
    assert "reward" not in outcome  # the client leaving says nothing of the model


@pytest.mark.parametrize("fault", [{"status": 429, "retry_after": 30, "remaining": 1},
                                   {"status": 500, "remaining": 5}])  # (5: past its retries)
def test_a_pick_passed_over_for_a_rate_limit_is_not_learned_from(
        gateway: ServerThread, fleet: Fleet, fault: dict[str, Any]) -> None:
    """A rate limit is not the model's fault: it earned a reward of 0 for the fallback's
    answer, as a model that failed does (and learned routing came to pass it over)."""
    fleet.primary.fault(PAIR[0], **fault)
    model, _, request_id = ask(client(gateway))
    assert model == PAIR[1]
    outcome = gateway.call(lambda: gateway.app[ROUTER].outcomes.get("alice", request_id))
    assert outcome["chosen"] == PAIR[0]
    if fault["status"] == 429:
        assert "reward" not in outcome
    else:  # (its own failure: it earns nothing)
        assert outcome["reward"] <= 0


def test_processes_learn_from_each_other_on_a_redis_cluster(fleet: Fleet,
                                                            tmp_path: Path) -> None:
    with RedisCluster() as cluster:
        def shared() -> ServerThread:
            return learning_gateway(fleet, tmp_path / "unused.json", redis_url=cluster.url)

        one, two = shared(), shared()
        try:
            ids = [ask(client(one), n)[2] for n in range(8)]
            wait_until(lambda: samples(two) >= 8, 10, "the other process learning of them")
            assert rate(two, ids[0], thumbs="down")["learned"] is True  # found via Redis
            assert rate(one, ids[0], thumbs="up")["learned"] is False  # (a second word)
            before = samples(one)
        finally:
            one.stop()
            two.stop()
        again = shared()  # every process restarted: what they learned is in the cluster
        try:
            assert samples(again) >= before
        finally:
            again.stop()
