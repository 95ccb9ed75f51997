"""The fault matrix: one test per upstream fault. Each checks what the client received (a
complete answer or a clean error), what the upstream saw (attempts, the gaps between them,
model names, prefill or not), and that the gateway still answers afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.keys import CATALOG, ROUTER
from gateway.sim import SIM_STATE, SimModel, create_ollama_app, create_openai_app
from gateway.sim.fleet import DEFAULT_REPLY, THOUGHT
from tests.integration import conftest
from tests.integration.conftest import FAST, Fleet, fleet_config, host_models
from tests.support import (
    ServerThread,
    Sim,
    backend,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

USER = [{"role": "user", "content": "Hello"}]
THINK = len(THOUGHT.split())  # qwq:32b thinks this many tokens before it answers


@dataclass
class Reply:
    status: int
    headers: Any
    text: str  # the answer's content, streamed or not
    body: Any  # the JSON body, or the list of stream events
    finish: str | None = None

    @property
    def error(self) -> dict[str, Any] | None:
        if isinstance(self.body, dict):
            return self.body.get("error")  # type: ignore[no-any-return]
        last = self.body[-1] if self.body else None
        return last.get("error") if isinstance(last, dict) else None


async def ask(gateway: ServerThread, model: str, *, stream: bool = False,
              messages: list[dict[str, Any]] = USER, **extra: Any) -> Reply:
    payload = {"model": model, "messages": messages, "stream": stream, **extra}
    async with aiohttp.ClientSession() as http, http.post(
        gateway.url + "/v1/chat/completions", json=payload
    ) as response:
        raw = await response.read()
    if not stream or response.status != 200:
        body = orjson.loads(raw)
        choice = (body.get("choices") or [{}])[0]
        return Reply(response.status, response.headers,
                     (choice.get("message") or {}).get("content") or "", body,
                     choice.get("finish_reason"))
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    parsed = [e if e == "[DONE]" else orjson.loads(e) for e in events]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in parsed
                   if isinstance(e, dict) and e.get("choices"))
    finishes = [e["choices"][0]["finish_reason"] for e in parsed
                if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]
    return Reply(response.status, response.headers, text, parsed,
                 finishes[-1] if finishes else None)


def complete(reply: Reply) -> None:
    """The client got the whole answer, properly finished."""
    assert reply.status == 200, reply.body
    assert reply.text == DEFAULT_REPLY, reply.text
    assert reply.finish == "stop"
    if isinstance(reply.body, list):
        assert reply.body[-1] == "[DONE]"


def gaps(records: list[dict[str, Any]]) -> list[float]:
    return [b["t"] - a["t"] for a, b in itertools.pairwise(records)]


async def still_answers(gateway: ServerThread) -> None:
    complete(await ask(gateway, "qwen2.5-coder:32b"))


# --- before the first token ----------------------------------------------------------------


async def test_429_with_retry_after_is_waited_out_on_the_same_model(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", status=429, retry_after=1, remaining=1)
    reply = await ask(routed_gateway, "qwq:32b")
    complete(reply)
    attempts = fleet.primary.requests("/api/chat")
    assert [r["model"] for r in attempts] == ["qwq:32b", "qwq:32b"]
    assert 0.95 <= gaps(attempts)[0] < 1.6  # Retry-After: 1
    assert reply.headers["x-gateway-attempts"] == "2"
    assert reply.headers["x-gateway-model"] == "qwq:32b"
    await still_answers(routed_gateway)


async def test_persistent_429_without_retry_after_fails_over(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", status=429)
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    complete(reply)
    tried = fleet.primary.requests("/api/chat")
    assert [r["model"] for r in tried if r["model"] == "qwq:32b"] == ["qwq:32b", "qwq:32b"]
    assert gaps(tried[:2])[0] < 0.5  # jittered backoff, not a fixed second
    assert reply.headers["x-gateway-model"] == "qwen2.5-coder:32b"
    assert reply.headers["x-gateway-route"] == "fallback for qwq:32b"
    assert reply.headers["x-gateway-attempts"] == "3"


async def test_a_rate_limited_deployment_rests_for_its_retry_after_and_keeps_its_breaker(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    """A 429 is the upstream saying "not now", not failing: the deployment gets no new
    request for its Retry-After, and the clients hear that wait. (It used to count toward
    the breaker: after three, clients got 503 "breaker open" with Retry-After: 1, and each
    cool-down sent another request to an upstream that had asked for 30 seconds.)
    """
    fleet.cloud.fault("gpt-4o-mini", status=429, retry_after=30)
    for _ in range(5):  # more than the breaker's 3 failures
        reply = await ask(routed_gateway, "gpt-4o-mini")
        assert reply.status == 429, reply.body
        assert 28 <= int(reply.headers["Retry-After"]) <= 30
        assert reply.error is not None and reply.error["type"] == "rate_limit_error"
    assert len(fleet.cloud.requests("/v1/chat/completions")) == 1
    async with aiohttp.ClientSession() as http, http.get(routed_gateway.url + "/health") as r:
        health = await r.json()
    deployment = health["deployments"]["cloud/gpt-4o-mini"]
    assert deployment["breaker"] == "closed" and 28 <= deployment["rate_limited_s"] <= 30


async def test_a_rate_limited_model_is_passed_over_for_its_fallback_while_it_rests(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", status=429, retry_after=30)
    for _ in range(4):
        reply = await ask(routed_gateway, "qwq:32b", stream=True)
        complete(reply)
        assert reply.headers["x-gateway-model"] == "qwen2.5-coder:32b"
    assert [r["model"] for r in fleet.primary.requests("/api/chat")].count("qwq:32b") == 1


async def test_a_429_whose_body_breaks_off_is_still_a_429_with_its_retry_after(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.cloud.fault("gpt-4o-mini", status=429, retry_after=20, cut_body=True)
    reply = await ask(routed_gateway, "gpt-4o-mini")
    assert reply.status == 429, reply.body
    assert 18 <= int(reply.headers["Retry-After"]) <= 20


async def test_500_once_is_retried_once(routed_gateway: ServerThread, fleet: Fleet) -> None:
    fleet.primary.fault("qwq:32b", status=500, message="runner crashed", remaining=1)
    reply = await ask(routed_gateway, "qwq:32b")
    complete(reply)
    attempts = fleet.primary.requests("/api/chat")
    assert [r["outcome"] for r in attempts] == ["status 500", "completed"]
    assert 0.02 <= gaps(attempts)[0] < 0.5
    assert reply.body["model"] == "qwq:32b"


async def test_persistent_503_fails_over_and_bills_only_the_answer(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", status=503)
    reply = await ask(routed_gateway, "qwq:32b")
    complete(reply)
    assert reply.body["model"] == "qwen2.5-coder:32b"
    answered = [r for sim in (fleet.primary, fleet.secondary) for r in sim.requests("/api/chat")
                if r["model"] == "qwen2.5-coder:32b"]
    assert len(answered) == 1
    assert reply.body["usage"]["completion_tokens"] == len(DEFAULT_REPLY.split())


async def test_a_model_its_server_cannot_run_goes_elsewhere_and_leaves_its_breaker_closed(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    """A 501 (llama.cpp's "not supported") is not retried and not held against the
    deployment: it stays in use for what it can do.
    """
    fleet.primary.fault("qwq:32b", status=501, message="This server does not support that")
    for _ in range(4):  # more than the breaker's 3 failures
        reply = await ask(routed_gateway, "qwq:32b")
        complete(reply)
        assert reply.headers["x-gateway-attempts"] == "2"  # one try, then the fallback
        assert reply.body["model"] == "qwen2.5-coder:32b"
    assert len([r for r in fleet.primary.requests("/api/chat")
                if r["model"] == "qwq:32b"]) == 4
    async with aiohttp.ClientSession() as http, http.get(routed_gateway.url + "/health") as r:
        health = await r.json()
    assert health["deployments"]["primary/qwq:32b"]["breaker"] == "closed"
    fleet.primary.clear()
    reply = await ask(routed_gateway, "qwq:32b")  # no cool-down to wait out
    complete(reply)
    assert reply.headers["x-gateway-model"] == "qwq:32b"
    # When the fallback then fails for a passing reason, that is what the client hears
    # (a 502 it may try again), not the 400 of a model that cannot do it.
    fleet.primary.fault("qwq:32b", status=501, message="This server does not support that")
    for sim in (fleet.primary, fleet.secondary):
        sim.fault("qwen2.5-coder:32b", status=500, message="runner crashed")
    reply = await ask(routed_gateway, "qwq:32b")
    assert reply.status == 502 and "runner crashed" in reply.error["message"]


async def test_reset_before_headers_is_retried_then_failed_over(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", reset=True)
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    complete(reply)
    assert [r["outcome"] for r in fleet.primary.requests("/api/chat")
            if r["model"] == "qwq:32b"] == ["reset", "reset"]
    assert reply.headers["x-gateway-model"] == "qwen2.5-coder:32b"


@pytest.mark.parametrize("stream", [True, False])
async def test_no_response_fails_over_without_retrying_the_silent_route(
    routed_gateway: ServerThread, fleet: Fleet, stream: bool
) -> None:
    fleet.primary.fault("qwq:32b", no_response=True)
    started = time.monotonic()
    reply = await ask(routed_gateway, "qwq:32b", stream=stream)
    complete(reply)
    assert len([r for r in fleet.primary.requests("/api/chat") if r["model"] == "qwq:32b"]) == 1
    assert fleet.primary.hung_up("/api/chat", "qwq:32b")["closed_by_client"]
    # A stream must start within the 1 s header limit; a whole answer has `total` (10 s).
    assert time.monotonic() - started < (3 if stream else 12)
    assert reply.headers["x-gateway-model"] == "qwen2.5-coder:32b"


async def test_slow_first_token_fails_over(routed_gateway: ServerThread, fleet: Fleet) -> None:
    fleet.primary.fault("qwq:32b", ttft=3)
    started = time.monotonic()
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    complete(reply)
    assert time.monotonic() - started < 2.5  # first-token limit: 1 s
    assert len([r for r in fleet.primary.requests("/api/chat") if r["model"] == "qwq:32b"]) == 1
    slow = fleet.primary.hung_up("/api/chat", "qwq:32b")
    assert slow["closed_by_client"] and slow["tokens"] == 0
    assert reply.headers["x-gateway-model"] == "qwen2.5-coder:32b"


async def test_a_cold_model_is_given_time_to_load_and_a_warm_one_is_not() -> None:
    """The first request of the morning for a model Ollama has not loaded waits for it to
    load (``first_token_cold``); once it has answered, a silence that long is a stall; once
    Ollama says it unloaded the model, it is cold again.
    """
    big = SimModel("big:70b", parameter_size="70B", load_s=1.5)
    upstream = ServerThread(lambda: create_ollama_app([big, SimModel("small:3b")])).start()
    sim = Sim(upstream, "ollama")
    gateway = start_gateway(gateway_config(
        backend("ollama", "ollama", upstream.url,
                timeouts={"first_token": 0.5, "first_token_cold": 3.0}),
        routing={"fallbacks": ["small:3b"]}, server={"discovery_interval": 0.2}))

    def loaded() -> bool:
        return gateway.app[CATALOG].deployments("big:70b")[0].model.loaded

    try:
        assert not loaded()  # as /api/ps said at start
        reply = await ask(gateway, "big:70b", stream=True)
        complete(reply)  # in 1.5 s, past first_token: the gateway waited for it to load
        assert reply.headers["x-gateway-model"] == "big:70b"
        wait_until(loaded, 5, "the next discovery to see it loaded")
        sim.fault("big:70b", ttft=1.5, remaining=1)  # loaded now: 1.5 s is a stall
        reply = await ask(gateway, "big:70b", stream=True)
        complete(reply)
        assert reply.headers["x-gateway-model"] == "small:3b"
        async with aiohttp.ClientSession() as http:  # Ollama unloads it (keep_alive 0)
            await (await http.post(upstream.url + "/api/generate",
                                   json={"model": "big:70b", "keep_alive": 0})).read()
        wait_until(lambda: not loaded(), 5, "the next discovery to see it unloaded")
        reply = await ask(gateway, "big:70b", stream=True)
        complete(reply)  # cold again: loading it takes 1.5 s, and it is waited for
        assert reply.headers["x-gateway-model"] == "big:70b"
    finally:
        gateway.stop()
        upstream.stop()


async def test_context_length_error_goes_to_a_larger_window(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    long = [{"role": "user", "content": "word " * 100}]  # tiny-ctx:1b holds 64 tokens
    reply = await ask(routed_gateway, "tiny-ctx:1b", messages=long)
    complete(reply)
    assert [r["outcome"] for r in fleet.primary.requests("/api/chat")
            if r["model"] == "tiny-ctx:1b"] == ["pending"]  # refused, once, not retried
    assert reply.body["model"] == "qwen2.5-coder:32b"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_context_length_error_sent_in_the_stream_goes_to_a_larger_window(
    routed_gateway: ServerThread, fleet: Fleet, stream: bool
) -> None:
    """Servers that begin the stream before they read the prompt say it is too long in an
    error event: that is the same refusal as its 400, not a failure to retry.
    """
    fleet.primary.fault("tiny-ctx:1b", error_after=0,
                        message="the input length exceeds the context length")
    reply = await ask(routed_gateway, "tiny-ctx:1b", stream=stream)
    complete(reply)
    assert [r["model"] for r in fleet.primary.requests("/api/chat")].count("tiny-ctx:1b") == 1
    assert reply.headers["x-gateway-model"] == "qwen2.5-coder:32b"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_refused_in_the_stream_is_the_clients_400_not_a_502(
    routed_gateway: ServerThread, fleet: Fleet, stream: bool
) -> None:
    # vLLM's and llama.cpp's error events carry the status the refusal would have had.
    fleet.cloud.fault("gpt-4o-mini", error_after=0, error_code=400,
                      message="top_logprobs must be at most 20")
    reply = await ask(routed_gateway, "gpt-4o-mini", stream=stream)
    assert reply.status == 400, reply.body
    assert reply.error is not None and reply.error["message"] == \
        "top_logprobs must be at most 20"
    assert len(fleet.cloud.requests("/v1/chat/completions")) == 1  # not retried


async def test_context_length_error_goes_to_the_fallback_when_no_window_is_declared() -> None:
    # As a user writes it: a small model on an OpenAI-compatible server (one that does not
    # say how long a context its models take) and a larger one as its fallback.
    models = [SimModel("small", context_length=64), SimModel("large", context_length=32768)]
    upstream = ServerThread(lambda: create_openai_app(models, flavor="openai")).start()
    server = start_gateway(gateway_config(
        backend("vllm", "openai", upstream.url + "/v1", tier="server", timeouts=FAST),
        models=[{"name": "small", "fallbacks": ["large"]}],
        routing={"tier_fallback": False}))
    try:
        assert server.call(lambda: [d.model.context_length for name in ("small", "large")
                                    for d in server.app[CATALOG].deployments(name)]) == [
            None, None]  # not declared, not told
        long = [{"role": "user", "content": "word " * 100}]
        reply = await ask(server, "small", messages=long)
        complete(reply)
        assert [r["model"] for r in upstream.app[SIM_STATE].log] == ["small", "large"]
        assert reply.body["model"] == "large"
    finally:
        server.stop()
        upstream.stop()


async def test_a_fallbacks_refusal_does_not_hide_what_the_model_asked_for_said(
    fleet: Fleet
) -> None:
    """The model asked for is down (503); its fallback refuses the request as a client
    error (a parameter it does not take). The client hears the 503, which its SDK retries,
    not a 400 that says its request was wrong. The fallback's refusal does not count
    against its breaker.
    """
    server = start_gateway(fleet_config(fleet, tier_fallback=False))
    try:
        fleet.primary.fault("qwq:32b", status=503)
        for host in (fleet.primary, fleet.secondary):
            host.fault("qwen2.5-coder:32b", status=400, message="Unsupported parameter")
        for stream in (False, True):
            reply = await ask(server, "qwq:32b", stream=stream)
            assert reply.status == 503, reply.body
            assert reply.error and reply.error["code"] == "service_unavailable"
        refused = [r for s in (fleet.primary, fleet.secondary) for r in s.requests("/api/chat")
                   if r["model"] == "qwen2.5-coder:32b"]
        assert len(refused) == 4  # each fallback host, once a request
        async with aiohttp.ClientSession() as http, http.get(server.url + "/health") as r:
            health = await r.json()
        assert {health["deployments"][f"{host}/qwen2.5-coder:32b"]["breaker"]
                for host in ("primary", "secondary")} == {"closed"}
    finally:
        server.stop()


async def test_a_fallbacks_refusal_does_not_hide_that_the_model_was_full(fleet: Fleet) -> None:
    """The model asked for is busy (its one slot taken, the wait in line over); its fallback
    refuses the request as a client error: the client hears the 429 it may try again.
    """
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST, max_concurrency=1),
        backend("secondary", "ollama", fleet.secondary.api_url, timeouts={**FAST, "total": 30}),
        models=[{"name": "qwq:32b", "fallbacks": ["qwen2.5-coder:32b"]}],
        routing={"retries": 1, "backoff_initial": 0.05, "backoff_max": 0.2,
                 "queue_timeout": 0.3, "tier_fallback": False}))
    try:
        fleet.primary.fault("qwq:32b", tokens_per_s=5.0)  # (some 10 s: it holds the slot)
        for host in (fleet.primary, fleet.secondary):
            host.fault("qwen2.5-coder:32b", status=400, message="Unsupported parameter")
        slow = asyncio.create_task(ask(server, "qwq:32b", stream=True))
        await asyncio.sleep(0.5)
        reply = await ask(server, "qwq:32b")
        assert reply.status == 429, reply.body
        assert reply.error and reply.error["code"] == "deployment_busy"
        # A fallback that fails is heard as such (a batch line counts its timeouts).
        for host in (fleet.primary, fleet.secondary):
            host.fault("qwen2.5-coder:32b", status=500, message="runner crashed")
        reply = await ask(server, "qwq:32b")
        assert reply.status == 502 and "runner crashed" in reply.error["message"], reply.body
        slow.cancel()
    finally:
        server.stop()


async def test_content_policy_rejection_is_passed_on_untouched(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", content_policy=True)
    reply = await ask(routed_gateway, "qwq:32b")
    assert reply.status == 400
    assert reply.error and reply.error["code"] == "content_policy_violation"
    assert len(fleet.primary.requests("/api/chat")) == 1
    assert not fleet.secondary.requests() and not fleet.server.requests()
    await still_answers(routed_gateway)


# --- after the first token: the stream is rescued -------------------------------------------


async def test_stream_cut_mid_answer_is_continued_with_a_prefill(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", cut_after=THINK + 5)  # five words into the answer
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    complete(reply)  # seamless: the exact answer, once
    [cut] = [r for r in fleet.primary.requests("/api/chat") if r["model"] == "qwq:32b"]
    assert cut["outcome"] == "cut" and cut["tokens"] == THINK + 5
    rescue = [r for s in (fleet.primary, fleet.secondary) for r in s.requests("/api/chat")
              if r["model"] == "qwen2.5-coder:32b"]
    assert len(rescue) == 1 and rescue[0]["prefill"]
    sent = "".join(DEFAULT_REPLY.split(" ")[i] + " " for i in range(5))
    assert rescue[0]["payload"]["messages"][-1] == {"role": "assistant", "content": sent}
    events = [e for e in reply.body if isinstance(e, dict)]
    assert events[0]["model"] == "qwq:32b" and events[-1]["model"] == "qwen2.5-coder:32b"
    await still_answers(routed_gateway)


async def test_a_deployment_whose_every_stream_breaks_off_opens_its_breaker(
    fleet: Fleet
) -> None:
    """Each answer begins (a first token) and breaks off mid-way: each is rescued, and after
    the breaker's 3 failures in a row the requests go to the fallback at once. (The first
    token used to forget the failures, so the breaker never opened.)
    """
    server = start_gateway(fleet_config(fleet, breaker={"failures": 3, "cooldown": 60.0}))
    try:
        fleet.primary.fault("qwq:32b", cut_after=THINK + 2)
        for _ in range(5):
            complete(await ask(server, "qwq:32b", stream=True))
        assert len([r for r in fleet.primary.requests("/api/chat")
                    if r["model"] == "qwq:32b"]) == 3
        async with aiohttp.ClientSession() as http, http.get(server.url + "/health") as r:
            health = await r.json()
        assert health["deployments"]["primary/qwq:32b"]["breaker"] == "open"
    finally:
        server.stop()


async def test_an_answer_whose_connection_drops_after_its_finish_is_whole(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    """The backend sends the whole answer and its finish, then its connection drops before
    the usage and ``[DONE]``: the client gets that answer, once, and nothing is asked again
    (it used to get the answer, then a second one from the fallback, or an error).
    """
    fleet.cloud.fault("gpt-4o-mini", cut_at_end=True)
    for stream in (True, False):
        extra = {"stream_options": {"include_usage": True}} if stream else {}
        reply = await ask(routed_gateway, "gpt-4o-mini", stream=stream, **extra)
        complete(reply)
        if stream:
            assert [e["choices"][0]["finish_reason"] for e in reply.body
                    if isinstance(e, dict) and e.get("choices")
                    and e["choices"][0]["finish_reason"]] == ["stop"]
    assert [r["outcome"] for r in fleet.cloud.requests()] == ["cut", "cut"]
    assert not fleet.primary.requests("/api/chat") and not fleet.secondary.requests("/api/chat")
    assert not fleet.server.requests("/v1/chat/completions")


async def test_a_continued_answer_counts_the_text_carried_over_as_answer(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    """A rescue continues the answer from the text sent so far, which the fallback reads as
    its question: the usage counts those tokens as the answer's, as the client had them.
    """
    fleet.primary.fault("qwq:32b", cut_after=THINK + 5)
    reply = await ask(routed_gateway, "qwq:32b", stream=True,
                      stream_options={"include_usage": True})
    complete(reply)
    [rescue] = [r for s in (fleet.primary, fleet.secondary) for r in s.requests("/api/chat")
                if r["model"] == "qwen2.5-coder:32b"]
    assert rescue["prefill"]
    usage = reply.body[-2]["usage"]
    assert usage["completion_tokens"] == len(DEFAULT_REPLY.split())  # 5 carried + the rest
    fleet.primary.clear()
    clean = await ask(routed_gateway, "qwen2.5-coder:32b", stream=True,
                      stream_options={"include_usage": True})
    assert usage["prompt_tokens"] <= clean.body[-2]["usage"]["prompt_tokens"] + 5


@pytest.mark.parametrize("code", [429, 400])
async def test_an_error_event_with_a_status_mid_answer_is_a_break_and_is_rescued(
        code: int) -> None:
    """Once the answer has begun, an error event is the stream breaking, whatever status it
    names (an aggregator passes a provider's 429 on mid-stream): it is rescued as a cut is,
    not passed on as the client's error after half an answer.
    """
    ups = [ServerThread(lambda: create_openai_app([SimModel("m1")], flavor="vllm")).start()
           for _ in range(2)]
    sims = [Sim(up, "openai") for up in ups]
    gateway = start_gateway(gateway_config(  # (the first tier's first: a)
        backend("a", "openai", sims[0].api_url, timeouts=FAST),
        backend("b", "openai", sims[1].api_url, tier="server", timeouts=FAST)))
    try:
        sims[0].fault("m1", error_after=3, error_code=code, message="provider error")
        reply = await ask(gateway, "m1", stream=True)
        complete(reply)
        assert len(sims[0].requests("/v1/chat/completions")) == 1
    finally:
        gateway.stop()
        for up in ups:
            up.stop()


async def test_a_content_policy_error_mid_answer_ends_it_and_is_no_fault() -> None:
    """A provider's content filter stopping an answer half-way is that answer's end: not
    continued by another model from the flagged text, not held against the deployment."""
    ups = [ServerThread(lambda: create_openai_app([SimModel("m1")], flavor="openai")).start()
           for _ in range(2)]
    sims = [Sim(up, "openai") for up in ups]
    gateway = start_gateway(gateway_config(
        backend("a", "openai", sims[0].api_url, timeouts=FAST),
        backend("b", "openai", sims[1].api_url, tier="server", timeouts=FAST),
        routing={"breaker": {"failures": 2, "cooldown": 30.0}}))
    try:
        sims[0].fault("m1", error_after=3, error_code="content_policy_violation",
                      message="The response was filtered by the content filter")
        for _ in range(3):
            reply = await ask(gateway, "m1", stream=True)
            assert reply.error is not None and reply.error["code"] == \
                "content_policy_violation"
            assert "[DONE]" not in reply.body
        assert sims[1].requests("/v1/chat/completions") == []
        sims[0].clear()
        complete(reply := await ask(gateway, "m1"))
        assert reply.headers["x-gateway-backend"] == "a"  # its breaker closed
    finally:
        gateway.stop()
        for up in ups:
            up.stop()


async def test_stalled_stream_is_rescued(routed_gateway: ServerThread, fleet: Fleet) -> None:
    fleet.primary.fault("qwq:32b", stall_after=4)
    started = time.monotonic()
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    complete(reply)
    assert time.monotonic() - started < 3  # idle limit: 1 s
    stalled = fleet.primary.hung_up("/api/chat", "qwq:32b")
    assert stalled["outcome"] == "stalled" and stalled["closed_by_client"]


async def test_fallback_that_rejects_prefill_is_restarted_and_deduplicated(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", cut_after=THINK + 6)
    for host in (fleet.primary, fleet.secondary):
        host.fault("qwen2.5-coder:32b", reject_prefill=True)
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    complete(reply)
    fallback = [r for s in (fleet.primary, fleet.secondary) for r in s.requests("/api/chat")
                if r["model"] == "qwen2.5-coder:32b"]
    assert [(r["prefill"], r["outcome"]) for r in fallback] == [
        (True, "prefill_rejected"), (False, "completed")]


@pytest.mark.parametrize("prefill", ["auto", "yes"])
async def test_prefill_is_set_per_model(fleet: Fleet, prefill: str) -> None:
    # The fallback runs on an OpenAI-compatible server (no prefill by default); the config
    # says this one model there continues a final assistant message.
    server = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, timeouts=FAST),
        backend("server", "openai", fleet.server.api_url, tier="server", timeouts=FAST),
        models=[{"name": "qwq:32b", "fallbacks": ["smollm2:135m"]},
                {"name": "smollm2:135m", "prefill": prefill}],
        routing={"tier_fallback": False}))
    try:
        fleet.primary.fault("qwq:32b", cut_after=THINK + 5)
        reply = await ask(server, "qwq:32b", stream=True)
        assert reply.status == 200 and "[DONE]" in reply.body
        [rescue] = [r for r in fleet.server.requests() if r["model"] == "smollm2:135m"]
        assert rescue["prefill"] is (prefill == "yes")
    finally:
        server.stop()


async def test_a_stream_that_cannot_be_rescued_ends_with_one_clean_error(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", cut_after=3)
    for host in (fleet.primary, fleet.secondary):
        host.fault("qwen2.5-coder:32b", status=500)
    for sim in (fleet.server, fleet.cloud):
        sim.fault("smollm2:135m" if sim is fleet.server else "gpt-4o-mini", status=500)
    reply = await ask(routed_gateway, "qwq:32b", stream=True)
    assert reply.status == 200 and "[DONE]" not in reply.body
    assert reply.error is not None and reply.finish is None
    assert sum(1 for e in reply.body if isinstance(e, dict) and "error" in e) == 1


async def test_malformed_event_is_skipped_without_another_attempt(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", malformed_at=3)
    complete(await ask(routed_gateway, "qwq:32b", stream=True))
    assert len(fleet.primary.requests("/api/chat")) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_server_that_ignores_stream_and_answers_whole_is_understood(
    routed_gateway: ServerThread, fleet: Fleet, stream: bool
) -> None:
    # The gateway asks every upstream for a stream; a server without streaming answers whole.
    fleet.cloud.fault("gpt-4o-mini", ignore_stream=True)
    reply = await ask(routed_gateway, "gpt-4o-mini", stream=stream,
                      stream_options={"include_usage": True} if stream else None)
    complete(reply)
    usage = reply.body[-2]["usage"] if stream else reply.body["usage"]
    assert usage["completion_tokens"] == len(DEFAULT_REPLY.split())
    assert len(fleet.cloud.requests()) == 1


async def test_stream_without_done_is_finalised_at_once(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.cloud.fault("gpt-4o-mini", missing_done=True)
    started = time.monotonic()
    reply = await ask(routed_gateway, "gpt-4o-mini", stream=True,
                      stream_options={"include_usage": True})
    complete(reply)
    assert time.monotonic() - started < 0.9  # not after the 1 s idle limit
    assert reply.body[-2]["usage"]["completion_tokens"] == len(DEFAULT_REPLY.split())
    assert len(fleet.cloud.requests()) == 1


# --- a primary that goes away and comes back ----------------------------------------------


async def test_primary_down_for_a_while_then_back(fleet: Fleet) -> None:
    gateway = start_gateway(fleet_config(fleet))
    try:
        complete(await ask(gateway, "qwq:32b"))
        fleet.threads["primary"].stop()
        outage = [await ask(gateway, "qwq:32b", stream=i % 2 == 0) for i in range(6)]
        for reply in outage:
            complete(reply)
            assert reply.headers["x-gateway-backend"] == "secondary"
        fleet.restart("primary", lambda: create_ollama_app(host_models()))
        deadline = time.monotonic() + 5
        while True:
            reply = await ask(gateway, "qwq:32b")
            complete(reply)
            if reply.headers["x-gateway-backend"] == "primary":
                break
            assert time.monotonic() < deadline, "the primary did not get its traffic back"
            await asyncio.sleep(0.2)
    finally:
        gateway.stop()


async def test_an_open_breaker_sends_traffic_elsewhere_and_shows_in_health(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", status=500)
    for _ in range(2):  # 2 + 1 failed attempts: the breaker (3 failures) opens
        complete(await ask(routed_gateway, "qwq:32b"))
    async with aiohttp.ClientSession() as http, http.get(routed_gateway.url + "/health") as r:
        health = await r.json()
    assert health["deployments"]["primary/qwq:32b"]["breaker"] == "open"
    tried = len([r for r in fleet.primary.requests("/api/chat") if r["model"] == "qwq:32b"])
    for _ in range(3):
        reply = await ask(routed_gateway, "qwq:32b")
        complete(reply)
        assert reply.headers["x-gateway-attempts"] == "1"  # straight to the fallback
    assert len([r for r in fleet.primary.requests("/api/chat")
                if r["model"] == "qwq:32b"]) == tried  # not bothered while open
    fleet.primary.clear()
    await asyncio.sleep(1.1)  # the cool-down: one trial goes through, and works
    reply = await ask(routed_gateway, "qwq:32b")
    complete(reply)
    assert reply.headers["x-gateway-model"] == "qwq:32b"


async def test_a_rescue_by_another_model_does_not_repeat_the_reasoning(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", cut_after=3)  # mid-thought: no answer text sent yet
    reply = await ask(routed_gateway, "qwq:32b", stream=True)  # (its fallback: no thinker)
    complete(reply)
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content") or ""
                        for e in reply.body if isinstance(e, dict) and e.get("choices"))
    assert reasoning == "".join(THOUGHT.split(" ")[i] + " " for i in range(3))


@pytest.mark.parametrize(("other", "expected"), [
    (None, THOUGHT),
    ("Another line of thought.", " ".join(THOUGHT.split(" ")[:3]) + " \n\nAnother line of "
                                 "thought."),
])
async def test_a_rescue_mid_thought_leaves_the_reasoning_whole(
        other: str | None, expected: str) -> None:
    """The stream breaks while the model reasons, before any text, and a model that reasons
    too rescues it: its reasoning goes on from where the client's broke off when it begins
    the same, and comes whole after a blank line when it does not. It was dropped, and the
    client's reasoning was left cut off ("The user wants")."""
    thinker = next(m for m in host_models() if m.name == "qwq:32b")
    twin = dataclasses.replace(thinker, name="qwq-twin:32b")
    with ServerThread(lambda: create_ollama_app([thinker])) as first, \
            ServerThread(lambda: create_ollama_app([twin])) as second:
        gateway = start_gateway(gateway_config(
            backend("first", "ollama", first.url), backend("second", "ollama", second.url),
            models=[{"name": "qwq:32b", "fallbacks": ["qwq-twin:32b"]}]))
        try:
            Sim(first, "ollama").fault("qwq:32b", cut_after=3)
            if other is not None:
                Sim(second, "ollama").fault("qwq-twin:32b", thought=other)
            reply = await ask(gateway, "qwq:32b", stream=True)
        finally:
            gateway.stop()
    complete(reply)
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content") or ""
                        for e in reply.body if isinstance(e, dict) and e.get("choices"))
    assert reasoning.strip() == expected


