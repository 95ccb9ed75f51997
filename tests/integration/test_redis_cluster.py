"""What the gateway keeps in Redis, on a real Redis Cluster: three masters of the tests' own,
the gateway given the address of one of them. Each part finds out it is a cluster and sends
each key to the node that holds its slot (a plain client would be told MOVED for most keys),
and what one script or step touches shares one slot (no CROSSSLOT):

- the response cache: answers cached are hits, spread over the nodes;
- keys and their limits' counters: a key issued through one gateway works through another,
  the two allow its rate once, not once each, and its revocation reaches both;
- the Batch API's queue: a batch's lines are answered once each, and a batch is cancelled;
- a cluster away when the gateway started is found out once it answers;
- a cluster slower to learn than a call may wait for is learned all the same;
- a burst on one key waits for the cluster client's connections instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio
from redis.asyncio.cluster import NodesManager

from gateway.config import KeyConfig, LearnedConfig
from gateway.routing.features import DIMENSIONS
from gateway.routing.learned import LearnedOrder
from gateway.routing.learning_link import LearningLink
from gateway.store import Client, RedisStore, StoreUnavailable
from gateway.tasks.shared import RedisStore as TaskStore
from gateway.tenants.link import Link
from gateway.tenants.shared_limits import RedisLimits
from tests.redis_peer import RedisCluster
from tests.support import (
    GATEWAY,
    ServerThread,
    Sim,
    backend,
    gateway_config,
    openai_client,
    start_gateway,
    wait_until,
)

MODEL = "qwq:32b"
ADMIN = "gw-admin-key-of-the-cluster-tests"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as started:
        yield started


def test_the_cache_works_on_a_redis_cluster(ollama_sim: Sim, cluster: RedisCluster) -> None:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        plugins=[{"name": "cache", "options": {"backend": "redis",
                                               "redis_url": cluster.url}}]))
    client = openai_client(server.url)
    try:
        def ask(n: int) -> str:
            response = client.chat.completions.with_raw_response.create(
                model=MODEL, temperature=0,
                messages=[{"role": "user", "content": f"Question number {n}"}])
            return response.headers["x-gateway-cache"]

        assert [ask(n) for n in range(12)] == ["miss"] * 12
        assert [ask(n) for n in range(12)] == ["hit"] * 12
    finally:
        server.stop()
    held = [node.keys("gw:cache:*") for node in cluster.nodes]
    assert sum(held) >= 12 and sum(1 for keys in held if keys) >= 2, held


def test_a_cluster_slower_to_learn_than_a_call_may_wait_for_is_learned_all_the_same(
        cluster: RedisCluster) -> None:
    """Learning the nodes' slots takes several round trips, which on a loaded machine or a
    farther Redis is more than the cache's calls may wait (50 ms each). A call gives up; the
    learning goes on, and calls after it are answered, even while the node it learned from
    stalls. (A learning cancelled with its call started over at the next, and failed again.)
    """
    first = cluster.nodes[0]
    key = next(f"k{n}" for n in range(1000)
               if int(first.command("CLUSTER", "KEYSLOT", f"k{n}")[1:]) > 10922)  # (node 3)

    async def call(client: Client, within: float) -> None:
        async with asyncio.timeout(within):
            await client.find_out(within)
            await client.now.set(key, b"answered")

    async def scenario() -> None:
        client = Client(first.url, "test", redis.asyncio.Redis.from_url(first.url),
                        socket_timeout=5)
        client.moved()  # (as a MOVED answer tells it)
        first.command("CLIENT", "PAUSE", "400", "ALL")  # learning from it takes 400 ms
        with pytest.raises(TimeoutError):
            await call(client, 0.05)
        await asyncio.sleep(0.8)
        first.command("CLIENT", "PAUSE", "3000", "ALL")  # it stalls again
        try:
            await call(client, 1.0)
        finally:
            first.command("CLIENT", "UNPAUSE")
            await client.close()

    asyncio.run(scenario())
    assert cluster.nodes[2].command("GET", key) == b"$8"


def test_a_cluster_whose_connections_broke_is_learned_again_all_the_same(
        cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connections break (a node restarts): the cluster client drops the slots it
    knew, and learns them again. Learning takes longer here than a cache call may wait
    (redis-py's own learning made slower, as on a loaded machine); the cache answers again
    all the same, where each call began the learning and gave it up.
    """
    learn = NodesManager.initialize

    async def slowly(self: NodesManager, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.3)
        await learn(self, *args, **kwargs)

    monkeypatch.setattr(NodesManager, "initialize", slowly)

    async def answered(store: RedisStore, calls: int) -> int:
        count = 0
        for _ in range(calls):
            with contextlib.suppress(StoreUnavailable):
                await store.set("k1", b"v", 60)
                count += 1
            await asyncio.sleep(0.05)
        return count

    async def scenario() -> tuple[int, int]:
        store = RedisStore(cluster.url, 0.05, 8, "cache")
        await store.start()  # (learns the slots, slowly)
        try:
            before = await answered(store, 10)
            for node in cluster.nodes:
                node.command("CLIENT", "KILL", "TYPE", "normal")
            await asyncio.sleep(0.1)
            return before, await answered(store, 60)  # 3 s
        finally:
            await store.close()

    before, after = asyncio.run(scenario())
    assert before == 10
    assert after >= 10, after


