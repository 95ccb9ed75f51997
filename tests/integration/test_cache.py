"""The response cache against a real Redis server (the tests' own, on a free port): hits and
misses, expiry, the per-request directives, tenants kept apart, SSE replay read by the
official SDK, coalesced misses, and a Redis that dies or stalls under load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.store import RedisStore, StoreUnavailable
from gateway.tenants.link import Link
from tests.redis_peer import RedisServer
from tests.support import ServerThread, Sim, backend, gateway_config, start_gateway, wait_until

MODEL = "qwen2.5-coder:32b"
KEY_A, KEY_B = "gw-tenant-a-0123456789", "gw-tenant-b-0123456789"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def cached_gateway(sim: Sim, redis: RedisServer | None, **options: Any) -> ServerThread:
    store = {"backend": "redis", "redis_url": redis.url} if redis else {"backend": "memory"}
    auth = options.pop("auth", {})
    return start_gateway(gateway_config(
        backend("ollama", "ollama", sim.api_url, parallel=4),  # (several streams at once)
        plugins=[{"name": "cache", "options": {**store, **options}}],
        **({"auth": auth} if auth else {})))


@pytest.fixture
def gateway(ollama_sim: Sim, redis_server: RedisServer) -> Iterator[ServerThread]:
    redis_server.command("FLUSHALL")
    server = cached_gateway(ollama_sim, redis_server)
    yield server
    server.stop()


def ask(server: ServerThread, content: str, *, key: str = "x", headers: dict[str, str] | None
        = None, **extra: Any) -> tuple[str, str]:
    """The answer's text and its ``x-gateway-cache`` header."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": content}],
            extra_headers=headers or {}, **{"temperature": 0, **extra})
        return raw.parse().choices[0].message.content or "", raw.headers["x-gateway-cache"]


def upstream_calls(sim: Sim) -> int:
    return len(sim.requests("/api/chat"))


def health(server: ServerThread) -> dict[str, Any]:
    with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def test_a_repeated_request_is_answered_from_redis(gateway: ServerThread, ollama_sim: Sim,
                                                    redis_server: RedisServer) -> None:
    first, state = ask(gateway, "What is a monad?")
    assert state == "miss"
    assert redis_server.keys("gw:cache:*") == 1
    second, state = ask(gateway, "What is a monad?")
    assert (second, state) == (first, "hit")
    assert upstream_calls(ollama_sim) == 1
    assert ask(gateway, "What is a functor?")[1] == "miss"  # another question, another answer
    assert upstream_calls(ollama_sim) == 2


def test_sampling_settings_are_part_of_the_key(gateway: ServerThread, ollama_sim: Sim) -> None:
    ask(gateway, "Name a colour.", seed=1)
    assert ask(gateway, "Name a colour.", seed=2)[1] == "miss"
    assert ask(gateway, "Name a colour.", seed=1, max_tokens=5)[1] == "miss"
    assert ask(gateway, "Name a colour.", seed=1)[1] == "hit"
    assert upstream_calls(ollama_sim) == 3


def test_a_request_said_another_way_is_the_same_request(gateway: ServerThread,
                                                         ollama_sim: Sim) -> None:
    assert ask(gateway, "Name a tree.", temperature=0, max_tokens=50)[1] == "miss"
    assert ask(gateway, "Name a tree.", temperature=0.0, max_tokens=50)[1] == "hit"
    assert ask(gateway, "Name a tree.", temperature=0, max_completion_tokens=50)[1] == "hit"
    assert ask(gateway, "Name a tree.", temperature=0, max_tokens=50, n=1)[1] == "hit"
    assert ask(gateway, "Name a tree.", temperature=0, max_tokens=51)[1] == "miss"
    assert upstream_calls(ollama_sim) == 2
    # (seeds far apart as integers, and alike as floats: two requests)
    assert ask(gateway, "Name a tree.", seed=2**53)[1] == "miss"
    assert ask(gateway, "Name a tree.", seed=2**53 + 1)[1] == "miss"


