"""Cache management: `cache purge` and `cache stats`, in the admin API and the CLI, against real Redis servers.

A purge bumps the model's generation, part of every cache key of the model: the next request for it is a miss on
every instance (announced over pub/sub, or caught up by the periodic re-read), the in-process tier does not serve it,
and other models stay hits."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis
import xxhash

from proxy.config import ConfigError, RedisSettings, parse
from proxy.http.admin import CACHE
from proxy.http.app import LEDGER, SERVICE
from proxy.stores.generations import CacheGenerations
from proxy.stores.guard import Store, in_process_redis
from proxy.stores.rediskeys import DigestBuilder, RedisKeys
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import until
from tests.redis_servers import Cluster
from tests.test_cli import cli

pytestmark = pytest.mark.redis
SMALL, LARGE = "text-embedding-3-small", "text-embedding-3-large"
ADMIN = "cache-test-admin-key-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
# Only the pub/sub announcement can bring a purge to another instance within a test.
NO_REREAD = "[cache]\ngenerations_refresh_s = 600\n"
KNOWN = "Known models: text-embedding-3-small, text-embedding-3-large, text-embedding-ada-002."


async def x_cache(proxy: Proxy, key: str, model: str, text: str) -> str:
    resp = await proxy.embed(key, {"model": model, "input": [text]})
    assert resp.status == 200, await resp.text()
    cache: str = resp.headers["x-cache"]
    return cache


async def purge(proxy: Proxy, body: dict[str, Any]) -> tuple[int, Any]:
    resp = await proxy.client.post("/admin/cache/purge", json=body, headers=AS_ADMIN)
    return resp.status, await resp.json()


def generation(proxy: Proxy, model: str, team: str | None = None) -> str | None:
    return proxy.app[CACHE].generations.token(model, team)


# --- keys ----------------------------------------------------------------------------------------------------


def test_the_generation_is_hashed_after_the_model_and_revision() -> None:
    seed = 42
    assert RedisKeys("ep").cache_generations() == "ep:cache-gen"
    assert RedisKeys("ep").cache_generation_changes() == "ep:cache-gen:changed"
    never_purged = DigestBuilder(seed, SMALL, None, "s").text("hello")
    assert never_purged == xxhash.xxh3_128(f"{SMALL}\0" "0\0s\0hello".encode(), seed=seed).hexdigest()
    assert DigestBuilder(seed, SMALL, None, "s", "", "").text("hello") == never_purged  # no purge: keys as before
    assert DigestBuilder(seed, SMALL, None, "s", "", "2").text("hello") == xxhash.xxh3_128(
        f"{SMALL}\0\0g2\0" "0\0s\0hello".encode(), seed=seed).hexdigest()
    assert DigestBuilder(seed, SMALL, 256, "s", "r1", "3.1").text("hello") == xxhash.xxh3_128(
        f"{SMALL}\0r1\0g3.1\0" "256\0s\0hello".encode(), seed=seed).hexdigest()


async def test_generations_only_grow_whatever_order_news_arrives_in() -> None:
    store = Store(in_process_redis(), RedisSettings(), embedded=True)
    gens = CacheGenerations(store, RedisKeys(), [SMALL, LARGE], "team")
    assert gens.token(SMALL, None) is None  # unknown until read: the cache is bypassed
    await store.client.hset("ep:cache-gen", f"m:{SMALL}", 1)
    await gens.refresh()
    assert gens.token(SMALL, None) == "1" and gens.token(LARGE, None) == ""
    gens.announced(f"3 m:{SMALL}".encode())
    assert gens.token(SMALL, None) == "3" and gens.token(SMALL, "alpha") == "3"
    gens.announced(f"2 m:{SMALL}".encode())  # an older purge's message, late
    await gens.refresh()  # a read that raced the newest message
    assert gens.token(SMALL, None) == "3"
    gens.announced(f"1 t:alpha:{SMALL}".encode())
    assert gens.token(SMALL, "alpha") == "3.1" and gens.token(SMALL, "beta") == "3"
    gens.announced(b"not a purge")
    assert gens.generations() == {f"m:{SMALL}": 3, f"t:alpha:{SMALL}": 1}


def test_the_reread_interval_has_a_floor() -> None:
    with pytest.raises(ConfigError, match=r"x.toml: cache.generations_refresh_s must be at least 0.1"):
        parse("[cache]\ngenerations_refresh_s = 0\n", "x.toml", {})


# --- purges across instances -----------------------------------------------------------------------------------


async def test_a_purge_reaches_every_instance_and_its_memory_tier_and_spares_other_models(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    settings = make_settings(upstream.base_url, redis_url, NO_REREAD, PROXY_ADMIN_KEY=ADMIN)
    a, b = await make_proxy(settings), await make_proxy(settings)
    key = await a.new_key()
    assert await x_cache(a, key, SMALL, "purged text") == "miss"
    assert await x_cache(a, key, LARGE, "kept text") == "miss"
    await settle(a)
    assert await x_cache(b, key, SMALL, "purged text") == "hit"  # read from Redis: now in b's memory tier too
    assert await x_cache(b, key, LARGE, "kept text") == "hit"
    local = b.app[SERVICE].local_cache
    assert local is not None and len(local) == 2

    upstream.state.reset()
    assert await purge(a, {"model": SMALL}) == (
        200, {"object": "cache.purge", "model": SMALL, "team": None, "generation": 1, "scope": "shared"})
    assert generation(a, SMALL) == "1"  # the purging instance at once
    await until(lambda: generation(b, SMALL) == "1")  # the other one by the announcement

    assert await x_cache(b, key, SMALL, "purged text") == "miss"  # neither Redis nor b's memory tier served it
    assert upstream.state.inputs == 1
    assert await x_cache(b, key, LARGE, "kept text") == "hit"
    assert await x_cache(a, key, LARGE, "kept text") == "hit"
    await settle(b)
    assert await x_cache(a, key, SMALL, "purged text") == "hit"  # the new generation's entry, written by b
    assert upstream.state.inputs == 1
    assert generation(a, LARGE) == "" and generation(b, LARGE) == ""


async def test_a_lost_announcement_is_caught_up_by_the_periodic_reread(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "[cache]\ngenerations_refresh_s = 0.2\n"))
    key = await proxy.new_key()
    assert await x_cache(proxy, key, SMALL, "lost") == "miss"
    await settle(proxy)
    assert await x_cache(proxy, key, SMALL, "lost") == "hit"
    assert await x_cache(proxy, key, SMALL, "lost") == "hit"  # from the memory tier
    # a purge whose PUBLISH never arrived: the generation moved on in Redis alone
    redis.Redis.from_url(redis_url).hincrby("ep:cache-gen", f"m:{SMALL}", 1)
    await until(lambda: generation(proxy, SMALL) == "1")  # re-read every 0.2 s
    assert await x_cache(proxy, key, SMALL, "lost") == "miss"


async def test_an_instance_started_after_a_purge_uses_its_generation(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    settings = make_settings(upstream.base_url, redis_url, NO_REREAD, PROXY_ADMIN_KEY=ADMIN)
    a = await make_proxy(settings)
    key = await a.new_key()
    assert await x_cache(a, key, SMALL, "before") == "miss"
    await settle(a)
    assert (await purge(a, {"model": SMALL}))[0] == 200
    late = await make_proxy(settings)
    assert generation(late, SMALL) == "1"
    assert await x_cache(late, key, SMALL, "before") == "miss"


async def test_team_purges_under_the_team_scope(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    config = NO_REREAD + 'scope = "team"\n'
    settings = make_settings(upstream.base_url, redis_url, config, PROXY_ADMIN_KEY=ADMIN)
    a, b = await make_proxy(settings), await make_proxy(settings)
    alpha, beta = await a.new_key("alpha"), await a.new_key("beta")
    for key in (alpha, beta):
        assert await x_cache(a, key, SMALL, "shared words") == "miss"
    await settle(a)

    assert await purge(a, {"model": SMALL, "team": "alpha"}) == (
        200, {"object": "cache.purge", "model": SMALL, "team": "alpha", "generation": 1, "scope": "team"})
    await until(lambda: generation(b, SMALL, "alpha") == "0.1")
    assert generation(b, SMALL, "beta") == ""
    assert await x_cache(b, alpha, SMALL, "shared words") == "miss"
    assert await x_cache(b, beta, SMALL, "shared words") == "hit"
    await settle(b)

    # without a team: every team's entries of the model
    assert (await purge(a, {"model": SMALL}))[1]["generation"] == 1
    await until(lambda: generation(b, SMALL, "beta") == "1")
    assert generation(b, SMALL, "alpha") == "1.1"
    assert await x_cache(b, alpha, SMALL, "shared words") == "miss"
    assert await x_cache(b, beta, SMALL, "shared words") == "miss"


async def test_purges_that_cannot_be_made_are_400_naming_why(proxy_admin: Proxy) -> None:
    status, body = await purge(proxy_admin, {"model": "text-embedding-4"})
    assert status == 400
    assert body["error"] == {"message": f"Unknown model 'text-embedding-4'. {KNOWN}", "type": "invalid_request_error",
                             "param": "model", "code": "model_not_found"}
    status, body = await purge(proxy_admin, {"model": SMALL, "team": "alpha"})
    assert status == 400 and body["error"]["param"] == "team"
    assert body["error"]["message"] == (
        "The cache scope is shared: every team's requests read and write the same entries, so one team's cannot be "
        "purged alone. Purge the model for every team (no team), or use cache.scope = \"team\".")
    for bad, param in [({}, "model"), ({"model": 3}, "model"), ({"model": SMALL, "team": 5}, "team"),
                       ({"model": SMALL, "everything": True}, "everything")]:
        status, body = await purge(proxy_admin, bad)
        assert status == 400 and body["error"]["param"] == param, body
    resp = await proxy_admin.client.post("/admin/cache/purge", json={"model": SMALL})
    assert resp.status == 401  # the admin key is needed
    assert generation(proxy_admin, SMALL) == ""  # nothing was purged


@pytest.fixture
async def proxy_admin(make_proxy: Any, upstream: Upstream, redis_url: str) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    return p


# --- stats ---------------------------------------------------------------------------------------------------


async def test_stats_of_a_cache_store_of_its_own(
    make_proxy: Any, upstream: Upstream, redis_url: str, own_redis: RedisServer
) -> None:
    settings = make_settings(upstream.base_url, redis_url, NO_REREAD, PROXY_ADMIN_KEY=ADMIN,
                             CACHE_REDIS_URL=own_redis.url)
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert await x_cache(proxy, key, SMALL, "hello world") == "miss"  # 2 tokens
    assert (await proxy.embed(key, {"model": SMALL, "input": ["one", "two", "three"]})).status == 200
    await settle(proxy)
    assert await x_cache(proxy, key, SMALL, "hello world") == "hit"
    assert (await purge(proxy, {"model": LARGE}))[0] == 200

    resp = await proxy.client.get("/admin/cache", headers=AS_ADMIN)
    assert resp.status == 200
    stats = await resp.json()
    cache_row, state_row = stats["stores"]
    assert {k: cache_row[k] for k in ("store", "node", "keys", "entries", "estimated", "maxmemory_policy")} == {
        "store": "cache", "node": "", "keys": 5, "entries": 4, "estimated": False, "maxmemory_policy": "noeviction"}
    assert own_redis.client().hgetall("ep:cache-gen") == {f"m:{LARGE}".encode(): b"1"}  # the fifth key: the copy
    assert state_row["store"] == "state" and state_row["entries"] == 0 and state_row["keys"] > 0
    assert cache_row["memory_bytes"] > 0 and cache_row["evicted_keys"] == 0 and cache_row["maxmemory_bytes"] is None
    assert stats["memory_bytes"] == cache_row["memory_bytes"]  # the cache's servers only
    assert {k: stats[k] for k in ("object", "scope", "entries", "estimated", "hit_ratio")} == {
        "object": "cache", "scope": "shared", "entries": 4, "estimated": False, "hit_ratio": 2 / 7}
    assert stats["models"] == [
        {"model": SMALL, "generation": 0, "cached_tokens": 2, "total_tokens": 7, "hit_ratio": 2 / 7},
        {"model": LARGE, "generation": 1, "cached_tokens": 0, "total_tokens": 0, "hit_ratio": None},
        {"model": "text-embedding-ada-002", "generation": 0, "cached_tokens": 0, "total_tokens": 0,
         "hit_ratio": None},
    ]
    process = stats["process"]
    assert process["lookups"] == {"hit": 1, "miss": 4, "error": 0} and process["hit_ratio"] == 0.2
    assert process["local_entries"] == 1 and process["local_bytes"] > 0
    assert process["local_max_bytes"] == 64 * 1024 * 1024 and process["generations_loaded"] is True


async def test_stats_per_team_under_the_team_scope_and_a_shared_store(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    settings = make_settings(upstream.base_url, redis_url, '[cache]\nscope = "team"\n', PROXY_ADMIN_KEY=ADMIN)
    proxy = await make_proxy(settings)
    alpha, beta = await proxy.new_key("alpha"), await proxy.new_key("beta")
    assert (await proxy.embed(alpha, {"model": SMALL, "input": ["a", "b", "c"]})).status == 200
    assert (await proxy.embed(beta, {"model": SMALL, "input": ["a"]})).status == 200
    await settle(proxy)
    assert (await purge(proxy, {"model": SMALL, "team": "beta"}))[0] == 200
    stats = await (await proxy.client.get("/admin/cache", headers=AS_ADMIN)).json()
    [row] = stats["stores"]
    assert row["store"] == "state and cache" and row["entries"] == 4 and row["keys"] > 4  # keys, ledger, ...
    assert stats["teams"] == [{"team": "alpha", "entries": 3}, {"team": "beta", "entries": 1}]
    assert stats["models"][0]["generation"] == 0 and stats["models"][0]["team_generations"] == {"beta": 1}


async def test_stats_estimate_from_a_sample_beyond_the_scan_limit(redis_url: str) -> None:
    from proxy.stores.cachestats import SAMPLE, SCAN_LIMIT, StoreRef, store_stats
    from proxy.stores.guard import connect

    raw = redis.Redis.from_url(redis_url)
    pipe = raw.pipeline(transaction=False)
    for i in range(2 * SCAN_LIMIT):
        pipe.set(f"ep:emb:v2:s:{i:032x}" if i % 2 else f"ep:usage:team:{i}", b"x")
    pipe.execute()
    settings = RedisSettings(url=redis_url)
    store = Store(connect(settings)[0], settings)
    try:
        [row], _ = await store_stats(StoreRef("state and cache", store, settings), RedisKeys())
    finally:
        await store.close()
    assert row["keys"] == 2 * SCAN_LIMIT and row["estimated"] is True
    # half of the keys are entries; 200 random keys put the estimate within 5 standard deviations of that
    spread = 5 * (0.25 / SAMPLE) ** 0.5 * 2 * SCAN_LIMIT
    assert abs(row["entries"] - SCAN_LIMIT) < spread, row


# --- CLI -----------------------------------------------------------------------------------------------------


async def test_cli_purge_reaches_a_running_proxy_and_stats_report_it(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, NO_REREAD))
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": SMALL, "input": ["cli purge"]})
    assert resp.headers["x-cache"] == "miss"
    tokens = (await resp.json())["usage"]["prompt_tokens"]
    await settle(proxy)
    assert await x_cache(proxy, key, SMALL, "cli purge") == "hit"

    unknown = await asyncio.to_thread(cli, redis_url, "cache", "purge", "--model", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == f"error: Unknown model 'nope'. {KNOWN}"
    team = await asyncio.to_thread(cli, redis_url, "cache", "purge", "--model", SMALL, "--team", "alpha")
    assert team.returncode == 2 and "The cache scope is shared" in team.stderr

    done = await asyncio.to_thread(cli, redis_url, "cache", "purge", "--model", SMALL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"purged {SMALL}: generation 1; ")
    await until(lambda: generation(proxy, SMALL) == "1")
    assert await x_cache(proxy, key, SMALL, "cli purge") == "miss"
    await settle(proxy)
    await proxy.app[LEDGER].flush()

    stats = await asyncio.to_thread(cli, redis_url, "cache", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    doc = json.loads(stats.stdout)
    assert doc["entries"] == 2 and doc["estimated"] is False  # the old generation's entry and the new one
    assert doc["models"][0] == {"model": SMALL, "generation": 1, "cached_tokens": tokens,
                                "total_tokens": 3 * tokens, "hit_ratio": 1 / 3}  # a miss, a hit, a miss
    assert "process" not in doc  # the CLI is no proxy process
    table = await asyncio.to_thread(cli, redis_url, "cache", "stats")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STORE", "NODE", "KEYS", "ENTRIES", "MEMORY", "MAXMEMORY", "POLICY", "EVICTED"]
    assert lines[1].startswith("state and cache  -")
    assert lines[2].startswith("cache entries: 2; hit ratio today (")
    assert lines[4].split()[:2] == [SMALL, "1"]


def test_cli_cache_needs_redis() -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROXY_CONFIG")}
    done = subprocess.run([sys.executable, "-m", "proxy", "cache", "stats"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "needs REDIS_URL" in done.stderr


# --- cluster -------------------------------------------------------------------------------------------------


async def test_purge_and_stats_on_a_cluster(make_proxy: Any, upstream: Upstream, cluster: Cluster) -> None:
    settings = make_settings(upstream.base_url, cluster.seeds, NO_REREAD, REDIS_TYPE="cluster",
                             PROXY_ADMIN_KEY=ADMIN)
    a, b = await make_proxy(settings), await make_proxy(settings)
    key = await a.new_key()
    inputs = [f"cluster purge {i}" for i in range(30)]
    assert (await a.embed(key, {"model": SMALL, "input": inputs})).status == 200
    assert await x_cache(a, key, LARGE, "cluster kept") == "miss"
    await settle(a)
    assert (await b.embed(key, {"model": SMALL, "input": inputs})).headers["x-cache"] == "hit"

    assert (await purge(a, {"model": SMALL}))[0] == 200
    await until(lambda: generation(b, SMALL) == "1")  # announced through the cluster to b's subscribed node
    upstream.state.reset()
    assert (await b.embed(key, {"model": SMALL, "input": inputs})).headers["x-cache"] == "miss"
    assert upstream.state.inputs == 30
    assert await x_cache(b, key, LARGE, "cluster kept") == "hit"
    await settle(b)

    stats = await (await a.client.get("/admin/cache", headers=AS_ADMIN)).json()
    assert len(stats["stores"]) == 3  # every master
    assert sorted(r["node"] for r in stats["stores"]) == sorted(m.addr for m in cluster.masters())
    assert stats["entries"] == 61 and stats["estimated"] is False  # 30 purged, 30 new, 1 of the other model


async def test_one_subscription_carries_key_changes_and_purges(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    await make_proxy(make_settings(upstream.base_url, redis_url))
    raw = redis.Redis.from_url(redis_url)
    channels = ["ep:keys:changed", "ep:cache-gen:changed", "ep:fleet:health"]
    await until(lambda: raw.pubsub_numsub(*channels) == [(c.encode(), 1) for c in channels])
    subscribed = [c for c in raw.client_list() if int(c.get("sub", 0)) > 0]
    assert [int(c["sub"]) for c in subscribed] == [3]  # one connection, every channel (keys, purges, fleet health)