def tenants_config(cluster: RedisCluster) -> dict[str, Any]:
    # The third node's address: it holds slots 10923-16383, and the keys these tests use
    # hash below (the key book's tag "keys" to 2915; "on-cluster" to 3361, "late" to 549),
    # so a client that did not know it talks to a cluster would be told MOVED for each.
    return {"tenants": {"store": "redis", "redis_url": cluster.nodes[2].url, "timeout": 2.0},
            "auth": {"admin_key_hashes": [hashlib.sha256(ADMIN.encode()).hexdigest()]}}


def call(server: ServerThread, path: str, key: str, body: Any = None,
         method: str = "POST") -> tuple[int, Any]:
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode() if body is not None else None,
        method=method, headers={"Authorization": f"Bearer {key}",
                                "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(server: ServerThread, key: str) -> int:
    return call(server, "/v1/chat/completions", key,
                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})[0]


def test_keys_and_their_limits_are_shared_on_a_redis_cluster(
        ollama_sim: Sim, cluster: RedisCluster, tmp_path: Path) -> None:
    config = gateway_config(backend("ollama", "ollama", ollama_sim.api_url),
                            **tenants_config(cluster))
    first, second = start_gateway(config), start_gateway(config)
    try:
        status, issued = call(first, "/admin/keys", ADMIN,
                              {"id": "on-cluster", "rpm": 10, "concurrency": 4, "budget": 10**6})
        assert status == 201, issued
        key = issued["key"]
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            said = list(pool.map(lambda n: chat((first, second)[n % 2], key), range(30)))
        took = time.monotonic() - started
        # 10 at once, plus one each 6 s the test ran: once for both gateways, not twice
        assert 10 <= said.count(200) <= 10 + math.ceil(took / 6) + 1, (said, took)
        assert said.count(200) + said.count(429) == 30, said
        held = [node.keys("gw:rl:*") for node in cluster.nodes]
        assert sum(held) >= 2 and sum(1 for keys in held if keys) == 1, held  # one slot

        status, _ = call(second, "/admin/keys/on-cluster", ADMIN, method="DELETE")
        assert status == 200
        wait_until(lambda: chat(first, key) == 401, 1.5, "the revoked key refused")
    finally:
        first.stop()
        second.stop()

    # the keys command (a process of its own) reads the same keys through the cluster
    path = tmp_path / "cluster.toml"
    path.write_text(f'[tenants]\nstore = "redis"\nredis_url = "{cluster.nodes[2].url}"\n\n'
                    f'[[backends]]\nname = "ollama"\nkind = "ollama"\n'
                    f'url = "{ollama_sim.api_url}"\n')
    listed = subprocess.run([*GATEWAY, "keys", "list", "--config", str(path)],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    row = next(line for line in listed.splitlines() if line.startswith("on-cluster"))
    assert "revoked" in row and "rpm 10" in row


def test_batches_run_on_a_redis_cluster(ollama_sim: Sim, cluster: RedisCluster) -> None:
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        tasks={"queue": "redis", "redis_url": cluster.url}))
    api = openai_client(server.url)

    def batch_of(lines: int, tag: str) -> Any:
        rows = [{"custom_id": f"{tag}-{n}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "max_tokens": 8,
                          "messages": [{"role": "user", "content": f"{tag} {n}"}]}}
                for n in range(lines)]
        source = api.files.create(
            file=(f"{tag}.jsonl", io.BytesIO("\n".join(map(json.dumps, rows)).encode())),
            purpose="batch")
        return api.batches.create(input_file_id=source.id, completion_window="24h",
                                  endpoint="/v1/chat/completions")

    def finished(batch_id: str) -> Any:
        deadline = time.monotonic() + 60
        while (batch := api.batches.retrieve(batch_id)).status not in (
                "completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
        return batch

    try:
        done = finished(batch_of(20, "whole").id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (20, 0)
        answered = [json.loads(row)["custom_id"] for row in
                    api.files.content(done.output_file_id).text.splitlines()]  # type: ignore[arg-type]
        assert sorted(answered) == sorted(f"whole-{n}" for n in range(20))

        ollama_sim.fault(MODEL, latency=0.3, remaining=40)
        slow = batch_of(40, "slow")
        time.sleep(0.5)
        assert api.batches.cancel(slow.id).status in ("cancelling", "cancelled")
        cancelled = finished(slow.id)
        assert cancelled.status == "cancelled" and cancelled.request_counts is not None
        assert cancelled.request_counts.completed < 40
        assert [b.id for b in api.batches.list()][:2] == [slow.id, done.id]
    finally:
        ollama_sim.fault(MODEL, remaining=0)
        server.stop()
    held = [node.keys("gw:*tasks*") for node in cluster.nodes]
    assert sum(1 for keys in held if keys) >= 2, held  # the batches' keys spread


def test_a_cluster_away_at_start_is_found_out_when_it_answers(ollama_sim: Sim) -> None:
    with RedisCluster() as own:
        own.nodes[2].kill()  # the node the gateway is given
        server = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama_sim.api_url), **tenants_config(own),
            tasks={"queue": "redis", "redis_url": own.nodes[2].url}))
        try:
            assert call(server, "/admin/keys", ADMIN, method="GET")[0] == 503
            own.nodes[2].restart()
            wait_until(lambda: call(server, "/admin/keys", ADMIN, method="GET")[0] == 200, 15,
                       "the key store answering")
            status, issued = call(server, "/admin/keys", ADMIN, {"id": "late", "rpm": 100})
            assert status == 201, issued

            def counted() -> bool:  # (until the link has heard MOVED, limits count locally)
                assert chat(server, issued["key"]) == 200
                return sum(node.keys("gw:rl:{late}:*") for node in own.nodes) > 0

            wait_until(counted, 15, "the key's requests counted in the cluster")
            own.wait_ok(40)  # (on a loaded machine the others may have marked it failed)

            # the task store found out too (its keys hash all over): a batch runs
            api = openai_client(server.url, issued["key"])
            lines = [{"custom_id": f"late-{n}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": MODEL, "max_tokens": 8,
                               "messages": [{"role": "user", "content": f"late {n}"}]}}
                     for n in range(8)]
            source = wait_for(lambda: api.files.create(
                file=("late.jsonl", io.BytesIO("\n".join(map(json.dumps, lines)).encode())),
                purpose="batch"))
            batch = wait_for(lambda: api.batches.create(
                input_file_id=source.id, completion_window="24h",
                endpoint="/v1/chat/completions"))
            wait_until(lambda: api.batches.retrieve(batch.id).status == "completed", 30,
                       "the batch done")
        finally:
            server.stop()


