"""Load balancing between two hosts serving the same model, concurrency caps, and a host
that dies under load."""

from __future__ import annotations

import asyncio
import collections
import time

from gateway.keys import CATALOG, ROUTER
from gateway.sim import SimModel, create_ollama_app, create_openai_app
from tests.integration.conftest import Fleet, fleet_config
from tests.integration.test_failover import ask, complete
from tests.support import ServerThread, backend, gateway_config, start_gateway

MODEL = "qwen2.5-coder:32b"


def served_by(fleet: Fleet) -> collections.Counter[str]:
    return collections.Counter({"primary": len(fleet.primary.requests("/api/chat")),
                                "secondary": len(fleet.secondary.requests("/api/chat"))})


async def test_two_hosts_share_concurrent_load(fleet: Fleet) -> None:
    # Equal hosts, with a time to first token as real ones have (the latency the balancer
    # weighs; a simulator's bare millisecond would be the machine's noise alone).
    for host in (fleet.primary, fleet.secondary):
        host.fault(MODEL, tokens_per_s=100, ttft=0.05)
    gateway = start_gateway(fleet_config(fleet))
    try:
        replies = await asyncio.gather(*(ask(gateway, MODEL) for _ in range(24)))
    finally:
        gateway.stop()
    for reply in replies:
        complete(reply)
    counts = served_by(fleet)
    assert min(counts.values()) >= 6, counts  # both take a real share


async def test_a_slow_host_gets_little_traffic(fleet: Fleet) -> None:
    fleet.secondary.fault(MODEL, ttft=0.3)
    gateway = start_gateway(fleet_config(fleet))
    try:
        for _ in range(20):
            complete(await ask(gateway, MODEL))
    finally:
        gateway.stop()
    assert served_by(fleet)["secondary"] <= 2, served_by(fleet)


async def test_past_the_cap_and_the_queue_requests_get_429_with_retry_after(
    fleet: Fleet
) -> None:
    fleet.primary.fault("qwq:32b", tokens_per_s=20)  # ~1.5 s per answer
    gateway = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, max_concurrency=1, max_queue=1),
        routing={"tier_fallback": False, "queue_timeout": 5.0}))
    try:
        replies = await asyncio.gather(*(ask(gateway, "qwq:32b") for _ in range(3)))
    finally:
        gateway.stop()
    statuses = sorted(r.status for r in replies)
    assert statuses == [200, 200, 429], statuses
    [busy] = [r for r in replies if r.status == 429]
    assert busy.error is not None and busy.error["type"] == "rate_limit_error"
    assert int(busy.headers["Retry-After"]) >= 1
    # The two that were let in ran one after the other (each takes ~1.5 s), never together.
    starts = sorted(r["t"] for r in fleet.primary.requests("/api/chat"))
    assert len(starts) == 2 and starts[1] - starts[0] > 1.0


async def test_a_retry_under_a_cap_of_one_does_not_wait_for_its_own_slot(fleet: Fleet) -> None:
    fleet.primary.fault("qwq:32b", status=500, remaining=1)
    gateway = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, max_concurrency=1),
        routing={"tier_fallback": False, "queue_timeout": 3.0, "backoff_initial": 0.05}))
    try:
        started = asyncio.get_running_loop().time()
        reply = await ask(gateway, "qwq:32b")
    finally:
        gateway.stop()
    complete(reply)
    assert reply.headers["x-gateway-attempts"] == "2"
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_a_host_killed_under_load_fails_no_request(fleet: Fleet) -> None:
    for host in (fleet.primary, fleet.secondary):
        host.fault(MODEL, tokens_per_s=150)
    gateway = start_gateway(fleet_config(fleet))
    done = 0
    served_before_death = 0
    thirty_done = asyncio.Event()

    async def client(i: int) -> None:
        nonlocal done
        for j in range(10):
            reply = await ask(gateway, MODEL, stream=(i + j) % 2 == 0)
            complete(reply)
            done += 1
            if done == 30:
                thirty_done.set()

    async def killer() -> None:
        nonlocal served_before_death
        await thirty_done.wait()
        served_before_death = len(fleet.secondary.requests("/api/chat"))
        await asyncio.to_thread(fleet.threads["secondary"].stop)

    try:
        await asyncio.gather(killer(), *(client(i) for i in range(12)))
    finally:
        gateway.stop()
    assert done == 120
    assert served_before_death > 5  # it did take its share before it died


