"""The embeddings path's public face: `EmbeddingService.embed` runs one request through its phases, in order.

    1. digest and de-duplicate     digest.py       every input's cache key; each distinct input once
    2. read the tiers, charge      tiers.py        in-process tier, then one Redis read carrying the quota charge
    3. count and check             counting.py     tokens of the misses, the model's limits, the all-token charge
    4. settle and fetch the misses misses.py       reserve, claim in flight (coalesce.py), call (calls.py), wait
    5. settle the ticket, record   settlement.py   the quota corrected to what was billed, the usage ledger

The request's state passes from phase to phase in a `Job` (job.py); new entries reach the shared cache after the
answer (writeback.py), and whatever outlives a request is held in `Background` until shutdown drains it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from ..accounts.keys import KeyRecord
from ..accounts.quota import Ticket
from ..accounts.usage import UsageLedger
from ..config import Settings
from ..stores.cache import EmbeddingCache
from ..stores.generations import CacheGenerations
from ..stores.localcache import LocalCache
from ..telemetry.metrics import Metrics
from ..telemetry.tracing import NO_TRACING, Tracing
from ..tokens import Tokenizer
from ..upstream import FleetClient
from .background import Background
from .calls import UpstreamCalls
from .coalesce import InFlight
from .counting import TokenCheck
from .digest import Digester
from .job import Job
from .misses import Misses
from .outcome import Outcome, Trace
from .request import EmbeddingRequest
from .settlement import Settlement
from .tiers import Tiers
from .writeback import WriteBehind

__all__ = ["EmbeddingService", "Outcome", "Trace"]


class EmbeddingService:
    def __init__(
        self,
        settings: Settings,
        cache: EmbeddingCache,
        upstream: FleetClient,
        metrics: Metrics,
        tokenizers: Mapping[str, Tokenizer],
        ledger: UsageLedger,
        clock: Callable[[], float] = time.time,
        *,
        generations: CacheGenerations,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._settings = settings
        self._cache = cache  # the shared tier: the phases hold their own reference (tests read its seed here)
        self._clock = clock
        mb = settings.cache.local_max_mb
        self._local = LocalCache(mb * 1024 * 1024, settings.cache.local_ttl_s) if mb > 0 else None
        inflight = InFlight()
        self._background = background = Background()
        self._writes = WriteBehind(cache, inflight, metrics, background)
        self._digester = Digester(settings, cache, generations)
        self._tiers = tiers = Tiers(cache, self._local, inflight, metrics, tracing)
        self._check = TokenCheck(tokenizers)
        calls = UpstreamCalls(upstream, inflight, metrics, self._writes, background)
        self._misses = Misses(tiers, inflight, calls, metrics)
        self._settlement = Settlement(settings, ledger, metrics)

    @property
    def local_cache(self) -> LocalCache | None:
        return self._local

    async def embed(
        self, req: EmbeddingRequest, key: KeyRecord, ticket: Ticket | None = None, trace: Trace | None = None,
        *, on_misses: Callable[[int], Awaitable[None]] | None = None,
    ) -> Outcome:
        """The answer's vectors and counts. With a quota `ticket`, the request is charged in the cache read's
        round trip and its tokens once they are known, before anything goes upstream; either may refuse (429).
        `on_misses(n)` is awaited once the tiers have said that n unique inputs miss, before anything goes upstream
        (the admission budget charges their upstream answer there, and may refuse). It is recorded in the usage
        ledger under the time it started (its ticket's, so quotas and ledger agree on the day), whatever happens to
        it (settlement.py)."""
        job = await self.digest(req, key, ticket, trace)
        await self._tiers.read_with_charge(job)
        try:
            await self._check.count_and_check(job)
            if on_misses is not None and job.misses:
                await on_misses(len(job.misses))
            await self._misses.settle_and_fetch(job)
        except asyncio.CancelledError:  # shutdown: its own upstream calls already sent go on (others share them)
            job.cancelled.set()
            self._background.spawn(self._settlement.close_unanswered(job))
            raise
        except BaseException:
            await self._settlement.close_unanswered(job)
            raise
        return await self._settlement.settle_and_record(job)

    async def digest(
        self, req: EmbeddingRequest, key: KeyRecord, ticket: Ticket | None = None, trace: Trace | None = None
    ) -> Job:
        """Phase 1: the request digested and de-duplicated, as the `Job` the other phases pass along."""
        trace = trace if trace is not None else Trace()
        at = ticket.now if ticket is not None else self._clock()
        inputs, cacheable = await self._digester.digest(req, key.team)
        trace.inputs = len(inputs.positions)
        return Job(req, key, self._settings.models[req.model], ticket, trace, at, inputs, cacheable)

    async def drain(self) -> None:
        """Wait for background upstream calls and cache writes (at shutdown)."""
        while self._background or self._writes.pending:
            self._writes.flush()
            await self._background.wait()
