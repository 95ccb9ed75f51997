"""The model catalog: which backend serves which model, learned by asking the backends.

Discovery runs at start-up and then periodically. A backend that cannot be listed keeps
its last known models (it may be restarting); requests to it then fail with a clear 502.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.backends.base import Backend, ModelInfo
from gateway.errors import GatewayError, ModelNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One model on one backend; ``model.name`` is the name the backend knows it by."""

    backend: Backend
    model: ModelInfo


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


class ModelCatalog:
    def __init__(self, backends: Iterable[Backend], optional: Iterable[str] = ()) -> None:
        self._backends = list(backends)
        self._optional = set(optional)
        self._listings = {b.name: _Listing() for b in self._backends}
        self._index: dict[str, list[Deployment]] = {}

    async def refresh(self) -> None:
        """Ask every backend for its models, concurrently, and rebuild the index."""
        await asyncio.gather(*(self._refresh_one(b) for b in self._backends))
        index: dict[str, list[Deployment]] = {}
        for backend in self._backends:
            for info in self._listings[backend.name].models:
                index.setdefault(info.name, []).append(Deployment(backend, info))
        self._index = index

    async def _refresh_one(self, backend: Backend) -> None:
        listing = self._listings[backend.name]
        try:
            models = await backend.list_models()
        except Exception as exc:  # a discovery round must survive any one backend
            reason = exc.message if isinstance(exc, GatewayError) else repr(exc)
            if listing.status.ok or not listing.status.error:
                level = logging.INFO if backend.name in self._optional else logging.WARNING
                log.log(level, "backend %s: cannot list models: %s", backend.name, reason)
            listing.status = BackendStatus(False, reason, len(listing.models), time.time())
            return
        if not listing.status.ok:
            log.info("backend %s: %d models", backend.name, len(models))
        listing.models = models
        listing.status = BackendStatus(True, "", len(models), time.time())

    def resolve(self, name: str) -> list[Deployment]:
        """The deployments of a model, by exact name, without ``:latest``, or ``backend/name``."""
        found = self._lookup(name)
        if not found and "/" in name:
            backend, _, rest = name.partition("/")
            if backend in self._listings:
                found = [d for d in self._lookup(rest) if d.backend.name == backend]
        if not found:
            raise ModelNotFound(name, self._unreachable())
        return found

    def _lookup(self, name: str) -> list[Deployment]:
        found = self._index.get(name)
        if found is None and ":" not in name:
            found = self._index.get(name + ":latest")
        if found is None and name.endswith(":latest"):
            found = self._index.get(name.removesuffix(":latest"))
        return found or []

    def _unreachable(self) -> list[str]:
        return [name for name, listing in self._listings.items() if not listing.status.ok]

    def models(self) -> list[Deployment]:
        """One deployment per model name: the first backend (in config order) serving it."""
        return [deployments[0] for deployments in self._index.values()]

    def status(self) -> dict[str, BackendStatus]:
        return {name: listing.status for name, listing in self._listings.items()}

    def listing(self, backend: str) -> list[ModelInfo]:
        return list(self._listings[backend].models)
