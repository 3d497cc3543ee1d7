"""The in-process cache tier: bounded LRU with a TTL, admitted from Redis reads only, used before Redis."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.http.app import METRICS, SERVICE
from proxy.stores.cache import Entry, decode_entry, encode_entry
from proxy.stores.localcache import LocalCache, entry_cost
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import Clock, assert_same_vectors, direct, vectors

MODEL = "text-embedding-3-small"


def entry(n: int = 1536, tokens: int = 3) -> Entry:
    return Entry(bytes(4 * n), tokens)


def test_lru_by_bytes() -> None:
    one = entry_cost("a", entry().vector)
    cache = LocalCache(max_bytes=3 * one, ttl_s=60)
    for k in "abc":
        cache.put(k, entry())
    assert len(cache) == 3 and cache.bytes == 3 * one
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", entry())
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert len(cache) == 3 and cache.bytes == 3 * one
    cache.put("d", entry(tokens=99))  # already there: kept as it was
    got = cache.get("d")
    assert got is not None and got.tokens == 3
    tiny = LocalCache(max_bytes=100, ttl_s=60)
    tiny.put("big", entry())  # larger than the whole tier: not admitted
    assert len(tiny) == 0 and tiny.bytes == 0


def test_rendered_text_counts_in_the_budget() -> None:
    one = entry_cost("a", entry().vector)
    text = 900 + 33  # a bytes object's header
    cache = LocalCache(max_bytes=2 * one + 1000, ttl_s=60)
    cache.put("a", entry())
    cache.put("b", entry())
    cache.keep_rendered("zzz", b"x" * 10)  # not held: nothing kept
    assert cache.bytes == 2 * one and cache.rendered("zzz") is None
    cache.keep_rendered("b", b"x" * 900)
    assert cache.rendered("b") == b"x" * 900 and cache.bytes == 2 * one + text
    cache.keep_rendered("b", b"y")  # the first text stays
    assert cache.rendered("b") == b"x" * 900
    cache.keep_rendered("a", b"x" * 900)  # over budget: the least recently used entry goes, text and all
    assert cache.get("a") is None and cache.rendered("b") == b"x" * 900 and cache.bytes == one + text


BUDGET = 2 << 20


def held_by(fill: Callable[[LocalCache], None]) -> int:
    """Bytes still allocated once `fill` has filled a tier of BUDGET bytes (the tier kept alive, all else gone)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        cache = LocalCache(BUDGET, ttl_s=600)
        fill(cache)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert cache.bytes <= BUDGET and len(cache) > 0
    return held


def cache_key(n: int) -> str:
    return f"ep:emb:v2:s:{n:032x}"  # the shape of a real key: prefix, then a 128-bit hex digest


def redis_value(n: int, dims: int) -> bytes:
    vector = struct.pack("<f", 0.1 + n / 7) * dims  # floats of about 10 digits when rendered
    return encode_entry(Entry(vector, n % 600))  # token counts small and large, in the cache's own layout


def fill_tiny(cache: LocalCache) -> None:
    # a flood of distinct inputs at dimensions = 1, each admitted as get_many decodes it: a view into its value
    for n in range(60_000):
        got = decode_entry(redis_value(n, 1), 1)
        assert got is not None
        cache.put(cache_key(n), got)


def fill_views_into_whole_replies(cache: LocalCache) -> None:
    # the worst a view can do: a 1-d entry viewing into a 2048-value reply would keep all of it alive
    for n in range(8_000):
        reply = redis_value(n, 1) * 2048
        cache.put(cache_key(n), Entry(memoryview(reply)[8 * 1000 + 4: 8 * 1001], n % 600))


def fill_large(cache: LocalCache) -> None:
    # 1536-d entries with their float JSON text, as hot inputs answered in float keep them
    for n in range(300):
        got = decode_entry(redis_value(n, 1536), 1536)
        assert got is not None
        cache.put(cache_key(n), got)
        text = orjson.dumps(np.frombuffer(got.vector, dtype="<f4"), option=orjson.OPT_SERIALIZE_NUMPY)  # as rendered
        cache.keep_rendered(cache_key(n), text)


@pytest.mark.parametrize("fill", [fill_tiny, fill_views_into_whole_replies, fill_large])
def test_the_budget_bounds_the_memory_held(fill: Callable[[LocalCache], None]) -> None:
    held = held_by(fill)
    assert 0.75 * BUDGET <= held <= 1.25 * BUDGET, f"{held / BUDGET:.2f} x the budget"


def test_ttl_with_a_pinned_clock() -> None:
    clock = Clock(1000.0)
    cache = LocalCache(max_bytes=1 << 20, ttl_s=10, clock=clock)
    cache.put("a", entry())
    clock.now += 9.9
    assert cache.get("a") is not None
    clock.now += 0.2
    assert cache.get("a") is None and len(cache) == 0 and cache.bytes == 0


