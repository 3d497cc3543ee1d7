"""The cache against a real redis-server: the written layout, the TTL, and reads of what was written."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from proxy.config import RedisSettings
from proxy.stores.cache import EmbeddingCache, Entry
from proxy.stores.guard import Store, StoreUnavailable
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import RedisServer
from tests.helpers import count_store_calls

pytestmark = pytest.mark.redis


async def test_set_many_writes_layout_with_ttl_and_get_many_reads_it(redis_server: RedisServer) -> None:
    redis_server.flush()
    client = aioredis.Redis(port=redis_server.port)
    cache = EmbeddingCache(Store(client, RedisSettings(url=redis_server.url)), RedisKeys(), ttl_s=1234, secret="s")
    vec = np.arange(4, dtype="<f4").tobytes()
    try:
        await cache.set_many([("ep:emb:v2:s:a", Entry(vec, 9)), ("ep:emb:v2:s:b", Entry(memoryview(vec), 1))])
        assert await client.get("ep:emb:v2:s:a") == b"\xb2\x09\x00\x00\x00" + vec
        assert 1230 <= await client.ttl("ep:emb:v2:s:b") <= 1234
        got, _ = await cache.get_many(["ep:emb:v2:s:a", "ep:emb:v2:s:x", "ep:emb:v2:s:b"], 4)
        assert [None if e is None else (bytes(e.vector), e.tokens) for e in got] == [(vec, 9), None, (vec, 1)]
    finally:
        await client.aclose()


async def test_reads_in_one_loop_turn_share_one_pipeline(redis_server: RedisServer) -> None:
    redis_server.flush()
    client = aioredis.Redis(port=redis_server.port)
    store = Store(client, RedisSettings(url=redis_server.url))
    calls = count_store_calls(store)
    cache = EmbeddingCache(store, RedisKeys(), ttl_s=60, secret="s")
    vec = np.arange(4, dtype="<f4").tobytes()
    try:
        await cache.set_many([(f"ep:emb:v2:s:{k}", Entry(vec, k)) for k in range(1, 6)])
        calls.clear()

        def also(pipe: Any) -> None:
            pipe.incr("counter")  # stands for the quota script queued with a read

        got = await asyncio.gather(*(cache.get_many([f"ep:emb:v2:s:{k}", "ep:emb:v2:s:none"], 4,
                                                    also if k % 2 else None) for k in range(1, 6)))
        assert calls == ["mget"]  # five requests' reads, one round trip
        for k, (entries, extra) in enumerate(got, start=1):
            assert entries[0] is not None and entries[0].tokens == k and entries[1] is None
            assert extra == ([(k + 1) // 2] if k % 2 else [])  # each gets its own `also` reply, in order
        calls.clear()
        entries, extra = await cache.get_many(["ep:emb:v2:s:1"], 4)  # alone: a plain MGET, no pipeline
        assert calls == ["mget"] and entries[0] is not None and extra == []
    finally:
        await client.aclose()


async def test_a_failed_shared_read_fails_every_request_in_it() -> None:
    class DownStore:
        embedded = False

        async def call(self, op: str, fn: Any, **kw: Any) -> Any:
            raise StoreUnavailable("redis mget failed: ConnectionError")

    cache = EmbeddingCache(DownStore(), RedisKeys(), ttl_s=60, secret="s")  # type: ignore[arg-type]
    results = await asyncio.gather(*(cache.get_many(["k"], 4) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
