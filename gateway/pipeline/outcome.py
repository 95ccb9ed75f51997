"""A request's outcome, as routing learns from it and feedback and export find it: one
record per request, written once its answer is whole or has failed.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.errors import GatewayError
from gateway.protocol.times import ms, stamp
from gateway.protocol.units import Completion
from gateway.routing.dispositions import counts_against
from gateway.routing.failover import RoutedAnswer
from gateway.routing.router import Router
from plugins.base import RequestContext


class StreamEnded(GatewayError):
    """A stream that ended before its answer was whole (an outcome, never sent)."""

    status = 499
    code = "stream_ended_early"


def record_outcome(router: Router, ctx: RequestContext, routed: RoutedAnswer, started: float,
                   *, error: GatewayError | None = None,
                   completion: Completion | None = None, escalating: bool = False) -> None:
    """The request's outcome, for learned routing, feedback and export: quality 1 for
    an answer every check passed, 0 for one found wanting or a failure of the
    deployments (a request that was itself at fault teaches nothing).
    """
    now = time.monotonic()
    req = ctx.req
    record: dict[str, Any] = {
        "id": ctx.request_id, "at": stamp(time.time()), "tenant": ctx.tenant,
        "alias": req.model if router.selector.is_alias(req.model) else "",
        "asked": req.model, "batch": ctx.batch, "feedback": None,
        "latency_ms": ms(now - started)}
    quality: float | None
    if error is not None:
        record.update(ok=False, error=error.code or str(error.status))
        quality = 0.0 if counts_against(error) else None
        if isinstance(error, StreamEnded):
            record.update(model=routed.model, backend=routed.deployment.backend.name)
    else:
        usage = completion.usage if completion is not None else None
        first = routed.first_token_at
        record.update(ok=ctx.rejected is None, error=None, model=routed.model,
                      backend=routed.deployment.backend.name,
                      ttft_ms=ms(first - started),
                      qa=ctx.rejected.checks() if ctx.rejected else "pass",
                      escalated=escalating)
        if usage is not None and usage.completion_tokens > 1 and now > first:
            record["tokens_per_s"] = round((usage.completion_tokens - 1) / (now - first), 1)
        quality = 0.0 if ctx.rejected is not None else 1.0
    router.record(req, record, routed, quality)