def test_an_agent_run_again_is_answered_from_the_cache_with_ids_of_its_own(
        gateway: ServerThread, ollama_sim: Sim) -> None:
    """A tool call from the cache has an id of its own (an agent asking again held two calls
    of one id, and would answer the second with the first's result); and the turns after
    it, whose ids then differ from the first run's, are the same requests all the same.
    """
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    said, ids = [], []
    for _ in range(3):
        messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
        first = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, tools=[tool], messages=messages)  # type: ignore
        call = first.parse().choices[0].message.tool_calls[0]  # type: ignore[index]
        messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}]
        second = client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, tools=[tool], messages=messages)  # type: ignore
        said.append((first.headers["x-gateway-cache"], second.headers["x-gateway-cache"]))
        ids.append(call.id)
    client.close()
    assert said == [("miss", "miss"), ("hit", "hit"), ("hit", "hit")]
    assert len(set(ids)) == 3
    assert upstream_calls(ollama_sim) == 2


def test_only_deterministic_requests_are_cached_unless_forced(gateway: ServerThread,
                                                              ollama_sim: Sim) -> None:
    assert ask(gateway, "Write a poem.", temperature=0.8)[1] == "skip"
    assert ask(gateway, "Write a poem.", temperature=0.8)[1] == "skip"
    assert upstream_calls(ollama_sim) == 2
    force = {"x-gateway-cache": "force"}
    assert ask(gateway, "Write a poem.", temperature=0.8, headers=force)[1] == "miss"
    assert ask(gateway, "Write a poem.", temperature=0.8, headers=force)[1] == "hit"
    assert upstream_calls(ollama_sim) == 3


def test_bypass_and_refresh(gateway: ServerThread, ollama_sim: Sim) -> None:
    ask(gateway, "Define entropy.")
    bypass = {"x-gateway-cache": "bypass"}
    assert ask(gateway, "Define entropy.", headers=bypass)[1] == "bypass"
    assert upstream_calls(ollama_sim) == 2
    # refresh asks the model again and keeps the new answer
    ollama_sim.fault(MODEL, reply="Entropy, freshly asked.")
    assert ask(gateway, "Define entropy.", headers={"x-gateway-cache": "refresh"}) == (
        "Entropy, freshly asked.", "refresh")
    ollama_sim.clear()
    assert ask(gateway, "Define entropy.") == ("Entropy, freshly asked.", "hit")
    assert upstream_calls(ollama_sim) == 0  # (the log was cleared with the fault)


def test_a_refresh_in_flight_keeps_no_one_waiting(gateway: ServerThread,
                                                  ollama_sim: Sim) -> None:
    """While a refresh asks a slow model again, the same request without it is answered
    from the store at once.
    """
    ask(gateway, "Define a group.")
    ollama_sim.fault(MODEL, latency=2.0)
    refreshing = threading.Thread(target=ask, args=(gateway, "Define a group."),
                                  kwargs={"headers": {"x-gateway-cache": "refresh"}})
    refreshing.start()
    try:
        wait_until(lambda: upstream_calls(ollama_sim) == 2, 5, "the refresh to reach the model")
        started = time.monotonic()
        assert ask(gateway, "Define a group.")[1] == "hit"
        assert time.monotonic() - started < 1.0
    finally:
        refreshing.join()


def test_entries_expire_after_their_ttl(ollama_sim: Sim, redis_server: RedisServer) -> None:
    for store in (redis_server, None):  # Redis, then the in-memory store
        server = cached_gateway(ollama_sim, store, ttl=0.5)
        try:
            question = f"What is a lens? ({'redis' if store else 'memory'})"
            assert ask(server, question)[1] == "miss"
            assert ask(server, question)[1] == "hit"
            time.sleep(0.7)
            assert ask(server, question)[1] == "miss"
        finally:
            server.stop()


