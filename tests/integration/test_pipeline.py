"""The plugin pipeline: a third-party plugin loaded by dotted path, the configured order, what
each step sees, and config mistakes caught at start-up.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from gateway.pipeline import load_plugins
from gateway.protocol.units import Chunk, Completion
from gateway.sim import SimModel, create_ollama_app
from gateway.sim.fleet import DEFAULT_REPLY
from gateway.typed_toml import ConfigError
from plugins.base import BasePlugin, RequestContext, Verdict
from tests.support import (
    ServerThread,
    Sim,
    backend,
    gateway_config,
    openai_client,
    start_gateway,
)

MODEL = "qwen2.5-coder:32b"
steps: list[str] = []


@dataclass(frozen=True, slots=True)
class ShoutOptions:
    suffix: str = "!"


class Shout(BasePlugin):
    """A third-party plugin: upper-cases answers as they stream and notes each step."""

    Options = ShoutOptions

    def __init__(self, options: ShoutOptions) -> None:
        self.options = options

    async def on_request(self, ctx: RequestContext) -> None:
        steps.append(f"{self.name}.request")
        ctx.headers["x-shout"] = self.options.suffix

    def on_stream(self, ctx: RequestContext,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        async def louder() -> AsyncIterator[Chunk]:
            async for chunk in chunks:
                chunk.content = chunk.content.upper()
                yield chunk
        return louder()

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        steps.append(f"{self.name}.complete:{result.content[:5]}")
        return None

    def on_finish(self, ctx: RequestContext) -> None:
        steps.append(f"{self.name}.finish")

    def report(self) -> dict[str, Any]:
        return {"suffix": self.options.suffix}


PATH = "tests.integration.test_pipeline:Shout"


class Stamp(BasePlugin):
    """A plugin as the README says to write one: from BasePlugin, one method of its own."""

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        ctx.headers["x-stamp"] = "seen"
        return None


class Ready:
    def __init__(self) -> None:
        self.ready = True


class KeepsItsOwn(BasePlugin, Ready):
    def __init__(self, options: Any) -> None:
        self.options = options
        super().__init__()


def test_a_plugin_that_sets_its_options_and_calls_on_keeps_them() -> None:
    plugin = KeepsItsOwn({"word": "hello"})
    assert plugin.options == {"word": "hello"} and plugin.ready


def test_a_plugin_started_from_base_plugin_needs_no_constructor(ollama_sim: Sim) -> None:
    """The gateway would not start with it: ``Stamp() takes no arguments``."""
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        plugins=[{"name": "stamp", "path": "tests.integration.test_pipeline:Stamp"}]))
    try:
        raw = openai_client(server.url).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    finally:
        server.stop()
    assert raw.headers["x-stamp"] == "seen"


def test_a_plugin_is_loaded_by_dotted_path_and_run_in_order(ollama_sim: Sim) -> None:
    steps.clear()
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        plugins=[{"name": "first", "path": PATH, "options": {"suffix": "?"}},
                 {"name": "second", "path": PATH}]))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}])
            body = raw.parse()
        with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
            report = json.loads(response.read())["plugins"]
    finally:
        server.stop()
    text = body.choices[0].message.content or ""
    assert text == text.upper() and text.strip()
    assert raw.headers["x-shout"] == "!"  # the later plugin's word is the last
    assert steps == ["first.request", "second.request", f"first.complete:{text[:5]}",
                    f"second.complete:{text[:5]}", "second.finish", "first.finish"]
    assert report == {"first": {"suffix": "?"}, "second": {"suffix": "!"}}


@pytest.mark.parametrize(("plugin", "message"), [
    ({"name": "cahce"}, "no built-in plugin 'cahce'"),
    ({"name": "x", "path": "tests.nowhere:Plugin"}, "cannot load tests.nowhere:Plugin"),
    ({"name": "x", "path": "tests.integration.test_pipeline:Nothing"}, "cannot load"),
    ({"name": "x", "path": PATH, "options": {"sufix": "?"}}, r"plugins\[0\].options.sufix"),
    ({"name": "cache", "options": {"ttl": 0}}, "ttl: expected seconds > 0"),
    ({"name": "cache", "options": {"backend": "memcached"}}, "backend"),
    ({"name": "qa", "options": {"checks": ["empty", "vibes"]}}, "no such check 'vibes'"),
])
def test_plugin_mistakes_are_caught_when_the_config_is_loaded(plugin: dict[str, Any],
                                                               message: str) -> None:
    config = gateway_config(backend("o", "ollama", "http://127.0.0.1:1"), plugins=[plugin])
    with pytest.raises(ConfigError, match=message):
        load_plugins(config)


@pytest.mark.parametrize("order", [["cache", "qa"], ["cache", "safety"],
                                   ["safety", "cache", "qa"]])
def test_the_cache_must_come_after_what_it_trusts(order: list[str]) -> None:
    """Listed before QA, the cache would keep answers QA rejects; before the safety checker,
    a hit would skip its blocks.
    """
    config = gateway_config(backend("o", "ollama", "http://127.0.0.1:1"),
                            plugins=[{"name": name} for name in order])
    with pytest.raises(ConfigError, match="must come before cache"):
        load_plugins(config)
    good = gateway_config(backend("o", "ollama", "http://127.0.0.1:1"),
                          plugins=[{"name": name} for name in ("safety", "qa", "cache")])
    assert [plugin.name for plugin in load_plugins(good)] == ["safety", "qa", "cache"]


def test_two_plugins_of_one_name_are_refused_and_two_caches_named_apart_work() -> None:
    """Two caches listed with one name: each repeated request waited 120 s for the first's
    mark of the request in flight, which the second had overwritten.
    """
    twice = gateway_config(backend("o", "ollama", "http://127.0.0.1:1"),
                           plugins=[{"name": "cache"}, {"name": "cache"}])
    with pytest.raises(ConfigError, match=r"plugins\[1\]\.name: 'cache' is already"):
        load_plugins(twice)
    with ServerThread(lambda: create_ollama_app([SimModel("m:1b")])) as server:
        sim = Sim(server, "ollama")
        gateway = start_gateway(gateway_config(
            backend("o", "ollama", sim.api_url),
            plugins=[{"name": "cache", "options": {"ttl": 5}},
                     {"name": "l2", "path": "plugins.cache:CachePlugin"}]))
        try:
            client = openai_client(gateway.url)
            for _ in range(3):
                started = time.monotonic()
                client.chat.completions.create(model="m:1b", temperature=0, messages=[
                    {"role": "user", "content": "Hello"}])
                assert time.monotonic() - started < 5
            assert len(sim.requests("/api/chat")) == 1
        finally:
            gateway.stop()


class Broken(BasePlugin):
    """A plugin whose clean-up fails."""

    def __init__(self, options: Any) -> None:
        pass

    def on_finish(self, ctx: RequestContext) -> None:
        steps.append(f"{self.name}.finish")
        raise RuntimeError("a bug in a plugin")


def test_a_plugin_failing_to_clean_up_does_not_stop_the_others(ollama_sim: Sim) -> None:
    """A broken on_finish after the answer is logged; the plugins before it in the clean-up
    order still run (the cache would otherwise leave identical requests waiting).
    """
    steps.clear()
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        plugins=[{"name": "shout", "path": PATH},
                 {"name": "broken", "path": "tests.integration.test_pipeline:Broken"}]))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            for _ in range(2):
                answer = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}])
                assert answer.choices[0].message.content
    finally:
        server.stop()
    assert [step for step in steps if step.endswith(".finish")] == [
        "broken.finish", "shout.finish"] * 2


class BrokenJudge(BasePlugin):
    """A third-party plugin whose judging fails."""

    def __init__(self, options: Any) -> None:
        pass

    async def on_complete(self, ctx: RequestContext, result: Completion) -> Verdict | None:
        raise RuntimeError("a bug in the judge")


@pytest.mark.parametrize("stream", [False, True])
def test_a_plugin_failing_to_judge_an_answer_does_not_throw_it_away(
        ollama_sim: Sim, stream: bool) -> None:
    """The model's answer, made, was a 500 (whole) or ended in an error event (streamed)."""
    server = start_gateway(gateway_config(
        backend("ollama", "ollama", ollama_sim.api_url),
        plugins=[{"name": "judge", "path": "tests.integration.test_pipeline:BrokenJudge"}]))
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
            if stream:
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                text = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}]
                ).choices[0].message.content or ""
        assert text == DEFAULT_REPLY
    finally:
        server.stop()
