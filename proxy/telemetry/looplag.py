"""How long this process's event loop was blocked, and when.

A timer that should fire every `interval_s` is late by exactly the time the loop spent on something else (a long
computation, a burst of callbacks, the process not being scheduled). Each late tick is a stall from when it was
due to when it ran; the recent ones are kept, so a caller can ask how much of a span of time the loop was blocked
(`blocked`). The Redis guard (stores/guard.py) asks it when a call times out: a call that had the loop for less
than its time limit did not time out because of Redis, and must not make the process bypass Redis.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

# A tick later than this is kept as a stall (shorter ones are jitter, not a blocked loop).
_KEEP_AT_LEAST_S = 0.005


class LoopLag:
    def __init__(self, interval_s: float = 0.02, *, keep_s: float = 60.0,
                 observe: Callable[[float], None] | None = None) -> None:
        self.interval_s = interval_s
        self._keep_s = keep_s
        self._observe = observe  # every tick's lateness (the event_loop_lag_seconds histogram)
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=100_000)
        self._next_due: float | None = None  # the tick being waited for (None: not running)

    async def run(self) -> None:
        """Tick until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = self._next_due = loop.time() + self.interval_s
                await asyncio.sleep(self.interval_s)
                now = loop.time()
                self.record(due, now)
        finally:
            self._next_due = None

    def record(self, due: float, now: float) -> None:
        lag = max(0.0, now - due)
        if self._observe is not None:
            self._observe(lag)
        if lag >= _KEEP_AT_LEAST_S:
            self._stalls.append((due, now))
        while self._stalls and self._stalls[0][1] < now - self._keep_s:
            self._stalls.popleft()

    def blocked(self, start: float, end: float, *, at_least: float = 0.0) -> float:
        """Seconds of [start, end] (loop time) during which the loop was blocked, counting only stalls of at least
        `at_least` seconds; a stall still going on (the tick due inside it has not run yet) counts up to `end`."""
        total = 0.0
        due = self._next_due
        if due is not None and due < end and end - due >= at_least:
            total += end - max(due, start)
        for a, b in reversed(self._stalls):  # newest first: stop at the first that ended before `start`
            if b <= start:
                break
            if b - a >= at_least:
                total += max(0.0, min(b, end) - max(a, start))
        return total