async def test_a_cancelled_breaker_trial_does_not_lock_the_deployment_out(
    routed_gateway: ServerThread, fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", status=500)
    for _ in range(2):
        complete(await ask(routed_gateway, "qwq:32b"))  # the breaker opens
    fleet.primary.fault("qwq:32b", ttft=0.8)
    await asyncio.sleep(1.1)  # cool-down over: the next request is the trial...
    try:
        async with asyncio.timeout(0.3):
            await ask(routed_gateway, "qwq:32b", stream=True)  # ...and its client leaves
    except TimeoutError:
        pass
    fleet.primary.clear()
    await asyncio.sleep(0.2)
    reply = await ask(routed_gateway, "qwq:32b")
    complete(reply)
    assert reply.headers["x-gateway-model"] == "qwq:32b"  # tried again, not shut out


async def test_a_configured_model_whose_host_was_down_at_start_falls_back(
    fleet: Fleet
) -> None:
    fleet.threads["primary"].stop()  # qwq:32b lives only there
    gateway = start_gateway(fleet_config(fleet))
    try:
        reply = await ask(gateway, "qwq:32b")
    finally:
        gateway.stop()
    complete(reply)
    assert reply.headers["x-gateway-backend"] == "secondary"
    assert reply.headers["x-gateway-route"] == "fallback for qwq:32b"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_model_thinking_past_the_idle_limit_before_its_first_token_is_waited_for(
        stream: bool) -> None:
    """A server that sends its headers at once and its first token 2.5 s later (a model
    thinking, or loading): the idle limit (1 s) cut it off as stalled, though its first
    token was due within 5 s.
    """
    model = SimModel("m:1b", ttft=2.5, loaded=True)
    upstream = ServerThread(lambda: create_openai_app([model], flavor="llamacpp")).start()
    gateway = start_gateway(gateway_config(
        backend("light", "openai", upstream.url + "/v1",
                timeouts={"headers": 10.0, "first_token": 5.0, "idle": 1.0, "total": 30.0})))
    try:
        reply = await ask(gateway, "m:1b", stream=stream)
        assert reply.status == 200, reply.body
        assert reply.text
    finally:
        gateway.stop()
        upstream.stop()


async def test_a_server_that_sends_headers_then_nothing_is_given_up_within_its_limits(
        ) -> None:
    """Headers, then silence: a whole answer waited ``first_token_cold`` (a cold Ollama
    model's allowance, 12 s here) where it waited ``idle`` (2 s), a first version of the
    fix that let a thinking model's first token come later than ``idle``.
    """
    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")  # and no more

    server = await asyncio.get_running_loop().create_server(Silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = start_gateway(gateway_config(backend(
        "silent", "openai", f"http://127.0.0.1:{port}/v1", models=["m"],
        timeouts={"first_token": 2.0, "idle": 2.0, "first_token_cold": 12.0, "total": 60.0})))
    try:
        for stream in (True, False):
            started = time.monotonic()
            reply = await ask(gateway, "m", stream=stream)
            assert reply.status == 504 and time.monotonic() - started < 4.0, reply.body
    finally:
        gateway.stop()
        server.close()


async def test_an_embedding_that_takes_longer_than_the_headers_limit_is_waited_for() -> None:
    """An embedding server sends its headers when its work is done, which grows with the
    input (thousands of texts on a CPU take minutes): held to the headers limit, a big
    batch was a 504, and a few of them opened the breaker for everyone's small ones.
    """
    model = SimModel("nomic-embed-text:latest", capabilities=("embedding",),
                     embedding_length=8)
    with ServerThread(lambda: create_ollama_app([model])) as ollama:
        gateway = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama.url, timeouts={"headers": 1.0})))
        try:
            Sim(ollama, "ollama").fault(model.name, latency=1.5)  # (once it is listed)
            async with aiohttp.ClientSession() as http, http.post(
                    gateway.url + "/v1/embeddings",
                    json={"model": "nomic-embed-text", "input": ["a"] * 100}) as response:
                body = await response.json()
            assert response.status == 200, body
            assert len(body["data"]) == 100
        finally:
            gateway.stop()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_an_answer_still_coming_at_the_total_limit_ends_there_and_is_no_fault(
        fleet: Fleet, stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A healthy answer, token after token, that outlasts ``total`` (600 s by default: 6,000
    tokens at 10 a second): it was taken for a broken stream, finished by another model (or
    a 504 when whole), and counted toward the breaker of a deployment that answered well.
    It ends where the limit cut it, as a length limit ends one; and, with the plugins on, no
    cache keeps it as if the client's limit had cut it, no QA takes it to another model.
    """
    monkeypatch.setattr(conftest, "FAST", {**FAST, "total": 2.5})
    config = dataclasses.replace(fleet_config(fleet, breaker={"failures": 1, "cooldown": 60.0}),
                                 plugins=gateway_config(plugins=[{"name": "qa"},
                                                                 {"name": "cache"}]).plugins)
    fleet.primary.fault("qwq:32b", tokens_per_s=10, ttft=0.0)  # 44 tokens: 4.4 s
    server = start_gateway(config)
    try:
        client = openai_client(server.url)
        for limit in (1000, 1000, None):  # (the client's limit: the cache's case, QA's)
            started = time.monotonic()
            extra = {"temperature": 0, **({"max_tokens": limit} if limit else {})}
            if stream:
                chunks = list(client.chat.completions.create(
                    model="qwq:32b", messages=USER, stream=True,  # type: ignore[arg-type]
                    **extra))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                models = {c.model for c in chunks}
            else:
                whole = client.chat.completions.create(model="qwq:32b", messages=USER,
                                                       **extra)  # type: ignore[arg-type]
                text, finish = whole.choices[0].message.content or "", \
                    whole.choices[0].finish_reason
                models = {whole.model}
            assert 2.0 < time.monotonic() - started < 4.0  # (asked: not from the cache)
            assert (finish, models) == ("length", {"qwq:32b"})
            assert text and DEFAULT_REPLY.startswith(text) and text != DEFAULT_REPLY
        assert [r["model"] for r in fleet.primary.requests("/api/chat")] == ["qwq:32b"] * 3
        assert fleet.secondary.requests("/api/chat") == []
        assert server.call(lambda: server.app[ROUTER].balancer.report())[  # type: ignore
            "primary/qwq:32b"]["breaker"] == "closed"
    finally:
        server.stop()


def test_an_answer_whose_finish_came_before_the_total_limit_keeps_its_finish(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finish had come, its usage and end not yet, when the limit ran out: the answer
    is whole, and an agent's tool call must stay one (it was said to be cut, ``length``).
    """
    monkeypatch.setattr(conftest, "FAST", {**FAST, "total": 1.5, "idle": 5.0})
    # (its finish at once; then neither usage nor [DONE], its body ended 3 s later)
    fleet.cloud.fault("gpt-4o-mini", no_usage=True, missing_done=True, end_delay=3)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    server = start_gateway(fleet_config(fleet))
    try:
        client = openai_client(server.url)
        plain = client.chat.completions.create(model="gpt-4o-mini",
                                               messages=USER)  # type: ignore[arg-type]
        called = client.chat.completions.create(model="gpt-4o-mini", messages=USER,  # type: ignore
                                                tools=[tool])  # type: ignore[list-item]
    finally:
        server.stop()
    assert plain.choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content == DEFAULT_REPLY
    assert called.choices[0].finish_reason == "tool_calls"
