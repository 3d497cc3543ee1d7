"""Giving memory back after a burst (README "Overload and memory").

CPython hands objects larger than 512 bytes (a cached vector, a piece of an answer, a Redis reply) to the C
library's malloc. glibc keeps what they freed in its heap for reuse, and after a burst raises its threshold for
giving large blocks their own mapping, so a process that once held 2 GB keeps most of it resident long after.
`malloc_trim(0)` gives back every free page of the heap (under 20 ms for a few hundred MB here). It is called once a
burst is over: the process's RSS grew by `MIN_GROWTH_BYTES` since the last trim, and the admission budget's use
(admission.py) is below an eighth of its peak over the last `interval_s`. Checked every second, so a trim follows
a burst within about a second and does not run in the middle of one.
On a C library without `malloc_trim` (musl, macOS) nothing happens.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

from .admission import Budget

log = logging.getLogger("proxy.app")

MIN_GROWTH_BYTES = 16 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class MemoryReturn:
    def __init__(self, budget: Budget, *, enabled: bool = True, interval_s: float = 1.0,
                 trim: Callable[[int], int] | None = None, rss: Callable[[], int] = rss_bytes) -> None:
        self._budget = budget
        self._trim = (trim or _malloc_trim()) if enabled else None
        self._rss = rss
        self._interval_s = interval_s
        self._settled = rss()  # the RSS after the last trim (or at start): growth is counted from here
        self.trims = 0
        self.returned_bytes = 0  # RSS before minus after, over every trim

    def check(self) -> bool:
        """Trim if the process grew by MIN_GROWTH_BYTES since the last trim and the budget's use is now below an
        eighth of its peak since the last check (the burst is over); whether it did."""
        budget = self._budget
        peak = budget.reset_peak()
        if self._trim is None or budget.in_use * 8 > peak:
            return False
        before = self._rss()
        if before - self._settled < MIN_GROWTH_BYTES:
            self._settled = min(self._settled, before)
            return False
        self._trim(0)
        self._settled = after = self._rss()
        self.trims += 1
        self.returned_bytes += max(0, before - after)
        log.info("memory given back after a burst: RSS %d -> %d MiB", before >> 20, after >> 20)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.check()
