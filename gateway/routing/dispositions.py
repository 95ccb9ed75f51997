"""What an error from a deployment means: for the request's next attempt (retried, waited
for, failed over, sent to a larger window, or passed on to the client), and for the
deployment (whether it counts toward its breaker).
"""

from __future__ import annotations

from typing import Literal

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout

Disposition = Literal["propagate", "retry", "wait", "failover", "bigger"]
# Codes of a deployment that cannot take a request (it is full, or cannot do this kind at
# all), not one that failed at it: the request goes elsewhere, the deployment is not held
# to account, and the client hears what came after, if anything did.
ELSEWHERE = frozenset({"deployment_busy", "unsupported_by_backend"})


def disposition(error: GatewayError) -> Disposition:
    """What an error means for the next attempt."""
    if isinstance(error, UpstreamTimeout):
        return "failover"  # a silent route is not retried blindly
    if error.code in ("backend_unreachable", "upstream_auth_failed"):
        return "failover"  # nothing listens there, or it refuses our key: not the same again
    if error.code == "rescue_diverged":
        return "propagate"  # the fallback answered fine, just differently: nothing to retry
    if error.code == "content_policy_violation":
        return "propagate"
    if error.code == "context_length_exceeded":
        return "bigger"
    if error.code in ELSEWHERE:
        return "failover"
    if error.status in (429, 503):
        return "wait"
    if isinstance(error, UpstreamError):
        return "retry"  # 5xx, refused or reset connection, a stream that broke off
    if error.status == 404:
        return "failover"  # the backend no longer has the model: the catalog is behind
    return "propagate"  # the request itself is wrong; another model would say the same


def counts_against(error: GatewayError) -> bool:
    """Whether an error is the deployment's fault (and so counts toward its breaker). Its
    upstream's rate limit is not: the deployment rests for the ``Retry-After`` instead.
    """
    return disposition(error) in ("retry", "wait", "failover") and \
        error.code not in ELSEWHERE and not throttled(error)


def throttled(error: GatewayError) -> bool:
    """The upstream's rate limit, or its queue full (not a deployment found full here)."""
    return (error.status == 429 and error.code not in ELSEWHERE) or error.code == "backend_busy"
