"""Keys and limits shared by several gateway processes through one real Redis (the tests'
own): together they allow a key's rate once, not once each; a key revoked through one is
refused by the other within a second; when Redis dies or stalls, requests wait no longer
than the configured bound, limits fall back as configured, and shared counting comes back
with Redis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client

from gateway.tenants.keys import issue as issue_record
from tests.redis_peer import RedisServer
from tests.support import GATEWAY, GatewayProcess, Sim, wait_until

ADMIN = "gw-admin-key-of-the-shared-tests"
MODEL = "qwq:32b"


def config_file(path: Path, redis: RedisServer, ollama: Sim, *, on_down: str = "open",
                timeout: float = 0.5, keys: str = "") -> Path:
    path.write_text(f"""
[server]
host = "127.0.0.1"
shutdown_grace = 2.0

[auth]
admin_key_hashes = ["{hashlib.sha256(ADMIN.encode()).hexdigest()}"]

[tenants]
store = "redis"
redis_url = "{redis.url}"
on_redis_down = "{on_down}"
timeout = {timeout}

[[backends]]
name = "ollama"
kind = "ollama"
url = "{ollama.api_url}"
{keys}
""")
    return path


def config_key(name: str, **settings: int) -> str:
    """A ``[[keys]]`` block (the key's secret is ``secret(name)``)."""
    lines = [f'id = "{name}"', f'hash = "{hashlib.sha256(secret(name).encode()).hexdigest()}"']
    lines += [f"{k} = {v}" for k, v in settings.items()]
    return "\n[[keys]]\n" + "\n".join(lines) + "\n"


def secret(name: str) -> str:
    return f"gw-shared-test-{name}-0123456789"


def call(url: str, path: str, key: str, body: Any = None, method: str | None = None
         ) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def chat(url: str, key: str, max_tokens: int | None = None) -> tuple[int, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    status, _, answer = call(url, "/v1/chat/completions", key, body)
    return status, answer


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def pair(tmp_path: Path, redis: RedisServer, ollama_sim: Sim
         ) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    config = config_file(tmp_path / "shared.toml", redis, ollama_sim)
    first = GatewayProcess(config)
    try:
        second = GatewayProcess(config)
    except BaseException:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def issue(gateway: GatewayProcess, **settings: Any) -> dict[str, Any]:
    status, _, issued = call(gateway.url, "/admin/keys", ADMIN, settings)
    assert status == 201, issued
    return issued  # type: ignore[no-any-return]


def hammer(targets: list[str], key: str, count: int, max_tokens: int | None = None
           ) -> tuple[list[tuple[int, Any]], float]:
    """``count`` chat requests spread over the gateways, eight at a time."""
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda i: chat(targets[i % len(targets)], key, max_tokens),
                                 range(count)))
    return outcomes, time.monotonic() - started


