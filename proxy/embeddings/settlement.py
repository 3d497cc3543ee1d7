"""Phase 5, settle the ticket and record: the quota reservation corrected to what the upstream billed, and the
request in the usage ledger and the metrics, under the time it started.

Whatever became of the request (answered, failed, refused, cancelled), the tokens the upstream billed for its own
calls (answers the proxy refused included) stay in its quota and go to the ledger; only the tokens of inputs that
were not billed are given back. Attempts that may have been billed unread go to the ledger's unconfirmed tokens.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from ..accounts.keys import KeyRecord
from ..accounts.usage import UsageLedger
from ..config import Settings
from ..stores.cache import Entry
from ..telemetry.metrics import Metrics
from .job import Job
from .outcome import Outcome, Trace


class Settlement:
    def __init__(self, settings: Settings, ledger: UsageLedger, metrics: Metrics) -> None:
        self._settings = settings
        self._ledger = ledger
        self._metrics = metrics

    async def settle_and_record(self, job: Job) -> Outcome:
        """An answered request (every entry found): settle its ticket, record it, and say what it was."""
        entries: list[Entry] = job.found  # type: ignore[assignment]
        index, positions, trace, ticket, key = job.inputs.index, job.inputs.positions, job.trace, job.ticket, job.key
        billed = sum(entries[index[k]].tokens for k in job.own)
        prompt = sum(entries[p].tokens for p in positions)
        if ticket is not None:
            await ticket.settle((prompt if ticket.counts_all else billed) + trace.failed_tokens)
        self._ledger.record(key.team, key.id, job.req.model, prompt, billed, at=job.at)
        self._record_lost(key, job.req.model, trace.failed_tokens, trace, job.at)
        trace.prompt_tokens, trace.cached_tokens = prompt, prompt - billed
        # What happened: an input is a miss only if this request's own upstream call fetched it; one served by
        # another request's call (in flight, or just answered and being written) cost it nothing, as a cache hit.
        trace.cache_hits = hits = len(job.keys) - len(job.own)
        state: Literal["hit", "miss", "partial"] = "hit" if not job.own else ("miss" if not hits else "partial")
        return Outcome(entries, positions, prompt, billed, state, ticket, job.keys)

    async def close_unanswered(self, job: Job) -> None:
        """A request not answered 200 (failed, refused, or cancelled): once its own upstream calls are over, the
        tokens the upstream billed for them stay in its quota and go to the ledger; the rest is given back."""
        own = job.own.values()
        if pending := [f for f in own if not f.done()]:
            await asyncio.wait(pending)
        billed = sum(f.result().tokens for f in own if not f.cancelled() and f.exception() is None)
        billed += job.trace.failed_tokens
        if job.ticket is not None:
            await job.ticket.settle(billed)
        self._record_lost(job.key, job.req.model, billed, job.trace, job.at)

    def _record_lost(self, key: KeyRecord, model: str, failed: int, trace: Trace, at: float) -> None:
        """Billed tokens that served nothing (`failed`), and the tokens of attempts that may have been billed
        unread, in the ledger and the metrics."""
        if failed:
            self._ledger.record_failed(key.team, key.id, model, failed, at=at)
            price = self._settings.models[model].price_per_million_tokens
            self._metrics.observe_unanswered(key.team, model, failed, price)
        if trace.unconfirmed_tokens:
            self._ledger.record_unconfirmed(key.team, key.id, model, trace.unconfirmed_tokens, at=at)
            self._metrics.add(self._metrics.unconfirmed_tokens, key.team, key.id, model,
                              amount=trace.unconfirmed_tokens)
