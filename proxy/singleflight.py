"""One run of a piece of work at a time per key, shared by every caller that asks for it while it runs.

For reads and refreshes that many requests may need at the same moment: a key record not yet verified, a cloud
provider's credentials. A caller that stops waiting (its time limit, its client gone) leaves the run going for the
others and the next caller, so giving up never starts a second run beside the first (a stalled token endpoint
costs one thread at a time, not one per call), and every waiter gets the run's result or its exception.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    def __init__(self) -> None:
        self._runs: dict[K, asyncio.Future[T]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> T:
        """`work()`'s result, from the run in flight for `key` if there is one, else from a new run."""
        return await asyncio.shield(self.start(key, work))

    def start(self, key: K, work: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """The run in flight for `key`, else a new run of `work()`: for a caller that need not wait for it."""
        run = self._runs.get(key)
        if run is None:
            run = asyncio.ensure_future(work())
            self._runs[key] = run
            run.add_done_callback(functools.partial(self._done, key))
        return run

    def forget(self, key: K | None = None) -> None:
        """Callers from now on start a new run for `key` (None: every key): what is in flight may be stale."""
        if key is None:
            self._runs.clear()
        else:
            self._runs.pop(key, None)

    def _done(self, key: K, run: asyncio.Future[T]) -> None:
        if self._runs.get(key) is run:
            del self._runs[key]
        if not run.cancelled():
            run.exception()  # retrieved here: every waiter may have stopped waiting
