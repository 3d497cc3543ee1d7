"""Issue 19 point 1: deployment health shared by every process (two proxy apps on one real redis-server).

A failure streak, a cooldown, a 429's pause and its probe seen by one process hold in every other within a second
(proxy/stores/fleethealth.py, announced on the subscription key changes and purges use); with Redis stopped each
process goes by its own view, as before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
import pytest

from proxy.http.admin import FLEET
from proxy.upstream.router import Deployment
from tests import test_fleet
from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, RedisServer, Upstream, make_settings
from tests.redis_servers import Cluster
from tests.test_break11 import up_toml
from tests.test_fleet import ADMIN, MODEL, Mocks, fleet_settings

mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment
pytestmark = pytest.mark.redis


def two(a: Upstream, b: Upstream, **a_options: object) -> tuple[str, str]:
    """Deployments a (nearly every call, by weight) and b, of one model."""
    return (up_toml("a", a, allowed_fails=2, cooldown_s=30.0, **a_options) + up_toml("b", b),
            f'[models."{MODEL}"]\ndimensions = 1536\n'
            'deployments = [{ upstream = "a", weight = 1000 }, { upstream = "b", weight = 0.001 }]\n')


def deployment(proxy: Proxy, name: str) -> Deployment:
    return next(d for d in proxy.app[FLEET].router.models[MODEL] if d.upstream == name)


async def within(condition: Callable[[], bool]) -> float:
    """Poll `condition()` until true; how long it took (the caller bounds it)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < 10, "never happened"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def pair(make_proxy: ProxyFactory, redis_url: str, upstreams: str, models: str,
               **env: str) -> tuple[Proxy, Proxy, str]:
    """Two processes of the fleet and a key both have verified (the subscription is up in both)."""
    settings = fleet_settings(redis_url, upstreams, models) if not env else make_settings(
        "http://127.0.0.1:9/v1", redis_url, upstreams + models, FLEET_KEY=UPSTREAM_KEY, PROXY_ADMIN_KEY=ADMIN, **env)
    first = await make_proxy(settings)
    second = await make_proxy(settings)
    key = await first.new_key()
    for p in (first, second):  # each has subscribed by the time it answers (a second's retry at most)
        assert (await p.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status == 200
    await asyncio.sleep(0.3)  # the subscriptions are made as the apps start; give a loaded machine time
    return first, second, key


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_a_cooldown_seen_by_one_process_holds_in_the_other_within_a_second(
    make_proxy: ProxyFactory, mocks: Mocks, topology: str, request: pytest.FixtureRequest
) -> None:
    a, b = await mocks(), await mocks()
    if topology == "cluster":
        cluster: Cluster = request.getfixturevalue("cluster")
        first, second, key = await pair(make_proxy, cluster.seeds, *two(a, b), REDIS_TYPE="cluster")
    else:
        first, second, key = await pair(make_proxy, request.getfixturevalue("redis_url"), *two(a, b))
    a.state.fail_next("status", times=10_000, status=500)  # a is down
    for i in range(2):
        assert (await first.embed(key, {"model": MODEL, "input": f"first {i}"})).status == 200  # failed over to b
    assert a.state.requests == 2  # allowed_fails: the first process cooled it down
    took = await within(lambda: deployment(second, "a").cooling(time.monotonic()))
    assert took < 1.0
    for i in range(10):  # the second process sends it nothing: before, 2 more attempts
        assert (await second.embed(key, {"model": MODEL, "input": f"second {i}"})).status == 200
    assert a.state.requests == 2 and b.state.requests == 12


async def test_a_failure_streak_adds_up_across_processes(make_proxy: ProxyFactory, mocks: Mocks,
                                                         redis_url: str) -> None:
    a, b = await mocks(), await mocks()
    first, second, key = await pair(make_proxy, redis_url, *two(a, b))
    a.state.fail_next("status", times=10_000, status=500)
    assert (await first.embed(key, {"model": MODEL, "input": "one"})).status == 200
    await within(lambda: deployment(second, "a").fails == 1)
    assert (await second.embed(key, {"model": MODEL, "input": "two"})).status == 200
    assert a.state.requests == 2  # one failure in each process: the fleet's streak of allowed_fails = 2
    await within(lambda: deployment(first, "a").cooling(time.monotonic()))
    for p in (first, second):
        for i in range(5):
            assert (await p.embed(key, {"model": MODEL, "input": f"more {i} {id(p)}"})).status == 200
    assert a.state.requests == 2


async def test_a_429_pause_holds_in_the_other_process_and_its_probe_is_one_call_fleet_wide(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks()
    first, second, key = await pair(make_proxy, redis_url, up_toml("a", up, cooldown_s=1.0),
                                    f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}]\n')
    up.state.fail_next("status", status=429, retry_after=3600)  # once; the upstream is fine right after
    assert (await first.embed(key, {"model": MODEL, "input": "first"})).status == 429
    took = await within(lambda: deployment(second, "a").down_for(time.monotonic()) > 3000)
    assert took < 1.0
    resp = await second.embed(key, {"model": MODEL, "input": "second"})
    assert resp.status == 429 and up.state.requests == 1  # paused in the other process too: no upstream call
    await asyncio.sleep(1.2)  # cooldown_s: a probe is due
    up.settings.latency_ms = 1000  # the probe takes a while: the others arrive while it is in flight
    resps = await asyncio.gather(*(p.embed(key, {"model": MODEL, "input": f"p{i}", "user": f"u{i}"})
                                   for i in range(4) for p in (first, second)))
    assert sorted(r.status for r in resps) == [200] + [429] * 7  # one probe in the fleet, not one per process
    assert up.state.requests == 2
    up.settings.latency_ms = 0
    await within(lambda: deployment(second, "a").down_for(time.monotonic()) <= 0
                 and deployment(first, "a").down_for(time.monotonic()) <= 0)  # the pause ended everywhere
    for p in (first, second):
        assert (await p.embed(key, {"model": MODEL, "input": f"after {id(p)}"})).status == 200
    assert up.state.requests == 4


async def test_with_redis_stopped_each_process_cools_down_by_its_own_view(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer
) -> None:
    a, b = await mocks(), await mocks()
    first, second, key = await pair(make_proxy, own_redis.url, *two(a, b))
    own_redis.stop()
    a.state.fail_next("status", times=10_000, status=500)
    for i in range(4):
        assert (await first.embed(key, {"model": MODEL, "input": f"first {i}"})).status == 200
    assert a.state.requests == 2 and deployment(first, "a").cooling(time.monotonic())
    assert not deployment(second, "a").cooling(time.monotonic())  # nobody could tell it
    for i in range(4):
        assert (await second.embed(key, {"model": MODEL, "input": f"second {i}"})).status == 200
    assert a.state.requests == 4 and deployment(second, "a").cooling(time.monotonic())


async def test_the_health_is_kept_and_announced_under_the_documented_names(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    a, b = await mocks(), await mocks()
    first, _, key = await pair(make_proxy, redis_url, *two(a, b))
    r = redis_server.client()
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("ep:fleet:health")
    a.state.fail_next("status", times=1, status=500)
    assert (await first.embed(key, {"model": MODEL, "input": "one"})).status == 200
    await within(lambda: r.hget(f"ep:dep:{{{MODEL}|a}}", "fails") == b"1")
    message = None
    for _ in range(10):  # the subscription's confirmation comes first (read as None)
        message = message or pubsub.get_message(timeout=1)
    assert message is not None
    doc = orjson.loads(message["data"])
    assert (doc["model"], doc["upstream"]) == (MODEL, "a") and doc["state"].split()[1] == "1"
    assert 0 < r.ttl(f"ep:dep:{{{MODEL}|a}}") <= 86400
    pubsub.close()


async def test_a_hung_deployment_costs_the_fleet_one_trial_per_cooldown_under_steady_traffic(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """The issue's target: after its first cooldown a deployment that hangs gets one call per cooldown from the
    whole fleet (the trial, claimed in Redis), not every call sent while the trial hangs; requests keep succeeding on
    the healthy one. Before: each cooldown's end let through every call until the first one timed out."""
    a, b = await mocks(), await mocks()
    upstreams = (up_toml("a", a, allowed_fails=2, cooldown_s=1.0, attempt_timeout_s=0.5) + up_toml("b", b))
    models = f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}, {{ upstream = "b" }}]\n'
    first, second, key = await pair(make_proxy, redis_url, upstreams, models)
    a.state.fail_next("timeout", times=10_000)  # a hangs: every call to it stalls past attempt_timeout_s
    statuses: list[int] = []

    async def steady(p: Proxy, n: int, until: Callable[[], bool]) -> None:
        i = 0
        while not until():
            statuses.append((await p.embed(key, {"model": MODEL, "input": f"steady {n} {i}"})).status)
            i += 1

    def both_cooling() -> bool:
        return all(deployment(p, "a").cooling(time.monotonic()) for p in (first, second))

    await asyncio.gather(*(steady(p, n, both_cooling) for n in range(3) for p in (first, second)))
    before = a.state.requests  # its first streak: the calls in flight before anyone knew
    started = time.monotonic()
    end = started + 3.5

    await asyncio.gather(*(steady(p, n, lambda: time.monotonic() > end) for n in range(3) for p in (first, second)))
    cooldowns = int((time.monotonic() - started) / 1.0) + 1  # at most this many cooldowns ended meanwhile
    assert a.state.requests - before <= cooldowns, (a.state.requests - before, cooldowns)
    assert set(statuses) == {200} and b.state.requests > 20
    a.state.pending.clear()  # it answers again: its next trial brings it back in every process
    answered = a.state.requests
    for i in range(400):
        assert (await first.embed(key, {"model": MODEL, "input": f"after {i}"})).status == 200
        if a.state.requests > answered and not any(deployment(p, "a").half_open for p in (first, second)):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the deployment never came back")


async def test_garbage_on_the_channel_or_in_the_hash_never_takes_a_deployment_out_for_longer_than_its_cooldown(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    """Anyone who can write to Redis (or a store whose clock jumped after a failover) may leave far or infinite
    times there: each process cuts them to its own settings (a cooldown to `cooldown_s`, a model's only deployment
    never cooled), drops what is not a state, and its subscription carries on. Before: `inf` or `1e18` took the
    deployment out for good in every process, the model's only one included (503 for every request)."""
    a, b = await mocks(), await mocks()
    solo = (f'[models."solo-model"]\ndimensions = 1536\nupstream_model = "{MODEL}"\n'
            'deployments = [{ upstream = "b" }]\n')
    upstreams, models = two(a, b)
    first, second, key = await pair(make_proxy, redis_url, upstreams, models + solo)
    r = redis_server.client()
    for junk in (b"{", b"[]", b'{"model": 1}', orjson.dumps({"model": MODEL, "upstream": "a", "state": "1 2"}),
                 orjson.dumps({"model": MODEL, "upstream": "a", "state": "0 0 inf 0 0 0"})):
        r.publish("ep:fleet:health", junk)
    for model, upstream in ((MODEL, "a"), ("solo-model", "b")):
        r.publish("ep:fleet:health", orjson.dumps({"model": model, "upstream": upstream,
                                                  "state": "0 0 1e18 1e18 1e18 1e18"}))
    solo_b = next(d for d in second.app[FLEET].router.models["solo-model"])
    await within(lambda: deployment(second, "a").cooling(time.monotonic()) and solo_b.paused_until > 0)
    now = time.monotonic()
    for p in (first, second):
        assert deployment(p, "a").cool_until - now <= 30.0  # its cooldown_s, not 1e18 seconds
        only = next(d for d in p.app[FLEET].router.models["solo-model"])
        assert not only.cooling(now) and only.probe_at - now <= 30.0  # probed within cooldown_s
    r.hset(f"ep:dep:{{{MODEL}|b}}", mapping={"fails": "0", "cool": "inf", "paused": "0", "probe_at": "0",
                                             "probe_until": "0"})
    b.state.fail_next("status", times=1, status=500)  # a booking for b reads the hash's garbage back
    assert (await first.embed(key, {"model": MODEL, "input": "one"})).status == 200  # a retry on b
    assert deployment(first, "b").cool_until - time.monotonic() <= 30.0
    r.publish("ep:fleet:health", orjson.dumps({"model": MODEL, "upstream": "b", "state": "5 1 0 0 0 0"}))
    await within(lambda: deployment(second, "b").fails == 1)  # the subscription carried on through the garbage
    r.close()