async def test_a_llamacpp_servers_slots_cap_what_it_is_sent() -> None:
    # llama.cpp runs as many requests at once as it has slots (its /props says how many) and
    # makes the rest wait inside, their wait counted in their time to first token.
    model = SimModel("smollm2:135m", ttft=0.4, tokens_per_s=400)
    upstream = ServerThread(lambda: create_openai_app([model], flavor="llamacpp",
                                                      slots=2)).start()
    gateway = start_gateway(gateway_config(  # as a user writes it: no limit configured
        backend("light", "openai", upstream.url + "/v1", tier="server",
                timeouts={"first_token": 1.0})))
    try:
        replies = await asyncio.gather(*(ask(gateway, "smollm2:135m", stream=True)
                                         for _ in range(8)))
        for reply in replies:  # 8 at once, 2 at a time: the last wait ~1.2 s in all
            complete(reply)
        deployment = gateway.app[CATALOG].deployments("smollm2:135m")[0]
        assert gateway.call(lambda: gateway.app[ROUTER].balancer.state(deployment).limit) == 2
        assert deployment.model.context_length == model.context_length  # its n_ctx, told
    finally:
        gateway.stop()
        upstream.stop()


async def test_ollamas_parallel_in_the_config_caps_what_it_is_sent(fleet: Fleet) -> None:
    fleet.primary.fault(MODEL, ttft=0.3)
    gateway = start_gateway(gateway_config(  # OLLAMA_NUM_PARALLEL=2 on that host
        backend("studio", "ollama", fleet.primary.api_url, parallel=2)))
    try:
        pending = [asyncio.ensure_future(ask(gateway, MODEL, stream=True)) for _ in range(5)]
        await asyncio.sleep(0.15)
        assert len(fleet.primary.requests("/api/chat")) == 2  # the rest wait in the gateway
        for reply in await asyncio.gather(*pending):
            complete(reply)
    finally:
        gateway.stop()


async def test_a_model_also_in_the_cloud_is_answered_there_only_when_its_host_cannot(
    fleet: Fleet
) -> None:
    """The cloud tier is the last resort, also for a model it serves under the same name:
    it took a share of the traffic (all of it, as its simulated latency was lower) while the
    workstation was up and idle.
    """
    cloud = ServerThread(lambda: create_openai_app([SimModel(MODEL)], flavor="openai")).start()
    gateway = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url),
        backend("cloud", "openai", cloud.url + "/v1", tier="cloud"),
        routing={"breaker": {"failures": 2, "cooldown": 30.0}}))
    try:
        for _ in range(12):
            reply = await ask(gateway, MODEL)
            complete(reply)
            assert reply.headers["x-gateway-backend"] == "primary"
        fleet.primary.fault(MODEL, status=500)  # the host fails: the cloud answers
        for _ in range(4):
            reply = await ask(gateway, MODEL)
            complete(reply)
            assert reply.headers["x-gateway-backend"] == "cloud"
    finally:
        gateway.stop()
        cloud.stop()


async def test_what_the_workstation_cannot_take_now_goes_to_the_cloud_not_its_queue(
    fleet: Fleet
) -> None:
    """A burst past the workstation's slots overflows to the model's cloud deployment at
    once, rather than waiting in the workstation's queue for up to ``queue_timeout``."""
    fleet.primary.fault(MODEL, ttft=1.0)
    cloud = ServerThread(lambda: create_openai_app([SimModel(MODEL)], flavor="openai")).start()
    gateway = start_gateway(gateway_config(
        backend("primary", "ollama", fleet.primary.api_url, max_concurrency=1),
        backend("cloud", "openai", cloud.url + "/v1", tier="cloud")))
    try:
        replies = await asyncio.gather(*(ask(gateway, MODEL) for _ in range(3)))
        for reply in replies:
            complete(reply)
        assert sorted(r.headers["x-gateway-backend"] for r in replies) == [
            "cloud", "cloud", "primary"]
    finally:
        gateway.stop()
        cloud.stop()


async def test_more_requests_than_connections_wait_in_line_and_open_no_breaker(
        fleet: Fleet) -> None:
    """A backend with 1 connection and no other limit, 4 streams at once: the 3 that
    waited for the connection did so inside their first-token limit, were 504s, and
    opened the breaker of a backend that answers well.
    """
    fleet.primary.fault(MODEL, ttft=0.4)
    gateway = start_gateway(gateway_config(
        backend("studio", "ollama", fleet.primary.api_url, max_connections=1,
                timeouts={"first_token": 1.0})))
    try:
        for reply in await asyncio.gather(*(ask(gateway, MODEL, stream=True)
                                            for _ in range(4))):
            complete(reply)
        deployment = gateway.app[CATALOG].deployments(MODEL)[0]
        assert gateway.call(lambda: gateway.app[ROUTER].balancer.state(deployment).limit) == 1
    finally:
        gateway.stop()


