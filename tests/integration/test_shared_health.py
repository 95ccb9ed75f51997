"""Health shared through Redis (``[routing] redis_url``): two gateway processes on one
Redis (its own redis-server), the Ollama simulators as the fleet. A breaker one opens keeps
traffic off that deployment in the other before the other has sent it anything; a backend
one finds down is avoided by the other at once, and the other, probing it itself, gives it
its traffic back when it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.keys import HEALTH, ROUTER
from gateway.monitor import claims
from gateway.monitor.claims import AlertClaims
from gateway.monitor.sinks import Notice
from tests.integration.conftest import Fleet, fleet_config
from tests.integration.test_failover import ask, complete
from tests.redis_peer import RedisCluster, RedisServer
from tests.support import (
    GATEWAY,
    ServerThread,
    free_port,
    start_gateway,
    wait_ready,
    wait_until,
)

MODEL = "qwen2.5-coder:32b"  # on both the primary and the secondary host
ROOT = Path(__file__).resolve().parents[2]


def breaker(server: ServerThread, backend: str) -> str | None:
    report = server.call(lambda: server.app[ROUTER].balancer.report())  # type: ignore[index]
    state: dict[str, str] | None = report.get(f"{backend}/{MODEL}")
    return state["breaker"] if state else None


def checked(server: ServerThread) -> bool:
    up = server.call(lambda: dict(server.app[HEALTH].up))  # type: ignore[index]
    return up["primary"] is True and up["secondary"] is True


def is_down(server: ServerThread, backend: str) -> bool:
    return bool(server.call(
        lambda: server.app[ROUTER].balancer.is_down(backend)))  # type: ignore[index]


@contextlib.contextmanager
def breaking_pair(fleet: Fleet, redis_url: str) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two gateway processes on one Redis, quick to open a breaker and slow to retry it;
    both stopped after.
    """
    started: list[ServerThread] = []
    try:
        for _ in range(2):
            started.append(start_gateway(fleet_config(
                fleet, redis_url=redis_url, retries=0,
                breaker={"failures": 2, "cooldown": 30.0})))
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


async def open_breaker(server: ServerThread) -> None:
    """Requests through ``server`` until its breaker for the failing primary opens (each
    fails over to the secondary host, and is answered).
    """
    for _ in range(6):
        complete(await ask(server, MODEL))
        if breaker(server, "primary") == "open":
            break
    assert breaker(server, "primary") == "open"


async def test_a_breaker_opened_in_one_process_keeps_traffic_off_in_the_other(
    fleet: Fleet
) -> None:
    fleet.primary.fault(MODEL, status=500)  # every answer from the primary host fails
    with RedisServer() as redis, breaking_pair(fleet, redis.url) as (one, two):
        await open_breaker(one)
        # (two has not had a single request yet)
        wait_until(lambda: breaker(two, "primary") == "open", 5,
                   "the other process hearing of the open breaker")
        fleet.primary.clear()  # (its request log; the primary answers well again)
        fleet.primary.fault(MODEL, status=500)
        for _ in range(8):
            complete(await ask(two, MODEL))
        assert fleet.primary.requests("/api/chat") == []  # not one tried there


async def test_a_rest_one_process_is_asked_for_is_kept_by_the_other(fleet: Fleet) -> None:
    """A 429 with ``Retry-After: 30`` through one process: the other sent its next request
    there all the same, and each worker of ``--workers N`` had its own 429 to find."""
    fleet.primary.fault(MODEL, status=429, retry_after=30)
    with RedisServer() as redis, breaking_pair(fleet, redis.url) as (one, two):
        for _ in range(4):  # (until one tries the primary host: the balancer picks)
            complete(await ask(one, MODEL))
            if fleet.primary.requests("/api/chat"):
                break
        assert fleet.primary.requests("/api/chat"), "the primary host was never tried"
        wait_until(lambda: "rate_limited_s" in two.call(
            lambda: two.app[ROUTER].balancer.report()).get(f"primary/{MODEL}", {}),  # type: ignore[index]
            5, "the other process hearing of the rest")
        fleet.primary.clear()
        for _ in range(6):
            complete(await ask(two, MODEL))
        assert fleet.primary.requests("/api/chat") == []  # not one tried there


async def test_a_backend_one_process_finds_down_is_avoided_by_the_other_until_it_answers(
    fleet: Fleet
) -> None:
    with RedisServer() as redis:
        one, two = (start_gateway(fleet_config(fleet, redis_url=redis.url, health_interval=0.5))
                    for _ in range(2))
        try:
            for server in (one, two):  # both have checked every backend once
                wait_until(lambda s=server: checked(s), 10, "the first health checks")
            # One process loses the primary host (its tunnel drops, say): the other one,
            # which still reaches it, takes it out of rotation too...
            one.call(lambda: one.app[HEALTH].lost("primary", "its tunnel dropped"))  # type: ignore[index]
            wait_until(lambda: is_down(two, "primary"), 5,
                       "the other process hearing the backend is down")
            # ...then probes it itself, finds it answering, and gives it its traffic back
            # (and says so, so the first one probes it again too).
            wait_until(lambda: not is_down(two, "primary"), 10, "the other process's probe")
            wait_until(lambda: not is_down(one, "primary"), 10, "the first process's probe")
            await asyncio.gather(*(ask(two, MODEL) for _ in range(4)))
        finally:
            one.stop()
            two.stop()