def test_two_processes_allow_a_keys_requests_per_minute_once_not_twice(
        pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    first, second = pair
    issued = issue(first, name="shared", rpm=60)
    outcomes, took = hammer([first.url, second.url], issued["key"], 150)
    served = sum(1 for status, _ in outcomes if status == 200)
    refused = [answer for status, answer in outcomes if status == 429]
    assert served + len(refused) == 150
    # 60 at once, plus one a second for each second the test ran (the bucket refills).
    assert 60 <= served <= 60 + math.ceil(took) + 1, (served, took)
    assert all(r["error"]["code"] == "requests_limit_exceeded" for r in refused)


def test_what_a_key_has_left_is_shown_by_every_process_and_listing_models_is_free(
        pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    first, second = pair
    issued = issue(first, name="lister", rpm=3)

    def left(gateway: GatewayProcess) -> str:
        status, headers, listed = call(gateway.url, "/v1/models", issued["key"])
        assert status == 200 and listed["data"]
        return headers["x-ratelimit-remaining-requests"]

    assert [left(gateway) for _ in range(3) for gateway in pair] == ["3"] * 6  # looks only
    assert chat(second.url, issued["key"])[0] == 200
    assert [left(first), left(second)] == ["2", "2"]  # (20 s to refill one)


def test_two_processes_allow_a_keys_tokens_per_minute_once_not_twice(
        pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    first, second = pair
    issued = issue(first, name="tokens", tpm=3000)
    outcomes, took = hammer([first.url, second.url], issued["key"], 200, max_tokens=20)
    used = sum(answer["usage"]["total_tokens"] for status, answer in outcomes if status == 200)
    refused = [answer for status, answer in outcomes if status == 429]
    assert refused and all(r["error"]["code"] == "tokens_limit_exceeded" for r in refused)
    # The tokens used add up to the minute's 3,000 (and what refilled: 50 a second), not
    # 6,000; up to eight answers in flight may each go past their estimate.
    refill = 50 * took
    assert 2500 <= used <= 3000 + refill + 8 * 40, (used, took)


def test_a_key_revoked_through_one_process_stops_on_the_other_within_a_second(
        pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    first, second = pair
    issued = issue(first, name="leaving")
    assert chat(second.url, issued["key"])[0] == 200  # the second process knows it
    status, _, shown = call(first.url, f"/admin/keys/{issued['id']}", ADMIN, method="DELETE")
    assert status == 200 and shown["revoked"] is True
    took = wait_until(lambda: chat(second.url, issued["key"])[0] == 401, 1.0,
                      "the other process refusing the revoked key")
    status, answer = chat(second.url, issued["key"])
    assert status == 401 and answer["error"]["code"] == "revoked_api_key"
    assert chat(first.url, issued["key"])[0] == 401
    assert took < 1.0


def test_the_admin_api_changes_a_keys_limits_for_every_process(
        pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    first, second = pair
    issued = issue(first, name="growing", rpm=2, models=[MODEL])
    assert [chat(second.url, issued["key"])[0] for _ in range(3)] == [200, 200, 429]
    status, _, changed = call(second.url, f"/admin/keys/{issued['id']}", ADMIN,
                              {"rpm": 100}, method="PATCH")
    assert status == 200 and changed["rpm"] == 100 and changed["models"] == [MODEL]
    wait_until(lambda: chat(first.url, issued["key"])[0] == 200, 1.0, "the new limit")
    status, _, listing = call(first.url, "/admin/keys", ADMIN)
    assert {k["id"]: k["rpm"] for k in listing["data"]}[issued["id"]] == 100
    status, _, error = call(first.url, f"/admin/keys/{issued['id']}", ADMIN,
                            {"rpm": True}, method="PATCH")
    assert status == 400 and "rpm: expected an integer" in error["error"]["message"]
    status, _, error = call(first.url, f"/admin/keys/{issued['id']}", ADMIN,
                            {"hash": "0" * 64}, method="PATCH")
    assert status == 400 and "hash: cannot be changed" in error["error"]["message"]
    status, _, error = call(first.url, "/admin/keys", ADMIN, {"id": issued["id"]})
    assert status == 409 and error["error"]["code"] == "key_exists"
    status, _, error = call(first.url, "/admin/keys", ADMIN, {"expires": 1_600_000_000})
    assert status == 400 and "2020-09-13T12:26:40Z is past" in error["error"]["message"]
    for models in ("qwq:32b", 5, None, {"a": 1}):  # a list of names, or nothing changes
        status, _, error = call(first.url, f"/admin/keys/{issued['id']}", ADMIN,
                                {"models": models}, method="PATCH")
        assert status == 400 and "models: expected a list" in error["error"]["message"]
    status, _, error = call(first.url, f"/admin/keys/{issued['id']}", ADMIN, [1],
                            method="PATCH")
    assert status == 400
    assert call(first.url, f"/admin/keys/{issued['id']}", ADMIN)[2]["models"] == [MODEL]


def test_the_keys_command_manages_keys_every_process_sees(
        pair: tuple[GatewayProcess, GatewayProcess], tmp_path: Path) -> None:
    first, second = pair
    config = str(tmp_path / "shared.toml")

    def keys(*args: str) -> str:
        return subprocess.run([*GATEWAY, "keys", *args, "--config", config],
                              capture_output=True, text=True, timeout=30, check=True).stdout

    printed = keys("new", "--id", "cli-made", "--name", "made by hand", "--rpm", "1")
    key = printed.split()[1]
    assert [chat(u, key)[0] for u in (first.url, second.url)] == [200, 429]
    keys("set", "cli-made", "--rpm", "50")
    wait_until(lambda: chat(second.url, key)[0] == 200, 1.0, "the changed limit")
    row = next(line for line in keys("list").splitlines() if line.startswith("cli-made"))
    assert "made by hand" in row and "redis" in row and "rpm 50" in row
    keys("revoke", "cli-made")
    wait_until(lambda: chat(first.url, key)[0] == 401, 1.0, "the revoked key refused")
    assert keys("list").splitlines()[-1].endswith("revoked")


def test_a_slot_redis_could_not_be_told_of_is_given_back_when_it_answers(
        tmp_path: Path, redis: RedisServer, ollama_sim: Sim) -> None:
    """A request ends while Redis stalls: its slot (one request at once) is not held for
    good, but given back once Redis answers again."""
    config = config_file(tmp_path / "slots.toml", redis, ollama_sim, timeout=0.1,
                         keys=config_key("single", concurrency=1))
    gateway = GatewayProcess(config)
    try:
        ollama_sim.fault(MODEL, ttft=0.6)
        answered: list[int] = []
        slow = threading.Thread(target=lambda: answered.append(
            chat(gateway.url, secret("single"))[0]))
        slow.start()
        time.sleep(0.3)  # admitted: its slot is in Redis
        stall = threading.Thread(target=redis.command, args=("DEBUG", "SLEEP", "1.5"))
        stall.start()  # the answer ends while Redis stalls: it cannot be told
        slow.join(timeout=10)
        stall.join(timeout=10)
        assert answered == [200]
        ollama_sim.clear()
        time.sleep(1.2)  # Redis answers again, and the process asks it again
        assert redis.command("ZCARD", "gw:rl:{single}:leases") in (b":0", b":1")
        wait_until(lambda: redis.command("ZCARD", "gw:rl:{single}:leases") == b":0", 3,
                   "the slot given back")
        assert [chat(gateway.url, secret("single"))[0] for _ in range(3)] == [200] * 3
    finally:
        gateway.stop()


def test_keys_in_redis_keep_working_while_it_is_away(
        pair: tuple[GatewayProcess, GatewayProcess], redis: RedisServer) -> None:
    """Even after a spray of made-up keys (which emptied what the process remembered of
    the keys it knows as well)."""
    first, _ = pair
    issued = issue(first, name="steady")
    assert chat(first.url, issued["key"])[0] == 200
    with ThreadPoolExecutor(8) as pool:
        refused = set(pool.map(lambda i: chat(first.url, f"sk-made-up-{i}")[0], range(1100)))
    assert refused == {401}
    redis.kill()
    time.sleep(0.6)  # past the half second a process trusts what it read
    assert [chat(first.url, issued["key"])[0] for _ in range(3)] == [200] * 3
    status, _, error = call(first.url, "/admin/keys", ADMIN, {"name": "now"})
    assert status == 503 and error["error"]["code"] == "key_store_unavailable"


def test_keys_on_a_plain_redis_stay_where_earlier_versions_keep_them(
        tmp_path: Path, redis: RedisServer, ollama_sim: Sim) -> None:
    """On a plain Redis, keys stay in ``gw:keys`` and ``gw:keys:by-digest`` (only a cluster
    needs them under one hash tag): one written by an earlier version works, and one issued
    now is where processes of that version, still running beside, look for it.
    """
    key, record = issue_record({"id": "from-before", "rpm": 100}, "test")
    old = redis_client.Redis(port=redis.port)
    old.hset("gw:keys", record.id, json.dumps(dataclasses.asdict(record)))
    old.hset("gw:keys:by-digest", record.hash, record.id)
    gateway = GatewayProcess(config_file(tmp_path / "upgrade.toml", redis, ollama_sim))
    try:
        assert chat(gateway.url, key)[0] == 200
        issued = issue(gateway, id="from-now")
        assert sorted(old.hkeys("gw:keys")) == [b"from-before", b"from-now"]
        assert old.hget("gw:keys:by-digest", hashlib.sha256(issued["key"].encode())
                        .hexdigest()) == b"from-now"
    finally:
        gateway.stop()
        old.close()


def load(url: str, key: str, stop: threading.Event, record: list[tuple[float, int, float]]
         ) -> None:
    while not stop.is_set():
        started = time.monotonic()
        status, _ = chat(url, key)
        record.append((started, status, time.monotonic() - started))


def test_redis_dying_mid_load_keeps_latency_bounded_and_limits_fall_back(
        tmp_path: Path, redis: RedisServer, ollama_sim: Sim) -> None:
    """``open``: while Redis is away, each process counts alone; shared again after."""
    keys = config_key("busy", rpm=1_000_000) + config_key("few", rpm=4)
    config = config_file(tmp_path / "open.toml", redis, ollama_sim, timeout=0.1, keys=keys)
    first, second = GatewayProcess(config), GatewayProcess(config)
    stop = threading.Event()
    record: list[tuple[float, int, float]] = []
    loaders = [threading.Thread(target=load, args=(g.url, secret("busy"), stop, record))
               for g in (first, second, first, second)]
    try:
        for thread in loaders:
            thread.start()
        wait_until(lambda: len(record) > 40, 20, "the load to get going")
        assert redis.keys("gw:rl:*") > 0  # counted in Redis
        redis.kill()
        killed = time.monotonic()
        time.sleep(1.5)
        # Each process counts alone: 4 a minute on each.
        few = [chat(g.url, secret("few"))[0] for g in (first, second) for _ in range(5)]
        assert few == [200] * 4 + [429] + [200] * 4 + [429]
        stalled_from = time.monotonic()
        redis.start()  # back (empty: a restart without persistence)
        wait_until(lambda: redis.keys("gw:rl:*") > 0, 10, "counting in Redis again")
        time.sleep(1.2)  # each process's quiet second has passed: both count in Redis
        back = [chat(g.url, secret("few"))[0] for g in (first, second) for _ in range(3)]
        assert back.count(200) == 4, back  # 4 a minute for both together, again
        # Redis stalls (alive, but answering nothing for 3 s): waits stay bounded too.
        stalled = time.monotonic()
        redis.command("DEBUG", "SLEEP", "3")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in loaders:
            thread.join(timeout=30)
        out = first.stop() + second.stop()
    assert "Traceback" not in out
    statuses = {status for _, status, _ in record}
    assert statuses == {200}, statuses
    before = sorted(took for at, _, took in record if at < killed)
    during = [took for at, _, took in record if killed <= at < stalled_from]
    stalling = [took for at, _, took in record if at >= stalled]
    assert during and stalling
    # A request never waits on Redis longer than the bound (0.1 s), however it fails.
    allowance = before[int(len(before) * 0.99)] + 0.1 + 0.25  # (a busy 2-core machine)
    assert max(during) < allowance, (max(during), allowance)
    assert max(stalling) < allowance, (max(stalling), allowance)


def test_failing_closed_refuses_quickly_while_redis_is_away(
        tmp_path: Path, redis: RedisServer, ollama_sim: Sim) -> None:
    keys = config_key("limited", rpm=100) + config_key("unlimited")
    config = config_file(tmp_path / "closed.toml", redis, ollama_sim, on_down="closed",
                         timeout=0.1, keys=keys)
    gateway = GatewayProcess(config)
    try:
        assert chat(gateway.url, secret("limited"))[0] == 200
        redis.kill()
        started = time.monotonic()
        status, headers, answer = call(gateway.url, "/v1/chat/completions",
                                       secret("limited"), {"model": MODEL, "messages": [
                                           {"role": "user", "content": "Hi"}]})
        assert time.monotonic() - started < 1.0
        assert status == 503 and answer["error"]["code"] == "limits_unavailable"
        assert headers["Retry-After"] == "1"
        assert chat(gateway.url, secret("unlimited"))[0] == 200  # nothing to count
        redis.start()
        wait_until(lambda: chat(gateway.url, secret("limited"))[0] == 200, 5,
                   "limits checked again")
    finally:
        gateway.stop()
