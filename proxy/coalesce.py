"""Single-flight per cache key inside one process: concurrent requests missing on the same input share one
upstream call. A key stays claimed until its cache write has finished, so nobody misses in between."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .cache import Entry


def _retrieve(fut: asyncio.Future[Entry]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark as retrieved: a failure nobody waits for is not an "unhandled" error


class InFlight:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[Entry]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def pending(self, keys: Iterable[str]) -> set[str]:
        """Keys some request is already fetching (checked before the cache read, so a key released after its
        write is always found in the cache)."""
        return {k for k in keys if k in self._futures}

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

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._futures.pop(key, None)