def test_one_tenant_never_sees_anothers_answer(ollama_sim: Sim,
                                               redis_server: RedisServer) -> None:
    auth = {"key_hashes": [hashlib.sha256(k.encode()).hexdigest() for k in (KEY_A, KEY_B)]}
    server = cached_gateway(ollama_sim, redis_server, auth=auth)
    try:
        ollama_sim.fault(MODEL, reply="Tenant A's private answer.")
        assert ask(server, "Summarise my notes.", key=KEY_A) == (
            "Tenant A's private answer.", "miss")
        ollama_sim.clear()
        text, state = ask(server, "Summarise my notes.", key=KEY_B)
        assert state == "miss" and "Tenant A" not in text
        assert ask(server, "Summarise my notes.", key=KEY_A) == (
            "Tenant A's private answer.", "hit")
    finally:
        server.stop()
    shared = cached_gateway(ollama_sim, redis_server, auth=auth, shared=True)
    try:
        ask(shared, "A public question.", key=KEY_A)
        assert ask(shared, "A public question.", key=KEY_B)[1] == "hit"
    finally:
        shared.stop()


def test_a_hit_is_replayed_as_a_stream_the_sdk_reads(gateway: ServerThread,
                                                     ollama_sim: Sim) -> None:
    def stream() -> tuple[list[Any], str]:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me about SSE."}],
                temperature=0, stream=True, stream_options={"include_usage": True})
            return list(raw.parse()), raw.headers["x-gateway-cache"]

    live, state = stream()
    assert state == "miss"
    replay, state = stream()
    assert state == "hit"
    assert upstream_calls(ollama_sim) == 1

    def text(chunks: list[Any]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(replay) == text(live) != ""
    assert replay[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in replay if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert replay[-1].usage is not None and replay[-1].usage == live[-1].usage
    assert {c.model for c in replay} == {MODEL}
    # and the stream's answer is the non-streamed one
    assert ask(gateway, "Tell me about SSE.") == (text(live), "hit")


@pytest.mark.parametrize("fault", [
    {"status": 500},  # an error
    {"error_after": 2},  # an answer that broke off with an in-band error
    {"cut_after": 2},  # a connection cut in the middle
])
def test_a_failed_answer_is_never_kept(gateway: ServerThread, ollama_sim: Sim,
                                       redis_server: RedisServer, fault: dict[str, Any]) -> None:
    ollama_sim.fault(MODEL, **fault)
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0) as client:
        try:
            chunks = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Explain RAID."}],
                temperature=0, stream=True)
            for _ in chunks:
                pass
        except openai.APIError:
            pass  # the client hears of the failure (how depends on when it struck)
    assert redis_server.keys("gw:cache:*") == 0
    ollama_sim.clear()
    assert ask(gateway, "Explain RAID.")[1] == "miss"
    assert ask(gateway, "Explain RAID.")[1] == "hit"


def test_an_answer_cut_by_the_models_own_limit_is_not_kept(gateway: ServerThread,
                                                           ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, finish="length")
    ask(gateway, "A long story, please.")
    assert ask(gateway, "A long story, please.")[1] == "miss"
    ollama_sim.clear()
    # cut by the client's own max_tokens: that is the answer it asked for
    ask(gateway, "A long story, please.", max_tokens=3)
    assert ask(gateway, "A long story, please.", max_tokens=3)[1] == "hit"


def test_identical_concurrent_misses_share_one_upstream_call(gateway: ServerThread,
                                                             ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, latency=1.0)  # the first answer takes long enough for all to arrive

    async def burst() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x",
                                      max_retries=0, timeout=30) as client:
            async def one() -> tuple[str, str]:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "Why is the sky blue?"}],
                    temperature=0)
                body = raw.parse()
                return body.choices[0].message.content or "", raw.headers["x-gateway-cache"]
            return await asyncio.gather(*(one() for _ in range(100)))

    answers = asyncio.run(burst())
    assert upstream_calls(ollama_sim) == 1
    assert len({text for text, _ in answers}) == 1
    states = sorted(state for _, state in answers)
    assert states.count("miss") == 1 and states.count("hit") == 99
    assert health(gateway)["plugins"]["cache"]["coalesced"] >= 90


