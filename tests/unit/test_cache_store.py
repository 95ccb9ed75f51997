"""The in-memory store (the embedded default) and the cache key."""

from __future__ import annotations

import asyncio

from gateway.protocol.openai import parse_chat
from gateway.store import MemoryStore
from plugins.base import RequestContext
from plugins.cache import CacheOptions, CachePlugin


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


def test_the_memory_store_keeps_no_more_bytes_than_its_bound() -> None:
    async def scenario() -> list[bytes | None]:
        store = MemoryStore(max_entries=100, max_bytes=10)
        await store.set("a", b"1234", 60)
        await store.set("b", b"5678", 60)
        await store.set("a", b"12", 60)  # replaced: only its new size counts
        await store.set("c", b"abcd", 60)  # 2 + 4 + 4 fits exactly
        await store.set("d", b"efgh", 60)  # b, the least recently used, goes
        return [await store.get(k) for k in "abcd"]

    assert asyncio.run(scenario()) == [b"12", None, b"abcd", b"efgh"]


def test_the_memory_store_makes_room_at_the_expense_of_whoever_holds_the_most() -> None:
    async def scenario() -> tuple[list[bytes | None], list[bytes | None]]:
        by_count = MemoryStore(max_entries=4, owner=lambda k: k.split(":")[0])
        await by_count.set("a:1", b"1", 60)
        await by_count.set("a:2", b"2", 60)
        for n in range(6):  # b stores the most: its own oldest go, never a's
            await by_count.set(f"b:{n}", b"x", 60)
        by_size = MemoryStore(max_entries=100, max_bytes=10, owner=lambda k: k.split(":")[0])
        await by_size.set("a:1", b"123", 60)
        await by_size.set("b:1", b"5678", 60)
        await by_size.set("b:2", b"9abc", 60)  # b holds the most bytes: its oldest goes
        await by_size.set("c:1", b"123456", 60)  # c does now, by its one value, which stays:
        # the one who held the most before it loses (b), its last one
        return ([await by_count.get(k) for k in ("a:1", "a:2", "b:3", "b:4", "b:5")],
                [await by_size.get(k) for k in ("a:1", "b:1", "b:2", "c:1")])

    assert asyncio.run(scenario()) == ([b"1", b"2", None, b"x", b"x"],
                                       [b"123", None, None, b"123456"])

def key(body: dict[str, object], tenant: str = "t1", shared: bool = False) -> str:
    plugin = CachePlugin(CacheOptions(shared=shared))
    return plugin._key(RequestContext("chat", parse_chat(body), tenant, {}))


BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_the_key_covers_what_decides_the_answer_and_nothing_else() -> None:
    assert key(BASE) == key(dict(reversed(list(BASE.items()))))  # order does not matter
    # How the answer is delivered, and notes about the caller, do not change it.
    assert key(BASE) == key({**BASE, "user": "someone", "stream": True, "store": True,
                             "stream_options": {"include_usage": True},
                             "metadata": {"team": "a"}})
    # Everything else may: fields the gateway acts on, and fields it only passes along.
    for change in ({"model": "n"}, {"temperature": 0.5}, {"seed": 3}, {"max_tokens": 9},
                   {"messages": [{"role": "user", "content": "hi!"}]},
                   {"response_format": {"type": "json_object"}},
                   {"tools": [{"type": "function", "function": {"name": "f"}}]},
                   {"presence_penalty": 1.0}, {"frequency_penalty": 0.5},
                   {"logprobs": True}, {"logit_bias": {"50256": -100}}, {"stop": ["\n"]},
                   {"reasoning_effort": "high"}):
        assert key({**BASE, **change}) != key(BASE), change
    # Nested objects are compared by content, not by the order their keys came in.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}
    reordered = {"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}
    assert key({**BASE, "tools": [tool]}) == key({**BASE, "tools": [reordered]})


def test_the_key_is_that_of_the_redacted_request() -> None:
    """Two requests that differ only in a secret the safety plugin redacted share an answer:
    what the model saw was the same (and the secret is in no key).
    """
    from plugins.safety import SafetyOptions, SafetyPlugin

    safety = SafetyPlugin(SafetyOptions())

    def redacted_key(secret: str) -> str:
        body = {**BASE, "messages": [{"role": "user", "content": f"why does {secret} fail?"}]}
        ctx = RequestContext("chat", parse_chat(body), "t1", {})
        asyncio.run(safety.on_request(ctx))
        return CachePlugin(CacheOptions())._key(ctx)

    assert redacted_key("sk-" + "a1" * 20) == redacted_key("sk-" + "b2" * 20)
    assert redacted_key("sk-" + "a1" * 20) != key(BASE)


def test_the_key_is_the_tenants_own_unless_shared() -> None:
    assert key(BASE, "t1") != key(BASE, "t2")
    # A body cannot name another tenant's scope.
    assert key({**BASE, " tenant": "t2"}, "t1") != key(BASE, "t2")
    assert key({**BASE, " tenant": ""}, "t1") != key(BASE, "t1", shared=True)
    assert key(BASE, "t1", shared=True) == key(BASE, "t2", shared=True)


def test_a_shared_answer_is_shared_only_among_keys_of_the_same_models() -> None:
    """A key that may use only a small model is not given the answer an alias gave another
    key through a model it may not use.
    """
    def scoped(tenant: str, models: tuple[str, ...]) -> str:
        ctx = RequestContext("chat", parse_chat({**BASE, "model": "auto"}), tenant, {})
        ctx.models = models
        return CachePlugin(CacheOptions(shared=True))._key(ctx)

    assert scoped("t1", ("small:1b",)) != scoped("t2", ())
    assert scoped("t1", ("small:1b", "auto")) == scoped("t2", ("auto", "small:1b"))


def test_a_stream_answered_beside_a_request_that_failed_is_stored() -> None:
    """Two identical streams: the second, finding the first in flight, is answered by the
    model too. The first fails: the second's answer is stored (it was thrown away, and the
    next identical request missed again)."""
    from gateway.protocol.units import Completion

    async def scenario() -> Completion | None:
        plugin = CachePlugin(CacheOptions())
        await plugin.start()
        body = {"model": "m", "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": "Same question."}]}

        def ctx() -> RequestContext:
            return RequestContext(kind="chat", req=parse_chat(dict(body)), tenant="t",
                                  client_headers={})

        first, second = ctx(), ctx()
        assert await plugin.on_request(first) is None  # a miss: it leads
        assert await plugin.on_request(second) is None  # beside it, to the model
        first.failed = True
        plugin.on_finish(first)  # the first failed
        await plugin.on_complete(second, Completion(content="Answer.", finish_reason="stop"))
        plugin.on_finish(second)
        return await plugin.on_request(ctx())

    hit = asyncio.run(scenario())
    assert hit is not None and hit.content == "Answer."
