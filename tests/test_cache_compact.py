"""Packed cache entries in a real redis-server: their memory, the proxy serving them bit for bit, and entries the
previous version wrote (under its keys, in its layout) never read."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from proxy.config import RedisSettings
from proxy.mock.upstream import vector_for
from proxy.stores.cache import EmbeddingCache, Entry
from proxy.stores.entrycodec import PACKED_TAG
from proxy.stores.guard import Store
from proxy.stores.rediskeys import DigestBuilder, RedisKeys, seed_from_secret
from proxy.tokens import get_encoding
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import vectors

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
SECRET = "compact-test-secret"


def mock_vector(text: str, dims: int, dimensions: int | None = None) -> np.ndarray:
    return vector_for(MODEL if dims == 1536 else "text-embedding-3-large",
                      get_encoding("cl100k_base").encode(text), dims, dimensions)


@pytest.mark.parametrize(("dims", "before", "after"), [(256, 1368, 1112), (1536, 7256, 6232), (3072, 14424, 12376)])
async def test_memory_usage_of_a_packed_entry(redis_server: RedisServer, dims: int, before: int, after: int) -> None:
    """The issue's bound: a cached 1536-d entry takes <= 6,300 bytes (MEMORY USAGE); the previous layout, same
    vector and count, 7,256. With jemalloc (Redis's and Valkey's allocator) the value is one size class smaller;
    the literal totals are Redis 7's (key and object overhead differ a little between servers)."""
    redis_server.flush()
    client = aioredis.Redis(port=redis_server.port)
    cache = EmbeddingCache(Store(client, RedisSettings(url=redis_server.url)), RedisKeys(), ttl_s=600, secret="s")
    texts = [f"sizing input {k}" for k in range(20)]
    vecs = [vector_for("text-embedding-3-large", get_encoding("cl100k_base").encode(t), 3072, dims) for t in texts]
    keys = [f"ep:emb:v2:s:{k:032x}" for k in range(len(texts))]
    try:
        await cache.set_many([(k, Entry(v.tobytes(), 12)) for k, v in zip(keys, vecs, strict=True)])
        packed = [await client.memory_usage(k, samples=0) for k in keys]
        for k, v in zip(keys, vecs, strict=True):  # the same entries as the previous version stored them
            await client.set(k.replace(":v2:", ":"), (12).to_bytes(4, "little") + v.tobytes(), ex=600)
        old = [await client.memory_usage(k.replace(":v2:", ":"), samples=0) for k in keys]
        assert max(packed) < min(old)
        if dims == 1536:
            assert max(packed) <= 6300
        if (await client.info("memory")).get("mem_allocator", "").startswith("jemalloc"):
            assert {o - p for o, p in zip(old, packed, strict=True)} == {before - after}
            if "valkey_version" not in await client.info("server"):
                assert (set(old), set(packed)) == ({before}, {after})
        got, _ = await cache.get_many(keys, dims)
        assert [bytes(e.vector) if e else None for e in got] == [v.tobytes() for v in vecs]
    finally:
        await client.aclose()


def no_local_tier(upstream: Upstream, redis_url: str) -> Any:
    # every hit is decoded from Redis, not answered from the in-process tier
    return make_settings(upstream.base_url, redis_url, "[cache]\nlocal_max_mb = 0\n", PROXY_CACHE_SECRET=SECRET)


@pytest.mark.parametrize(("model", "dimensions", "dims"), [(MODEL, None, 1536), ("text-embedding-3-large", None, 3072),
                                                           (MODEL, 256, 256), (MODEL, 1, 1), (MODEL, 63, 63)])
@pytest.mark.parametrize("fmt", ["base64", "float"])
async def test_the_proxy_serves_packed_entries_bit_for_bit(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer, model: str,
    dimensions: int | None, dims: int, fmt: str,
) -> None:
    proxy: Proxy = await make_proxy(no_local_tier(upstream, redis_url))
    key = await proxy.new_key()
    texts = [f"packed {k} {fmt}" for k in range(6)]
    body: dict[str, Any] = {"model": model, "input": texts, "encoding_format": fmt}
    if dimensions:
        body["dimensions"] = dimensions
    first = await proxy.embed(key, body)
    assert first.status == 200 and first.headers["x-cache"] == "miss"
    await settle(proxy)
    stored = redis_server.client().keys("ep:emb:v2:s:*")
    assert len(stored) == len(texts)
    assert {redis_server.client().get(k)[0] for k in stored} == ({PACKED_TAG} if dims >= 64 else {0xB2})
    upstream.state.reset()
    again = await proxy.embed(key, body)
    assert again.status == 200 and again.headers["x-cache"] == "hit" and upstream.state.inputs == 0
    doc = await again.json()
    native = 3072 if model != MODEL else 1536
    expected = [vector_for(model, get_encoding("cl100k_base").encode(t), native, dimensions) for t in texts]
    assert [v.tobytes() for v in vectors(doc)] == [e.astype("<f4").tobytes() for e in expected]
    assert [v.tobytes() for v in vectors(await first.json())] == [e.astype("<f4").tobytes() for e in expected]


async def test_an_entry_in_the_previous_layout_under_its_key_is_never_read(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    """Documented: entries the previous version wrote are not read (a miss); the new one goes under `emb:v2`."""
    client = redis_server.client()
    digest = DigestBuilder(seed_from_secret(SECRET), MODEL, None, "s").text("planted")
    wrong = np.full(1536, 0.25, dtype="<f4").tobytes()
    for first_byte in (PACKED_TAG, 0xB2, 7):  # its count's low byte, the first byte a reader sees
        client.set(f"ep:emb:s:{digest}", first_byte.to_bytes(4, "little") + wrong)
        client.delete(f"ep:emb:v2:s:{digest}")
        proxy: Proxy = await make_proxy(no_local_tier(upstream, redis_url))
        key = await proxy.new_key()
        resp = await proxy.embed(key, {"model": MODEL, "input": "planted", "encoding_format": "base64"})
        assert resp.status == 200 and resp.headers["x-cache"] == "miss"
        assert vectors(await resp.json())[0].tobytes() == mock_vector("planted", 1536).tobytes()
        await settle(proxy)
        assert client.get(f"ep:emb:v2:s:{digest}")[0] == PACKED_TAG  # type: ignore[index]
        assert client.get(f"ep:emb:s:{digest}") == first_byte.to_bytes(4, "little") + wrong  # left alone
