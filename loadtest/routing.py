"""Learned routing through the real gateway: what the learned policy earns against the
static priority and an oracle on a mixed workload, and what it costs per request.

    .venv/bin/python -m loadtest.routing      # its section of loadtest/RESULTS.md, routing.png

1. Policies. One alias over four simulated Ollama models (a process of its own on loopback),
   each with its own skill by kind of task (``SimModel.skills``: the chance QA passes its
   answer) and its own speed (time to first token, tokens a second: tens of milliseconds,
   with the alias's ``latency_cost`` scaled up to match). A seeded workload of five kinds
   (chat, code, JSON extraction, reasoning, long documents) goes through a ``gateway
   serve`` process with the QA plugin (``escalate = false``: one request, one model's
   answer), the same requests for each policy: ``policy = "priority"``, ``policy =
   "learned"`` (``--repeats`` runs, each from a fresh state file: runs differ by timing)
   and an oracle that asks by name for the model with the best expected reward for the
   request's kind, worked out from the configured skills and speeds. A request's reward is
   the gateway's own formula (``gateway.routing.learned.reward``): 1 if QA passed the
   answer (``x-gateway-qa``), else 0, less ``latency_cost`` times its latency as the
   client saw it.
2. Overhead. The same plain chat request to the alias (no plugins, models that answer at
   once) through a gateway with each policy: instructions per request under callgrind
   (``loadtest.doors``'s machinery), turned into microseconds by this machine's
   instructions per microsecond of the gateway's CPU time, and that CPU time per request
   measured directly outside valgrind as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import timeit
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.config import LearnedConfig
from gateway.protocol.openai import parse_chat
from gateway.routing.candidates import Candidate
from gateway.routing.features import features_of, kind_of
from gateway.routing.learned import LearnedOrder, reward
from gateway.sim.fleet import DEFAULT_REPLY, json_reply, tokens
from loadtest.batches import Meter, write_section
from loadtest.doors import Counted, _send
from loadtest.run import HERE, free_ports, start, wait_ready

SECTION = "## Learned routing"
ALIAS = "auto:mixed"
# The simulated times are about a hundredth of a real model's, so a second costs a hundred
# times what it costs `auto` (0.02): the slowest model's ~0.1 s costs ~0.2 of a good answer.
LATENCY_COST = 2.0
KINDS = ("chat", "code", "extract", "reason", "long")
SHARE = {"chat": 0.30, "code": 0.25, "extract": 0.20, "reason": 0.10, "long": 0.15}
WINDOW = 200  # requests in the learning curve's moving mean
# The overhead's request: a plain chat to the alias.
VARIED = 200  # the overhead's requests: the workload's first, each sent as a plain chat


@dataclass(frozen=True, slots=True)
class Model:
    """A simulated model: its speed and its chance of an answer QA passes, by kind."""

    name: str
    size: str
    ttft: float  # seconds to the first token
    tokens_per_s: float
    skills: dict[str, float]


# Listed as the static priority has them (the largest first, as `auto` does): a generalist
# that is good at everything and slow; a long-context model; a coder; a small, fast model
# that chats and extracts well and fails at the rest.
FLEET = (
    Model("llama3.3:70b", "70.6B", 0.040, 500,
          {"chat": 0.95, "code": 0.85, "extract": 0.92, "reason": 0.90, "long": 0.88}),
    Model("command-r:35b", "35.0B", 0.025, 1000,
          {"chat": 0.80, "code": 0.50, "extract": 0.75, "reason": 0.70, "long": 0.97}),
    Model("qwen2.5-coder:14b", "14.8B", 0.015, 1500,
          {"chat": 0.60, "code": 0.95, "extract": 0.70, "reason": 0.60, "long": 0.30}),
    Model("llama3.2:3b", "3.2B", 0.005, 3000,
          {"chat": 0.90, "code": 0.30, "extract": 0.88, "reason": 0.40, "long": 0.20}),
)
BY_NAME = {m.name: m for m in FLEET}


# ---- the workload

TOPICS = ("rivers", "the moon", "bread", "trains", "chess", "bees", "glass", "jazz", "gardens",
          "lighthouses", "tea", "bicycles", "volcanoes", "owls", "maps", "autumn", "cheese",
          "kites", "libraries", "harbours")
PLACES = ("Lisbon", "Kyoto", "Oslo", "Montreal", "Cape Town", "Valparaiso", "Tallinn",
          "Hobart", "Porto", "Ghent", "Tromso", "Cusco")
NAMES = ("Ana", "Bram", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal",
         "Lena", "Mira", "Nils", "Omar", "Priya", "Rosa", "Sven", "Tariq", "Uma")
ADJECTIVES = ("surprising", "nice", "little known", "cheerful", "odd", "beautiful", "useful",
              "historical", "funny", "practical")
SUBJECTS = ("The committee", "Our team", "The city council", "Most visitors", "The new library",
            "Local farmers", "The museum", "Several residents", "The harbour office",
            "A small group of volunteers", "The school board", "The festival organisers")
VERBS = ("reviewed", "welcomed", "discussed", "postponed", "supported", "questioned",
         "described", "praised", "planned", "expanded", "reorganised", "funded")
OBJECTS = ("the spring festival", "the new bus timetable", "the garden project",
           "the annual report", "the bridge repairs", "the reading programme",
           "the market hours", "the recycling scheme", "the winter schedule",
           "the heritage walk", "the swimming pool", "the cycle lanes")
CIRCUMSTANCES = ("after a long meeting", "with some reservations", "in the autumn",
                 "for the third year running", "despite the rain", "at the request of the mayor",
                 "without much fuss", "ahead of the holidays", "in great detail",
                 "over several weeks", "with the help of {name}", "near the old station")


@dataclass(frozen=True, slots=True)
class Request:
    kind: str  # as the gateway's router and the simulator both read it
    body: dict[str, Any]  # the chat completion, without its model


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(CIRCUMSTANCES).format(name=rng.choice(NAMES))}.")


def prose(rng: random.Random, chars: int) -> str:
    """Paragraphs of ordinary sentences, about ``chars`` long."""
    paragraphs: list[str] = []
    size = 0
    while size < chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(4, 8)))
        paragraphs.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def chat(rng: random.Random) -> list[dict[str, str]]:
    topic, place, name = rng.choice(TOPICS), rng.choice(PLACES), rng.choice(NAMES)
    ask = rng.choice((
        f"Tell me something {rng.choice(ADJECTIVES)} about {topic}.",
        f"I have {rng.randint(2, 9)} days in {place} and I love {topic}. What should I see?",
        f"Write a short note thanking {name} for the help with the {topic} exhibition.",
        f"Suggest a name for a small shop in {place} that sells gifts about {topic}.",
        f"Give me three tips for talking to {name}, who is shy, about {topic}.",
        f"Here is my draft for {name}; make it friendlier:\n\n"
        f"{prose(rng, rng.randint(300, 3000))}",
    ))
    if rng.random() < 0.3:  # a conversation going on
        return [{"role": "user", "content": ask},
                {"role": "assistant", "content": f"Happy to. {sentence(rng)}"},
                {"role": "user", "content": f"Thanks! Now something about "
                                            f"{rng.choice(TOPICS)}, please."}]
    return [{"role": "user", "content": ask}]


def code(rng: random.Random) -> list[dict[str, str]]:
    topic, name, k = rng.choice(TOPICS), rng.choice(NAMES), rng.randint(2, 99)
    return [{"role": "user", "content": rng.choice((
        f"Write a Python function that sorts a list of {topic} by name, for {name}.",
        f"Write a Python function that removes duplicate {topic} from a list of {k} items.",
        f"Fix this bug:\n```python\ndef total(items):\n    return sum(i.price for i in item)\n"
        f"```\nIt raises NameError on {name}'s order of {k} {topic}.",
        f"Refactor this JavaScript to use async/await:\n```js\nfetch('/{topic}/{k}')"
        f".then(r => r.text()).then(t => show(t))\n```",
        f"Explain what this SQL does: SELECT name, count(*) FROM orders WHERE item = "
        f"'{topic}' GROUP BY name HAVING count(*) > {k};",
        f"My Rust program fails to compile with 'borrowed value does not live long enough' "
        f"in a loop over {k} {topic}. What should I change?",
    ))}]


def extract(rng: random.Random) -> list[dict[str, str]]:
    name, place = rng.choice(NAMES), rng.choice(PLACES)
    invoice = (f"Invoice {rng.randint(1000, 99999)} for {name} of {place}, dated "
               f"{rng.randint(1, 28)} {rng.choice(('March', 'June', 'October'))}. "
               f"{rng.randint(2, 12)} boxes of {rng.choice(TOPICS)} postcards, total "
               f"{rng.randint(20, 900)} EUR.")
    return [{"role": "user", "content": rng.choice((
        f"Extract the customer name, date and total from this invoice as JSON.\n\n{invoice}",
        f"Return JSON with the fields name and city for every person in this text.\n\n"
        f"{prose(rng, rng.randint(200, 2500))}",
        f"From this email, give me a JSON object with sender, topic and urgency.\n\n"
        f"Hello, this is {name} from {place}. {prose(rng, rng.randint(150, 1200))}",
    ))}]


def reason(rng: random.Random) -> list[dict[str, str]]:
    a, b, c = rng.randint(2, 9), rng.randint(1, 40), rng.randint(41, 99)
    hour = rng.randint(6, 14)
    return [{"role": "user", "content": rng.choice((
        f"A train leaves {rng.choice(PLACES)} at {hour} o'clock travelling at "
        f"{rng.randint(40, 160)} km/h. How many kilometres has it covered by {hour + 3} "
        f"o'clock?",
        f"Solve for x: {a}x + {b} = {c}.",
        f"Why do {rng.choice(TOPICS)} matter to a city like {rng.choice(PLACES)}? Give a short "
        f"argument.",
        f"What is the probability of drawing {a} red cards in a row from a full deck? Work "
        f"it out step by step.",
    ))}]


def long(rng: random.Random) -> list[dict[str, str]]:
    name = rng.choice(NAMES)
    document = prose(rng, rng.randint(7000, 10000))
    if rng.random() < 0.5:
        return [{"role": "user", "content": f"Summarise these minutes for {name}:\n\n"
                                            f"{document}"}]
    return [{"role": "user", "content": f"{document}\n\nSummarise the report above in "
                                        f"{rng.randint(3, 7)} bullet points for {name}."}]


MAKERS: dict[str, Callable[[random.Random], list[dict[str, str]]]] = {
    "chat": chat, "code": code, "extract": extract, "reason": reason, "long": long}


def workload(count: int, seed: int) -> list[Request]:
    """``count`` requests, the kinds mixed as ``SHARE`` says; each one checked to be the kind
    it was made as, both for the gateway (its features) and for the simulator (its skill).
    """
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.choices(KINDS, weights=[SHARE[k] for k in KINDS])[0]
        body: dict[str, Any] = {"messages": MAKERS[kind](rng)}
        if kind == "extract":
            body["response_format"] = {"type": "json_object"}
        routed = features_of(parse_chat({"model": ALIAS, **body})).kind
        simulated = sim_kind(body)
        if not routed == simulated == kind:
            raise AssertionError(f"a {kind} request read as {routed} (router) and {simulated} "
                                 f"(simulator): {body['messages'][-1]['content'][:200]!r}")
        out.append(Request(kind, body))
    return out


def sim_kind(body: dict[str, Any]) -> str:
    """The kind the simulator judges its answer by (``gateway.sim.engine.poor_answer``)."""
    text = "\n".join(m["content"] for m in body["messages"])
    lower = text.lower()
    json = "response_format" in body or '"json' in lower or " json" in lower
    return kind_of(text, json)


# ---- what each model is expected to earn (the oracle's choice)


def expected_seconds(model: Model, kind: str) -> float:
    """How long its answer takes on average: the first token, then one token after another
    (a good answer is the simulator's reply; a poor one is JSON cut short after 2 tokens,
    or else equally often nothing or a 60-token loop).
    """
    def after_first(text: str) -> int:  # the tokens that each take 1 / tokens_per_s
        return max(0, len(tokens(text)) - 1)

    skill = model.skills[kind]
    good = after_first(orjson.dumps(json_reply(DEFAULT_REPLY, None)).decode()
                       if kind == "extract" else DEFAULT_REPLY)
    poor = after_first('{"name": "') if kind == "extract" else \
        0.5 * after_first("It is so. " * 20) + 0.5 * after_first("")
    return model.ttft + (skill * good + (1 - skill) * poor) / model.tokens_per_s


def expected_reward(model: Model, kind: str) -> float:
    return reward(model.skills[kind], expected_seconds(model, kind), LATENCY_COST)


def oracle(kind: str) -> str:
    return max(FLEET, key=lambda m: expected_reward(m, kind)).name


# ---- the simulator and the gateways


def serve_sims(skilled: int, plain: int) -> None:
    """The simulated Ollama servers (run in a process of their own): the fleet as configured
    on port ``skilled``, and the same models answering at once, always well, on ``plain``.
    """
    from gateway.runtime import new_event_loop, until_signalled
    from gateway.sim import SimModel, create_ollama_app, start_site

    def models(plain: bool) -> list[SimModel]:
        return [SimModel(m.name, parameter_size=m.size, context_length=32768,
                         capabilities=("completion",),
                         ttft=0.0 if plain else m.ttft,
                         tokens_per_s=0.0 if plain else m.tokens_per_s,
                         skills={} if plain else dict(m.skills)) for m in FLEET]

    async def serve() -> None:
        runners = [await start_site(create_ollama_app(models(False)), "127.0.0.1", skilled),
                   await start_site(create_ollama_app(models(True)), "127.0.0.1", plain)]
        try:
            await until_signalled()
        finally:
            for runner in runners:
                await runner.cleanup()

    new_event_loop().run_until_complete(serve())


def config(port: int, sim: int, work: Path, name: str, policy: str, qa: bool) -> Path:
    """A gateway's TOML: the alias over the fleet with ``policy``, QA on or not."""
    order = ", ".join(f'"{m.name}"' for m in FLEET)
    text = f"""[server]
port = {port}
shutdown_grace = 2.0

[tasks]
data_dir = "{work / name}"

[routing]
policy = "{policy}"

[routing.learned]
state_file = "{work / name / 'learned-routing.json'}"

[[backends]]
name = "sim"
kind = "ollama"
url = "http://127.0.0.1:{sim}"

[aliases."{ALIAS}"]
priority = {{ ollama = [{order}] }}
latency_cost = {LATENCY_COST}
"""
    if qa:
        text += '\n[[plugins]]\nname = "qa"\n\n[plugins.options]\nescalate = false\n'
    path = work / f"{name}.toml"
    path.write_text(text)
    return path


