"""Redis restarted under load: connections pooled before the restart are replaced, not failed, and a command is
never sent twice (a charge whose reply was lost must not count again)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config import RedisSettings
from proxy.http.app import STORE
from proxy.stores.guard import Store, StoreUnavailable, connect
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.forwarder import Forwarder
from tests.test_redis_outage import LOOKUP_ERRORS, REDIS_ERRORS, grew, samples

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
DEPTH = 24  # connections in the pool before the restart: as many concurrent Redis calls as a burst makes


def restart(server: RedisServer) -> None:
    """Stop and start redis-server on the same port with its data (saved first: the test server has no AOF)."""
    server.client().save()
    server.stop()
    server.start()


@pytest.fixture
async def forwarder(own_redis: RedisServer) -> AsyncIterator[Forwarder]:
    fwd = Forwarder(own_redis.port)
    await fwd.start()
    yield fwd
    await fwd.close()


async def test_connections_pooled_before_a_restart_are_replaced_not_failed(own_redis: RedisServer) -> None:
    settings = RedisSettings(url=own_redis.url, socket_timeout_s=2.0, retry_interval_s=30.0)
    errors: list[str] = []
    store = Store(connect(settings)[0], settings, on_error=errors.append)
    try:
        async def burst() -> list[Any]:  # concurrent calls: each takes a connection of its own
            return await asyncio.gather(*(store.call("ping", lambda r: r.ping()) for _ in range(DEPTH)),
                                        return_exceptions=True)

        assert await burst() == [True] * DEPTH
        assert len(store.client.connection_pool._available_connections) == DEPTH
        await asyncio.to_thread(restart, own_redis)  # every pooled connection is now closed by the old server
        assert await burst() == [True] * DEPTH  # no StoreUnavailable: each dead one was replaced before use
        assert errors == [] and store.available
    finally:
        await store.close()


async def test_a_command_whose_reply_was_lost_is_not_sent_again(own_redis: RedisServer, forwarder: Forwarder) -> None:
    settings = RedisSettings(url=forwarder.url, socket_timeout_s=2.0)
    store = Store(connect(settings)[0], settings)
    try:
        assert await store.call("incr", lambda r: r.incr("charged")) == 1
        forwarder.cut_next = True  # Redis runs the next INCR; the connection dies before its reply comes back
        with pytest.raises(StoreUnavailable):
            await store.call("incr", lambda r: r.incr("charged"))
        assert own_redis.client().get("charged") == b"2"  # run once: a retry would have made it 3
    finally:
        await store.close()


async def test_invariant_redis_restart_under_load(make_proxy: Any, upstream: Upstream,
                                                  own_redis: RedisServer) -> None:
    """A few seconds after a restart under steady load: no Redis error, no cache bypass."""
    # Redis alone answers hits (no in-process tier); every request reads its key from Redis (cache_s = 0), so a
    # burst of clients with keys of their own is a burst of concurrent Redis calls, each on its own connection.
    config = ("[redis]\nsocket_timeout_s = 1.0\nretry_interval_s = 0.5\n[cache]\nlocal_max_mb = 0\n"
              "[keys]\ncache_s = 0\n")
    proxy: Proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, config))
    keys = [await proxy.new_key() for _ in range(DEPTH)]
    warm = [f"warm {i}" for i in range(8)]
    assert (await proxy.embed(keys[0], {"model": MODEL, "input": warm})).status == 200
    await settle(proxy)
    seen: list[tuple[float, int, str]] = []  # (when, status, x-cache)

    async def one(key: str, n: int, tag: str) -> None:
        resp = await proxy.embed(key, {"model": MODEL, "input": [warm[n % len(warm)], f"{tag} {n}"]})
        seen.append((time.monotonic(), resp.status, resp.headers.get("x-cache", "")))

    async def burst(tag: str) -> None:
        await asyncio.gather(*(one(k, i, tag) for i, k in enumerate(keys)))

    stop = asyncio.Event()

    async def steady(worker: int) -> None:
        for n in range(100_000):  # bounded; ends when told
            if stop.is_set():
                return
            await one(keys[worker], n, f"steady {worker}")

    await burst("before")  # the pool is many connections deep (reads of one loop turn may share one)
    assert len(proxy.app[STORE].client.connection_pool._available_connections) >= DEPTH // 2
    load = [asyncio.create_task(steady(w)) for w in range(4)]
    try:
        await asyncio.to_thread(restart, own_redis)
        back_at = time.monotonic()
        deadline = back_at + 10
        while not any(t > back_at and status == 200 and cache == "partial" for t, status, cache in seen):
            assert time.monotonic() < deadline, "the cache was not used again within 10 s of the restart"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # "a few seconds after": any bypass from the restart itself has ended
        before, since = samples(proxy), time.monotonic()
        await burst("after")  # concurrency reaches the connections pooled before the restart
        await asyncio.sleep(1.0)  # the steady load goes on
    finally:
        stop.set()
        await asyncio.gather(*load)
    after = samples(proxy)
    window = [(status, cache) for t, status, cache in seen if t >= since]
    assert len(window) >= DEPTH
    assert grew(before, after, REDIS_ERRORS) == 0
    assert grew(before, after, LOOKUP_ERRORS) == 0
    # every answer in the window read the cache: the warm input a hit, the new one a miss (no bypass)
    assert {w for w in window} == {(200, "partial")}
    assert proxy.app[STORE].available
