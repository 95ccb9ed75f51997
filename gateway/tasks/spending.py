"""A batch's lines spend its key's token budget, as the key's live requests do; a key
revoked or expired since the batch was made answers no more of its lines, and one allowed
fewer models since has its lines refused those. The key's rates
and slots do not apply to them: the lines have their share of the deployments instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import KeyConfig
from gateway.errors import AuthenticationFailed, Unavailable
from gateway.http.access import check_standing, estimate, over_limit
from gateway.protocol.units import CHARS_PER_TOKEN
from gateway.tenants import Admission, Away, KeyBook, Limits, Tally


@dataclass(frozen=True, slots=True)
class Spend:
    """A line admitted against its key's budget, to be settled with what it used."""

    budget: KeyConfig  # the key with its budget alone
    admission: Admission


class Spending:
    def __init__(self, book: KeyBook, limits: Limits) -> None:
        self._book = book
        self._limits = limits

    async def admit(self, tenant: str) -> tuple[Spend | None, KeyConfig | None]:
        """Whether the batch's key may have a line answered now, and the key as it is now
        (the models it may use may have changed since the batch was made); raises the
        refusal (``Unavailable`` while the keys' store is away: the line waits).
        """
        if not tenant or not self._book.required:
            return None, None
        try:
            key = await self._book.by_id(tenant)
        except Away:
            raise Unavailable("The store of API keys is unavailable right now.",
                              retry_after=1, code="key_store_unavailable") from None
        if key is None:
            raise AuthenticationFailed("The batch's API key no longer exists.")
        check_standing(key)
        if not key.budget:
            return None, key
        budget = KeyConfig(id=key.id, hash=key.hash, budget=key.budget,
                           budget_period=key.budget_period)
        admission = await self._limits.admit(budget, 0)
        if admission.reason:
            raise over_limit(admission)
        return Spend(budget, admission), key

    async def settle(self, spend: Spend | None, used: Tally, body: dict[str, Any],
                     endpoint: str, answered: bool) -> None:
        """Count the tokens the line's answer used, as the pipeline reported them (a
        cached answer: none); an answer from a backend that did not say costs an estimate
        (or its prompt and the answer, estimated, when that is more), as a live request's
        does; a failure, nothing.
        """
        if spend is None:
            return
        prompt = len(orjson.dumps(body)) // CHARS_PER_TOKEN
        tokens = used.tokens + used.output if used.reported else max(
            estimate(body, prompt, endpoint == "/v1/embeddings"),
            prompt + used.output) if answered else 0
        await self._limits.settle(spend.budget, spend.admission, tokens)
