"""The upstreams' slots: at most `max_concurrency` attempts in flight per upstream, in this process.

An attempt first takes a slot of its upstream, waiting for one within its call's deadline: at the deadline it is
an UpstreamTimeout (504) and nothing is sent. Holding the slot, the call is sent only if it is still worth it: at
least 50 ms of its deadline left (less, its answer could hardly be read in time, but it would be billed) and some
request still waiting for it (`gave_up`; else CallAbandoned). A call not sent counts in
`upstream_calls_dropped_total` by reason. Kept apart from the fleet client so that the wait, its metrics and the
release are in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..config import Settings
from ..errors import ServiceUnavailable, UpstreamTimeout
from ..telemetry.metrics import Metrics
from .router import Deployment

PAST_DEADLINE = "The upstream did not answer within the proxy's deadline."
# An attempt with less of its deadline left is not sent: its answer could hardly be read in time, but it would be
# billed.
MIN_ATTEMPT_S = 0.05


class CallAbandoned(ServiceUnavailable):
    """Every request a call was for gave up (its task was cancelled) while the call waited for an upstream slot: it
    was not sent. A request that shared the call (in-flight coalescing) sends its inputs again itself."""


class Slots:
    """One semaphore per upstream (`max_concurrency`), the waits for them, and the calls dropped before sending."""

    def __init__(self, settings: Settings, clock: Callable[[], float], metrics: Metrics | None) -> None:
        self._permits = {name: asyncio.Semaphore(u.max_concurrency) for name, u in settings.upstreams.items()}
        self._clock = clock
        self._metrics = metrics

    async def take(self, d: Deployment, deadline: float) -> None:
        """One of `d`'s upstream's `max_concurrency` slots (the caller releases it), waited for within the call's
        deadline: UpstreamTimeout at the deadline, and the call is not sent."""
        permits, m = self._permits[d.upstream], self._metrics
        if not permits.locked():
            await permits.acquire()  # no wait: does not suspend
            if m is not None:
                m.child(m.upstream_slot_wait, d.model, d.upstream).observe(0.0)
            return
        started = self._clock()
        waiters = m.child(m.upstream_slot_waiters, d.model, d.upstream) if m is not None else None
        if waiters is not None:
            waiters.inc()
        try:
            async with asyncio.timeout(deadline - started):
                await permits.acquire()
        except TimeoutError:
            self.dropped(d, "deadline")
            raise UpstreamTimeout(PAST_DEADLINE) from None
        finally:
            if waiters is not None:
                waiters.dec()
            if m is not None:
                m.child(m.upstream_slot_wait, d.model, d.upstream).observe(self._clock() - started)

    def release(self, d: Deployment) -> None:
        self._permits[d.upstream].release()

    def check(self, d: Deployment, deadline: float, gave_up: Callable[[], bool] | None) -> float:
        """Holding `d`'s slot: whether the call is still worth sending (see the module's doc); the time now, or
        UpstreamTimeout / CallAbandoned (counted as dropped, nothing sent)."""
        now = self._clock()
        if deadline - now < MIN_ATTEMPT_S:
            self.dropped(d, "deadline")
            raise UpstreamTimeout(PAST_DEADLINE)
        if gave_up is not None and gave_up():
            self.dropped(d, "abandoned")
            raise CallAbandoned("Every request this upstream call was for gave up; it was not sent.")
        return now

    def dropped(self, d: Deployment, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.add(self._metrics.upstream_calls_dropped, d.model, d.upstream, reason)
