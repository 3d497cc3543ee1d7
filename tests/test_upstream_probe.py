"""Issue 15 point 12: one 429 no longer takes a model down for as long as its Retry-After says.

A pause longer than the deployment's `cooldown_s` is checked by one probe call every `cooldown_s`: one real
request is let through to the paused deployment (one at a time), the others get the 429 as before, and a success
ends the pause. Against real servers (the mock upstream, a real redis-server, the proxy app), and the router alone
with a pinned clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from proxy.upstream.router import Router
from tests import test_fleet
from tests.conftest import Proxy, ProxyFactory, Upstream
from tests.test_break11 import up_toml
from tests.test_fleet import MODEL, Mocks, admin_upstreams, fleet_settings
from tests.test_fleet_units import settings as unit_settings

mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment
COOLDOWN_S = 1.0


def only(up: Upstream) -> tuple[str, str]:
    """The model's only deployment, with a short cooldown_s."""
    return (up_toml("a", up, cooldown_s=COOLDOWN_S),
            f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}]\n')


async def state_of(proxy: Proxy) -> dict[str, Any]:
    return (await admin_upstreams(proxy))[f"{MODEL}/a"]


@pytest.mark.redis
async def test_a_429_with_an_absurd_retry_after_is_probed_and_ends_when_the_upstream_answers(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks()
    proxy = await make_proxy(fleet_settings(redis_url, *only(up)))
    key = await proxy.new_key()
    up.state.fail_next("status", status=429, retry_after="1e309")  # once; the upstream is fine right after
    resp = await proxy.embed(key, {"model": MODEL, "input": "first"})
    assert resp.status == 429 and resp.headers["Retry-After"] == "3600"  # bounded to an hour, as before
    resp = await proxy.embed(key, {"model": MODEL, "input": "second"})
    assert resp.status == 429 and up.state.requests == 1  # within cooldown_s: paused, no upstream call
    assert (await state_of(proxy))["state"] == "paused"

    await asyncio.sleep(COOLDOWN_S + 0.2)
    up.settings.latency_ms = 1000  # the probe takes a while: the others arrive while it is in flight
    # the probe is due: one request goes to the upstream, the ones arriving while it is in flight get the 429 as
    # before (distinct users: separate upstream calls, not one merged call)
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": f"p{i}", "user": f"u{i}"})
                                   for i in range(4)))
    assert sorted(r.status for r in resps) == [200, 429, 429, 429]  # before: four 429s for an hour
    assert up.state.requests == 2
    state = await state_of(proxy)
    assert state["state"] == "healthy" and state["paused_until"] is None
    up.settings.latency_ms = 0
    for i in range(3):
        assert (await proxy.embed(key, {"model": MODEL, "input": f"after {i}"})).status == 200
    assert up.state.requests == 5


@pytest.mark.redis
async def test_a_429_storm_with_sane_values_ends_as_soon_as_the_upstream_answers(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks()
    proxy = await make_proxy(fleet_settings(redis_url, *only(up)))
    key = await proxy.new_key()
    up.state.fail_next("status", times=3, status=429, retry_after=30)  # the storm: three 429s, 30 s each
    started = time.monotonic()
    statuses = []
    while True:
        resp = await proxy.embed(key, {"model": MODEL, "input": f"storm {len(statuses)}"})
        statuses.append(resp.status)
        if resp.status == 200:
            break
        assert resp.status == 429
        assert time.monotonic() - started < 15, "still paused: the Retry-After of 30 s was waited out"
        await asyncio.sleep(0.05)
    took = time.monotonic() - started
    # the first call and two probes got the storm's 429s, the third probe the answer; every other request was
    # answered by the proxy without an upstream call, and probes were cooldown_s apart
    assert up.state.requests == 4
    assert 3 * COOLDOWN_S <= took < 3 * COOLDOWN_S + 5, took
    assert len(statuses) > 4
    assert (await state_of(proxy))["state"] == "healthy"


def test_the_router_lets_one_probe_through_every_cooldown_and_a_success_ends_the_pause() -> None:
    router = Router(unit_settings(), random.Random(1))
    (b,) = router.models["one"]  # cooldown_s = 30 (the default)
    Router.failed(b, "rate_limited", 100.0, retry_after=3600.0)
    assert router.choose("one", 1, 129.0).deployment is None  # before the first probe: paused
    assert router.choose("one", 1, 130.0).deployment is b and b.probe_due(130.0)  # the call that takes it probes
    Router.probe_started(b)
    waiting = router.choose("one", 1, 131.0)
    assert waiting.deployment is None and waiting.rate_limited and waiting.wait == 3569.0  # as before the probe
    assert not Router.probe_done(b, False, 132.0)  # it failed: the next one in cooldown_s
    assert router.choose("one", 1, 161.0).deployment is None
    assert router.choose("one", 1, 162.0).deployment is b and b.probe_due(162.0)
    Router.probe_started(b)
    assert not Router.probe_done(b, None, 162.5)  # cancelled, no outcome: due again at once
    assert router.choose("one", 1, 162.5).deployment is b and b.probe_due(162.5)
    Router.probe_started(b)
    assert Router.probe_done(b, True, 163.0)
    assert router.choose("one", 1, 163.0).deployment is b and not b.probe_due(163.0) and b.paused_until == 0.0


def test_a_pause_within_cooldown_s_is_not_probed_and_a_429_pushes_the_next_probe() -> None:
    router = Router(unit_settings(), random.Random(1))
    (b,) = router.models["one"]
    Router.failed(b, "rate_limited", 100.0, retry_after=20.0)  # shorter than cooldown_s: waited out
    assert all(router.choose("one", 1, t).deployment is None for t in (101.0, 110.0, 119.9))
    assert router.choose("one", 1, 120.0).deployment is b and not b.probe_due(120.0)  # over: no probe needed
    Router.failed(b, "rate_limited", 200.0, retry_after=600.0)
    assert b.probe_due(230.0)
    Router.probe_started(b)
    Router.failed(b, "rate_limited", 231.0, retry_after=600.0)  # the probe got another 429
    Router.probe_done(b, False, 231.0)
    assert router.choose("one", 1, 260.0).deployment is None and router.choose("one", 1, 261.0).deployment is b


def test_a_probe_due_on_one_deployment_takes_its_share_beside_a_healthy_one() -> None:
    router = Router(unit_settings(), random.Random(3))
    a, az, _ = router.models["m"]  # a: cooldown_s = 30
    Router.failed(a, "rate_limited", 0.0, retry_after=3600.0)
    assert {router.choose("m", 1, 10.0).deployment for _ in range(20)} == {az}
    picks = {router.choose("m", 1, 30.0).deployment for _ in range(50)}
    assert picks == {a, az} and a.probe_due(30.0)  # a by its weight (2 of 3), as its probe

