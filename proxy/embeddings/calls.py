"""One upstream call for some of a request's misses, and what the requests waiting on it get.

A call resolves the in-flight futures of the keys it carries, with an entry each, or fails them all with a
`CallFailed` that says whether a request that shared it may send those inputs again itself. It never raises into
the requests that wait on it: any failure, a bug included, ends up in their futures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InvalidRequest, ProxyError, ServiceUnavailable, UpstreamBadGateway
from ..stores.cache import Entry
from ..telemetry.metrics import Metrics
from ..upstream import CallAbandoned, FleetClient
from .background import Background
from .coalesce import InFlight
from .job import Job
from .writeback import WriteBehind

log = logging.getLogger("proxy.service")
SHUTTING_DOWN = ServiceUnavailable("The proxy is shutting down.")


class CallFailed(Exception):
    """What the requests waiting on a failed upstream call get: its `error`, the cache `keys` it carried, and
    whether a request that shared it may send its inputs again itself (`retryable`)."""

    def __init__(self, error: ProxyError, keys: frozenset[str], retryable: bool) -> None:
        super().__init__(error.message)
        self.error, self.keys, self.retryable = error, keys, retryable

    def worth_retrying(self, mine: set[str]) -> bool:
        """For a request asking for `mine` that shared this call: an upstream 400 is about its own inputs when the
        call carried nothing else (relayed as it is); otherwise it may be about another request's input, and its
        message must not reach this one."""
        if isinstance(self.error, InvalidRequest):
            return not self.keys <= mine
        return self.retryable


def chunk(indices: Sequence[int], counts: Sequence[int], max_items: int, max_tokens: int) -> list[list[int]]:
    """Greedy split into as few upstream requests as the item and token limits allow, in order."""
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in indices:
        if current and (len(current) >= max_items or tokens + counts[i] > max_tokens):
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += counts[i]
    if current:
        chunks.append(current)
    return chunks


def entries_of(vectors: np.ndarray, tokens: Sequence[int]) -> list[Entry]:
    """Views into the one array the upstream answer was decoded to: no copy per vector."""
    rows = np.ascontiguousarray(vectors, dtype="<f4").data.cast("B")
    width = vectors.shape[1] * 4
    return [Entry(rows[i * width:(i + 1) * width], tok) for i, tok in enumerate(tokens)]


class UpstreamCalls:
    def __init__(
        self, upstream: FleetClient, inflight: InFlight, metrics: Metrics, writes: WriteBehind, background: Background,
    ) -> None:
        self._upstream = upstream
        self._inflight = inflight
        self._metrics = metrics
        self._writes = writes
        self._background = background

    def now(self) -> float:
        """The upstream client's clock: a request's upstream deadline counts from this."""
        return self._upstream.now()

    def start(self, job: Job, part: list[int], asked: float) -> None:
        """Send the unique inputs `part` of `job` (claimed by it) in one call, in the background."""
        keys, items = [job.keys[i] for i in part], [job.inputs.items[i] for i in part]
        call = self._call(job, keys, items, [job.counts[i] for i in part], asked, job.cancelled.is_set)
        self._background.spawn(call)

    async def _call(
        self, job: Job, keys: list[str], items: list[str | list[int]], counts: list[int], asked: float,
        gave_up: Callable[[], bool],
    ) -> None:
        req, m = job.req, self._metrics
        m.upstream_batch_size.labels(req.model).observe(len(items))
        try:
            with m.upstream_latency.labels(req.model).time():
                result = await self._upstream.embed(
                    req.model, items, counts, req.dimensions, req.user, team=job.team,  # type: ignore[arg-type]
                    on_lost=job.trace.lost, asked=asked, gave_up=gave_up, input_type=req.input_type)
        except ProxyError as exc:
            if not isinstance(exc, CallAbandoned):  # never sent: no upstream error
                m.observe_upstream_error(req.model, exc)
            helpless = isinstance(exc, UpstreamBadGateway) and exc.kind == "auth"  # the proxy's credentials
            self._inflight.fail(keys, CallFailed(exc, frozenset(keys), not helpless))
            return
        except asyncio.CancelledError:
            self._inflight.fail(keys, CallFailed(SHUTTING_DOWN, frozenset(keys), False))
            raise
        except Exception as exc:  # a bug must not leave other requests waiting forever
            log.exception("upstream call failed unexpectedly")
            m.observe_upstream_error(req.model, None)
            error = UpstreamBadGateway(f"Upstream call failed ({type(exc).__name__}).")
            self._inflight.fail(keys, CallFailed(error, frozenset(keys), False))
            return
        m.upstream_requests.labels(req.model, "ok").inc()
        self._deliver(keys, entries_of(result.vectors, result.tokens), job.cacheable)

    def _deliver(self, keys: list[str], entries: list[Entry], cacheable: bool) -> None:
        """Answer everyone waiting on `keys`, then release them now or after their cache write."""
        for key, entry in zip(keys, entries, strict=True):
            self._inflight.resolve(key, entry)
        if not cacheable:
            self._inflight.release(keys, written=False)
            return
        if any(not e.tokens for e in entries):  # an input the upstream counted as empty: served, never cached
            self._inflight.release([k for k, e in zip(keys, entries, strict=True) if not e.tokens], written=False)
        self._writes.add((k, e) for k, e in zip(keys, entries, strict=True) if e.tokens)