async def test_sharing_goes_on_after_redis_restarts(fleet: Fleet) -> None:
    fleet.primary.fault(MODEL, status=500)
    with RedisServer() as redis, breaking_pair(fleet, redis.url) as (one, two):
        redis.restart()  # both lose their connections (and Redis what it held)
        await open_breaker(one)
        wait_until(lambda: breaker(two, "primary") == "open", 15,
                   "the other process hearing of it once both are back on Redis")


async def test_breakers_are_shared_on_a_redis_cluster(fleet: Fleet) -> None:
    fleet.primary.fault(MODEL, status=500)
    with RedisCluster() as cluster, breaking_pair(fleet, cluster.url) as (one, two):
        await open_breaker(one)
        wait_until(lambda: breaker(two, "primary") == "open", 5,
                   "the other process hearing of it through the cluster")


def test_an_alert_seen_by_several_processes_is_announced_once_and_ended_by_the_last() -> None:
    """Two processes on one Redis each judge the rules on what they see (their tunnels,
    their traffic). The first to see an alert announces it; the other's notice is not sent;
    it ends for the sinks only when the last that saw it sees it end; and a process that
    stopped saying so drops out. While Redis is away, each sends its own.
    """
    def notice(status: str) -> Notice:
        return Notice(status, "error_rate", "error_rate", "gpu-box", "warning", "errors", 0.0)

    async def scenario(url: str) -> list[bool]:
        first, second = AlertClaims(url, "gw"), AlertClaims(url, "gw")
        try:
            said = [await first(notice("firing")), await second(notice("firing"))]
            await second.keep([("error_rate", "gpu-box")])
            said += [await first(notice("resolved")),  # the second still sees it
                     await second(notice("resolved"))]
            said.append(await first(notice("firing")))  # it starts again
            return said
        finally:
            await first.close()
            await second.close()

    with RedisServer() as redis:
        assert asyncio.run(scenario(redis.url)) == [True, False, False, True, True]
    # Redis away: a notice twice rather than none.
    assert asyncio.run(scenario(f"redis://127.0.0.1:{free_port()}/0")) == [True] * 5


def alert(status: str) -> Notice:
    return Notice(status, "backend_down", "backend_down", "studio", "warning", "down", 0.0)


