"""Phase 2, read the tiers with the quota charge: the in-process tier, then the shared one (Redis) for the rest, and
the request's quota charge (step 1 of its ticket) in the same round trip where the counters live beside the cache.

An input in flight (another request is fetching it) is not read: the request will wait on that call instead. A
failed Redis read never fails the request: its inputs are misses and the request goes upstream; when the quota
script shared the failed pipeline, its reply is kept (or known lost) so the request is never charged twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..accounts.quota import REPLY_LOST
from ..stores.cache import EmbeddingCache, ReadFailed
from ..stores.guard import StoreUnavailable
from ..stores.localcache import LocalCache
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import Tracing
from .coalesce import InFlight
from .job import Job


class Tiers:
    def __init__(
        self, cache: EmbeddingCache, local: LocalCache | None, inflight: InFlight, metrics: Metrics, tracing: Tracing,
    ) -> None:
        self._cache = cache
        self._local = local
        self._inflight = inflight
        self._metrics = metrics
        self._tracing = tracing

    async def read_with_charge(self, job: Job) -> None:
        """Fill `job.found` from the tiers and leave `job.misses`; charge the request to its ticket (may raise 429)."""
        self._read_local(job)
        job.epoch = self._inflight.epoch()  # before the cache read: what is released after it may need a second look
        lookup = [i for i, e in enumerate(job.found) if e is None and job.keys[i] not in self._inflight]
        job.readable = job.cacheable
        quota_reply: Any = None
        charged = False
        if job.cacheable and lookup:
            quota_reply, charged = await self._read_shared_and_charge(job, lookup)
        job.misses = [i for i, e in enumerate(job.found) if e is None]
        if job.ticket is not None and not charged:
            await job.ticket.charge_request(quota_reply)

    def _read_local(self, job: Job) -> None:
        if self._local is None or not job.cacheable:
            return
        get, found = self._local.get, job.found
        local_hits = 0
        for i, k in enumerate(job.keys):
            found[i] = e = get(k)
            if e is not None:
                local_hits += 1
        if local_hits:
            m = self._metrics
            m.add(m.cache_lookups, "hit", amount=local_hits)
            m.add(m.local_hits, amount=local_hits)

    async def _read_shared_and_charge(self, job: Job, lookup: list[int]) -> tuple[Any, bool]:
        """The Redis read of `lookup`; the quota script rides in its pipeline when the cache can carry it, else it
        runs alongside. Returns the script's reply (when it rode along) and whether the request is charged."""
        ticket = job.ticket
        carried = ticket is not None and self._cache.carries_quota
        charging: asyncio.Future[None] | None = None
        if ticket is not None and not carried:  # counters in another store or slot: charge during the read
            charging = asyncio.ensure_future(ticket.charge_request())
        quota_reply: Any = None
        try:
            also = ticket.queue if ticket is not None and carried else None
            quota_reply = await self._traced_read(job, lookup, also)
        except StoreUnavailable as exc:
            job.readable = False
            self._metrics.add(self._metrics.cache_lookups, "error", amount=len(lookup))
            if isinstance(exc, ReadFailed):  # the quota script shared the pipeline: it may have run anyway
                quota_reply = exc.extra[0] if exc.extra else (REPLY_LOST if exc.sent else None)
        finally:
            if charging is not None:
                await charging
        return quota_reply, charging is not None

    async def _traced_read(self, job: Job, lookup: list[int], also: Callable[[Any], None] | None) -> Any:
        with self._tracing.span("cache read") as span:
            if span.is_recording():
                span.set_attribute("db.system.name", "redis")
                span.set_attribute("embedding_proxy.cache.lookups", len(lookup))
                span.set_attribute("embedding_proxy.quota.in_cache_read", also is not None)
            reply = await self.read_shared(job, lookup, also)
            if span.is_recording():
                span.set_attribute("embedding_proxy.cache.hits", sum(job.found[i] is not None for i in lookup))
        return reply

    async def read_shared(self, job: Job, lookup: list[int], also: Callable[[Any], None] | None = None) -> Any:
        """Fill `job.found` at `lookup` from Redis (admitting hits to the local tier); returns `also`'s reply.
        Raises StoreUnavailable."""
        keys, found = job.keys, job.found
        got, extra = await self._cache.get_many([keys[i] for i in lookup], job.dims, also)
        local = self._local
        hits = 0
        for i, entry in zip(lookup, got, strict=True):
            if entry is not None:
                hits += 1
                found[i] = entry
                if local is not None:
                    local.put(keys[i], entry)
        if hits:  # the others are decided once they are served: by this request's own call (a miss) or not
            self._metrics.add(self._metrics.cache_lookups, "hit", amount=hits)
        return extra[0] if extra else None
