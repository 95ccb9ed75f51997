"""The in-memory store (the embedded default) and the cache key."""

from __future__ import annotations

import asyncio

from gateway.protocol.openai import parse_chat
from plugins.base import RequestContext
from plugins.cache import CacheOptions, CachePlugin
from plugins.cache_store import MemoryStore


def test_the_memory_store_keeps_the_most_recently_used_within_its_bound() -> None:
    async def scenario() -> list[bytes | None]:
        store = MemoryStore(max_entries=2)
        await store.set("a", b"1", 60)
        await store.set("b", b"2", 60)
        await store.get("a")  # a is now the most recently used
        await store.set("c", b"3", 60)  # b goes
        found = [await store.get(k) for k in "abc"]
        await store.set("d", b"4", -1)  # already expired
        return [*found, await store.get("d")]

    assert asyncio.run(scenario()) == [b"1", None, b"3", None]


def key(body: dict[str, object], tenant: str = "t1", shared: bool = False) -> str:
    plugin = CachePlugin(CacheOptions(shared=shared))
    return plugin._key(RequestContext("chat", parse_chat(body), tenant, {}))


BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_the_key_covers_what_decides_the_answer_and_nothing_else() -> None:
    assert key(BASE) == key(dict(reversed(list(BASE.items()))))  # order does not matter
    assert key(BASE) == key({**BASE, "user": "someone", "stream": True})
    for change in ({"model": "n"}, {"temperature": 0.5}, {"seed": 3}, {"max_tokens": 9},
                   {"messages": [{"role": "user", "content": "hi!"}]},
                   {"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        assert key({**BASE, **change}) != key(BASE), change


def test_the_key_is_the_tenants_own_unless_shared() -> None:
    assert key(BASE, "t1") != key(BASE, "t2")
    assert key(BASE, "t1", shared=True) == key(BASE, "t2", shared=True)