def test_a_stream_does_not_wait_for_the_same_request_answered_whole(
        gateway: ServerThread, ollama_sim: Sim) -> None:
    """The second of two identical streams waited for the first one's answer to be whole,
    and got it all at once at its end (its first token 2.7 s late, not 0.02 s)."""
    ollama_sim.fault(MODEL, tokens_per_s=10)  # 28 tokens: about 3 s an answer

    async def first_token_after(delay: float) -> float:
        await asyncio.sleep(delay)
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x",
                                      max_retries=0, timeout=30) as client:
            started = time.monotonic()
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Stream it twice."}],
                temperature=0, stream=True)
            took = 0.0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and not took:
                    took = time.monotonic() - started
            return took

    async def both() -> list[float]:
        return await asyncio.gather(first_token_after(0.0), first_token_after(0.3))

    leader, follower = asyncio.run(both())
    assert leader < 1.0 and follower < 1.0, (leader, follower)


def test_identical_streams_at_once_are_answered_from_what_is_stored(
        gateway: ServerThread, ollama_sim: Sim) -> None:
    """(A first version of the stream fix let the streams that found the question in flight
    skip the store too: 38 of 40 went to the model, and their writes overran Redis.)"""
    async def one(client: openai.AsyncOpenAI) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Same question."}],
            temperature=0, stream=True)
        async for _ in raw.parse():
            pass
        return raw.headers["x-gateway-cache"]

    async def rounds() -> list[str]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x",
                                      max_retries=0, timeout=30) as client:
            assert await one(client) == "miss"
            ollama_sim.clear()
            return list(await asyncio.gather(*(one(client) for _ in range(30))))

    states = asyncio.run(rounds())
    # On a loaded machine a lookup may outlast the store's bounded wait (50 ms): that
    # request goes to the model, and is counted a store error. No other one may.
    misses = states.count("miss")
    assert states.count("hit") + misses == 30, states
    assert misses <= health(gateway)["plugins"]["cache"].get("store_errors", 0), states
    assert upstream_calls(ollama_sim) == misses


def test_a_stalled_redis_costs_a_bounded_wait(gateway: ServerThread, ollama_sim: Sim,
                                              redis_server: RedisServer) -> None:
    ask(gateway, "Is Redis single-threaded?")
    sleeper = threading.Thread(target=redis_server.command, args=("DEBUG", "SLEEP", "1.5"))
    sleeper.start()
    try:
        time.sleep(0.1)  # Redis is now asleep, answering no one
        started = time.monotonic()
        text, state = ask(gateway, "Is Redis single-threaded?")
        took = time.monotonic() - started
    finally:
        sleeper.join()
    assert state == "miss" and text  # answered by the model instead
    assert took < 1.0, f"the request waited {took:.2f}s on a stalled Redis"
    assert health(gateway)["plugins"]["cache"]["store_errors"] >= 1


