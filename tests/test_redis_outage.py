"""Redis hung or gone mid-run: requests still succeed from the upstream, and the proxy recovers by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.http.app import KEYSTORE, METRICS
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import assert_same_vectors, direct, vectors
from tests.stack import Samples, delta

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def samples(proxy: Proxy) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(proxy.app[METRICS].render().decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


LOOKUP_ERRORS = ("embedding_proxy_cache_lookups_total", {"result": "error"})
REDIS_ERRORS = ("embedding_proxy_redis_errors_total", {})


def grew(before: Samples, after: Samples, metric: tuple[str, dict[str, str]]) -> float:
    name, labels = metric
    return delta(before, after, name, **labels)


async def test_redis_hung_then_gone_then_back(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    # Redis alone: the in-process tier would answer "warm" during the outage (tests/test_local_cache.py)
    config = "[redis]\nsocket_timeout_s = 0.2\nretry_interval_s = 0.3\n[cache]\nlocal_max_mb = 0\n"
    settings = make_settings(upstream.base_url, own_redis.url, config)
    proxy = await make_proxy(settings)
    known, _ = await proxy.app[KEYSTORE].create("search")
    never_used, _ = await proxy.app[KEYSTORE].create("search")
    body = {"model": MODEL, "input": ["warm"]}
    assert (await proxy.embed(known, body)).headers["x-cache"] == "miss"
    await settle(proxy)
    assert (await proxy.embed(known, body)).headers["x-cache"] == "hit"
    assert own_redis.proc is not None
    before = samples(proxy)
    assert grew({}, before, LOOKUP_ERRORS) == 0 and grew({}, before, REDIS_ERRORS) == 0
    caplog.clear()

    # 1. Redis hangs (SIGSTOP): answers come from the upstream, exact, within the Redis timeout budget.
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        upstream.state.reset()
        both = {"model": MODEL, "input": ["warm", "cold"]}
        resp = await asyncio.wait_for(proxy.embed(known, both), 5)
        assert resp.status == 200, await resp.text()
        assert resp.headers["x-cache"] == "miss"
        assert upstream.state.inputs == 2
        assert_same_vectors(vectors(await resp.json()), vectors(await direct(upstream.base_url, both)))
        # a key never verified by this instance is refused while Redis cannot vouch for it
        resp = await proxy.embed(never_used, body)
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "server_error"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    during = samples(proxy)
    assert grew(before, during, LOOKUP_ERRORS) == 2  # both unique inputs of the bypassed lookup
    # the first failed call (the lookup, or a usage flush that came first) counted and logged the bypass
    assert grew(before, during, REDIS_ERRORS) >= 1
    bypass = [r for r in caplog.records if r.name == "proxy.store" and r.levelno == logging.WARNING]
    assert any("failed (TimeoutError); bypassing it" in r.getMessage() for r in bypass), caplog.text

    # 2. Redis comes back: the cache is read and written again without a restart.
    await asyncio.sleep(0.4)
    upstream.state.reset()
    resp = await proxy.embed(known, body)
    assert resp.status == 200 and resp.headers["x-cache"] == "hit"
    assert upstream.state.inputs == 0
    assert (await proxy.embed(never_used, body)).status == 200
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.name == "proxy.store")
    fresh = {"model": MODEL, "input": ["after the hang"]}
    assert (await proxy.embed(known, fresh)).headers["x-cache"] == "miss"
    await settle(proxy)
    assert (await proxy.embed(known, fresh)).headers["x-cache"] == "hit"
    assert upstream.state.inputs == 1
    recovered = samples(proxy)
    assert grew(during, recovered, LOOKUP_ERRORS) == 0

    # 3. Redis process gone (connection refused), then restarted with its data.
    own_redis.client().save()
    own_redis.stop()
    caplog.clear()
    upstream.state.reset()
    resp = await proxy.embed(known, {"model": MODEL, "input": ["during outage"]})
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    assert upstream.state.inputs == 1
    await settle(proxy)
    gone = samples(proxy)
    assert grew(recovered, gone, LOOKUP_ERRORS) == 1
    assert grew(recovered, gone, REDIS_ERRORS) >= 1
    assert any("bypassing it" in r.getMessage() for r in caplog.records if r.name == "proxy.store"), caplog.text
    own_redis.start()
    await asyncio.sleep(0.4)
    resp = await proxy.embed(known, body)
    assert resp.status == 200 and resp.headers["x-cache"] == "hit"
    assert upstream.state.inputs == 1
    # what was fetched during the outage was never written (nor with a wrong key): it is simply a miss now
    resp = await proxy.embed(known, {"model": MODEL, "input": ["during outage"]})
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    assert upstream.state.inputs == 2
    await settle(proxy)
    resp = await proxy.embed(known, {"model": MODEL, "input": ["during outage"]})
    assert resp.headers["x-cache"] == "hit" and upstream.state.inputs == 2
    assert grew(gone, samples(proxy), LOOKUP_ERRORS) == 0
