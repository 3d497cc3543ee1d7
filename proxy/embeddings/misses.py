"""Phase 4, settle and fetch the misses: reserve the tokens of what this request will send, claim its misses in the
in-flight table, send the ones it owns in as few calls as the model's batch limits allow, and wait for all of them
(its own calls and the ones it shares with other requests).

Settling comes right before claiming, with nothing awaited in between, so the reservation covers exactly what the
request will own. An input shared with another request whose call failed is sent again by this request, once, as
its own call (reserved and charged to it), unless the failure is about this request's own inputs (an upstream 400
for a call that carried only inputs it asked for: relayed) or cannot be helped by trying again.
"""

from __future__ import annotations

import asyncio
import time

from ..stores.cache import Entry
from ..stores.guard import StoreUnavailable
from ..telemetry.metrics import Metrics
from .calls import SHUTTING_DOWN, CallFailed, UpstreamCalls, chunk
from .coalesce import InFlight
from .job import Job
from .tiers import Tiers


class Misses:
    def __init__(self, tiers: Tiers, inflight: InFlight, calls: UpstreamCalls, metrics: Metrics) -> None:
        self._tiers = tiers
        self._inflight = inflight
        self._calls = calls
        self._metrics = metrics

    async def settle_and_fetch(self, job: Job) -> None:
        """Fill `job.found` at `job.misses` (noting its own calls in `job.own`); raises the first failure that
        remains, once every call it waited for is over."""
        if job.misses:
            job.misses = await self.settle(job, job.misses)
        job.trace.cache_hits = len(job.keys) - len(job.misses)
        await self.fetch(job)  # a coroutine awaited directly: nothing runs in between, the claim follows the settle

    async def settle(self, job: Job, misses: list[int], *, give_back: bool = True) -> list[int]:
        """The misses to claim, once the ones that landed in the cache meanwhile are read and the tokens of the
        ones this request will send upstream are reserved. Returns with nothing to await between its last check
        and the caller's claim, so the reservation covers exactly what the request will own."""
        inflight, keys, ticket = self._inflight, job.keys, job.ticket
        epoch, readable = job.epoch, job.readable  # this settle's own view: a failed second look is not the job's
        reserved: set[int] = set()
        reread = False
        while True:
            landed = [i for i in misses if keys[i] not in inflight and inflight.released_since(keys[i], epoch)]
            if landed and readable and not reread:
                reread, epoch = True, inflight.epoch()
                try:
                    await self._tiers.read_shared(job, landed)
                except StoreUnavailable:  # a second look, not a new lookup: counted once they are served
                    readable = False
                misses = [i for i in misses if job.found[i] is None]
                continue
            if ticket is not None and not ticket.counts_all:
                extra = [i for i in misses if keys[i] not in inflight and i not in reserved]
                if extra:
                    await ticket.charge_tokens(sum(job.counts[i] for i in extra), give_back=give_back)
                    reserved.update(extra)
                    continue
            return misses

    async def fetch(self, job: Job) -> None:
        """Claim `job.misses`, send the ones this request owns, wait for all; retry shared failures once.

        The upstream deadline of its calls counts from when it first asked, here, also for inputs it sends again
        after a shared call failed."""
        misses, mine = job.misses, set(job.keys)
        failure: BaseException | None = None
        retried = False
        asked = self._calls.now()
        while misses:
            futures = self._claim_and_send(job, misses, asked)
            again, failure = await self._collect(job, misses, futures, mine, retried)
            if failure is not None or not again:
                break
            retried = True
            misses = await self.settle(job, again, give_back=False)
        if failure is not None:
            raise failure.error if isinstance(failure, CallFailed) else failure

    def _claim_and_send(self, job: Job, misses: list[int], asked: float) -> dict[str, asyncio.Future[Entry]]:
        """Claim `misses` and start the calls for those nobody else is fetching; the futures of all of them."""
        keys = job.keys
        futures, owned = self._inflight.claim(keys[i] for i in misses)
        owned_idx = [i for i in misses if keys[i] in owned]
        job.own.update((k, futures[k]) for k in owned)
        job.trace.upstream_inputs += len(owned_idx)
        if job.readable and owned_idx:  # a miss: this request's own upstream call fetches it
            self._metrics.add(self._metrics.cache_lookups, "miss", amount=len(owned_idx))
        for part in chunk(owned_idx, job.counts, job.spec.max_batch_items, job.spec.max_batch_tokens):
            self._calls.start(job, part, asked)
        return futures

    async def _collect(
        self, job: Job, misses: list[int], futures: dict[str, asyncio.Future[Entry]], mine: set[str], retried: bool,
    ) -> tuple[list[int], BaseException | None]:
        """Wait for every call `misses` depend on; fill `job.found` with what came back. Returns the inputs worth
        sending again itself (a shared call failed) and the first failure that is final."""
        keys = job.keys
        started = time.perf_counter()
        waited = [futures[keys[i]] for i in misses]
        if pending := [f for f in waited if not f.done()]:
            await asyncio.wait(pending)  # never cancels them: other requests may share them
        job.trace.upstream_s += time.perf_counter() - started
        again: list[int] = []
        failure: BaseException | None = None
        shared = 0  # inputs answered by another request's call: served without a call of its own
        for i, fut in zip(misses, waited, strict=True):
            exc = fut.exception() if not fut.cancelled() else CallFailed(SHUTTING_DOWN, frozenset(), False)
            if exc is None:
                job.found[i] = fut.result()
                shared += keys[i] not in job.own
            elif not retried and keys[i] not in job.own and isinstance(exc, CallFailed) and exc.worth_retrying(mine):
                again.append(i)
            elif failure is None:
                failure = exc
        if job.readable and shared:  # their lookups end here (a failed read counted them as errors)
            self._metrics.add(self._metrics.cache_lookups, "hit", amount=shared)
        return again, failure