def test_redis_killed_under_load_fails_no_request_and_caching_resumes(ollama_sim: Sim) -> None:
    with RedisServer() as redis_server:
        server = cached_gateway(ollama_sim, redis_server)
        try:
            results: list[tuple[int, str]] = []

            async def load(seconds: float) -> None:
                async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                              max_retries=0, timeout=30) as client:
                    stop = time.monotonic() + seconds

                    async def worker(n: int) -> None:
                        i = 0
                        while time.monotonic() < stop:
                            i += 1
                            try:
                                raw = await client.chat.completions.with_raw_response.create(
                                    model=MODEL, temperature=0, messages=[
                                        {"role": "user", "content": f"Question {i % 7}"}])
                                raw.parse()
                                results.append((raw.status_code, raw.headers["x-gateway-cache"]))
                            except openai.APIError as exc:
                                results.append((getattr(exc, "status_code", 0) or 0, str(exc)))
                    await asyncio.gather(*(worker(n) for n in range(8)))

            runner = threading.Thread(target=asyncio.run, args=(load(3.0),))
            runner.start()
            time.sleep(1.0)
            port = redis_server.port
            redis_server.kill()
            killed_at = len(results)
            runner.join()
            assert len(results) > killed_at + 10, "the load did not go on after the kill"
            failures = [r for r in results if r[0] != 200]
            assert not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
            assert health(server)["plugins"]["cache"]["store_errors"] >= 1

            # Redis comes back (empty, on the same port): answers are kept and served again.
            revived = RedisServer(port).start()
            try:
                def resumed() -> bool:
                    ask(server, "After the outage")
                    return ask(server, "After the outage")[1] == "hit"
                wait_until(resumed, 10, "caching to resume")
                assert revived.keys("gw:cache:*") >= 1
            finally:
                revived.kill()
        finally:
            server.stop()


def test_when_the_first_of_identical_requests_fails_the_others_do_not_wait_on_it(
        gateway: ServerThread, ollama_sim: Sim) -> None:
    ollama_sim.fault(MODEL, status=500, latency=0.3)

    async def burst() -> list[int]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x",
                                      max_retries=0, timeout=30) as client:
            async def one() -> int:
                try:
                    await client.chat.completions.create(
                        model=MODEL, temperature=0,
                        messages=[{"role": "user", "content": "Doomed question"}])
                    return 200
                except openai.APIStatusError as exc:
                    return exc.status_code
            return await asyncio.gather(*(one() for _ in range(10)))

    started = time.monotonic()
    statuses = asyncio.run(burst())
    assert set(statuses) == {502}
    assert time.monotonic() - started < 10  # each asked on its own, none waited for a leader


async def test_a_connection_redis_closed_while_idle_is_no_redis_down(
        redis_server: RedisServer) -> None:
    """Redis closes a client's idle connections (its ``timeout``, set on most managed
    Redis; and all of them as it restarts): the first call after an idle spell failed on
    the closed one, and the gateway took Redis for down: a cache miss, a stored response
    lost, and with ``on_redis_down = "closed"`` a second of 503s to every keyed request.
    """
    redis_server.command("CONFIG", "SET", "timeout", "1")
    store, link = RedisStore(redis_server.url, 1.0, 4, "cache"), Link(redis_server.url, 1.0, 4)
    await store.start()
    await link.start()
    try:
        await store.set("k", b"v", 60)
        await link.call(lambda: link.client.set("t", b"1"))
        await asyncio.sleep(2.5)  # (Redis looks for idle clients every 100 ms or so)
        assert await store.get("k") == b"v"
        assert await link.call(lambda: link.client.get("t")) == b"1"
    finally:
        await store.close()
        await link.close()
        redis_server.command("CONFIG", "SET", "timeout", "0")  # (the module's server)


async def test_a_stalled_redis_is_not_asked_twice_per_call(redis_server: RedisServer) -> None:
    """A command that timed out was sent again: each call on a stalled Redis waited
    twice the store's bound."""
    store = RedisStore(redis_server.url, 0.5, 4, "cache")
    await store.start()
    sleeper = threading.Thread(target=redis_server.command, args=("DEBUG", "SLEEP", "2"))
    sleeper.start()
    try:
        await asyncio.sleep(0.2)  # Redis is now asleep, answering no one
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get("k")
        took = time.monotonic() - began
    finally:
        await asyncio.to_thread(sleeper.join)
        await store.close()
    assert took < 0.8, f"waited {took:.2f} s"