def gateway(path: Path, port: int, work: Path) -> subprocess.Popen[bytes]:
    process = start([sys.executable, "-m", "gateway", "--log-level", "warning", "serve",
                     "--config", str(path)], work / f"{path.stem}.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process=process)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# ---- 1. the policies


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    model: str  # the model that answered ("" after an error)
    passed: bool  # QA passed the answer
    seconds: float  # as the client saw it: sent to last byte read
    error: str = ""

    @property
    def reward(self) -> float:
        return reward(1.0 if self.passed else 0.0, self.seconds, LATENCY_COST)


async def drive(port: int, requests: list[Request], model_for: Callable[[Request], str],
                concurrency: int) -> list[Outcome]:
    """Every request, in order, ``concurrency`` at a time; their outcomes in the same order."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    outcomes: list[Outcome | None] = [None] * len(requests)
    queue = iter(enumerate(requests))

    async def worker(http: aiohttp.ClientSession) -> None:
        for i, req in queue:
            started = time.perf_counter()
            async with http.post(url, json={**req.body, "model": model_for(req)}) as response:
                data = await response.read()
                seconds = time.perf_counter() - started
                if response.status != 200:
                    outcomes[i] = Outcome(req.kind, "", False, seconds,
                                          f"HTTP {response.status}: {data[:200]!r}")
                    continue
                verdict = response.headers.get("x-gateway-qa", "")
                outcomes[i] = Outcome(req.kind, response.headers.get("x-gateway-model", ""),
                                      verdict == "pass", seconds)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]


async def warm_up(port: int) -> None:
    """A few requests to each model by name (no alias: nothing is learned from them)."""
    hello = [Request("chat", {"messages": [{"role": "user", "content": f"Say hello to {n}."}]})
             for n in NAMES[:8]]
    for model in FLEET:
        await drive(port, hello, by_name(model.name), 4)


def by_name(model: str) -> Callable[[Request], str]:
    return lambda req: model


@dataclass
class Policy:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)

    def rewards(self, tail: int = 0) -> list[float]:
        return [o.reward for o in self.outcomes[-tail if tail else 0:]]

    def mean(self, tail: int = 0) -> float:
        return statistics.fmean(self.rewards(tail))

    def passed(self) -> float:
        return sum(o.passed for o in self.outcomes) / len(self.outcomes)

    def latency_ms(self, p50: bool = False) -> float:
        seconds = [o.seconds for o in self.outcomes]
        return 1000 * (statistics.median(seconds) if p50 else statistics.fmean(seconds))

    def errors(self) -> int:
        return sum(1 for o in self.outcomes if o.error)


@dataclass
class Runs:
    """Every policy's run on the same requests: the static priority, the learned policy
    (each repeat from a fresh state) and the oracle.
    """

    static: Policy
    learned: list[Policy]
    oracle: Policy
    tail: int  # the last requests, where the learned policy is judged

    def share(self, run: Policy, whole: bool = False) -> float:
        """Of the oracle's reward on the same requests (the last ones, unless ``whole``)."""
        n = 0 if whole else self.tail
        return run.mean(n) / self.oracle.mean(n)

    @property
    def typical(self) -> Policy:
        """The learned run of the median share."""
        return sorted(self.learned, key=self.share)[len(self.learned) // 2]


def compare(requests: list[Request], concurrency: int, sim: int, work: Path, repeats: int,
            tail: int) -> Runs:
    """The same requests under each policy, each run through a fresh gateway process."""
    runs = [("priority", "priority", by_name(ALIAS)),
            *((f"learned, run {n + 1}", "learned", by_name(ALIAS)) for n in range(repeats)),
            ("oracle", "priority", lambda req: oracle(req.kind))]
    done = []
    for name, policy, model_for in runs:
        port = free_ports(("gateway",))["gateway"]
        process = gateway(config(port, sim, work, name.replace(", ", "-").replace(" ", "-"),
                                 policy, qa=True), port, work)
        try:
            asyncio.run(warm_up(port))
            started = time.perf_counter()
            outcomes = asyncio.run(drive(port, requests, model_for, concurrency))
        finally:
            stop(process)
        result = Policy(name, outcomes)
        print(f"{name}: {len(outcomes)} requests in {time.perf_counter() - started:.1f} s, "
              f"mean reward {result.mean():.3f} (last {tail}: {result.mean(tail):.3f}), "
              f"QA passed {result.passed():.1%}, {result.errors()} errors", file=sys.stderr)
        done.append(result)
    return Runs(done[0], done[1:-1], done[-1], tail)


# ---- 2. the overhead


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU so far, all the process's threads together."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total


@dataclass
class Overhead:
    requests: int  # per batch, sequential on one connection
    rounds: int
    instructions: dict[str, float]  # per request under callgrind, the lower of 2 batches
    cpu_us: dict[str, list[float]]  # CPU µs per request outside valgrind, one per round
    alone_us: float  # the policy's own pick and learning, in this process
    cores: dict[str, float]  # CPU used meanwhile, in cores: ours, others', the hypervisor's

    def cpu(self, policy: str) -> float:
        return statistics.median(self.cpu_us[policy])

    @property
    def added_cpu_us(self) -> list[float]:
        """learned - priority in each round (measured one right after the other)."""
        return [lo - pr for pr, lo in zip(self.cpu_us["priority"], self.cpu_us["learned"],
                                           strict=True)]

    @property
    def per_us(self) -> float:
        """Instructions per µs of the priority gateway's CPU time (user and system)."""
        return self.instructions["priority"] / self.cpu("priority")

    @property
    def added_instructions(self) -> float:
        return self.instructions["learned"] - self.instructions["priority"]


def ensure_valgrind() -> None:
    if shutil.which("valgrind"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "valgrind"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which("valgrind"):
        raise SystemExit("loadtest.routing needs valgrind: apt-get install -y valgrind")


def varied(seed: int) -> list[dict[str, Any]]:
    """The workload's first ``VARIED`` requests to the alias, as plain chats (the overhead's
    requests: they differ as the workload's do, so a pick is rarely one worked out before).
    """
    return [{"model": ALIAS, **r.body, "max_tokens": 64} for r in workload(VARIED, seed)]


def overhead(sim: int, sim_pid: int, work: Path, requests: int, native_requests: int,
             rounds: int, seed: int) -> Overhead:
    """The workload's first requests in turn, to the alias, through a gateway of each
    policy: CPU time per request outside valgrind (interleaved rounds), then instructions
    under callgrind.
    """
    body, path = varied(seed), "/v1/chat/completions"
    policies = ("priority", "learned")
    ports = free_ports(policies)
    configs = {p: config(ports[p], sim, work, f"plain-{p}", p, qa=False) for p in policies}
    cpu_us: dict[str, list[float]] = {p: [] for p in policies}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for policy in policies:
            processes[policy] = gateway(configs[policy], ports[policy], work)
            _send(ports[policy], path, body, 100)  # warm up
        meter = Meter({"gateways": [p.pid for p in processes.values()],
                       "simulator": [sim_pid]})
        for round_ in range(rounds):
            for policy in policies:
                before = cpu_ns(processes[policy].pid)
                _send(ports[policy], path, body, native_requests)
                cpu_us[policy].append((cpu_ns(processes[policy].pid) - before) / 1000 /
                                      native_requests)
            print(f"overhead, round {round_ + 1}/{rounds}: CPU µs per request " +
                  ", ".join(f"{p} {cpu_us[p][-1]:.1f}" for p in policies), file=sys.stderr)
        cores = meter.cores()
    finally:
        for process in processes.values():
            stop(process)
    ensure_valgrind()
    ports = free_ports(policies)  # new gateways, each with a fresh state
    configs = {p: config(ports[p], sim, work, f"counted-{p}", p, qa=False) for p in policies}
    counted: dict[str, Counted] = {}
    instructions: dict[str, float] = {}
    try:
        python = sys.executable
        for policy in policies:  # started together: each takes a while under valgrind
            counted[policy] = Counted([python, "-m", "gateway", "--log-level", "warning",
                                       "serve", "--config", str(configs[policy])], work,
                                      f"counted-{policy}")
        for policy in policies:
            wait_ready(f"http://127.0.0.1:{ports[policy]}/health", timeout=600,
                       process=counted[policy].process)
            _send(ports[policy], path, body, 20)  # warm up
        for _ in range(2):
            for policy in policies:
                began = time.perf_counter()
                count = counted[policy].per_request(ports[policy], path, body, requests)
                instructions[policy] = min(instructions.get(policy, count), count)
                print(f"overhead under callgrind: {policy} {count:,.0f} instructions per "
                      f"request ({time.perf_counter() - began:.1f} s)", file=sys.stderr)
    finally:
        for each in counted.values():
            each.stop()
    return Overhead(requests, rounds, instructions, cpu_us, learned_alone(body), cores)


def learned_alone(bodies: list[dict[str, Any]], number: int = 2000, repeat: int = 5
                  ) -> float:
    """µs of the learned policy's own work for the overhead's requests in turn (features,
    the pick among the alias's models, learning from the outcome), in this process, the
    best of ``repeat`` runs of ``number``: hot in the caches, as it never is in a gateway
    between requests.
    """
    policy = LearnedOrder(LearnedConfig())
    reqs = itertools.cycle([parse_chat(body) for body in bodies])
    picks = [Candidate(m.name, [], f"{ALIAS}: priority #{i + 1}") for i, m in enumerate(FLEET)]
    earned = reward(1.0, 0.001, LATENCY_COST)

    def once() -> None:
        _, decision = policy.order(ALIAS, picks, next(reqs), lambda candidate: True)
        assert decision is not None
        policy.learn(ALIAS, decision.model, decision.x, earned)

    for _ in range(200):
        once()
    return min(timeit.repeat(once, number=number, repeat=repeat)) / number * 1e6


# ---- the report


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(runs: Runs, path: Path) -> None:
    """The learned policy's moving mean reward (each run) against the static priority's
    and the oracle's whole-run means; below, its share of the oracle's reward on the same
    requests (the mix of kinds moves every policy's reward, the share much less).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    best = moving_mean(runs.oracle.rewards(), WINDOW)
    x = range(1, len(best) + 1)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.4), dpi=110, sharex=True,
                                         height_ratios=(2, 1))
    for n, run in enumerate(runs.learned):
        curve = moving_mean(run.rewards(), WINDOW)
        style: dict[str, Any] = {"color": "tab:blue", "linewidth": 1.4} if n == 0 else \
            {"color": "tab:cyan", "linewidth": 0.8, "alpha": 0.8}
        top.plot(x, curve, label=f"{run.name}: mean of the last {WINDOW} requests", **style)
        bottom.plot(x, [a / b for a, b in zip(curve, best, strict=True)], **style)
    for run, label, colour in ((runs.oracle, "oracle", "tab:green"),
                               (runs.static, "static priority", "tab:red")):
        top.axhline(run.mean(), color=colour, linestyle="--",
                    label=f"{label}: {run.mean():.3f}, the whole run's mean")
    top.set_ylabel(f"reward\n(QA pass 1/0 - {LATENCY_COST:g} x seconds)")
    top.set_title(f"Learned routing on {ALIAS}: {len(FLEET)} simulated models, "
                  f"{len(best):,} mixed requests")
    top.legend(loc="lower right", fontsize=8)
    bottom.axhline(0.95, color="tab:green", linestyle=":", label="95%")
    bottom.set_ylabel(f"of the oracle's reward,\nsame {WINDOW} requests")
    bottom.yaxis.set_major_formatter(PercentFormatter(1.0))
    bottom.set_ylim(0.6, 1.1)
    bottom.set_xlabel(f"request (shaded: the last {runs.tail})")
    bottom.legend(loc="lower right", fontsize=8)
    for axes in (top, bottom):
        axes.axvspan(len(best) - runs.tail, len(best), color="0.92", zorder=0)
        axes.set_xlim(0, len(best))
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def _fill(text: str) -> str:
    """A paragraph (or a bullet, its lines after the first indented) in lines of 92."""
    return textwrap.fill(" ".join(text.split()), 92,
                         subsequent_indent="  " if text.lstrip().startswith("- ") else "",
                         break_on_hyphens=False, break_long_words=False)


def _models_table() -> str:
    head = ["model", "first token", "tokens/s"] + [f"{k}" for k in KINDS]
    rows = [f"| {' | '.join(head)} |", "|---|---:|---:|" + "---:|" * len(KINDS)]
    for m in FLEET:
        cells = []
        for kind in KINDS:
            cell = f"{m.skills[kind]:.2f} → {expected_reward(m, kind):.2f}"
            cells.append(f"**{cell}**" if oracle(kind) == m.name else cell)
        rows.append(f"| `{m.name}` | {m.ttft * 1000:g} ms | {m.tokens_per_s:,.0f} | "
                    f"{' | '.join(cells)} |")
    return "\n".join(rows)


def _policies_table(runs: Runs) -> str:
    tail = runs.tail
    rows = [f"| policy | mean reward | last {tail}: mean reward | last {tail}: of the "
            "oracle's | QA passed | mean latency ms | p50 latency ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    named = [(runs.static, 'static priority (`policy = "priority"`)'),
             *((run, f'{run.name} (`policy = "learned"`, a fresh state)')
               for run in runs.learned),
             (runs.oracle, "oracle (the best model for the kind, by name)")]
    for run, name in named:
        rows.append(f"| {name} | {run.mean():.3f} | {run.mean(tail):.3f} | "
                    f"{runs.share(run):.1%} | {run.passed():.1%} | {run.latency_ms():.1f} | "
                    f"{run.latency_ms(p50=True):.1f} | {run.errors()} |")
    return "\n".join(rows)


def _kinds_table(runs: Runs, learned: Policy) -> str:
    """Per kind, over the last requests: where a learned run sent them, and what each
    policy earned on them.
    """
    rows = ["| kind | requests | oracle's model | learned sent there | learned's picks | "
            "reward: static | learned | oracle |", "|---|---:|---|---:|---|---:|---:|---:|"]
    last = {"static": runs.static.outcomes[-runs.tail:],
            "learned": learned.outcomes[-runs.tail:], "oracle": runs.oracle.outcomes[-runs.tail:]}
    for kind in KINDS:
        at = [i for i, o in enumerate(last["learned"]) if o.kind == kind]
        if not at:
            continue
        picks = Counter(last["learned"][i].model for i in at)
        best = oracle(kind)
        shares = ", ".join(f"{m} {n / len(at):.0%}" for m, n in picks.most_common())
        means = [statistics.fmean(outcomes[i].reward for i in at) for outcomes in last.values()]
        rows.append(f"| {kind} | {len(at)} | `{best}` | {picks[best] / len(at):.0%} | "
                    f"{shares} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(rows)


def _weak_kinds(runs: Runs, learned: Policy) -> list[str]:
    """The kinds on which a learned run earned less than the static priority, lately."""
    out = []
    last = learned.outcomes[-runs.tail:]
    for kind in KINDS:
        at = [i for i, o in enumerate(last) if o.kind == kind]
        if not at:
            continue
        mine = statistics.fmean(last[i].reward for i in at)
        static = statistics.fmean(runs.static.outcomes[-runs.tail:][i].reward for i in at)
        elsewhere = sum(last[i].model != oracle(kind) for i in at) / len(at)
        first, second = sorted((expected_reward(m, kind) for m in FLEET), reverse=True)[:2]
        static_too = " (the static priority's too)" if oracle(kind) == FLEET[0].name else ""
        if mine < static:
            out.append(f"""- On {kind} ({SHARE[kind]:.0%} of the requests) the median learned
                run earned less than the static priority over the last {runs.tail}
                ({mine:.3f} against {static:.3f}): it still sent {elsewhere:.0%} of them
                elsewhere than the oracle's choice{static_too}, `{oracle(kind)}`, whose
                expected reward for the kind ({first:.2f}) is {first - second:.2f} above the
                next model's.""")
    return out


def render(runs: Runs, cost: Overhead, args: argparse.Namespace, picture: Path) -> str:
    tail = args.tail
    static, best, learned = runs.static, runs.oracle, runs.typical
    share = runs.share(learned)
    added_us = cost.added_instructions / cost.per_us
    command = (f".venv/bin/python -m loadtest.routing --requests {args.requests} "
               f"--concurrency {args.concurrency} --seed {args.seed} --repeats {args.repeats} "
               f"--tail {tail} --overhead-requests {args.overhead_requests} --native-requests "
               f"{args.native_requests} --rounds {args.rounds}")
    mix = ", ".join(f"{k} {SHARE[k]:.0%}" for k in KINDS)
    counts = Counter(o.kind for o in static.outcomes)
    crossed = [next((i + 1 for i, v in enumerate(moving_mean(run.rewards(), WINDOW))
                     if i + 1 >= WINDOW and v >= 0.95 * best.mean()), None)
               for run in runs.learned]
    verdict = "met" if share >= 0.95 else "NOT met"
    target = "met" if added_us <= 50 else "NOT met"
    paragraphs = [
        f"""One alias, `{ALIAS}`, over {len(FLEET)} models of a simulated Ollama server (a
        process of its own on loopback), each with its own skill by kind of task
        (`SimModel.skills`: the chance QA passes its answer; otherwise it answers invalid
        JSON, a loop or nothing) and its own speed (time to first token, then its reply of
        {len(tokens(DEFAULT_REPLY))} tokens at its pace). The times are about a hundredth of
        a real model's, so the alias's `latency_cost` is {LATENCY_COST:g} a second (`auto`
        has 0.02): the slowest model's ~0.1 s costs as much as ~0.2 of a good answer. The
        static priority lists the models largest first, as `auto` does. A cell below: the
        skill, then the expected reward (skill - latency_cost x expected seconds, a poor
        answer's length included); in bold the oracle's choice for the kind.""",
        f"""Workload (seed {args.seed}): {args.requests:,} requests, the kinds mixed {mix}
        (drawn: {', '.join(f'{k} {counts[k]}' for k in KINDS)}); each checked to read as its
        kind to the gateway's router and to the simulator. Chat: short questions, a pasted
        draft of 300 to 3,000 characters, a third of them a conversation of three turns;
        code: functions to write, a bug or a snippet to explain (Python, JavaScript, SQL,
        Rust); extraction: an invoice, a text or an email to turn into JSON
        (`response_format` `json_object`, which QA checks); reasoning: arithmetic, a word
        problem, a why-question; long: minutes or a report of 7,000 to 10,000 characters to
        summarise. Every policy gets the same requests in the same order, {args.concurrency}
        at a time from one client, through a `gateway serve` process of its own with the QA
        plugin (`escalate = false`: one request, one model's answer), warmed up first with
        a few requests to each model by name. The simulator decides a good or poor answer
        from the model's name and the request's text, so a model gives the same answer to
        the same request under every policy.""",
        f"""Reward per request: `gateway.routing.learned.reward` as the gateway learns it, 1
        if QA passed the answer (`x-gateway-qa: pass`) else 0, less {LATENCY_COST:g} x its
        latency in seconds as the client saw it (sent to the last byte read; the gateway
        learns from its own measure, a fraction of a millisecond shorter). Static: `policy
        = "priority"`; learned: `policy = "learned"` with a fresh state file; oracle: each
        request asks by name for the model of the best expected reward for its kind (bold
        above), a gateway with the static policy answering. "Last {tail}": the same last
        {tail} requests of each run.""",
    ]
    runs_text = ", ".join(f"{runs.share(run):.1%}" for run in runs.learned)
    reached = ", ".join(f"{n:,}" if n else "never" for n in crossed)
    findings = [
        f"""- The learned policy, {len(runs.learned)} runs from a fresh state on the same requests,
        earned {runs_text} (in order) of the oracle's reward over the last {tail} requests;
        the median
        run ({learned.name}): **{share:.1%}** ({learned.mean(tail):.3f} against
        {best.mean(tail):.3f}; target about 95%: {verdict}), and
        {runs.share(learned, whole=True):.1%} over the whole run, exploration and the start
        from the static order included. The static priority earned
        {runs.share(static):.1%} of the oracle's over the last {tail}. The learned moving
        mean of {WINDOW} first reached 95% of the oracle's whole-run mean after {reached}
        requests. (A run differs from the next only by timing: latencies, and which
        outcomes are learned from before which pick.)""",
        f"""- The static priority sends everything to `{FLEET[0].name}`, which passes QA most
        often ({static.passed():.1%}) but is the slowest (p50
        {static.latency_ms(p50=True):.1f} ms); the oracle passes {best.passed():.1%} at p50
        {best.latency_ms(p50=True):.1f} ms.""",
        *_weak_kinds(runs, learned),
    ]
    diffs = cost.added_cpu_us
    overhead_text = f"""The workload's first {VARIED} requests (above, seed {args.seed}),
        sent in turn as plain chats (no plugins, the models answering at once, from a second
        simulated server of the same process): they differ as the workload's do (each is
        scored from its shape's coefficients, worked out for every model when outcomes are
        taken in, every 32 outcomes or a second). Each goes to
        `{ALIAS}` through two gateway processes that differ only in `[routing] policy`:
        what the learned policy adds per request (the request's features and their vector,
        an estimate per model, the pick and its explanation, the outcome learned from and
        kept with them; what was learned written to its state file every 10 s).
        Instructions: valgrind's callgrind, {cost.requests} sequential requests per batch
        on one connection after 20 to warm up, each batch twice, the lower count kept (as
        `loadtest.doors` counts). CPU time: the same two gateways outside valgrind,
        {cost.rounds} rounds of {args.native_requests:,} sequential requests to each, one
        right after the other, the process's CPU time per request (all its threads, user
        and system, from `/proc/PID/task/*/schedstat`); the difference is taken in each
        round, and its median kept. Instructions per µs: the priority gateway's
        instructions per request over its CPU µs per request (the median round), that is
        {cost.per_us:,.0f}: the gateway's average, Python and numpy, system calls
        included."""
    table = "\n".join([
        "| gateway, `policy =` | instructions per request | CPU µs per request: median "
        "round (range) |",
        "|---|---:|---:|",
        *(f"| `\"{p}\"` | {cost.instructions[p]:,.0f} | {cost.cpu(p):.0f} "
          f"({min(cost.cpu_us[p]):.0f} to {max(cost.cpu_us[p]):.0f}) |"
          for p in ("priority", "learned")),
        f"| learned - priority | **{cost.added_instructions:+,.0f}** "
        f"({cost.added_instructions / cost.instructions['priority']:+.1%}) | "
        f"**{statistics.median(diffs):+.0f}** ({min(diffs):+.0f} to {max(diffs):+.0f}) |",
    ])
    overhead_findings = "\n".join(_fill(f) for f in (
        f"""- The learned policy adds **{cost.added_instructions:,.0f} instructions per
        request**, that is **{added_us:.0f} µs** at this machine's {cost.per_us:,.0f}
        instructions per µs (target: at most 50 µs, {target}); measured as the gateway's
        CPU time it adds **{statistics.median(diffs):.0f} µs** per request (the median
        difference of {cost.rounds} rounds, from {min(diffs):.0f} to {max(diffs):.0f} µs:
        the machine's speed drifts from one round to the next, the instruction count does
        not).""",
        f"""- The policy's own work alone (`LearnedOrder.order` and `.learn` for the same
        requests in turn and the alias's {len(FLEET)} models, in the benchmark's process,
        over and over: hot in the caches) takes {cost.alone_us:.0f} µs; in a gateway, between two
        requests' other work, the same instructions run slower.""",
        f"""- While the CPU time was measured, the gateways used {cost.cores['gateways']:.2f}
        cores, the simulator {cost.cores['simulator']:.2f}, the benchmark
        {cost.cores['benchmark']:.2f}, anything else on the machine {cost.cores['other']:.2f},
        and the hypervisor took {cost.cores['steal']:.2f} (steal).""",
    ))
    return "\n\n".join([
        SECTION,
        f"Command: `{command}`\n({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}.)",
        "### Policies on a mixed workload",
        *(_fill(p) for p in paragraphs[:1]),
        _models_table(),
        *(_fill(p) for p in paragraphs[1:]),
        _policies_table(runs),
        "\n".join(_fill(f) for f in findings),
        f"Per kind, over the last {tail} requests: the median learned run's picks, and each "
        "policy's mean reward on those requests.",
        _kinds_table(runs, learned),
        f"![The learned policy's reward, a moving mean of {WINDOW} requests, against the "
        f"static priority's and the oracle's]({picture.name})",
        "### What the learned policy costs per request",
        _fill(overhead_text),
        table,
        overhead_findings,
    ]) + "\n"


def run(args: argparse.Namespace) -> str:
    requests = workload(args.requests, args.seed)
    work = Path(tempfile.mkdtemp(prefix="loadtest-routing-"))
    ports = free_ports(("skilled", "plain"))
    sim = start([sys.executable, "-m", "loadtest.routing", "--serve-sims",
                 f"{ports['skilled']},{ports['plain']}"], work / "sim.log")
    try:
        for name in ("skilled", "plain"):
            wait_ready(f"http://127.0.0.1:{ports[name]}/api/version", process=sim)
        runs = compare(requests, args.concurrency, ports["skilled"], work, args.repeats,
                       args.tail)
        cost = overhead(ports["plain"], sim.pid, work, args.overhead_requests,
                        args.native_requests, args.rounds, args.seed)
    finally:
        stop(sim)
    picture = args.out.parent / "routing.png"
    plot(runs, picture)
    report = render(runs, cost, args, picture)
    write_section(args.out, report, SECTION)
    shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per policy")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once")
    parser.add_argument("--seed", type=int, default=1, help="of the workload")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the learned policy, each from a fresh state")
    parser.add_argument("--tail", type=int, default=500,
                        help="the last requests, where the learned policy is judged")
    parser.add_argument("--overhead-requests", type=int, default=200,
                        help="requests per callgrind batch")
    parser.add_argument("--native-requests", type=int, default=300,
                        help="requests per round of CPU time outside valgrind")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of CPU time")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--serve-sims", help=argparse.SUPPRESS)  # (the simulator process)
    args = parser.parse_args()
    if args.serve_sims:
        skilled, plain = (int(p) for p in args.serve_sims.split(","))
        serve_sims(skilled, plain)
        return
    print(run(args))


if __name__ == "__main__":
    main()
