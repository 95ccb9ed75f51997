"""Keys kept in Redis, changed by several processes at once (the admin API and ``gateway
keys`` of each): a change is made from the record as it is when written, so none undoes
another made meanwhile, a revocation least of all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import redis as redis_client

from gateway.config import KeyConfig
from gateway.tenants import RedisKeys, amend, issue
from gateway.tenants.keys import PLAIN
from gateway.tenants.link import Link
from tests.redis_peer import RedisServer


@pytest.fixture
async def keys() -> AsyncIterator[tuple[RedisKeys, RedisServer]]:
    with RedisServer() as server:
        link = Link(server.url, timeout=2.0)
        await link.start()
        try:
            yield RedisKeys(link), server
        finally:
            await link.close()


async def test_a_change_made_as_the_key_is_revoked_keeps_it_revoked(
        keys: tuple[RedisKeys, RedisServer]) -> None:
    """Another process revokes the key between this change's read and its write: the
    change is made again on the revoked record. (It wrote back the record it had read, and
    the key worked again: 5 in 200 such races through the admin API.)"""
    book, server = keys
    _, record = issue({"name": "racing", "rpm": 5}, "test")
    assert await book.create(record)
    other = redis_client.Redis.from_url(server.url)  # another process, revoking it
    made_from: list[bool] = []

    def raise_the_limit(found: KeyConfig) -> KeyConfig:
        made_from.append(found.revoked)
        if len(made_from) == 1:
            data = orjson.loads(other.hget(PLAIN[0], record.id))  # type: ignore[arg-type]
            other.hset(PLAIN[0], record.id, orjson.dumps({**data, "revoked": True}))
        return amend(found, {"rpm": 10}, "test")

    try:
        changed = await book.change(record.id, raise_the_limit)
    finally:
        other.close()
    assert made_from == [False, True]  # made again, from the revoked record
    assert changed is not None and changed.revoked and changed.rpm == 10
    stored = await book.get(record.id)
    assert stored is not None and stored.revoked and stored.rpm == 10
    assert await book.change("no-such-key", raise_the_limit) is None
