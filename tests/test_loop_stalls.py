"""Issue 21, point 6: a stall of the process itself is never taken for a Redis failure.

A Redis call whose reply came in time but sat unread while this process's event loop was blocked (a long report, a
large answer being encoded) timed out, and the store then bypassed Redis for everyone: cache hits went upstream,
paid for. The old check blamed the loop only when the timeout fired more than half its limit late, so a stall
that began just after the command was sent and outlived the deadline by less than that tripped the bypass. Now the
store asks the event-loop lag monitor (telemetry/looplag.py) how much of the call's time the loop was blocked.
A report beside live traffic, against a real proxy process: tests/test_report_beside_traffic.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from proxy.config import RedisSettings
from proxy.stores.guard import Store, StoreUnavailable
from proxy.telemetry.looplag import LoopLag
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis
LIMIT_S = 0.25  # the default redis.socket_timeout_s


@pytest.fixture
async def lag() -> AsyncIterator[LoopLag]:
    monitor = LoopLag()
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.1)  # a few ticks: it is running
    yield monitor
    task.cancel()


def stall(seconds: float) -> None:
    """Block the event loop (called from a coroutine), as CPU-bound work on it does."""
    time.sleep(seconds)


def _store(url: str, lag: LoopLag | None, events: list[str]) -> Store:
    settings = RedisSettings(url=url, socket_timeout_s=LIMIT_S, retry_interval_s=30.0)
    return Store(aioredis.Redis.from_url(url), settings, lag=lag, on_event=events.append)


async def _call_during_a_stall(store: Store, stall_s: float) -> None:
    """A call Redis answers after 0.1 s (BLPOP on an empty list with that timeout), then, once it is waiting for
    its reply, the event loop blocked for `stall_s` (as a CPU-bound report did): the reply comes in time but is read
    only after the stall, past the call's 0.25 s deadline."""
    call = asyncio.ensure_future(store.call("blpop", lambda r: r.blpop(["ep:test:empty"], 0.1)))
    await asyncio.sleep(0.02)  # the command is sent; the call waits for its reply
    stall(stall_s)
    with pytest.raises(StoreUnavailable):
        await call


async def test_a_timeout_caused_by_a_blocked_event_loop_does_not_bypass_redis(
        redis_server: RedisServer, lag: LoopLag) -> None:
    events: list[str] = []
    store = _store(redis_server.url, lag, events)
    await store.call("ping", lambda r: r.ping())  # the pool holds a connection: the next call sends at once
    # the reply is read 0.32 s after the call began: 0.07 s past its deadline, less than the old rule's half a limit
    await _call_during_a_stall(store, 0.3)
    assert store.available, "a stall of this process was taken for a Redis failure: every request bypasses Redis"
    assert events == ["stalled"]
    assert await store.call("ping", lambda r: r.ping())  # and the next call goes to Redis as usual
    await store.close()


async def test_redis_itself_too_slow_still_makes_the_store_bypass_it(
        redis_server: RedisServer, lag: LoopLag) -> None:
    """The other side: the loop was free, Redis did not answer in time (paused): that is a Redis failure."""
    events: list[str] = []
    store = _store(redis_server.url, lag, events)
    await store.call("ping", lambda r: r.ping())
    pauser = redis.Redis(port=redis_server.port)
    pauser.execute_command("CLIENT", "PAUSE", 600, "ALL")
    try:
        with pytest.raises(StoreUnavailable):
            await store.call("ping", lambda r: r.ping())
    finally:
        pauser.execute_command("CLIENT", "UNPAUSE")
        pauser.close()
    assert not store.available and events == ["bypass"]
    await store.close()


async def test_without_a_lag_monitor_a_much_later_timeout_is_still_blamed_on_the_loop(
        redis_server: RedisServer) -> None:
    """Stores made without a monitor (the CLI's) keep the old rule: a timer fired over half a limit late."""
    events: list[str] = []
    store = _store(redis_server.url, None, events)
    await store.call("ping", lambda r: r.ping())
    await _call_during_a_stall(store, 0.5)
    assert store.available and events == ["stalled"]
    await store.close()


def test_blocked_counts_only_the_stalls_inside_the_span_and_long_enough() -> None:
    lag = LoopLag(interval_s=0.02)
    for due, ran in [(10.0, 10.01), (11.0, 11.3), (12.0, 12.04), (13.0, 13.5)]:
        lag.record(due, ran)
    assert lag.blocked(10.9, 13.2) == pytest.approx(0.3 + 0.04 + 0.2)
    assert lag.blocked(10.9, 13.2, at_least=0.05) == pytest.approx(0.3 + 0.2)
    assert lag.blocked(11.1, 11.2) == pytest.approx(0.1)
    assert lag.blocked(14.0, 15.0) == 0.0


def test_lag_is_observed_for_every_tick() -> None:
    seen: list[float] = []
    lag = LoopLag(observe=seen.append)
    lag.record(1.0, 1.0)
    lag.record(2.0, 2.25)
    assert seen == [0.0, pytest.approx(0.25)]


async def test_a_stall_still_going_on_counts_up_to_now(lag: LoopLag) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    stall(0.2)  # the monitor's next tick is due inside this stall and has not run yet
    now = loop.time()
    assert lag.blocked(start, now) >= 0.2 - 2 * lag.interval_s