async def test_the_models_of_one_backend_share_its_connections_in_line(fleet: Fleet) -> None:
    """Two models on a backend with 1 connection, 2 streams of each at once: each model
    had the connection to itself by the gateway's count, so a stream of the one waited
    for the other's in the pool, inside its first-token limit: 504s, and the breaker of
    a backend that answers well opened.
    """
    for model in (MODEL, "qwq:32b"):
        fleet.primary.fault(model, ttft=0.6)
    gateway = start_gateway(gateway_config(
        backend("studio", "ollama", fleet.primary.api_url, max_connections=1,
                timeouts={"first_token": 1.0}),
        routing={"tier_fallback": False}))
    try:
        for reply in await asyncio.gather(*(ask(gateway, model, stream=True)
                                            for model in (MODEL, "qwq:32b") * 2)):
            complete(reply)
        report = gateway.call(gateway.app[ROUTER].balancer.report)
        assert [report[f"studio/{model}"]["breaker"] for model in (MODEL, "qwq:32b")] == [
            "closed", "closed"]
    finally:
        gateway.stop()


async def test_ollama_is_sent_one_request_a_model_at_once_unless_told_more() -> None:
    """Ollama answers OLLAMA_NUM_PARALLEL requests a model at once (1 unless set), the rest
    waiting unanswered in its queue: sent every request at once, those that waited there
    did so inside their first-token limit: 504s, and the breaker opened.
    """
    with ServerThread(lambda: create_ollama_app(
            [SimModel(MODEL, parallel=1, ttft=0.6, loaded=True)])) as ollama:
        gateway = start_gateway(gateway_config(
            backend("studio", "ollama", ollama.url, timeouts={"first_token": 1.0})))
        try:
            for reply in await asyncio.gather(*(ask(gateway, MODEL, stream=True)
                                                for _ in range(4))):
                complete(reply)
        finally:
            gateway.stop()


async def test_requests_in_line_behind_a_model_ollama_loads_wait_for_its_load() -> None:
    """Sent one at a time to a model Ollama had not loaded, those in line waited for the
    load in the gateway's line, whose patience (queue_timeout) was shorter than a cold
    model's allowance: 429s, where Ollama's own queue would have answered them.
    """
    with ServerThread(lambda: create_ollama_app([SimModel(
            MODEL, load_s=1.5, ttft=0.1, parallel=1)])) as ollama:
        gateway = start_gateway(gateway_config(
            backend("studio", "ollama", ollama.url,
                    timeouts={"first_token_cold": 4.0, "headers": 4.0}),
            routing={"queue_timeout": 1.0, "tier_fallback": False}))
        try:
            for reply in await asyncio.gather(*(ask(gateway, MODEL) for _ in range(3))):
                complete(reply)
        finally:
            gateway.stop()


async def test_behind_a_warm_model_the_line_waits_its_own_patience() -> None:
    """(The longer wait is a cold model's alone: behind one loaded, a request in line waits
    queue_timeout, as an operator who set it short, to spill to another tier, expects.)"""
    with ServerThread(lambda: create_ollama_app([SimModel(
            MODEL, loaded=True, ttft=0.1, tokens_per_s=5, parallel=1)])) as ollama:
        gateway = start_gateway(gateway_config(
            backend("studio", "ollama", ollama.url),
            routing={"queue_timeout": 0.5, "tier_fallback": False}))
        try:
            first = asyncio.ensure_future(ask(gateway, MODEL))
            await asyncio.sleep(0.3)
            began = time.monotonic()
            second = await ask(gateway, MODEL)
            took = time.monotonic() - began
            assert second.status == 429 and took < 3, (second.status, took)
            complete(await first)
        finally:
            gateway.stop()


async def test_a_backend_busy_with_every_connection_is_not_taken_for_down(
        fleet: Fleet) -> None:
    """Its connections all carrying long streams, the health probe waited for one, timed
    out, and the backend was marked down: its next requests were 503s.
    """
    fleet.primary.fault(MODEL, tokens_per_s=4)  # streams of some seconds
    gateway = start_gateway(gateway_config(
        backend("studio", "ollama", fleet.primary.api_url, max_connections=2,
                max_concurrency=2, timeouts={"connect": 0.5, "idle": 5.0}),
        routing={"health_interval": 0.5}))
    try:
        streams = [asyncio.ensure_future(ask(gateway, MODEL, stream=True)) for _ in range(2)]
        await asyncio.sleep(4.5)  # a healthy backend is probed every 2.5 s: at least one
        assert not gateway.call(lambda: gateway.app[ROUTER].balancer.is_down("studio"))
        for reply in await asyncio.gather(*streams):
            complete(reply)
    finally:
        gateway.stop()
