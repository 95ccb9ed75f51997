"""The models a client can ask for, as the doors list them (``/v1/models``, Ollama's
``/api/tags`` and ``/api/show``): the backends' models, then the aliases that can pick one
now, each with the time its backend gives for it or else when the gateway first saw it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.errors import ModelNotFound
from gateway.pipeline.answer import Listed
from gateway.protocol.units import ModelInfo
from gateway.routing.router import Router


class Models:
    def __init__(self, router: Router) -> None:
        self.router = router
        self._created: dict[str, int] = {}  # model name → its time, as first given

    def all(self) -> list[Listed]:
        """Every model a client can ask for: the backends' models, then the aliases that
        can pick one now.
        """
        selector = self.router.selector
        listed = [self._listed(name, d.backend.name, d.model)
                  for name, d in self.router.catalog.models()
                  if not selector.is_alias(name)]  # (that name asks the alias)
        return listed + [self._listed(alias, "gateway", None) for alias in selector.aliases()]

    def one(self, name: str) -> Listed:
        """One model by the name a client asks for (raises ``ModelNotFound``)."""
        selector = self.router.selector
        if selector.is_alias(name):
            if name in selector.aliases():
                return self._listed(name, "gateway", None)
            raise ModelNotFound(name)
        deployment = self.router.catalog.resolve(name)[0]
        return self._listed(name, deployment.backend.name, deployment.model)

    async def load(self, name: str, keep_alive: Any) -> tuple[str, str]:
        """Ollama's load of a model by name, as a client asks it (a request without a
        prompt; ``keep_alive`` 0: unload): each backend that has it is told, those that keep
        their models loaded themselves have nothing to do. The name, and what was done in
        Ollama's words ("load", "unload"); raises ``ModelNotFound``, or the error of every
        backend that was asked and failed.
        """
        listed = self.one(name)
        if self.router.selector.is_alias(name):
            return listed.name, "load"  # (it picks per request: nothing to load now)
        deployments = self.router.catalog.resolve(name)
        said = await asyncio.gather(*(d.backend.load(d.model.name, keep_alive, _embeds(d.model))
                                      for d in deployments), return_exceptions=True)
        done = [s for s in said if isinstance(s, str)]
        if not done:
            raise next(s for s in said if isinstance(s, BaseException))
        return listed.name, "unload" if "unload" in done else done[0]

    def _listed(self, name: str, owner: str, info: ModelInfo | None) -> Listed:
        """With the time the backend gives for the model, else when the gateway first saw
        it (an alias: when it was first listed); the earliest given, for a server that says
        "now" at every listing (mlx_lm's) says nothing of when.
        """
        said = info.created if info is not None and info.created else None
        created = self._created.get(name)
        if created is None or (said is not None and said < created):
            created = self._created[name] = said or int(time.time())
        return Listed(name, owner, info, created)


def _embeds(model: ModelInfo) -> bool:
    """Whether the model only embeds (loaded by an embed, not a generate)."""
    return model.known and "embedding" in model.capabilities and \
        "completion" not in model.capabilities