def _samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


async def _mgets(redis_server: RedisServer) -> int:
    stats: dict[str, Any] = redis_server.client().info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


@pytest.mark.redis
async def test_second_read_is_served_in_process(proxy: Proxy, upstream: Upstream, redis_server: RedisServer) -> None:
    key = await proxy.new_key()
    body = {"model": MODEL, "input": ["hot input", "other"], "encoding_format": "base64"}
    assert (await proxy.embed(key, body)).headers["x-cache"] == "miss"
    await settle(proxy)
    # a fresh upstream answer is not admitted: the first repeat reads Redis, which admits it
    before = await _mgets(redis_server)
    assert (await proxy.embed(key, body)).headers["x-cache"] == "hit"
    assert await _mgets(redis_server) == before + 1
    local = proxy.app[SERVICE].local_cache
    assert local is not None and len(local) == 2
    # from now on no Redis read at all, and the same exact vectors
    resp = await proxy.embed(key, body)
    assert resp.headers["x-cache"] == "hit" and await _mgets(redis_server) == before + 1
    got = await resp.json()
    assert_same_vectors(vectors(got), vectors(await direct(upstream.base_url, {**body, "encoding_format": "base64"})))
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == got["usage"]["prompt_tokens"]
    # a partial local hit reads only what is missing
    upstream.state.reset()
    resp = await proxy.embed(key, {"model": MODEL, "input": ["hot input", "new one"]})
    assert resp.headers["x-cache"] == "partial" and upstream.state.inputs == 1
    samples = _samples(proxy.app[METRICS].render().decode())
    assert samples["embedding_proxy_cache_local_hits_total"] == 3
    assert samples["embedding_proxy_cache_lookups_total|result=hit"] == 5  # 2 from Redis, 3 local


@pytest.mark.redis
async def test_off_and_per_team(make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer) -> None:
    off = await make_proxy(make_settings(upstream.base_url, redis_url, "[cache]\nlocal_max_mb = 0\n"))
    assert off.app[SERVICE].local_cache is None
    key = await off.new_key()
    body = {"model": MODEL, "input": "x"}
    before = await _mgets(redis_server)
    for _ in range(3):
        assert (await off.embed(key, body)).status == 200
        await settle(off)
    assert await _mgets(redis_server) == before + 3  # every request read Redis

    teams = await make_proxy(make_settings(upstream.base_url, redis_url, '[cache]\nscope = "team"\n'))
    a, b = await teams.new_key("a"), await teams.new_key("b")
    for _ in range(3):
        assert (await teams.embed(a, body)).status == 200
        await settle(teams)
    upstream.state.reset()
    # team b never sees team a's entry, in Redis or in process
    assert (await teams.embed(b, body)).headers["x-cache"] == "miss" and upstream.state.inputs == 1


@pytest.mark.redis
async def test_local_entries_answer_while_redis_hangs(make_proxy: Any, upstream: Upstream,
                                                      own_redis: RedisServer) -> None:
    config = "[redis]\nsocket_timeout_s = 0.2\nretry_interval_s = 0.3\n"
    proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, config))
    key = await proxy.new_key()
    body = {"model": MODEL, "input": ["warm"]}
    for _ in range(2):  # miss, then a Redis hit that admits it
        assert (await proxy.embed(key, body)).status == 200
        await settle(proxy)
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        upstream.state.reset()
        resp = await asyncio.wait_for(proxy.embed(key, {"model": MODEL, "input": ["warm", "cold"]}), 5)
        assert resp.status == 200 and resp.headers["x-cache"] == "partial"
        assert upstream.state.inputs == 1  # only "cold"
        resp = await asyncio.wait_for(proxy.embed(key, body), 5)
        assert resp.status == 200 and resp.headers["x-cache"] == "hit"
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


@pytest.mark.redis
async def test_hot_float_answers_are_formatted_once(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    body = {"model": MODEL, "input": ["f1", "f2", "f1"]}
    for _ in range(2):  # miss, then a Redis hit that admits both entries
        assert (await proxy.embed(key, body)).status == 200
        await settle(proxy)
    first = await (await proxy.embed(key, body)).read()  # formats and keeps the texts
    local = proxy.app[SERVICE].local_cache
    assert local is not None
    kept = [k for k in list(local._entries) if local.rendered(k) is not None]
    assert len(kept) == 2
    again = await (await proxy.embed(key, body)).read()
    assert again == first
    assert_same_vectors(vectors(orjson.loads(again)), vectors(await direct(upstream.base_url, body)))
