"""The cache against a real redis-server: the written layout, the TTL, and reads of what was written."""

from __future__ import annotations

import numpy as np
import pytest
import redis.asyncio as aioredis

from proxy.cache import EmbeddingCache, Entry
from proxy.config import RedisSettings
from proxy.rediskeys import RedisKeys
from proxy.store import Store
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis


async def test_set_many_writes_layout_with_ttl_and_get_many_reads_it(redis_server: RedisServer) -> None:
    redis_server.flush()
    client = aioredis.Redis(port=redis_server.port)
    cache = EmbeddingCache(Store(client, RedisSettings(url=redis_server.url)), RedisKeys(), ttl_s=1234, secret="s")
    vec = np.arange(4, dtype="<f4").tobytes()
    try:
        await cache.set_many([("ep:emb:s:a", Entry(vec, 9)), ("ep:emb:s:b", Entry(memoryview(vec), 1))])
        assert await client.get("ep:emb:s:a") == b"\x09\x00\x00\x00" + vec
        assert 1230 <= await client.ttl("ep:emb:s:b") <= 1234
        got, _ = await cache.get_many(["ep:emb:s:a", "ep:emb:s:x", "ep:emb:s:b"], 4)
        assert [None if e is None else (bytes(e.vector), e.tokens) for e in got] == [(vec, 9), None, (vec, 1)]
    finally:
        await client.aclose()
