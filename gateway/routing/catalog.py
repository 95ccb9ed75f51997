"""The model catalog: which backend serves which model, learned by asking the backends.

Discovery runs at start-up and then periodically. A backend that cannot be listed keeps
its last known models (it may be restarting); requests to it then fail with a clear 502.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.backends.base import Backend
from gateway.config import ModelConfig
from gateway.errors import GatewayError, ModelNotFound
from gateway.protocol.units import ModelInfo

log = logging.getLogger(__name__)

RELIST_SECONDS = 5.0  # a backend found behind is listed again at once at most this often


def bare(name: str) -> str:
    """A model's name without ``:latest`` (``model`` and ``model:latest`` are one)."""
    return name.removesuffix(":latest")


def named_in(name: str, names: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``names`` (``model`` and ``model:latest`` being one)."""
    name = bare(name)
    return any(bare(n) == name for n in names)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model on one backend; ``model.name`` is the name the backend knows it by."""

    backend: Backend
    model: ModelInfo
    # When (monotonic seconds) its backend listed the model as it is described here.
    listed_at: float = field(default=0.0, compare=False)

    @property
    def continues_prefill(self) -> bool:
        """Whether it continues a final assistant message: the model's setting, else its
        backend's.
        """
        prefill = self.model.prefill
        return self.backend.config.continues_prefill if prefill is None else prefill


@dataclass(slots=True)
class BackendStatus:
    ok: bool = False
    error: str = ""
    models: int = 0
    refreshed_at: float = 0.0


@dataclass(slots=True)
class _Listing:
    models: list[ModelInfo] = field(default_factory=list)
    status: BackendStatus = field(default_factory=BackendStatus)
    listed_at: float = 0.0  # (monotonic seconds)
    asked: int = 0  # listings asked for, in turn
    told: int = 0  # the turn of the one whose answer is kept: an earlier one's is older


class ModelCatalog:
    """Model name → deployments. Backends list their models under their own names; the
    config's ``[[models]]`` adds names that span backends (the same model on Ollama and on
    MLX) and capabilities or context lengths a backend cannot tell.
    """

    def __init__(self, backends: Iterable[Backend], models: Iterable[ModelConfig] = (),
                 optional: Iterable[str] = ()) -> None:
        self._backends = list(backends)
        self._models = list(models)
        self._optional = set(optional)
        self._listings = {b.name: _Listing() for b in self._backends}
        self._index: dict[str, list[Deployment]] = {}
        self._refreshing: asyncio.Lock | None = None
        self._relisted: dict[str, float] = {}  # backend → when last listed again at once
        self._relisting: set[asyncio.Task[None]] = set()
        self.version = 0  # bumped whenever the index is rebuilt
        self.on_change: list[Callable[[], None]] = []  # called after each rebuild

    async def refresh(self) -> None:
        """Ask every backend for its models, concurrently, and rebuild the index."""
        self._refreshing = self._refreshing or asyncio.Lock()
        async with self._refreshing:
            await asyncio.gather(*(self._refresh_one(b) for b in self._backends))
            self._index = self._build_index()
            self.version += 1
        for listener in self.on_change:
            listener()

    def _build_index(self) -> dict[str, list[Deployment]]:
        by_name = {b.name: b for b in self._backends}
        listed = {(b.name, m.name): m for b in self._backends
                  for m in self._listings[b.name].models}
        at = {b.name: self._listings[b.name].listed_at for b in self._backends}
        index: dict[str, list[Deployment]] = {}
        for (backend, _), info in listed.items():
            index.setdefault(info.name, []).append(
                Deployment(by_name[backend], info, at[backend]))
        for spec in self._models:
            # (a name without ``:latest`` is the model a backend lists with it: the same)
            name = spec.name if spec.name in index or ":" in spec.name or \
                spec.name + ":latest" not in index else spec.name + ":latest"
            deployments = index.setdefault(name, [])
            for d in spec.deployments:
                found = listed.get((d.backend, d.model)) or next(
                    (m for (b, n), m in listed.items() if b == d.backend and
                     named_in(n, (d.model,))), None)  # (``llama3.2`` for ``llama3.2:latest``)
                if found is not None and all(x.model is not found for x in deployments):
                    deployments.append(Deployment(by_name[d.backend], found, at[d.backend]))
            if spec.capabilities or spec.context_length or spec.prefill != "auto":
                index[name] = [_override(d, spec) for d in deployments]
            if not deployments:
                del index[name]
        return index

    async def refresh_backend(self, name: str) -> None:
        """Ask one backend again (it just came back) and rebuild the index."""
        await self._relist([b for b in self._backends if b.name == name])

    def stale(self, backend: str | None = None) -> None:
        """A backend (None: any) is behind the catalog: it answered that it has no such
        model (``ollama rm``), or a model was asked for that none lists (``ollama pull`` a
        moment ago). List it again now, in the background, rather than at the next round;
        each backend at most once every ``RELIST_SECONDS``.
        """
        now = time.monotonic()
        # (asked of any, not a cloud's: its models change rarely, and a typo could ask often)
        wanted = [b for b in self._backends if b.name == backend or
                  (backend is None and b.tier != "cloud")]
        due = [b for b in wanted
               if now - self._relisted.get(b.name, -RELIST_SECONDS) >= RELIST_SECONDS]
        if not due:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._relist(due))
        except RuntimeError:  # (no loop: a command reading the catalog)
            return
        for b in due:
            self._relisted[b.name] = now
        self._relisting.add(task)
        task.add_done_callback(self._relisting.discard)

    async def _relist(self, backends: list[Backend]) -> None:
        """Ask these backends again and rebuild the index."""
        self._refreshing = self._refreshing or asyncio.Lock()
        await asyncio.gather(*(self._refresh_one(b) for b in backends))
        async with self._refreshing:
            self._index = self._build_index()
            self.version += 1
        for listener in self.on_change:
            listener()

    async def close(self) -> None:
        """Stop the listings still running (``stale``'s)."""
        for task in list(self._relisting):
            task.cancel()
        await asyncio.gather(*self._relisting, return_exceptions=True)

    async def _refresh_one(self, backend: Backend) -> None:
        listing = self._listings[backend.name]
        listing.asked += 1
        turn = listing.asked
        try:
            models = await backend.list_models()
        except Exception as exc:  # a discovery round must survive any one backend
            if turn < listing.told:
                return
            listing.told = turn
            reason = exc.message if isinstance(exc, GatewayError) else repr(exc)
            if listing.status.ok or not listing.status.error:
                level = logging.INFO if backend.name in self._optional else logging.WARNING
                log.log(level, "backend %s: cannot list models: %s", backend.name, reason)
            listing.status = BackendStatus(False, reason, len(listing.models), time.time())
            return
        if turn < listing.told:  # a listing asked later (a model just removed) answered first
            return
        listing.told = turn
        if not listing.status.ok:
            log.info("backend %s: %d models", backend.name, len(models))
        listing.models = models
        listing.status = BackendStatus(True, "", len(models), time.time())
        listing.listed_at = time.monotonic()

    def resolve(self, name: str) -> list[Deployment]:
        """The deployments of a model, by exact name, without ``:latest``, or ``backend/name``."""
        found = self.deployments(name)
        if not found and "/" in name:
            backend, _, rest = name.partition("/")
            if backend in self._listings:
                found = [d for d in self.deployments(rest) if d.backend.name == backend]
        if not found:
            self.stale()  # (pulled a moment ago? the next request finds it)
            raise ModelNotFound(name, self.unreachable())
        return found

    def known_as(self, name: str) -> str:
        """The name a model is known by here: ``name``, or it with or without ``:latest``
        (Ollama lists ``llama3.2:latest``; configs and clients often write ``llama3.2``).
        """
        if name in self._index:
            return name
        if ":" not in name and name + ":latest" in self._index:
            return name + ":latest"
        if name.endswith(":latest") and bare(name) in self._index:
            return bare(name)
        return name

    def unreachable(self) -> list[str]:
        """The backends whose models could not be listed last time (any model may be
        theirs)."""
        return [name for name, listing in self._listings.items() if not listing.status.ok]

    def models(self) -> list[tuple[str, Deployment]]:
        """Each model name with its first deployment (in config order)."""
        return [(name, deployments[0]) for name, deployments in self._index.items()]

    def status(self) -> dict[str, BackendStatus]:
        return {name: listing.status for name, listing in self._listings.items()}

    def listing(self, backend: str) -> list[ModelInfo]:
        return list(self._listings[backend].models)

    def names(self) -> list[str]:
        return list(self._index)

    def deployments(self, name: str) -> list[Deployment]:
        """The deployments under this name (``model`` and ``model:latest`` being one; none
        if unknown)."""
        return self._index.get(self.known_as(name), [])

    def unlisted(self) -> list[str]:
        """The configured ``[[models]]`` deployments whose backend answered without listing
        their model (a typo sends every request for it to the fallbacks), said plainly.
        """
        out = []
        for spec in self._models:
            for d in spec.deployments:
                listing = self._listings.get(d.backend)
                if listing is None or not listing.status.ok:
                    continue  # not listed yet: the backend is away, not wrong
                names = [m.name for m in listing.models]
                if not named_in(d.model, names):
                    near = difflib.get_close_matches(d.model, names, n=1, cutoff=0.6)
                    hint = f"did you mean {near[0]!r}?" if near else \
                        f"it lists {len(names)} models"
                    out.append(f"[[models]] {spec.name!r}: backend {d.backend!r} does not list "
                               f"the model {d.model!r} ({hint}); requests for it go to the "
                               "fallbacks")
        return out


def _override(deployment: Deployment, spec: ModelConfig) -> Deployment:
    info = deployment.model
    changes: dict[str, Any] = {}
    if spec.capabilities:
        changes["capabilities"] = frozenset(spec.capabilities) | {"chat", "completion"} \
            if "completion" in spec.capabilities else frozenset(spec.capabilities)
        changes["known"] = changes["reported"] = True
    if spec.context_length:
        changes["context_length"] = spec.context_length
    if spec.prefill != "auto":
        changes["prefill"] = spec.prefill == "yes"
    return Deployment(deployment.backend, dataclasses.replace(info, **changes),
                      deployment.listed_at)
