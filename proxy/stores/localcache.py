"""The in-process tier of the cache: the entries this process has recently read from Redis, bounded in bytes.

Entries are content-addressed and never change, so a local copy cannot be stale in its value; `ttl_s` only bounds
how long an entry deleted from Redis (an operator's purge) can still be served here. Only entries read from Redis
are admitted (an input asked for at least twice); fresh upstream answers go to Redis alone, so a stream of
one-off inputs does not churn this tier. Least recently used entries are evicted first.

An entry answered in `float` also keeps its JSON text (`keep_rendered`), counted in the same byte budget, so a
hot input's float answer is copied, not formatted again (about 40 us of float formatting per 1536-d vector).

The budget bounds the memory the tier holds, not its payload: an entry is counted at what it costs in this
process (its key, vector and text as Python objects, plus the Entry, tuple, expiry and dict slot that hold them),
measured with tracemalloc; at `dimensions = 1` that is about 400 bytes for 4 bytes of vector. A vector is copied
on admission (a view would keep alive a memoryview object and the whole buffer it views), and so is a text (the
bytes orjson returns keep the whole buffer it wrote into).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable

from .cache import Entry

# Bytes per entry beyond its key and vector objects: the Entry (48), the (entry, expiry, text) tuple (64), the
# expiry float (24), a token count above 256 (32), and the OrderedDict slot: its share of the hash table (which
# is 1/3 to 2/3 full) and of the order links, 60 to 110.
_PER_ENTRY = 280


def entry_cost(key: str, vector: bytes | memoryview) -> int:
    """What an entry holds in this process, in bytes, before any rendered text."""
    return sys.getsizeof(key) + sys.getsizeof(vector) + _PER_ENTRY


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
        vector = entry.vector if type(entry.vector) is bytes else bytes(entry.vector)
        size = entry_cost(key, vector)
        if size > self.max_bytes:
            return
        self._entries[key] = (Entry(vector, entry.tokens), self._clock() + self._ttl, None)
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
        text = bytes(memoryview(text))  # orjson's bytes keep its whole write buffer, up to 2x the text: a copy
        self._entries[key] = (item[0], item[1], text)
        self._grow(sys.getsizeof(text))

    def _grow(self, size: int) -> None:
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry, _, text = self._entries.pop(key)
        self.bytes -= entry_cost(key, entry.vector) + (sys.getsizeof(text) if text is not None else 0)
