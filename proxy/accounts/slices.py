"""Long operator work on the event loop in short slices, so live requests keep their latency.

Work is written as a generator that yields whenever it has held the loop for `SLICE_S`; `sliced` runs it and
pauses at each yield, and the loop serves whatever is ready meanwhile. The pause is `PAUSE_S`, longer when the loop
is busy: by twice how late the pause itself ended (live requests ran in it, or the process waited for a core), up to
`MAX_PAUSE_S`, so the work takes at most a third of an idle loop and backs off under traffic; a live request waits
for at most one slice at each turn of the loop it needs. A worker thread is no substitute for CPU-bound Python: the
GIL gives the loop back only every 5 ms (sys.getswitchinterval) at each of its turns, and live requests waited far
longer behind a thread than behind these slices (BENCHMARKS.md, "Overload").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")
SLICE_S = 0.001  # the longest a slice holds the loop before it lets requests run
PAUSE_S = 0.002  # the shortest pause after a slice
MAX_PAUSE_S = 0.05  # the longest (a busy loop makes the pause longer, see above)
CHECK_EVERY = 32  # items between two looks at the clock (each item costs microseconds)


class Pacer:
    """The pause between two slices of work that awaits between its slices too (the key index build): each `pause`
    sleeps `PAUSE_S`, longer while the loop is busy, as `sliced` does."""

    def __init__(self) -> None:
        self._pause = PAUSE_S

    async def pause(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(self._pause)
        late = loop.time() - started - self._pause
        self._pause = min(MAX_PAUSE_S, PAUSE_S + 2 * max(0.0, late))


async def sliced(steps: Iterator[None]) -> None:
    """Run a generator of short steps, pausing between two (longer while the loop is busy)."""
    pacer = Pacer()
    for _ in steps:
        await pacer.pause()


def _mapping(items: Iterable[T], fn: Callable[[T], U], out: list[U]) -> Iterator[None]:
    clock = time.perf_counter
    until = clock() + SLICE_S
    for n, item in enumerate(items, 1):
        out.append(fn(item))
        if not n % CHECK_EVERY and clock() > until:
            yield
            until = clock() + SLICE_S


async def mapped(items: Iterable[T], fn: Callable[[T], U]) -> list[U]:
    """[fn(x) for x in items], in slices."""
    out: list[U] = []
    await sliced(_mapping(items, fn, out))
    return out
