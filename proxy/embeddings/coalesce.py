"""Single-flight per cache key inside one process: concurrent requests missing on the same input share one
upstream call. A key stays claimed until its cache write has finished, so nobody misses in between.

Releases are numbered (an epoch). A request notes the epoch before it reads the cache; when it is about to claim
its misses, `released_since` tells which of them another request has fetched and written in the meantime (the
request awaited in between: the cache read, a quota round trip, token counting), so it reads those again instead
of sending them upstream a second time.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable

from ..stores.cache import Entry

# How many recent releases are remembered. A request that started before the oldest remembered release treats
# every key as possibly released (one extra cache read), so this only needs to cover one request's lifetime.
_RECENT_RELEASES = 65_536


def _retrieve(fut: asyncio.Future[Entry]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark as retrieved: a failure nobody waits for is not an "unhandled" error


class InFlight:
    def __init__(self, recent: int = _RECENT_RELEASES) -> None:
        self._futures: dict[str, asyncio.Future[Entry]] = {}
        self._epoch = 0
        self._released: OrderedDict[str, int] = OrderedDict()  # key -> epoch of its latest release
        self._recent = recent
        self._forgotten = 0  # releases up to this epoch are no longer remembered

    def __len__(self) -> int:
        return len(self._futures)

    def __contains__(self, key: str) -> bool:
        return key in self._futures

    def epoch(self) -> int:
        """The current release epoch; note it before reading the cache."""
        return self._epoch

    def released_since(self, key: str, epoch: int) -> bool:
        """Whether `key` was fetched and written to the cache after `epoch` (when unsure: True)."""
        if epoch < self._forgotten:
            return True
        released = self._released.get(key)
        return released is not None and released > epoch

    def claim(self, keys: Iterable[str]) -> tuple[dict[str, asyncio.Future[Entry]], list[str]]:
        """Futures for every key, and the keys this caller now owns (must resolve, then release)."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Entry]] = {}
        owned: list[str] = []
        for key in keys:
            fut = self._futures.get(key)
            if fut is None:
                fut = self._futures[key] = loop.create_future()
                fut.add_done_callback(_retrieve)
                owned.append(key)
            futures[key] = fut
        return futures, owned

    def resolve(self, key: str, entry: Entry) -> None:
        fut = self._futures.get(key)
        if fut is not None and not fut.done():
            fut.set_result(entry)

    def fail(self, keys: Iterable[str], exc: BaseException) -> None:
        """Fail and forget: a later request may try again."""
        for key in keys:
            fut = self._futures.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    def release(self, keys: Iterable[str], written: bool = True) -> None:
        """The owner is done with `keys`; `written`: their entries are in the cache now."""
        released = self._released
        for key in keys:
            self._futures.pop(key, None)
            if written:
                self._epoch += 1
                released[key] = self._epoch
                released.move_to_end(key)
        while len(released) > self._recent:
            _, self._forgotten = released.popitem(last=False)
