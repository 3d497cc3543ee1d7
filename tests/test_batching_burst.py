"""Issue 19 point 4: micro-batching that holds under a burst (dynamic batching, proxy/upstream/batching.py).

64 single-input misses for one model arriving over ~100 ms against a 30 ms upstream cost at most 16 upstream calls
(before: 34 to 47, one per 2 ms join window), counted by the real mock upstream behind the proxy app on a real
redis-server; a lone miss on an idle lane still goes at once.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from proxy.upstream import batching
from proxy.upstream.batching import Lost, MicroBatcher
from proxy.upstream.http import UpstreamResult
from tests import test_fleet
from tests.conftest import ProxyFactory
from tests.test_fleet import MODEL, Mocks, fleet_settings, upstream_toml

mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment


@pytest.mark.redis
async def test_64_misses_spread_over_100_ms_cost_at_most_16_upstream_calls(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(latency_ms=30)
    model = f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}]\n'
    proxy = await make_proxy(fleet_settings(redis_url, upstream_toml("a", up), model))
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200  # the key is verified
    up.state.reset()

    async def one(i: int) -> int:
        await asyncio.sleep(i * 0.1 / 64)  # one miss every ~1.6 ms: the burst lasts ~100 ms
        return (await proxy.embed(key, {"model": MODEL, "input": f"spread miss {i}"})).status

    assert await asyncio.gather(*(one(i) for i in range(64))) == [200] * 64
    assert up.state.inputs == 64
    assert up.state.requests <= 16, up.state.requests  # before: 23 to 47


async def test_a_lone_miss_on_an_idle_lane_goes_at_once() -> None:
    entered: list[bool] = []
    ran_meanwhile: list[bool] = []  # whether any other task ran between the submit and the call

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        entered.append(bool(ran_meanwhile))
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "a"

    batcher = MicroBatcher(call, lambda model: (100, 1000))
    asyncio.get_running_loop().call_soon(ran_meanwhile.append, True)
    await batcher.submit("m", ["x"], [1], None, None)
    assert entered == [False]  # the call began in the submitting task, before any timer or other task


async def test_a_lane_keeps_at_most_lane_calls_in_flight_and_collects_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batching, "LANE_HOLD_S", 60.0)  # a loaded machine's slow sleeps never end the hold here
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def call(model: str, inputs: list[str] | list[list[int]], counts: list[int], dims: int | None,
                   user: str | None, asked: float, lost: Lost | None = None,
                   gave_up: object = None, input_type: str | None = None) -> tuple[UpstreamResult, str]:
        calls.append(list(inputs))  # type: ignore[arg-type]
        await gate.wait()
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), list(counts)), "a"

    batcher = MicroBatcher(call, lambda model: (100, 1000))
    tasks = []
    for i in range(batching.LANE_CALLS):  # the first at once, each next one after its join window (2 ms)
        tasks.append(asyncio.create_task(batcher.submit("m", [f"x{i}"], [1], None, None)))
        await asyncio.sleep(0.01)
    assert calls == [[f"x{i}"] for i in range(batching.LANE_CALLS)]
    tasks += [asyncio.create_task(batcher.submit("m", [f"y{i}"], [1], None, None)) for i in range(10)]
    await asyncio.sleep(0.02)  # well past the join window
    assert len(calls) == batching.LANE_CALLS  # the ten are collected, not sent one window at a time
    gate.set()
    await asyncio.gather(*tasks)
    assert calls[batching.LANE_CALLS:] == [[f"y{i}" for i in range(10)]]  # one call as soon as one in flight ended
