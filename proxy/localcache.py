"""The in-process tier of the cache: the entries this process has recently read from Redis, bounded in bytes.

Entries are content-addressed and never change, so a local copy cannot be stale in its value; `ttl_s` only bounds
how long an entry deleted from Redis (an operator's purge) can still be served here. Only entries read from Redis
are admitted (an input asked for at least twice); fresh upstream answers go to Redis alone, so a stream of
one-off inputs does not churn this tier. Least recently used entries are evicted first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .cache import Entry

_OVERHEAD = 200  # bytes per entry beyond its vector: key string, Entry, tuple, dict slot


class LocalCache:
    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._ttl = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry | None:
        item = self._entries.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return item[0]

    def put(self, key: str, entry: Entry) -> None:
        if key in self._entries:
            return
        size = len(entry.vector) + _OVERHEAD
        if size > self.max_bytes:
            return
        self._entries[key] = (entry, self._clock() + self._ttl)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self.bytes -= len(entry.vector) + _OVERHEAD
