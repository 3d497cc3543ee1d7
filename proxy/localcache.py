"""The in-process tier of the cache: the entries this process has recently read from Redis, bounded in bytes.

Entries are content-addressed and never change, so a local copy cannot be stale in its value; `ttl_s` only bounds
how long an entry deleted from Redis (an operator's purge) can still be served here. Only entries read from Redis
are admitted (an input asked for at least twice); fresh upstream answers go to Redis alone, so a stream of
one-off inputs does not churn this tier. Least recently used entries are evicted first.

An entry answered in `float` also keeps its JSON text (`keep_rendered`), counted in the same byte budget, so a
hot input's float answer is copied, not formatted again (about 40 us of float formatting per 1536-d vector).
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
        # key -> (entry, expires at, its float JSON text once rendered)
        self._entries: OrderedDict[str, tuple[Entry, float, bytes | None]] = OrderedDict()
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
        if isinstance(entry.vector, memoryview) and not isinstance(entry.vector.obj, bytes):
            # a view into a whole batch's decode buffer: kept as it is, one entry would hold all of them alive
            entry = Entry(bytes(entry.vector), entry.tokens)
        size = len(entry.vector) + _OVERHEAD
        if size > self.max_bytes:
            return
        self._entries[key] = (entry, self._clock() + self._ttl, None)
        self._grow(size)

    def rendered(self, key: str) -> bytes | None:
        """The float JSON text kept for `key` (call after `get` has said the entry is here and fresh)."""
        item = self._entries.get(key)
        return item[2] if item is not None else None

    def keep_rendered(self, key: str, text: bytes) -> None:
        """Keep the float JSON text of an entry that is here (for anything else, nothing happens)."""
        item = self._entries.get(key)
        if item is None or item[2] is not None:
            return
        self._entries[key] = (item[0], item[1], text)
        self._grow(len(text))

    def _grow(self, size: int) -> None:
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry, _, text = self._entries.pop(key)
        self.bytes -= len(entry.vector) + _OVERHEAD + (len(text) if text is not None else 0)
