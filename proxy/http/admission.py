"""The admission budget: how many bytes of work one process holds at once (README "Overload and memory").

A request is charged, in bytes, for what it makes the process hold. While its body arrives: each piece as it comes
(body.py), so a slow upload holds what it sent, not what its `Content-Length` announces (charged ahead, the most a
16 MB body could need once parsed, ~47 MiB, was held for the hours a slow client took to send it: three such
uploads shut every other request out). Once parsed, exactly its body, inputs and answer (`request_bytes`), before
the cache is read. Once
the cache has said which inputs miss, their upstream answer (`miss_bytes`). All of it until the answer's last byte
is sent. While the budget has room a charge is taken at once, without a suspension. Past it the request waits, in
order of arrival, for at most `wait_s`, then gets `Overloaded` (503, code `overloaded`, Retry-After).

Order: leases asking for more (a request that read its body and now wants its answer's bytes) go before new
arrivals, and nobody passes the one at the head of a line, so a large request is not starved by a stream of
small ones. A request larger than the whole budget is granted once nothing else runs (every byte in use belongs
to requests that are waiting themselves): served alone, never refused for its size. One at a time: while one runs
past the budget it passes the lines for its own further charges and nobody else goes past the budget, so the use
stays within the budget plus one request. When every holder waits, the head is granted at once (no release would
come to wake it).

The budget is plain asyncio (the clock injected for the wait's statistics) and knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from ..embeddings.request import EmbeddingRequest
from ..errors import Overloaded
from .response import CHUNK_BYTES

# What a request makes the process hold, in bytes (README "Overload and memory"; checked against RSS under the
# bench's `burst` scenario and all-miss bursts, BENCHMARKS.md). Per float32 value of the answer:
_VECTOR = 4  # the vector itself: read from Redis, or decoded from the upstream's answer
_FLOAT_TEXT = 16  # the longest float32 JSON text ("-1.1754944e-38") and its comma
# Per missed input's value, its upstream answer while it is read and parsed: the raw JSON and the parsed form
_UPSTREAM_BASE64 = 11  # (2 x 16/3: the base64 text, then the same as a str)
_UPSTREAM_FLOAT = 60  # (the text ~20, the parsed Python floats 32, their float64 copy 8)
_PER_INPUT = 320  # its cache key, its entry, its item's JSON around the vector
_PER_STRING = 64  # a parsed input string beyond its text (object header, list slot)
_PER_TOKEN_ID = 36  # a parsed token id (int object, list slot)


def request_bytes(req: EmbeddingRequest, body_bytes: int, dims: int) -> int:
    """What a parsed request holds until it is answered, beyond its body: the parsed inputs, the vectors of its
    answer, its entries and keys, and the answer's text: whole when it is sent whole, two pieces when streamed
    (one encoded, one being sent)."""
    inputs = len(req.inputs)
    if req.kind == "s":
        parsed = body_bytes + inputs * _PER_STRING
    else:  # token-id lists
        parsed = sum(len(ids) for ids in req.inputs) * _PER_TOKEN_ID
    text = inputs * dims * (_FLOAT_TEXT if req.encoding_format == "float" else 16 / 3)
    window = min(2 * text, 2 * CHUNK_BYTES + dims * _FLOAT_TEXT)
    return parsed + inputs * (dims * _VECTOR + _PER_INPUT) + int(window)


def miss_bytes(misses: int, dims: int, upstream_base64: bool) -> int:
    """What the upstream's answer for `misses` inputs holds while it is read and parsed."""
    return misses * dims * (_UPSTREAM_BASE64 if upstream_base64 else _UPSTREAM_FLOAT)


@dataclass(eq=False)
class _Waiter:
    lease: Lease
    need: int
    future: asyncio.Future[None]
    started: float


class BudgetStats:
    """What the budget did, for the metrics (read and reset by the metrics flush)."""

    def __init__(self) -> None:
        self.waits: list[float] = []  # seconds each finished wait took (admitted or refused)
        self.refused = 0
        self.alone = 0  # requests larger than the whole budget, admitted alone


