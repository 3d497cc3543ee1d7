"""The admission budget alone (proxy/http/admission.py) and the memory return that follows it (memory.py): who
gets room in which order, who waits, who is refused, and the one larger than the whole budget served alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from proxy.embeddings.request import EmbeddingRequest
from proxy.errors import Overloaded
from proxy.http.admission import Budget, Lease, miss_bytes, request_bytes
from proxy.http.memory import MIN_GROWTH_BYTES, MemoryReturn

LONG = 30.0  # a wait nobody reaches in these tests: every grant comes from a release


def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _holding(budget: Budget, *amounts: int) -> Lease:
    lease = budget.lease()
    for amount in amounts:
        await lease.take(amount)
    return lease


async def test_room_is_taken_at_once_and_given_back() -> None:
    budget = Budget(100, LONG)
    lease = budget.lease()
    step = lease.take(60).__await__()
    with pytest.raises(StopIteration):  # done on the first step: no suspension when there is room
        step.send(None)
    assert budget.in_use == 60 and lease.held == 60
    lease.release()
    assert budget.in_use == 0 and lease.held == 0


async def test_waiters_are_served_in_order_and_nobody_passes_the_head() -> None:
    budget = Budget(100, LONG)
    first = await _holding(budget, 60)
    order: list[str] = []

    async def arrive(name: str, need: int) -> None:
        await budget.lease().take(need)
        order.append(name)

    big = _start(arrive("big", 50))
    await _turns()
    small = _start(arrive("small", 10))  # would fit now (60 + 10), but the big one is ahead
    await _turns()
    assert order == [] and budget.waiting == 2
    first.release()
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.in_use == 60


async def test_a_request_asking_for_more_goes_before_new_arrivals() -> None:
    budget = Budget(100, LONG)
    running = await _holding(budget, 90)
    grower = await _holding(budget, 5)  # read its body; now wants its answer's bytes
    order: list[str] = []

    async def grow() -> None:
        await grower.take(50)
        order.append("grow")

    async def arrive() -> None:
        await budget.lease().take(5)  # fits (95 + 5), but waits behind the one growing
        order.append("arrive")

    tasks = [_start(grow()), _start(arrive())]
    await _turns()
    assert order == []
    running.release()
    await asyncio.gather(*tasks)
    assert order == ["grow", "arrive"] and budget.in_use == 60


async def test_a_request_larger_than_the_budget_is_served_alone() -> None:
    budget = Budget(100, LONG)
    running = await _holding(budget, 30)
    huge = budget.lease()
    got_huge = _start(huge.take(150))
    await _turns()
    later = _start(budget.lease().take(1))
    await _turns()
    assert not got_huge.done() and budget.waiting == 2
    running.release()
    await got_huge
    assert budget.in_use == 150 and budget.stats.alone == 1
    await _turns()
    assert not later.done()  # nothing runs beside it
    huge.release()
    await later
    assert budget.in_use == 1


async def test_waiters_holding_their_bodies_do_not_block_the_head() -> None:
    """Two requests that read their bodies both want more than is left: nothing else runs, so the head runs
    alone, then the other."""
    budget = Budget(100, LONG)
    running = await _holding(budget, 80)
    one, two = await _holding(budget, 10), await _holding(budget, 10)
    grows = [_start(one.take(95)), _start(two.take(95))]
    await _turns()
    running.release()
    await grows[0]
    assert one.held == 105 and not grows[1].done()
    one.release()
    await grows[1]
    assert two.held == 105 and budget.in_use == 105


async def test_no_room_within_the_wait_is_a_503_overloaded_with_retry_after() -> None:
    budget = Budget(100, 0.05, retry_after_s=2)
    holder = await _holding(budget, 100)
    lease = budget.lease()
    with pytest.raises(Overloaded) as refused:
        await lease.take(10)
    err = refused.value
    assert (err.status, err.type, err.code, err.retry_after) == (503, "server_error", "overloaded", 2)
    assert lease.held == 0 and budget.waiting == 0 and budget.stats.refused == 1
    assert len(budget.stats.waits) == 1
    holder.release()
    await budget.lease().take(100)  # the refused one left no trace in the line


async def test_a_refused_head_lets_the_ones_behind_it_in() -> None:
    budget = Budget(100, LONG)
    await _holding(budget, 50)
    budget.wait_s = 0.05
    head = _start(budget.lease().take(80))  # will not fit while the 50 are held
    await _turns()
    budget.wait_s = LONG
    behind = _start(budget.lease().take(40))  # fits, but waits behind the head
    await _turns()
    assert not behind.done()
    with pytest.raises(Overloaded):
        await head
    await behind
    assert budget.in_use == 90


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    budget = Budget(100, LONG)
    holder = await _holding(budget, 100)
    gone = _start(budget.lease().take(10))
    await _turns()
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert budget.waiting == 0 and budget.in_use == 100
    holder.release()
    assert budget.in_use == 0


async def test_no_budget_admits_everything_and_still_counts() -> None:
    budget = Budget(0, 0.0)
    leases = [await _holding(budget, 1 << 30) for _ in range(3)]
    assert budget.in_use == 3 << 30 and budget.peak == 3 << 30
    for lease in leases:
        lease.release()
    assert budget.in_use == 0 and budget.stats.alone == 0


async def test_a_lease_gives_back_what_it_holds_when_the_request_ends() -> None:
    budget = Budget(100, LONG)
    with pytest.raises(RuntimeError):
        async with budget.lease() as lease:
            await lease.take(40)
            raise RuntimeError("the request failed")
    assert budget.in_use == 0


def test_charges_follow_the_answer_the_vectors_and_the_misses() -> None:
    strings = EmbeddingRequest("m", "s", ["x" * 60] * 2048, "float", None, None)
    charge = request_bytes(strings, 150_000, 1536)
    vectors = 2048 * 1536 * 4
    assert vectors < charge < vectors + 4 << 20  # a streamed answer: two pieces of text, not 38 MB
    b64 = request_bytes(EmbeddingRequest("m", "s", ["x"], "base64", None, None), 20, 1536)
    small_float = request_bytes(EmbeddingRequest("m", "s", ["x"], "float", None, None), 20, 1536)
    assert 1536 * 4 < b64 < small_float  # a small answer is built whole: twice its text
    tokens = request_bytes(EmbeddingRequest("m", "t", [[1, 2, 3]] * 100, "base64", None, None), 900, 8)
    assert tokens >= 300 * 36
    assert miss_bytes(205, 1536, True) == 205 * 1536 * 11
    assert miss_bytes(1, 1536, False) > miss_bytes(1, 1536, True)  # parsed JSON floats cost more than base64


async def test_a_lease_settles_on_what_the_parsed_request_needs() -> None:
    budget = Budget(100, LONG)
    lease = await _holding(budget, 60)  # the most its body could need
    other = budget.lease()
    waiting = _start(other.take(50))
    await _turns()
    await lease.settle(30)  # it needs less: the rest goes back at once, and the one waiting gets in
    await waiting
    assert lease.held == 30 and budget.in_use == 80
    await lease.settle(30)
    assert budget.in_use == 80
    grows = _start(lease.settle(75))  # more than is left: it waits like any take
    await _turns()
    assert not grows.done()
    other.release()
    await grows
    assert lease.held == 75 and budget.in_use == 75


def _memory(budget: Budget, rss: list[int]) -> tuple[MemoryReturn, list[int]]:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        rss[0] -= 40 << 20
        return 1

    return MemoryReturn(budget, trim=trim, rss=lambda: rss[0]), calls


async def test_memory_is_given_back_once_a_burst_is_over() -> None:
    budget = Budget(100 << 20, LONG)
    rss = [200 << 20]
    memory, calls = _memory(budget, rss)
    lease = await _holding(budget, 80 << 20)
    rss[0] += MIN_GROWTH_BYTES * 4
    assert not memory.check()  # the burst is still on
    lease.release()
    assert memory.check() and calls == [0]
    assert memory.trims == 1 and memory.returned_bytes == 40 << 20
    assert not memory.check()  # nothing grew since


async def test_memory_is_not_trimmed_for_small_growth_or_when_off() -> None:
    budget = Budget(100 << 20, LONG)
    rss = [200 << 20]
    memory, calls = _memory(budget, rss)
    rss[0] += MIN_GROWTH_BYTES - 1
    assert not memory.check() and calls == []
    off = MemoryReturn(budget, enabled=False, trim=lambda pad: 1, rss=lambda: 1 << 40)
    assert not off.check()


def test_the_c_library_trim_is_found_on_glibc() -> None:
    from proxy.http import memory

    trim: Callable[[int], int] | None = memory._malloc_trim()
    assert trim is not None  # the container and CI run glibc (python:3.11-slim, Debian)
    assert trim(0) in (0, 1)
    assert memory.rss_bytes() > 0
