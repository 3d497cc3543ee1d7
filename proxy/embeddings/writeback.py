"""Write-behind: entries fetched from the upstream go to the shared cache after the answer, many requests' entries in
one pipeline. Their keys stay claimed in the in-flight table until the write is over, so that nobody misses on
them in between; a failed write only counts an error (the next request fetches them again)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ..stores.cache import EmbeddingCache, Entry
from ..stores.guard import StoreUnavailable
from ..telemetry.metrics import Metrics
from .background import Background
from .coalesce import InFlight

# New entries are written this long after their upstream answer, all together: the answer goes out first, and
# under load one pipeline carries the entries of many requests.
_WRITE_DELAY_S = 0.001


class WriteBehind:
    def __init__(self, cache: EmbeddingCache, inflight: InFlight, metrics: Metrics, background: Background) -> None:
        self._cache = cache
        self._inflight = inflight
        self._metrics = metrics
        self._background = background
        self._writes: list[tuple[str, Entry]] = []  # fetched entries waiting for the next cache write
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        return bool(self._writes)

    def add(self, entries: Iterable[tuple[str, Entry]]) -> None:
        """Write these (key, entry) pairs soon, with whatever else arrives meanwhile."""
        self._writes.extend(entries)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_WRITE_DELAY_S, self._start)

    def flush(self) -> None:
        """Start the write of everything waiting now (at shutdown), without the delay."""
        if self._timer is not None:
            self._timer.cancel()
        self._start()

    def _start(self) -> None:
        self._timer = None
        batch, self._writes = self._writes, []
        if batch:
            self._background.spawn(self._write(batch))

    async def _write(self, batch: list[tuple[str, Entry]]) -> None:
        """One pipeline for every entry fetched since the last write; the keys stay claimed until it is done."""
        written = False
        try:
            await self._cache.set_many(batch)
            written = True
        except StoreUnavailable:
            self._metrics.cache_write_errors.inc()
        finally:
            self._inflight.release((key for key, _ in batch), written)
