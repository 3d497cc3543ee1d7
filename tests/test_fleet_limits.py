"""Issue 19 point 2: fleet-wide limits per deployment (rpm, tpm, max_in_flight), reserved in one real Redis.

Two proxy apps (two instances of the fleet) share one redis-server (or cluster) in front of a mock upstream that
enforces its limits without announcing them: together they never send it more than the limits; a call that does not
fit gets the proxy's own 429 with Retry-After; with Redis stopped each keeps to its share.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from proxy.config import ConfigError
from proxy.http.admin import FLEET
from proxy.http.adminfleet import FLEET_LIMITS
from tests import test_fleet
from tests.conftest import Proxy, ProxyFactory, RedisServer, Upstream
from tests.test_break11 import up_toml
from tests.test_fleet import ADMIN, MODEL, Mocks, fleet_settings
from tests.test_fleet_health import pair

mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment
pytestmark = pytest.mark.redis


def solo(up: Upstream, **options: Any) -> tuple[str, str]:
    """One deployment `a` of the model, one input per call (no micro-batching: each request is one call)."""
    return (up_toml("a", up, **options),
            f'[models."{MODEL}"]\ndimensions = 1536\nmicro_batching = false\ndeployments = [{{ upstream = "a" }}]\n')


PATIENT = "[redis]\nsocket_timeout_s = 5.0\n"  # a slow call on a loaded machine is no outage here


async def redis_for(topology: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    if topology == "cluster":
        return request.getfixturevalue("cluster").seeds, {"REDIS_TYPE": "cluster"}
    return request.getfixturevalue("redis_url"), {"REDIS_TYPE": "single"}


async def embed_all(proxies: list[Proxy], key: str, n: int, prefix: str) -> list[Any]:
    """`n` requests of distinct inputs, in turn through each proxy, one after another."""
    answers = []
    for i in range(n):
        answers.append(await proxies[i % len(proxies)].embed(key, {"model": MODEL, "input": f"{prefix} {i}"}))
    return answers


@pytest.mark.parametrize("topology", ["single", "cluster"])
async def test_rpm_holds_across_instances_and_the_rest_get_our_429(
    make_proxy: ProxyFactory, mocks: Mocks, topology: str, request: pytest.FixtureRequest
) -> None:
    up = await mocks(rpm=5, announce_limits=False)  # it enforces 5 a minute and says nothing
    url, env = await redis_for(topology, request)
    upstreams, models = solo(up, rpm=5, max_queue_wait_s=0.0)
    first, second, key = await pair(make_proxy, url, upstreams, models + PATIENT, **env)
    answers = await embed_all([first, second], key, 12, "rpm")
    assert [a.status for a in answers].count(200) == 5
    assert up.state.rate_limited == 0  # the upstream never had to refuse: before, 7 of its 429s
    refused = [a for a in answers if a.status == 429]
    assert len(refused) == 7
    for a in refused:
        assert (await a.json())["error"]["code"] == "rate_limit_exceeded"
        assert 0 < float(a.headers["Retry-After"]) <= 61


async def test_tpm_holds_across_instances(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> None:
    up = await mocks(tpm=20, announce_limits=False)
    first, second, key = await pair(make_proxy, redis_url, *solo(up, tpm=20, max_queue_wait_s=0.0))
    answers = await embed_all([first, second], key, 10, "four tokens here")  # 5 tokens each
    ok = [a for a in answers if a.status == 200]
    assert up.state.rate_limited == 0
    assert up.state.billed_tokens <= 20
    served = [(await a.json())["usage"]["total_tokens"] for a in ok]
    assert sum(served) == up.state.billed_tokens == 20  # 4 calls of 5 tokens: all of the minute's budget


async def test_in_flight_never_exceeds_max_in_flight_across_instances(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(max_in_flight=2, latency_ms=150, announce_limits=False)
    first, second, key = await pair(make_proxy, redis_url, *solo(up, max_in_flight=2, max_queue_wait_s=10.0))
    answers = await asyncio.gather(*(p.embed(key, {"model": MODEL, "input": f"flight {i}"})
                                     for i in range(12) for p in [(first, second)[i % 2]]))
    assert [a.status for a in answers] == [200] * 12  # each waited for a slot of the fleet
    assert up.state.rate_limited == 0
    assert up.state.peak_in_flight == 2


async def test_an_announced_budget_is_shared_by_the_instances(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(rpm=6)  # announced: x-ratelimit-* on every answer
    first, second, key = await pair(make_proxy, redis_url, *solo(up, max_queue_wait_s=0.0))
    for i, p in enumerate((first, second)):  # each hears the headers once
        assert (await p.embed(key, {"model": MODEL, "input": f"hello {i}"})).status == 200
    answers = await embed_all([first, second], key, 8, "announced")
    assert up.state.rate_limited == 0  # the fleet kept to the 4 left: before, each process sent 3 of them (a 429)
    assert [a.status for a in answers].count(200) == 4


async def test_an_instance_that_never_called_keeps_to_the_budget_the_fleet_heard(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(rpm=3)  # announced
    first, second, key = await pair(make_proxy, redis_url, *solo(up, max_queue_wait_s=0.0))
    assert [a.status for a in await embed_all([first], key, 3, "first")] == [200] * 3  # the minute's 3: none left
    await first.app[FLEET].limiter.settle()  # the last answer's budget booked in the fleet
    answers = await embed_all([second], key, 2, "second")  # its first calls: it has heard no header itself
    assert up.state.rate_limited == 0  # before: sent unreserved, the upstream's 429
    assert [a.status for a in answers] == [429, 429] and up.state.requests == 3


async def test_with_redis_stopped_each_instance_keeps_to_its_share(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer
) -> None:
    up = await mocks()
    first, second, key = await pair(make_proxy, own_redis.url, *solo(up, rpm=6, max_queue_wait_s=0.0))
    assert [a.status for a in await embed_all([first, second, first], key, 3, "up")] == [200] * 3
    own_redis.stop()  # first knows there are 2 of them: 3 a minute each, on its own, its part of the 3 used
    answers = await embed_all([first], key, 4, "down")
    assert [a.status for a in answers] == [200, 429, 429, 429]
    assert up.state.requests == 4  # before: 3 more, as if the fleet had used none of the minute


@pytest.mark.parametrize(("where", "line"), [
    ("upstream", "rpm = -1"), ("upstream", "tpm = 1.5"), ("upstream", "max_in_flight = -3"),
])
def test_bad_limits_are_refused_at_load_time_naming_the_key(redis_url: str, where: str, line: str) -> None:
    upstreams = '[upstreams.a]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "FLEET_KEY"\n' + line + "\n"
    with pytest.raises(ConfigError) as err:
        fleet_settings(redis_url, upstreams, f'[models."{MODEL}"]\ndimensions = 1536\nupstream = "a"\n')
    assert f"upstreams.a.{line.split()[0]}" in str(err.value)


def test_a_deployments_bad_limit_is_refused_naming_it(redis_url: str) -> None:
    upstreams = '[upstreams.a]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "FLEET_KEY"\n'
    with pytest.raises(ConfigError) as err:
        fleet_settings(redis_url, upstreams, f'[models."{MODEL}"]\ndimensions = 1536\n'
                       'deployments = [{ upstream = "a", tpm = -5 }]\n')
    assert "deployments[0].tpm" in str(err.value) and "at least 0" in str(err.value)


async def test_two_instances_answer_the_same_fleet_view(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> None:
    up = await mocks(rpm=50, announce_limits=False)
    first, second, key = await pair(make_proxy, redis_url, *solo(up, rpm=50, tpm=1000, max_in_flight=4))
    await embed_all([first, second], key, 4, "view")
    await first.app[FLEET].limiter.settle()
    await second.app[FLEET].limiter.settle()
    views = []
    for p in (first, second):
        doc = await (await p.client.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"})).json()
        views.append(doc["data"][0]["fleet"])
    assert views[0] == views[1]  # from Redis: the same whichever instance answers
    fleet = views[0]
    assert fleet["state"] == "healthy" and fleet["requests_used"] == 4 and fleet["requests_left"] == 46
    assert fleet["limits"] == {"rpm": 50, "tpm": 1000, "max_in_flight": 4} and fleet["in_flight"] == 0
    assert len(fleet["instances"]) == 2  # which instance reserved what


async def test_a_redis_outage_after_the_fleet_used_the_minute_sends_nothing_more(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer
) -> None:
    up = await mocks(tpm=20, announce_limits=False)
    first, second, key = await pair(make_proxy, own_redis.url, *solo(up, tpm=20, max_queue_wait_s=0.0))
    answers = await embed_all([first, second], key, 4, "four tokens here")  # 5 tokens each: the minute's 20
    assert [a.status for a in answers] == [200] * 4
    own_redis.stop()  # a blip: each falls back to its own share, which the fleet's minute has used already
    answers = await embed_all([first, second], key, 4, "after the outage")
    assert up.state.rate_limited == 0  # before: each sent its share of 10 tokens again, the upstream's 429s
    assert [a.status for a in answers] == [429] * 4 and up.state.requests == 4


async def test_calls_sent_on_a_share_during_an_outage_are_booked_in_the_fleet_after_it(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer
) -> None:
    up = await mocks(tpm=20, announce_limits=False)
    upstreams, models = solo(up, tpm=20, max_queue_wait_s=0.0)
    quick = "[redis]\nsocket_timeout_s = 0.3\nretry_interval_s = 0.2\n"
    first, second, key = await pair(make_proxy, own_redis.url, upstreams, models + quick, REDIS_TYPE="single")
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)  # Redis stalls: the call goes on first's own share
    try:
        assert (await first.embed(key, {"model": MODEL, "input": "four tokens here x"})).status == 200
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    await asyncio.sleep(0.5)  # past retry_interval_s: Redis is asked again
    answers = await embed_all([first, second], key, 4, "four tokens here")  # 5 tokens each
    assert up.state.rate_limited == 0  # before: the fleet knew nothing of those 5 tokens
    assert [a.status for a in answers] == [200, 200, 200, 429] and up.state.billed_tokens <= 20


@pytest.mark.parametrize("garbage", [
    {"p:ghost": "garbage"}, {"r:{sec}": "x"}, {"t:{sec}": "nan"}, {"r:{sec}": "-1000"}, {"p:ghost": "inf"},
    {"at": "0", "et": "1e300", "lt": "500", "wt": "60"}, {"at": "0", "et": "inf", "lt": "500", "wt": "60"},
    {"at": "0", "et": "nan", "lt": "nan", "wt": "nan"}, {"at": "inf", "et": "x", "lt": "-4", "wt": "1e309"},
    {"lease:x|1|ghost": "inf"}, {"lease:junk": "1e300"},  # in-flight leases that would hold the one slot forever
    {"string:": "a string"}, {"string::f": "a string"},  # keys of the wrong type
])
async def test_garbage_in_a_deployments_limit_keys_is_dropped_not_fatal(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, garbage: dict[str, str]
) -> None:
    up = await mocks(announce_limits=False)
    first, second, key = await pair(make_proxy, redis_url, *solo(up, rpm=50, max_in_flight=1, max_queue_wait_s=0.0))
    shared = first.app[FLEET_LIMITS]
    r, budget = shared._store.client, shared._rkeys.deployment_limits(MODEL, "a")
    sec = int((await r.time())[0])
    for name, value in garbage.items():
        if name.startswith("string:"):
            await r.set(budget + name.removeprefix("string:"), value)
        elif name.startswith("lease:"):
            await r.zadd(f"{budget}:f", {name.removeprefix("lease:"): float(value)})
        else:
            await r.hset(budget, name.format(sec=sec), value)
    answers = await embed_all([first, second], key, 3, "garbage")
    assert [a.status for a in answers] == [200] * 3  # before: a Lua error, Redis marked down, or a wedged deployment
    assert shared._store.available and second.app[FLEET_LIMITS]._store.available
    await first.app[FLEET].limiter.settle()
    doc = await (await first.client.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"})).json()
    assert doc["fleet_error"] is None and doc["data"][0]["fleet"]["requests_used"] == 3


async def test_a_call_cancelled_after_it_was_sent_keeps_its_tokens_in_the_fleets_minute(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(tpm=20, latency_ms=400, announce_limits=False)
    first, _, _ = await pair(make_proxy, redis_url, *solo(up, tpm=20, max_queue_wait_s=0.0))
    fleet = first.app[FLEET]
    call = asyncio.create_task(fleet.embed(MODEL, ["four tokens here"], [5], None, None))
    for _ in range(200):  # until the upstream has it
        if up.state.in_flight:
            break
        await asyncio.sleep(0.01)
    assert up.state.in_flight == 1
    call.cancel()  # a shutdown: the upstream counts the call all the same
    with pytest.raises(asyncio.CancelledError):
        await call
    await fleet.limiter.settle()
    view = await first.app[FLEET_LIMITS].view(MODEL, "a")
    assert view.in_flight == 0  # its lease given back
    assert view.used_tokens == 5  # before: 0, as if never sent: the fleet would hand out those 5 tokens again


async def test_a_lease_whose_done_met_a_redis_blip_is_given_back_after_it(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer
) -> None:
    up = await mocks(max_in_flight=1, latency_ms=800, announce_limits=False)
    upstreams, models = solo(up, max_in_flight=1, max_queue_wait_s=0.0)
    quick = "[redis]\nsocket_timeout_s = 0.3\nretry_interval_s = 1.5\n"
    first, second, key = await pair(make_proxy, own_redis.url, upstreams, models + quick, REDIS_TYPE="single")
    assert own_redis.proc is not None
    call = asyncio.create_task(first.embed(key, {"model": MODEL, "input": "in flight"}))
    for _ in range(300):  # until the upstream has it (its lease is in Redis)
        if up.state.in_flight:
            break
        await asyncio.sleep(0.01)
    store = first.app[FLEET_LIMITS]._store
    own_redis.proc.send_signal(signal.SIGSTOP)  # a blip: this process bypasses Redis for retry_interval_s
    try:
        assert not await store.ping()
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert (await call).status == 200  # answered within the bypass: its `done` could not be booked then
    await first.app[FLEET].limiter.settle()
    view = await first.app[FLEET_LIMITS].view(MODEL, "a")
    assert view.in_flight == 0  # before: the lease held the one slot for attempt_timeout_s + 1 s more
    assert (await second.embed(key, {"model": MODEL, "input": "next"})).status == 200  # before: our 429


@pytest.mark.parametrize("redis", ["up", "stopped"])  # stopped: this process's own share (the whole tpm: alone)
async def test_a_call_too_big_for_the_minutes_tokens_left_does_not_hold_up_smaller_ones(
    make_proxy: ProxyFactory, mocks: Mocks, own_redis: RedisServer, redis: str
) -> None:
    up = await mocks(tpm=20, announce_limits=False)
    first, _, key = await pair(make_proxy, own_redis.url, *solo(up, tpm=20, max_queue_wait_s=0.0))
    if redis == "stopped":
        own_redis.stop()
    sizes = [15, 10, 2, 3]  # tokens: the 10 does not fit after the 15; the 2 and the 3 do
    answers = [await first.embed(key, {"model": MODEL, "input": [[7 + i] * n]}) for i, n in enumerate(sizes)]
    assert [a.status for a in answers] == [200, 429, 200, 200]  # before: 200, 429, 429, 429 (for a minute)
    assert up.state.billed_tokens == 20 and up.state.rate_limited == 0


async def test_a_shorter_lease_of_another_instance_does_not_expire_a_longer_one(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(latency_ms=6000, announce_limits=False)  # instances of two configs (a rolling change, say)
    slow = await make_proxy(fleet_settings(redis_url, *solo(up, max_in_flight=4, attempt_timeout_s=8.0,
                                                            deadline_s=10.0)))
    fast = await make_proxy(fleet_settings(redis_url, *solo(up, max_in_flight=4, attempt_timeout_s=0.5,
                                                            max_retries=0)))
    key = await slow.new_key()
    long_call = asyncio.create_task(slow.embed(key, {"model": MODEL, "input": "a long call"}))
    await asyncio.sleep(0.3)
    assert (await fast.embed(key, {"model": MODEL, "input": "a short lease"})).status != 200  # it timed out
    await fast.app[FLEET].limiter.settle()
    await asyncio.sleep(3.0)  # past the short lease's life (0.5 s + 1 s) and its key's, not the long one's
    view = await slow.app[FLEET_LIMITS].view(MODEL, "a")
    assert view.in_flight == 1  # before: 0, the leases' key expired with the short lease: room for one more
    assert (await long_call).status == 200
