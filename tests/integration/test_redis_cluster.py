"""The response cache on a real Redis Cluster: three masters of the test's own, the gateway
given the address of one of them. The cache finds out it is a cluster and keeps each answer
on the node that holds its key's slot: answers cached are hits, spread over the nodes, with
no error on the way (a plain client would be told MOVED for most keys, and miss).
"""

from __future__ import annotations

import openai

from tests.redis_peer import RedisCluster
from tests.support import Sim, backend, gateway_config, start_gateway

MODEL = "qwq:32b"


def test_the_cache_works_on_a_redis_cluster(ollama_sim: Sim) -> None:
    with RedisCluster() as cluster:
        server = start_gateway(gateway_config(
            backend("ollama", "ollama", ollama_sim.api_url),
            plugins=[{"name": "cache", "options": {"backend": "redis",
                                                   "redis_url": cluster.url}}]))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
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
        held = [node.keys() for node in cluster.nodes]
        assert sum(held) >= 12 and sum(1 for keys in held if keys) >= 2, held