def test_an_alert_still_ends_for_the_sinks_after_a_watcher_stopped_or_died(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The end was held back for ever by a watcher no longer there: one that stopped (a
    worker restarted) until it dropped out, and after that by nobody asking again.
    """
    monkeypatch.setattr(claims, "WATCH_SECONDS", 1)  # (a watcher that said nothing drops out)

    async def scenario(url: str) -> list[Any]:
        one, two, three = AlertClaims(url, "gw"), AlertClaims(url, "gw"), AlertClaims(url, "gw")
        try:
            said: list[Any] = [await one(alert("firing")), await two(alert("firing"))]
            await one.close()  # stopped: it watches no more
            said.append(await two(alert("resolved")))
            said += [await two(alert("firing")), await three(alert("firing"))]
            await three.keep([(alert("firing").rule, "studio")])
            await three._forget()  # died: it says nothing from now on
            said.append(await two(alert("resolved")))  # (three watches, as far as Redis knows)
            said.append(await two.keep([]))
            for _ in range(10):  # two asks every round (here 0.3 s) until three drops out
                await asyncio.sleep(0.3)
                if due := await two.keep([]):
                    said.append([n.status for n in due])
                    break
            said.append(await two.keep([]))  # once
            return said
        finally:
            for claims in (one, two, three):
                await claims.close()

    with RedisServer() as redis:
        assert asyncio.run(scenario(redis.url)) == [
            True, False, True, True, False, False, [], ["resolved"], []]


def test_two_watchers_ending_one_after_the_other_send_one_end() -> None:
    async def scenario(url: str) -> list[Any]:
        one, two = AlertClaims(url, "gw"), AlertClaims(url, "gw")
        try:
            said: list[Any] = [await one(alert("firing")), await two(alert("firing"))]
            said += [await one(alert("resolved")), await two(alert("resolved"))]
            said += [await one.keep([]), await two.keep([])]
            return said
        finally:
            await one.close()
            await two.close()

    with RedisServer() as redis:
        assert asyncio.run(scenario(redis.url)) == [True, False, False, True, [], []]


def test_an_alert_announced_while_redis_was_away_or_forgot_it_is_ended() -> None:
    """The end of what Redis never knew of (redis_down itself: its firing went out while
    Redis was away), or lost (restarted without its data), was never sent.
    """
    async def scenario(redis: RedisServer) -> list[Any]:
        claims = AlertClaims(redis.url, "gw")
        try:
            redis.kill()
            said: list[Any] = [await claims(alert("firing"))]  # (away: sent)
            redis.start()
            said.append(await claims(alert("resolved")))
            said.append(await claims(alert("firing")))
            redis.restart()  # (no persistence: what it knew is gone)
            for _ in range(2):  # (rounds: the first finds its connection closed)
                said.append(await claims.keep([("backend_down", "studio")]))
            said.append(await claims(alert("resolved")))
            return said
        finally:
            await claims.close()

    with RedisServer() as redis:
        assert asyncio.run(scenario(redis)) == [True, True, True, [], [], True]


def test_alert_claims_find_a_cluster_that_was_away_at_their_first_call() -> None:
    async def scenario(cluster: RedisCluster) -> list[bool]:
        claims = AlertClaims(cluster.nodes[0].url, "gw")
        firing = Notice("firing", "tunnel_down", "tunnel_down", "studio", "critical", "down",
                        0.0)
        try:
            cluster.nodes[0].kill()
            said = [await claims(firing)]  # (away: sent)
            cluster.nodes[0].restart()
            cluster.wait_ok(40)
            said.append(await claims(firing))
            said.append(await claims(firing))  # announced already
            return said
        finally:
            await claims.close()

    with RedisCluster() as cluster:
        assert asyncio.run(scenario(cluster)) == [True, True, False]


async def test_sharing_goes_on_for_a_redis_user_that_may_not_ask_the_time(
        fleet: Fleet) -> None:
    """Asking Redis's time (TIME, of ACL category @fast) failed for a user given only what
    sharing needs, and the listener tried again for ever: no process heard the others.
    """
    fleet.primary.fault(MODEL, status=500)
    with RedisServer() as redis:
        redis.command("ACL", "SETUSER", "gateway", "on", ">secret-of-the-test", "~*", "&*",
                      "+@read", "+@write", "+@pubsub", "+@connection")
        url = f"redis://gateway:secret-of-the-test@127.0.0.1:{redis.port}/0"
        with breaking_pair(fleet, url) as (one, two):
            await open_breaker(one)
            wait_until(lambda: breaker(two, "primary") == "open", 5,
                       "the other process hearing of the open breaker")


def other_host(fleet: Fleet, redis_url: str, folder: Path, skew: float
               ) -> tuple[subprocess.Popen[str], int]:
    """A gateway process whose wall clock runs ``skew`` seconds ahead (as another host's
    may), on the same Redis and fleet as ``breaking_pair``'s, and its port.
    """
    skewed = folder / "skewed"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(
        f"import time\n_real = time.time\ntime.time = lambda: _real() + {skew}\n")
    port = free_port()
    config = folder / "other-host.toml"
    config.write_text(
        f'[server]\nport = {port}\n[tasks]\ndata_dir = "{folder / "data"}"\n'
        f'[routing]\nredis_url = "{redis_url}"\nretries = 0\n'
        '[routing.breaker]\nfailures = 2\ncooldown = 30.0\n' + "".join(
            f'[[backends]]\nname = "{name}"\nkind = "ollama"\nurl = "{sim.api_url}"\n'
            for name, sim in (("primary", fleet.primary), ("secondary", fleet.secondary))))
    process = subprocess.Popen(
        [*GATEWAY, "--log-level", "warning", "serve", "--config", str(config)],
        env={**os.environ, "PYTHONPATH": str(skewed)}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    wait_ready(f"http://127.0.0.1:{port}/health", process)
    return process, port


async def test_a_host_whose_clock_is_off_still_hears_of_a_breaker_opened_elsewhere(
        fleet: Fleet, tmp_path: Path) -> None:
    """Each change was stamped with its sender's clock and aged by the hearer's: a host
    whose clock ran 40 s ahead took a breaker opened elsewhere a moment ago for one whose
    30 s cool-down was over, and kept sending the failing deployment traffic.
    """
    fleet.primary.fault(MODEL, status=500)
    with RedisServer() as redis:
        other, port = other_host(fleet, redis.url, tmp_path, 40.0)
        try:
            with breaking_pair(fleet, redis.url) as (one, _):
                await open_breaker(one)

                def heard() -> bool:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                timeout=5) as response:
                        body = json.loads(response.read())
                    state = body.get("deployments", {}).get(f"primary/{MODEL}") or {}
                    return state.get("breaker") == "open"

                wait_until(heard, 5, "the host whose clock is off hearing of it")
        finally:
            other.terminate()
            other.wait(timeout=30)
