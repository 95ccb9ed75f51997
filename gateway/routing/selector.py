"""Which models may answer a request, best first: the model asked for or an ``auto`` alias's
picks, then the model's fallbacks, then the lower tiers — each filtered by what the request
needs (images → vision, tools → tools, its length → a context window that fits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from gateway.config import TIERS, AliasConfig, GatewayConfig
from gateway.errors import UNSUPPORTED_BY_MODEL, InvalidRequest, Unavailable, model_shown
from gateway.protocol.openai import ChatRequest, CompletionRequest, text_of
from gateway.protocol.units import CHARS_PER_TOKEN
from gateway.routing.candidates import REQUESTED, Candidate, Route
from gateway.routing.catalog import Deployment, ModelCatalog, bare, named_in
from gateway.routing.learned import LearnedOrder
from gateway.routing.ordering import Ordering, Priority, Usable

SEED_OLLAMA = ("qwq:32b", "qwen2.5-coder:32b", "phi3.5:3.8b")
SEED_MLX = ("command-r-plus:104b", "deepseek-r1-distill-llama:70b")

# The seed system's choices; a config's [aliases."name"] replaces one or adds another.
BUILTIN_ALIASES: dict[str, AliasConfig] = {
    "auto": AliasConfig(priority={"ollama": SEED_OLLAMA, "mlx": SEED_MLX},
                        prefer=("ollama", "mlx"), others="largest"),
    "auto:code": AliasConfig(
        priority={"ollama": ("qwen2.5-coder:32b", "qwq:32b", "phi3.5:3.8b"),
                  "mlx": ("deepseek-r1-distill-llama:70b", "command-r-plus:104b")},
        prefer=("ollama", "mlx"), others="largest"),
    "auto:fast": AliasConfig(priority={"ollama": ("phi3.5:3.8b",)}, others="smallest",
                             latency_cost=0.2),
    "auto:vision": AliasConfig(require=("vision",), others="largest"),
    "auto:reasoning": AliasConfig(priority={"ollama": ("qwq:32b",),
                                            "mlx": ("deepseek-r1-distill-llama:70b",)},
                                  prefer=("ollama", "mlx")),
}
PRIORITY = Priority()
PICKS_CACHE = 64  # remembered alias picks (per alias, capability needs, catalog version)
# A window must hold the prompt and the start of the answer: its limit, up to this many
# tokens. A limit is a ceiling, often a client's standing default (Claude Code asks for
# 32,000 every time): rather than pass over the best model for it, or refuse when no window
# holds it, a longer answer ends where the window does ("length"), and a backend that
# refuses the limit is failed over as a context error.
ANSWER_ROOM = 1024


@dataclass(frozen=True, slots=True)
class Needs:
    """What a request asks of a model."""

    vision: bool = False
    tools: bool = False
    tokens: int = 0  # estimated prompt tokens plus room for the answer
    insert: bool = False  # fill-in-the-middle (a text completion's ``suffix``)

    def met_by(self, deployment: Deployment) -> bool:
        info = deployment.model
        return (info.can("completion")
                and (not self.vision or info.can("vision"))
                and (not self.tools or info.can("tools"))
                and (not self.insert or info.can("insert"))
                and (not info.context_length or info.context_length >= self.tokens))

    def wanted(self) -> list[str]:
        """The capabilities needed beyond completion."""
        return [c for c, on in (("vision", self.vision), ("tools", self.tools),
                                ("insert", self.insert)) if on]

    def held_now(self, deployment: Deployment) -> bool:
        """Whether the window its backend runs it with now (where said) holds the prompt."""
        window = deployment.model.running_context
        return not window or window >= self.tokens

    def sure(self, candidate: Candidate) -> bool:
        """Whether the model is known (not just presumed) to have what is needed."""
        wanted = self.wanted()
        return all(d.model.known and all(c in d.model.capabilities for c in wanted)
                   for d in candidate.deployments) if wanted else True

    def describe(self) -> str:
        parts = [p for p, on in (("images", self.vision), ("tools", self.tools),
                                 ("fill-in-the-middle", self.insert)) if on]
        return " and ".join([*parts, f"~{self.tokens} tokens of context"])


def needs_of(req: ChatRequest | CompletionRequest) -> Needs:
    room = min(req.sampling.max_tokens or 0, ANSWER_ROOM)
    if isinstance(req, CompletionRequest):
        return Needs(tokens=(len(req.prompt) + len(req.suffix or "")) // CHARS_PER_TOKEN +
                     room, insert=bool(req.suffix))
    # The messages' text, the calls an assistant made, and the tools' definitions (an
    # agent's run to thousands of tokens): all of it goes into the window.
    chars = sum(len(text_of(m.get("content"))) + (len(orjson.dumps(m["tool_calls"]))
                                                   if m.get("tool_calls") else 0)
                for m in req.messages)
    if req.tools:
        chars += len(orjson.dumps(req.tools))
    vision = any(isinstance(m.get("content"), list) and
                 any(p.get("type") == "image_url" for p in m["content"]) for m in req.messages)
    return Needs(vision=vision, tools=bool(req.tools and req.tool_choice != "none"),
                 tokens=chars // CHARS_PER_TOKEN + room)


class Selector:
    def __init__(self, catalog: ModelCatalog, config: GatewayConfig) -> None:
        self._catalog = catalog
        self._aliases = {**BUILTIN_ALIASES, **config.aliases}
        # (by name without ``:latest``: ``llama3.2`` and ``llama3.2:latest`` are one)
        self._fallbacks = {bare(m.name): m.fallbacks for m in config.models if m.fallbacks}
        self._default_fallbacks = config.routing.fallbacks
        self._tier_fallback = config.routing.tier_fallback
        self._picks: dict[tuple[str, bool, bool, bool, int],
                          tuple[list[list[Candidate]], list[Candidate]]] = {}
        self._known = {bare(m.name) for m in config.models}
        learns = [name for name, spec in self._aliases.items()
                  if (spec.policy or config.routing.policy) == "learned"]
        # What was learned from outcomes (None: every alias keeps its static order).
        self.learned = LearnedOrder(config.routing.learned) if learns else None
        self._orderings: dict[str, Ordering] = {
            name: self.learned if self.learned is not None and name in learns else PRIORITY
            for name in self._aliases}

    def latency_cost(self, alias: str) -> float | None:
        """What a second of an answer costs for this alias (None: no such alias here)."""
        spec = self._aliases.get(alias)
        return spec.latency_cost if spec is not None else None

    def is_alias(self, name: str) -> bool:
        return name in self._aliases

    def route(self, req: ChatRequest | CompletionRequest, allowed: tuple[str, ...] = (),
              usable: Usable = lambda candidate: True) -> Route:
        """The candidates for a request, best first; never empty. The fallbacks (and what
        the request needs of them) are worked out only if the first candidates cannot answer:
        most requests never need them; with ``allowed``, only those models among them. An
        alias's picks are put in order by its ordering (``usable``: which can answer now).
        """
        name = req.model
        decision = None
        if name in self._aliases:
            needs = needs_of(req)
            first = self.alias_picks(name, needs)
            if not first:
                raise self._nothing_fits(name, self._required(name, needs))
            presumed: list[Candidate] = []
            if needs.wanted() or self._aliases[name].require:
                # Those known to have what is needed are ordered (and learned) among
                # themselves; those only presumed to come after them, however ordered.
                required = self._required(name, needs)
                sure = [c for c in first if required.sure(c)]
                if sure:
                    first, presumed = sure, first[len(sure):]
            first, decision = self._orderings[name].order(name, first, req, usable)
            if presumed:
                first = [*first, *presumed]
        elif bare(name) in self._known:
            # A configured model whose backend is away right now (never listed since start):
            # its fallbacks answer instead of a 404.
            # (None to try: the name is kept for what the client is told)
            first = [Candidate(name, _inserting(req, self._catalog.deployments(name)),
                               REQUESTED)]
        else:
            first = [Candidate(name, _inserting(req, self._catalog.resolve(name)), REQUESTED)]
        if allowed:
            return Route(first, lambda: [c for c in self._fallbacks_for(name, first,
                                                                        needs_of(req))
                                         if named_in(c.name, allowed)], decision)
        return Route(first, lambda: self._fallbacks_for(name, first, needs_of(req)), decision)

    def stronger(self, req: ChatRequest | CompletionRequest, than: Deployment, why: str,
                 allowed: tuple[str, ...] = ()) -> list[Candidate]:
        """Models to escalate to after an answer from ``than`` was found wanting: the next
        larger ones first, then the cloud tier (cheap local first, stronger only when needed);
        with ``allowed``, only those.
        """
        needs = needs_of(req)
        size = than.model.parameters or 0
        larger: list[Candidate] = []
        cloud: list[Candidate] = []
        for name in self._catalog.names():
            if allowed and not named_in(name, allowed):
                continue
            deployments = [d for d in self._catalog.deployments(name) if needs.met_by(d)
                           and d.model.name != than.model.name]
            if not deployments:
                continue
            candidate = Candidate(name, deployments, f"escalated after {why}")
            if size and _size(candidate) > size:
                larger.append(candidate)
            elif than.backend.tier != "cloud" and any(d.backend.tier == "cloud"
                                                      for d in deployments):
                cloud.append(candidate)
        # (those known to have what is needed first: one only presumed to see images, asked
        # to, may only say it cannot)
        larger.sort(key=lambda c: (not needs.sure(c), _size(c)))
        return larger + sorted(cloud, key=lambda c: (not needs.sure(c), -_size(c)))

    def _fallbacks_for(self, name: str, first: list[Candidate], needs: Needs
                       ) -> list[Candidate]:
        seen = {c.name for c in first}
        out: list[Candidate] = []
        for fallback in self._fallback_names(name):
            for candidate in self._expand(fallback, needs, f"fallback for {name}"):
                if candidate.name not in seen:
                    seen.add(candidate.name)
                    out.append(candidate)
        if self._tier_fallback:
            for candidate in self._lower_tiers([*first, *out], needs):
                if candidate.name not in seen:
                    seen.add(candidate.name)
                    out.append(candidate)
        return out

    def alias_picks(self, alias: str, needs: Needs) -> list[Candidate]:
        """An alias's models that exist now and meet the needs, best first: the best of each
        priority list (in the preferred order), then the rest of the lists, then others; a
        model known to have what is needed before one only presumed to.
        """
        required = self._required(alias, needs)
        lists, others = self._groups(alias, required)
        if needs.tokens:  # the prompt's length decides per request: not part of the cache
            lists = [_fitting(group, needs) for group in lists]
            others = _fitting(others, needs)
            # Only deployments whose backend runs them with a window that holds the prompt
            # now, if any does: one that would cut it short answers when no other can.
            held = [_fitting(group, needs, now=True) for group in lists]
            held_others = _fitting(others, needs, now=True)
            if any(held) or held_others:
                lists, others = held, held_others
        picks = [group[0] for group in lists if group]
        picks += [c for group in lists for c in group[1:]] + others
        picks.sort(key=lambda c: not required.sure(c))
        return picks

    def _groups(self, alias: str, required: Needs
                ) -> tuple[list[list[Candidate]], list[Candidate]]:
        """The alias's priority lists and its other models, as available now (remembered
        until the catalog changes).
        """
        key = (alias, required.vision, required.tools, required.insert, self._catalog.version)
        groups = self._picks.get(key)
        if groups is None:
            if len(self._picks) >= PICKS_CACHE:
                self._picks.clear()
            # (without the prompt's length: the first request's must not decide for all)
            groups = self._picks[key] = self._group(alias, dataclasses.replace(required, tokens=0))
        return groups

    def _group(self, alias: str, required: Needs
               ) -> tuple[list[list[Candidate]], list[Candidate]]:
        spec = self._aliases[alias]
        labels = [*spec.prefer, *(k for k in spec.priority if k not in spec.prefer)]
        lists = [[c for c in (self._candidate(n, required, alias, f"{label} priority #{i + 1}")
                              for i, n in enumerate(spec.priority.get(label, ()))) if c]
                 for label in labels]
        rest: list[Candidate] = []
        if spec.others != "none":
            listed = {c.name for group in lists for c in group}
            rest = [c for c in self._qualifying(required, alias, spec.require)
                    if c.name not in listed]
            if spec.others == "largest":
                rest.sort(key=_size, reverse=True)
            else:  # a model of unknown size is not presumed small
                rest.sort(key=lambda c: _size(c) or float("inf"))
        return lists, rest

    def _required(self, alias: str, needs: Needs) -> Needs:
        require = self._aliases[alias].require
        return Needs(vision=needs.vision or "vision" in require,
                     tools=needs.tools or "tools" in require, tokens=needs.tokens,
                     insert=needs.insert or "insert" in require)

    def aliases(self, *, available: bool = True) -> list[str]:
        """The aliases (only those that can pick a model right now, unless not asked to)."""
        return [name for name in self._aliases
                if not available or self.alias_picks(name, Needs())]

    def _candidate(self, name: str, needs: Needs, alias: str, why: str) -> Candidate | None:
        deployments = [d for d in self._catalog.deployments(name) if needs.met_by(d)]
        return Candidate(self._catalog.known_as(name), deployments, f"{alias}: {why}") \
            if deployments else None

    def _qualifying(self, needs: Needs, alias: str, require: Iterable[str]) -> list[Candidate]:
        out = []
        for name in self._catalog.names():
            deployments = [d for d in self._catalog.deployments(name) if needs.met_by(d)
                           and all(d.model.can(cap) for cap in require)]
            if deployments:
                out.append(Candidate(name, deployments, f"{alias}: available model"))
        return out

    def _fallback_names(self, name: str) -> tuple[str, ...]:
        return self._fallbacks.get(bare(name), self._default_fallbacks)

    def _expand(self, name: str, needs: Needs, why: str) -> list[Candidate]:
        if name in self._aliases:
            return [Candidate(c.name, c.deployments, f"{why} ({c.reason})")
                    for c in self.alias_picks(name, needs)]
        found = self._candidate(name, needs, why, "listed")
        return [Candidate(found.name, found.deployments, why)] if found else []

    def _lower_tiers(self, route: list[Candidate], needs: Needs) -> list[Candidate]:
        """Models of the tiers below the lowest one already in the route (server, cloud)."""
        tiers = {d.backend.tier for c in route for d in c.deployments}
        lowest = max((TIERS.index(t) for t in tiers), default=0)
        out: list[Candidate] = []
        for tier in TIERS[lowest + 1:]:
            tier_models = [
                Candidate(name, ds, f"{tier} tier fallback")
                for name in self._catalog.names()
                if (ds := [d for d in self._catalog.deployments(name)
                           if d.backend.tier == tier and needs.met_by(d)])
            ]
            out += sorted(tier_models, key=_size, reverse=True)
        return out

    def _nothing_fits(self, alias: str, needs: Needs) -> Exception:
        """A 400 when the alias has models up and none can take this request; a 503 when
        it has none up now (its backends away, or the models it names not there yet).
        """
        spec = self._aliases[alias]
        names = self._catalog.names() if spec.others != "none" else \
            [name for names in spec.priority.values() for name in names]
        if any(self._catalog.deployments(name) for name in names):
            return InvalidRequest(f"No model available for {alias!r} can take this request "
                                  f"({needs.describe()}).", param="model",
                                  code="no_capable_model")
        return Unavailable(f"No model is available for {alias!r} right now.", retry_after=5)


def _inserting(req: ChatRequest | CompletionRequest, deployments: list[Deployment]
               ) -> list[Deployment]:
    """A named model's deployments, less those said not to fill in the middle when the
    request does (a server that cannot leaves the suffix out without a word: llama.cpp's
    /v1/completions; images and tools a server refuses itself); a 400 when none is left.
    """
    if not isinstance(req, CompletionRequest) or not req.suffix:
        return deployments
    able = [d for d in deployments
            if not d.model.reported or "insert" in d.model.capabilities]
    if deployments and not able:
        raise InvalidRequest(f"The model {model_shown(req.model)!r} cannot fill in the "
                             "middle (a text completion's suffix).", param="model",
                             code=UNSUPPORTED_BY_MODEL)
    return able


def _fitting(candidates: list[Candidate], needs: Needs, now: bool = False
             ) -> list[Candidate]:
    """Those of the candidates (and of their deployments) that meet the needs (``now``:
    and hold the prompt in the window they run with now)."""
    out = []
    for c in candidates:
        deployments = [d for d in c.deployments
                       if needs.met_by(d) and (not now or needs.held_now(d))]
        if deployments:
            out.append(Candidate(c.name, deployments, c.reason))
    return out


def _size(candidate: Candidate) -> float:
    return max((d.model.parameters or 0 for d in candidate.deployments), default=0)