def wait_for(attempt: Any, limit: float = 15) -> Any:
    """What ``attempt()`` gives once it does not fail: until the store has found out (within
    the seconds between its looks at the batches), a key in another node's slot is a 503.
    """
    deadline = time.monotonic() + limit
    while True:
        try:
            return attempt()
        except openai.APIStatusError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


async def test_a_burst_waits_for_the_cluster_connections_and_is_answered(
        cluster: RedisCluster) -> None:
    """A cluster client fails at once past its connections to a node (a plain one's pool
    waits): the link makes calls wait their turn, so a burst on one key (one node) is
    counted in Redis, none refused as if Redis were away.
    """
    link = Link(cluster.nodes[2].url, timeout=2.0, max_connections=4)
    await link.start()
    limits = RedisLimits(link, "closed")  # (Redis away: refused)
    try:
        assert link.cluster
        key = KeyConfig(id="burst", hash="0" * 64, rpm=10_000, concurrency=1000)
        admissions = await asyncio.gather(*(limits.admit(key, 1) for _ in range(200)))
        assert [a.reason for a in admissions] == [""] * 200
        assert not any(a.local for a in admissions)
        for admission in admissions:
            await limits.settle(key, admission, 1)
    finally:
        await limits.close()
        await link.close()


async def test_the_task_store_takes_a_burst_on_a_cluster(cluster: RedisCluster) -> None:
    """The task store's calls are not limited by the cluster client's default size (100
    connections a node, past which it fails at once): 300 reads at once are all answered.
    """
    store = TaskStore(cluster.nodes[2].url, visibility_timeout=60)
    await store.start()
    try:
        await store.put_batch({"id": "batch_burst", "tenant": "t", "status": "validating",
                               "request_counts": {"total": 0, "completed": 0, "failed": 0}})
        found = await asyncio.gather(*(store.batch("batch_burst") for _ in range(300)))
        assert all(record is not None and record["id"] == "batch_burst" for record in found)
    finally:
        await store.close()


async def test_learning_shared_through_a_cluster_away_at_start_is_shared_once_it_answers(
) -> None:
    """A node that did not answer at start was taken for a plain Redis, and the learning
    link never asked again: told MOVED at every read and write, nothing learned was ever
    shared, and feedback through another process was a 503, for as long as it ran.
    """
    with RedisCluster() as own:
        given = own.nodes[2]  # (not the node of {router}'s slot: it answers MOVED)
        given.kill()
        link = LearningLink(given.url, LearnedOrder(LearnedConfig()), 100)
        await link.start()
        try:
            given.restart()
            await asyncio.to_thread(own.wait_ok, 40)
            x = [0.0] * DIMENSIONS

            async def shared() -> bool:
                link.learned("auto", "qwq:32b", x, 1.0, 0)
                await asyncio.sleep(0.5)
                return sum(node.keys("gw:{router}:learned") for node in own.nodes) > 0

            deadline = time.monotonic() + 20
            while not await shared():
                assert time.monotonic() < deadline, "nothing learned was shared"
        finally:
            await link.close()
