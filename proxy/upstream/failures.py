"""A failed attempt, and what it may have cost.

A failed attempt may still be billed by the upstream: an answer the checks refused carries its usage ("failed"), and
an attempt sent and never answered, or answered unreadably, may have been counted there ("unconfirmed", billed by
the local counts). The fleet client reports either to the caller (`lost`) as it happens, so the ledger records it
even when a retry then succeeds; unconfirmed attempts also count in `upstream_unconfirmed_attempts_total`.
"""

from __future__ import annotations

from ..errors import ProxyError
from ..telemetry.metrics import Metrics
from .batching import Lost
from .router import Deployment


class Failure:
    """What went wrong in one attempt: the error, the upstream's Retry-After, whether another attempt at the same
    deployment is no use (`final`: a 400 relayed, refused credentials, other statuses), and what it may have cost."""

    __slots__ = ("billed", "error", "final", "retry_after", "unconfirmed")

    def __init__(self, error: ProxyError, retry_after: float | None, *, final: bool, billed: list[int] | None = None,
                 unconfirmed: str = "") -> None:
        self.error, self.retry_after, self.final = error, retry_after, final
        self.billed, self.unconfirmed = billed, unconfirmed  # what the attempt may have cost (see RetryableError)


def report_lost(metrics: Metrics | None, d: Deployment, failure: Failure, counts: list[int], lost: Lost | None) -> None:
    """What a failed attempt may have cost: to the caller, and the unconfirmed attempts to the metrics."""
    if failure.billed is not None and any(failure.billed):
        if lost is not None:
            lost("failed", failure.billed)
    elif failure.unconfirmed:
        if metrics is not None:
            metrics.add(metrics.upstream_unconfirmed_attempts, d.model, d.upstream, failure.unconfirmed)
        if lost is not None:
            lost("unconfirmed", counts)
