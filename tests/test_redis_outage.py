"""Redis hung or gone mid-run: requests still succeed from the upstream, and the proxy recovers by itself."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from proxy.app import KEYSTORE, METRICS
from tests.conftest import RedisServer, Upstream, make_settings, settle
from tests.helpers import assert_same_vectors, direct, vectors

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


async def test_redis_hung_then_gone_then_back(make_proxy: Any, upstream: Upstream, own_redis: RedisServer) -> None:
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
    metrics = proxy.app[METRICS].render().decode()
    assert 'embedding_proxy_cache_lookups_total{result="error"}' in metrics

    # 2. Redis comes back: the cache is used again without a restart.
    await asyncio.sleep(0.4)
    resp = await proxy.embed(known, body)
    assert resp.status == 200 and resp.headers["x-cache"] == "hit"
    assert (await proxy.embed(never_used, body)).status == 200

    # 3. Redis process gone (connection refused), then restarted with its data.
    own_redis.client().save()
    own_redis.stop()
    resp = await proxy.embed(known, {"model": MODEL, "input": ["during outage"]})
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    own_redis.start()
    await asyncio.sleep(0.4)
    resp = await proxy.embed(known, body)
    assert resp.status == 200 and resp.headers["x-cache"] == "hit"
    # what was fetched during the outage was not written with a wrong key: it is simply a miss now
    resp = await proxy.embed(known, {"model": MODEL, "input": ["during outage"]})
    assert resp.status == 200
