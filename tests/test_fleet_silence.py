"""Issue 19's hung-deployment target in its first window: a deployment that starts hanging is found silent (a call in
flight for `silent_after_s` and no answer since it was sent) before its first call times out, and the fleet sends it
one trial at a time from then on, not every call routed to it until its first timeout (two proxy apps on one real
redis-server, mock upstreams; proxy/upstream/silence.py, router.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from proxy.config import UpstreamSettings
from proxy.upstream.silence import COLD_S, DEVIATIONS, SILENT_FLOOR_S, Silence
from tests import test_fleet
from tests.conftest import Proxy, ProxyFactory, RedisServer
from tests.redis_servers import Cluster
from tests.test_break11 import up_toml
from tests.test_fleet import MODEL, Mocks, admin_upstreams, metric
from tests.test_fleet_health import deployment, pair, within

mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment
pytestmark = pytest.mark.redis


def even(a_options: str = "", b_options: str = "") -> str:
    return (f'[models."{MODEL}"]\ndimensions = 1536\n'
            f'deployments = [{{ upstream = "a"{a_options} }}, {{ upstream = "b"{b_options} }}]\n')


async def steady(procs: tuple[Proxy, ...], key: str, interval_s: float, until: Callable[[], bool],
                 tag: str) -> list[int]:
    """Open-loop traffic: each process gets a new request every `interval_s` (whatever the earlier ones are doing)
    until `until()`; the statuses of all of them."""
    tasks: list[asyncio.Task[int]] = []

    async def one(p: Proxy, text: str) -> int:
        return (await p.embed(key, {"model": MODEL, "input": text})).status

    i = 0
    while not until():
        tasks += [asyncio.create_task(one(p, f"{tag} {n} {i}")) for n, p in enumerate(procs)]
        i += 1
        await asyncio.sleep(interval_s)
    return list(await asyncio.gather(*tasks))


async def test_a_deployment_that_starts_hanging_under_steady_traffic_gets_at_most_allowed_fails_plus_one_calls(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """The issue's target, first window: two processes send 10 requests a second each, spread evenly over a and b;
    a starts hanging. Until its first cooldown ends it gets at most allowed_fails + 1 calls from the fleet, and every
    request succeeds (on b). Before: every call routed to a until its first attempt timed out (13 and 21 in two
    runs). `silent_after_s` is set: the adaptive default's threshold grows with a loaded machine's answer times (its
    own test is below; the bench measures it)."""
    a, b = await mocks(), await mocks()
    upstreams = (up_toml("a", a, allowed_fails=3, cooldown_s=60.0, attempt_timeout_s=2.0, deadline_s=10.0,
                         silent_after_s=0.1)
                 + up_toml("b", b, deadline_s=10.0))
    first, second, key = await pair(make_proxy, redis_url, upstreams, even())
    warm_until = time.monotonic() + 1.0  # both healthy
    assert set(await steady((first, second), key, 0.1, lambda: time.monotonic() > warm_until, "warm")) == {200}
    assert a.state.requests >= 1
    before = a.state.requests
    a.state.fail_next("timeout", times=10_000)  # a hangs from now on: every call stalls past attempt_timeout_s
    end = time.monotonic() + 5.5  # its first calls time out, then a trial goes and times out (the next: 60 s later)
    statuses = await steady((first, second), key, 0.1, lambda: time.monotonic() > end, "steady")
    calls = a.state.requests - before
    assert calls <= 3 + 1, calls
    assert set(statuses) == {200} and len(statuses) >= 40
    assert deployment(first, "a").silences + deployment(second, "a").silences >= 1
    assert deployment(first, "a").steered + deployment(second, "a").steered >= 10


async def test_a_lone_slow_call_on_a_models_only_deployment_goes_and_succeeds(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """A large batch the upstream takes 1.5 s over, with nothing else in flight, on the model's only deployment: sent
    once, answered, never held back by the silence (there is nowhere else to send it)."""
    a = await mocks(latency_ms=1500)
    first, second, key = await pair(make_proxy, redis_url, up_toml("a", a, attempt_timeout_s=5.0, silent_after_s=0.2),
                                    f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}]\n')
    slow = asyncio.create_task(first.embed(key, {"model": MODEL, "input": [f"big {i}" for i in range(256)]}))
    await asyncio.sleep(0.5)  # past silent_after_s: another call now still goes to it, at once
    assert (await second.embed(key, {"model": MODEL, "input": "small"})).status == 200
    assert (await first.embed(key, {"model": MODEL, "input": "small too"})).status == 200
    assert (await slow).status == 200
    assert a.state.requests == 3
    assert not any(deployment(p, "a").silent or deployment(p, "a").silences for p in (first, second))


async def sized_pair(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> tuple[Any, Any, Proxy, Proxy, str]:
    """a answers a one-input call in about 20 ms plus 5 ms per input, b at once; a is preferred (weights), and both
    processes have heard a answer calls of the usual size (one input)."""
    a, b = await mocks(latency_ms=20, latency_per_input_ms=5), await mocks()
    up = up_toml("a", a, attempt_timeout_s=5.0) + up_toml("b", b)
    first, second, key = await pair(make_proxy, redis_url, up, even(", weight = 1000", ", weight = 0.001"))
    for p in (first, second):  # each hears a answer calls of the usual size
        for i in range(10):
            assert (await p.embed(key, {"model": MODEL, "input": f"warm {id(p)} {i}"})).status == 200
    return a, b, first, second, key


async def test_a_large_batch_taking_longer_than_usual_does_not_steer_the_fleets_calls_away(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """a answers a one-input call in about 20 ms and takes 5 ms more per input. One client's 300-input batch takes
    about 1.5 s: a call that large is expected to take longer, so a is not silent meanwhile and the other clients'
    calls keep going to it. Before: the batch was found silent after the usual threshold (about 0.1 s) and every
    process steered its calls to b until the batch answered, so one client's batches moved everyone's traffic."""
    _, b, first, second, key = await sized_pair(make_proxy, mocks, redis_url)
    b_before = b.state.requests
    batch = asyncio.create_task(first.embed(key, {"model": MODEL, "input": [f"batch {i}" for i in range(300)]}))
    await asyncio.sleep(0.5)  # several usual thresholds into the batch
    for i in range(5):  # the other clients' calls, in both processes, while the batch is in flight
        for p in (first, second):
            assert (await p.embed(key, {"model": MODEL, "input": f"meanwhile {id(p)} {i}"})).status == 200
    assert not batch.done()
    assert (await batch).status == 200
    assert b.state.requests == b_before  # nothing steered to b
    assert not any(deployment(p, "a").silences for p in (first, second))


async def test_a_slow_deployment_that_answers_under_traffic_is_not_avoided(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """a answers every call, in 300 ms (b in no time): once each process has heard it answer, its answers keep
    coming under traffic, so it is never silent and gets its half of the calls."""
    a, b = await mocks(latency_ms=300), await mocks()
    first, second, key = await pair(make_proxy, redis_url, up_toml("a", a, attempt_timeout_s=5.0) + up_toml("b", b),
                                    even())
    for p in (first, second):  # each process hears a answer once (the adaptive threshold's start)
        d = deployment(p, "a")
        for i in range(20):
            if d.silence.smoothed is not None:
                break
            assert (await p.embed(key, {"model": MODEL, "input": f"warm {id(p)} {i}"})).status == 200
    await within(lambda: not any(deployment(p, "a").silent for p in (first, second)))
    silences = sum(deployment(p, "a").silences for p in (first, second))
    a_before, b_before = a.state.requests, b.state.requests
    end = time.monotonic() + 4.0
    assert set(await steady((first, second), key, 0.05, lambda: time.monotonic() > end, "steady")) == {200}
    to_a, to_b = a.state.requests - a_before, b.state.requests - b_before
    assert sum(deployment(p, "a").silences for p in (first, second)) == silences
    assert to_a >= 0.3 * (to_a + to_b) and to_a + to_b >= 30, (to_a, to_b)


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_the_silence_holds_fleet_wide_and_ends_on_an_answer(
    make_proxy: ProxyFactory, mocks: Mocks, topology: str, request: pytest.FixtureRequest
) -> None:
    """One process finds a silent: the other steers its calls to b at once. a's slow call then answers: the silence
    ends in both processes long before its hold (the call's attempt timeout, 5 s, plus a second) would. On a single
    Redis and on a cluster (the deployment's hash and the announcement on one node of it)."""
    a, b = await mocks(), await mocks()
    up = up_toml("a", a, attempt_timeout_s=5.0, silent_after_s=0.2) + up_toml("b", b)
    models = even(", weight = 1000", ", weight = 0.001")
    if topology == "cluster":
        cluster: Cluster = request.getfixturevalue("cluster")
        first, second, key = await pair(make_proxy, cluster.seeds, up, models, REDIS_TYPE="cluster")
        host, port = cluster.nodes[0].addr.rsplit(":", 1)
        r: Any = redis.RedisCluster(host=host, port=int(port))
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        first, second, key = await pair(make_proxy, request.getfixturevalue("redis_url"), up, models)
        r = redis_server.client()
    a.settings.latency_ms = 1500
    slow = asyncio.create_task(first.embed(key, {"model": MODEL, "input": "slow"}))
    await within(lambda: a.state.requests == 1)
    a.settings.latency_ms = 0
    await asyncio.sleep(0.4)  # past silent_after_s
    assert (await first.embed(key, {"model": MODEL, "input": "one"})).status == 200  # to b: a is silent
    await within(lambda: deployment(second, "a").silent)
    assert float(r.hget(f"ep:dep:{{{MODEL}|a}}", "quiet") or 0) > 0
    for i in range(5):  # the other process sends a nothing either
        assert (await second.embed(key, {"model": MODEL, "input": f"two {i}"})).status == 200
    assert a.state.requests == 1 and b.state.requests == 6
    row = (await admin_upstreams(second))[f"{MODEL}/a"]
    assert row["state"] == "silent" and row["fleet"]["state"] == "silent" and row["fleet"]["silent_since"] > 0
    assert metric(second, "embedding_proxy_deployment_silent", model=MODEL, upstream="a") == 1
    assert metric(second, "embedding_proxy_upstream_silent_steered_total", model=MODEL, upstream="a") >= 5
    assert (await slow).status == 200  # a answered: the silence ends everywhere
    answered = time.monotonic()
    await within(lambda: not deployment(second, "a").silent and not deployment(first, "a").silent)
    assert time.monotonic() - answered < 3.0  # its hold ran until ~4.5 s from now
    assert float(r.hget(f"ep:dep:{{{MODEL}|a}}", "quiet") or 0) == 0
    row = (await admin_upstreams(second))[f"{MODEL}/a"]
    assert row["state"] == "healthy" and row["fleet"]["state"] == "healthy" and row["fleet"]["silent_since"] is None
    for p in (first, second):
        assert (await p.embed(key, {"model": MODEL, "input": f"after {id(p)}"})).status == 200
    assert a.state.requests == 3  # both went to a again
    r.close()


async def test_a_hung_call_holds_the_fleet_until_its_timeout_then_one_trial_brings_it_back(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """a's first call hangs (the next ones would answer): found silent, the whole fleet sends it nothing until that
    call's timeout (1 s) plus the hold's margin has passed; then one call goes as the trial, answers, and a is back
    in both processes. a gets exactly two calls in all."""
    a, b = await mocks(), await mocks()
    up = up_toml("a", a, attempt_timeout_s=1.0, silent_after_s=0.2) + up_toml("b", b)
    first, second, key = await pair(make_proxy, redis_url, up, even(", weight = 1000", ", weight = 0.001"))
    a.state.fail_next("timeout", times=1)
    hung = asyncio.create_task(first.embed(key, {"model": MODEL, "input": "hung"}))  # fails over to b after 1 s
    await within(lambda: a.state.requests == 1)
    await asyncio.sleep(0.4)
    assert (await first.embed(key, {"model": MODEL, "input": "one"})).status == 200
    await within(lambda: deployment(second, "a").silent)
    sent = 0
    while a.state.requests == 1:  # until the trial goes: every call to b meanwhile
        p = (first, second)[sent % 2]
        assert (await p.embed(key, {"model": MODEL, "input": f"while {sent}"})).status == 200
        sent += 1
        await asyncio.sleep(0.025)
        assert sent < 800, "no trial ever went"
    assert b.state.requests >= sent - 1 >= 10
    assert (await hung).status == 200
    await within(lambda: not deployment(second, "a").silent and not deployment(first, "a").silent)
    assert a.state.requests == 2  # the hung call and the trial
    statuses = [(await p.embed(key, {"model": MODEL, "input": f"after {id(p)}"})).status for p in (first, second)]
    assert statuses == [200, 200] and a.state.requests == 4  # both processes send to a again


async def test_with_redis_stopped_each_process_finds_the_silence_by_its_own_calls(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer
) -> None:
    """Redis stopped: the process whose call went silent sends the model's calls to b; the other knows nothing of it
    until a call of its own goes silent, then does the same."""
    a, b = await mocks(), await mocks()
    up = up_toml("a", a, attempt_timeout_s=3.0, silent_after_s=0.2) + up_toml("b", b)
    first, second, key = await pair(make_proxy, own_redis.url, up, even(", weight = 1000", ", weight = 0.001"))
    own_redis.stop()
    a.state.fail_next("timeout", times=10_000)
    hung = [asyncio.create_task(first.embed(key, {"model": MODEL, "input": "hung 1"}))]
    await within(lambda: a.state.requests == 1)
    await asyncio.sleep(0.4)
    for i in range(4):
        assert (await first.embed(key, {"model": MODEL, "input": f"first {i}"})).status == 200  # to b
    assert a.state.requests == 1 and deployment(first, "a").silent
    assert not deployment(second, "a").silent  # nobody could tell it
    hung.append(asyncio.create_task(second.embed(key, {"model": MODEL, "input": "hung 2"})))
    await within(lambda: a.state.requests == 2)
    await asyncio.sleep(0.4)
    for i in range(4):
        assert (await second.embed(key, {"model": MODEL, "input": f"second {i}"})).status == 200
    assert a.state.requests == 2 and deployment(second, "a").silent
    assert [r.status for r in await asyncio.gather(*hung)] == [200, 200]  # failed over to b at their timeouts


def test_the_threshold_adapts_to_the_answers_heard_and_a_setting_overrides_it() -> None:
    adaptive, fixed, off = (UpstreamSettings(attempt_timeout_s=10.0, silent_after_s=s) for s in (None, 0.5, 0.0))
    s = Silence()
    assert s.threshold(adaptive) == COLD_S  # nothing heard yet
    s.heard(0.01)
    assert s.threshold(adaptive) == pytest.approx(0.01 + SILENT_FLOOR_S)  # 0.01 + 4 x 0.005: the least margin
    s.heard(2.0)  # a large batch took 2 s: the threshold covers such a call at once
    assert s.threshold(adaptive) >= 2.0
    assert s.threshold(UpstreamSettings(attempt_timeout_s=1.5)) == 1.5  # at most the attempt timeout
    for _ in range(40):  # ... and forgets it over the next answers
        s.heard(0.01)
    assert s.threshold(adaptive) == pytest.approx(0.01 + SILENT_FLOOR_S, abs=0.01)
    for _ in range(40):  # a slow upstream that answers steadily: twice its own answer time (its deviation is ~0)
        s.heard(0.3)
    assert s.deviation * DEVIATIONS < 0.3 and s.threshold(adaptive) == pytest.approx(0.6, abs=0.01)
    assert s.threshold(fixed) == 0.5 and math.isinf(s.threshold(off))
    token = s.sent(200.0)
    s.sent(200.2)
    assert s.silent(fixed, 200.4) is None and s.silent(fixed, 200.5) == 200.0
    s.heard(0.6)  # an answer covers every call sent before it
    assert s.since() is None and s.ended(token) is False
    later = s.sent(201.0)
    assert s.silent(fixed, 201.6) == 201.0 and s.ended(later) is True and s.since() is None


def test_a_call_larger_than_usual_is_given_longer_before_it_is_silence() -> None:
    """The allowance of a call scales with its size against the usual size of the calls answered (their smoothed
    token count): a 20 times larger call gets 20 times the threshold, never more than the attempt timeout; a call
    of the usual size or smaller gets the threshold. Its answer time counts per usual-size call."""
    adaptive = UpstreamSettings(attempt_timeout_s=10.0)
    s = Silence()
    assert s.factor(5000) == 1.0  # nothing answered yet: no usual size
    for _ in range(20):
        s.heard(0.05, s.factor(100), 100)
    usual = s.threshold(adaptive)
    assert s.factor(100) == s.factor(10) == 1.0 and s.factor(2000) == pytest.approx(20)
    assert s.threshold(adaptive, 20.0) == pytest.approx(20 * usual) and s.threshold(adaptive, 1e6) == 10.0
    s.sent(100.0, s.factor(2000))
    assert s.silent(adaptive, 100.0 + 5 * usual) is None  # 5 thresholds in: a 20x call has time yet
    assert s.silent(adaptive, 100.0 + 20 * usual + 0.001) == 100.0
    s.covered()
    s.sent(200.0, s.factor(2000))
    s.sent(200.1, s.factor(100))  # a call of the usual size, sent later: silent at its own threshold
    assert s.silent(adaptive, 200.1 + usual + 0.001) == 200.1
    s.heard(1.0, s.factor(2000), 2000)  # the big call in 1 s: 0.05 s per usual-size call, as the others
    assert s.threshold(adaptive) == pytest.approx(usual, rel=0.05)


async def test_one_clients_batches_one_after_another_do_not_steer_the_fleets_calls_away(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """As above, but the client sends its 300-input batches one after another (a backfill), with little other
    traffic: neither batch makes a silent. Before: the first batch dragged the usual size (the plain mean of the
    calls' tokens) from a few tokens to about an eighth of the batch, so the second got about 8 times the threshold,
    not 300 times: it was found silent after about 1 s and every process steered its calls to b."""
    _, b, first, second, key = await sized_pair(make_proxy, mocks, redis_url)
    b_before = b.state.requests
    for n in range(2):  # the second batch is sent when the first has answered, nothing else in flight
        batch = asyncio.create_task(first.embed(key, {"model": MODEL, "input": [f"batch {n} {i}" for i in range(300)]}))
        await asyncio.sleep(1.2)  # most of the batch's time, alone
        for i in range(3):  # the other clients' calls, in both processes, while the batch is in flight
            for p in (first, second):
                assert (await p.embed(key, {"model": MODEL, "input": f"meanwhile {n} {id(p)} {i}"})).status == 200
        assert (await batch).status == 200
    assert b.state.requests == b_before  # nothing steered to b
    assert not any(deployment(p, "a").silences for p in (first, second))


def test_the_usual_size_is_not_dragged_to_large_calls_and_a_large_fast_call_does_not_shorten_the_threshold() -> None:
    """Batches one after another, or one huge call, keep the usual size near the usual calls' (a geometric mean):
    the next 300-input batch is still given about 300 usual thresholds. Before: the plain mean moved an eighth of
    the way to each large call (10 tokens to about 200 after one 1,600-token batch), so the next batch got 8 usual
    thresholds and was silence. A large call that took only as long as a usual one (a fixed overhead) does not
    count as faster than that."""
    adaptive = UpstreamSettings(attempt_timeout_s=10.0)
    s = Silence()
    for _ in range(20):
        s.heard(0.025, s.factor(10), 10)
    usual = s.threshold(adaptive)
    s.heard(1.52, s.factor(1600), 1600)  # a 300-input batch: 160 usual calls, about 10 ms each
    assert s.factor(1600) > 50 and s.threshold(adaptive, s.factor(1600)) > 1.52
    s.heard(1.0, s.factor(100_000), 100_000)  # one huge call
    assert s.factor(1600) > 25 and s.threshold(adaptive, s.factor(1600)) > 1.52
    t = Silence()
    for _ in range(20):
        t.heard(0.3, t.factor(10), 10)  # 0.3 s whatever the size: a fixed overhead
    before = t.threshold(adaptive)
    for _ in range(20):
        t.heard(0.3, t.factor(1000), 1000)
        t.heard(0.3, t.factor(10), 10)
    assert t.threshold(adaptive) >= before * 0.99 and t.threshold(adaptive) > 0.3
    assert usual == pytest.approx(s.threshold(adaptive), rel=0.5)
