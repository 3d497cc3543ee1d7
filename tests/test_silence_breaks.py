"""Break-it review of silence detection (issue 19): a stalled event loop, the hold left after an answer, garbage in
a deployment's hash. Two proxy apps on one real redis-server, mock upstreams."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.http.admin import FLEET
from tests import test_fleet
from tests.conftest import ProxyFactory, RedisServer
from tests.test_break11 import up_toml
from tests.test_fleet import MODEL, Mocks
from tests.test_fleet_health import deployment, pair, within
from tests.test_fleet_silence import even

mocks = test_fleet.mocks
pytestmark = pytest.mark.redis


@pytest.mark.parametrize("then", ["answer", "choice"])
async def test_a_stalled_event_loop_does_not_make_a_deployment_that_answered_meanwhile_silent(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, then: str
) -> None:
    """a answers in 30 ms; this process's loop stalls 0.4 s (a large input tokenized, a GC pause) right after a call
    to a went out. The answer is in the socket when the loop resumes: a was never silent. Before: the silence timer
    ran before the answer was read, and the fleet was told a was silent. With "choice", the first thing the loop
    runs after the stall is another request choosing a deployment (queued before a's answer is read). Before:
    `Router.choose` looked for silence itself, without the timer's second look, and took a for silent; only the
    per-call timer decides now."""
    a, b = await mocks(), await mocks()
    up = up_toml("a", a, attempt_timeout_s=5.0) + up_toml("b", b)
    first, second, key = await pair(make_proxy, redis_url, up, even(", weight = 1000", ", weight = 0.001"))
    d = deployment(first, "a")
    for i in range(10):  # warm: the adaptive threshold at its floor
        assert (await first.embed(key, {"model": MODEL, "input": f"warm {i}"})).status == 200
    assert d.silence.threshold(d.settings) < 0.2
    a.settings.latency_ms = 30
    router, loop = first.app[FLEET].router, asyncio.get_running_loop()
    for i in range(3):
        before = a.state.requests
        call = asyncio.create_task(first.embed(key, {"model": MODEL, "input": f"stalled {then} {i}"}))
        await within(lambda before=before: a.state.requests > before)  # a has the call
        await asyncio.sleep(0)
        if then == "choice":
            loop.call_soon(lambda: router.choose(MODEL, 1, time.monotonic()))  # runs before the answer is read
        time.sleep(0.4)  # noqa: ASYNC251 - the loop stalls on purpose: a's answer comes meanwhile
        assert (await call).status == 200
    await router.share.settle()
    assert d.silences == 0 and not deployment(second, "a").silent


async def test_a_cooldowns_trial_after_a_silence_that_ended_on_an_answer_is_not_held_by_that_silence(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """a is found silent (its slow call holds the trial for its attempt timeout, 8 s, plus a second), then answers:
    the silence is over, and so is its hold. a then fails once and cools down for 0.5 s: its trial goes once the
    cooldown has ended. Before: the silent call's hold stayed in Redis (and here) and kept the trial back ~7 s more
    (140 calls at this pace, all to b)."""
    a, b = await mocks(), await mocks()
    up = up_toml("a", a, attempt_timeout_s=8.0, silent_after_s=0.2, allowed_fails=1, cooldown_s=0.5) + up_toml("b", b)
    first, second, key = await pair(make_proxy, redis_url, up, even(", weight = 1000", ", weight = 0.001"))
    a.settings.latency_ms = 1000
    slow = asyncio.create_task(first.embed(key, {"model": MODEL, "input": "slow"}))
    await within(lambda: deployment(second, "a").silent)
    a.settings.latency_ms = 0
    assert (await slow).status == 200
    await within(lambda: not deployment(second, "a").silent and not deployment(first, "a").silent)
    a.state.fail_next("status", times=1, status=500)
    assert (await first.embed(key, {"model": MODEL, "input": "fails on a"})).status == 200  # retried on b
    await within(lambda: deployment(second, "a").cooling(time.monotonic()))
    before, sent = a.state.requests, 0
    while a.state.requests == before:  # until the trial goes
        p = (first, second)[sent % 2]
        assert (await p.embed(key, {"model": MODEL, "input": f"while {sent}"})).status == 200
        sent += 1
        await asyncio.sleep(0.05)
        assert sent < 60, "the trial was held back by the silence that had ended"


@pytest.mark.parametrize("junk", ["-1", "nan", "inf", "1e300"])
async def test_garbage_in_quiet_neither_hides_a_silence_nor_breaks_the_fleets_state(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer, junk: str
) -> None:
    """Anyone who can write to Redis may leave junk in a deployment's `quiet`: a call of a that hangs still makes a
    silent in both processes, and the states announced stay readable. Before: a negative or NaN `quiet` was never
    set again (the booking process's own silence was undone by the reply), `inf` made every state unreadable."""
    a, b = await mocks(), await mocks()
    up = up_toml("a", a, attempt_timeout_s=3.0, silent_after_s=0.2) + up_toml("b", b)
    first, second, key = await pair(make_proxy, redis_url, up, even(", weight = 1000", ", weight = 0.001"))
    r = redis_server.client()
    r.hset(f"ep:dep:{{{MODEL}|a}}", mapping={"fails": "0", "cool": "0", "paused": "0", "probe_at": "0",
                                             "probe_until": "0", "quiet": junk})
    a.state.fail_next("timeout", times=1)
    hung = asyncio.create_task(first.embed(key, {"model": MODEL, "input": "hung"}))
    await within(lambda: deployment(second, "a").silent and deployment(first, "a").silent)
    assert (await hung).status == 200  # failed over to b at its timeout
    r.close()