class Budget:
    def __init__(self, capacity: int, wait_s: float, retry_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity  # bytes; 0: no budget (everything admitted at once; use is still counted)
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.in_use = 0
        self.peak = 0  # the highest use since `reset_peak` (memory.py reads it)
        self.stats = BudgetStats()
        self._clock = clock
        self._growing: collections.deque[_Waiter] = collections.deque()  # leases asking for more: served first
        self._arriving: collections.deque[_Waiter] = collections.deque()
        self._waiting_held = 0  # bytes held by leases that wait in _growing (they run no work while they wait)
        # The lease granted past the budget, running alone, while the use is over the budget: the only one, so the
        # use stays within the budget plus one request (it passes the lines; nobody else goes past the budget).
        self._lone: Lease | None = None

    def lease(self) -> Lease:
        return Lease(self)

    @property
    def waiting(self) -> int:
        return len(self._growing) + len(self._arriving)

    def reset_peak(self) -> int:
        peak, self.peak = self.peak, self.in_use
        return peak

    def _fits(self, need: int, lease: Lease, waiting: bool) -> bool:
        """Whether `need` more bytes fit now, or the lease would run alone: every byte held by others belongs to
        leases that wait themselves (a waiting lease runs no work; its own bytes are in `_waiting_held`), and no
        other lease is past the budget already (else each one granted alone, waiting for its next piece, let the
        next one past the budget too, and the use grew by a request each time)."""
        if not self.capacity or self.in_use + need <= self.capacity:
            return True
        if self._lone is not None and self._lone is not lease:
            return False
        return self.in_use - self._waiting_held - (0 if waiting else lease.held) == 0

    def _grant(self, lease: Lease, need: int) -> None:
        if self.capacity and self.in_use + need > self.capacity and self._lone is not lease:
            self._lone = lease
            self.stats.alone += 1
        lease.held += need
        self.in_use += need
        self.peak = max(self.peak, self.in_use)

    async def take(self, lease: Lease, need: int) -> None:
        grows = lease.held > 0
        line = self._growing if grows else self._arriving
        ahead = self._growing or (not grows and self._arriving)
        if (not ahead or lease is self._lone) and self._fits(need, lease, waiting=False):
            self._grant(lease, need)
            return
        waiter = _Waiter(lease, need, asyncio.get_running_loop().create_future(), self._clock())
        line.append(waiter)
        self._waiting_held += lease.held
        # The bytes this lease holds now count as waiting: when every other lease that holds bytes waits too, the
        # head of a line runs alone, at once (no release would come to wake it: they all wait).
        self._wake()
        try:
            if not waiter.future.done():
                await asyncio.wait({waiter.future}, timeout=self.wait_s)
        finally:
            self.stats.waits.append(self._clock() - waiter.started)
            if not waiter.future.done():  # out of time, or the request was cancelled: it leaves its line
                line.remove(waiter)
                self._waiting_held -= lease.held
                self._wake()  # the ones behind it may fit now
        if not waiter.future.done():
            self.stats.refused += 1
            raise Overloaded("This process is busy with other requests. Please retry shortly.",
                             retry_after=self.retry_after_s)

    def release(self, lease: Lease, amount: int) -> None:
        lease.held -= amount
        self.in_use -= amount
        if self._lone is not None and self.in_use <= self.capacity:
            self._lone = None
        if self._growing or self._arriving:
            self._wake()

    def _wake(self) -> None:
        """Grant the heads of the lines, growing first, while they fit; nobody passes a head that does not, but
        the lease running alone past the budget, which goes first."""
        lone = next((w for w in self._growing if w.lease is self._lone), None)
        if lone is not None:
            if not self._fits(lone.need, lone.lease, waiting=True):
                return
            self._growing.remove(lone)
            self._waiting_held -= lone.lease.held
            self._grant(lone.lease, lone.need)
            lone.future.set_result(None)
        for line in (self._growing, self._arriving):
            while line:
                waiter = line[0]
                if not self._fits(waiter.need, waiter.lease, waiting=True):
                    return
                line.popleft()
                self._waiting_held -= waiter.lease.held
                self._grant(waiter.lease, waiter.need)
                waiter.future.set_result(None)


class Lease:
    """One request's share of the budget: `take` more as the request learns what it needs; everything it holds
    goes back when it leaves (`async with`)."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self.held = 0

    async def take(self, need: int) -> None:
        """`need` more bytes, now or after a wait; `Overloaded` when none came within the budget's wait."""
        if need > 0:
            await self._budget.take(self, need)

    async def settle(self, total: int) -> None:
        """Hold `total` bytes from now on: more (taken as `take` does) or less (the rest given back at once)."""
        if total > self.held:
            await self._budget.take(self, total - self.held)
        elif total < self.held:
            self._budget.release(self, self.held - total)

    def release(self) -> None:
        if self.held:
            self._budget.release(self, self.held)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()
