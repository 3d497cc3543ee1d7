"""Purge generations under faults: stores that lose them, instances cut off from every store, announcements no one
can read, stores that fail while stats are asked for; and purge requests that must not mean "every team".

(tests/test_cache_purge.py covers purges and stats when everything works; tests/test_break12.py the defects that
led here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import redis

from proxy.config import RedisSettings
from proxy.http.admin import CACHE
from proxy.stores.generations import CacheGenerations
from proxy.stores.guard import Store, in_process_redis
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.forwarder import Forwarder
from tests.helpers import until
from tests.redis_servers import SENTINEL_MASTER, SentinelSet

pytestmark = pytest.mark.redis
SMALL = "text-embedding-3-small"
ADMIN = "generations-admin-key-0123456789"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
GENS = "ep:cache-gen"


def generation(proxy: Proxy, model: str = SMALL, team: str | None = None) -> str | None:
    return proxy.app[CACHE].generations.token(model, team)


async def x_cache(proxy: Proxy, key: str, text: str) -> str:
    resp = await proxy.embed(key, {"model": SMALL, "input": [text]})
    assert resp.status == 200, await resp.text()
    cache: str = resp.headers["x-cache"]
    return cache


# --- generations never go back --------------------------------------------------------------------------------


def two_stores() -> tuple[Store, Store]:
    state = Store(in_process_redis(), RedisSettings(), embedded=True)
    cache = Store(in_process_redis(), RedisSettings(), embedded=True, name="cache redis")
    return state, cache


async def test_a_purge_counts_on_from_the_highest_number_any_store_or_the_purger_knows() -> None:
    state, cache = two_stores()
    proxy = CacheGenerations(state, RedisKeys(), [SMALL], "shared", cache_store=cache)
    assert (await proxy.purge(SMALL)).generation == 1
    assert await state.client.hgetall(GENS) == {f"m:{SMALL}".encode(): b"1"}
    assert await cache.client.hgetall(GENS) == {f"m:{SMALL}".encode(): b"1"}  # the copy beside the entries

    await state.client.flushall()  # the state store restarts empty
    cli = CacheGenerations(state, RedisKeys(), [SMALL], "shared", cache_store=cache)  # knows nothing itself
    assert (await cli.purge(SMALL)).generation == 2  # on from the cache store's copy
    await proxy.refresh()
    assert proxy.token(SMALL, None) == "2"

    await state.client.flushall()
    await cache.client.flushall()  # both lost: only the running process remembers
    assert (await proxy.purge(SMALL)).generation == 3
    assert await cache.client.hgetall(GENS) == {f"m:{SMALL}".encode(): b"3"}


async def test_each_read_writes_back_what_a_store_lost_and_never_lowers_a_number() -> None:
    state, cache = two_stores()
    proxy = CacheGenerations(state, RedisKeys(), [SMALL], "team", cache_store=cache)
    await state.client.hset(GENS, mapping={f"m:{SMALL}": 4, f"t:alpha:{SMALL}": 2})
    await proxy.refresh()
    assert await cache.client.hgetall(GENS) == {f"m:{SMALL}".encode(): b"4", f"t:alpha:{SMALL}".encode(): b"2"}

    await state.client.hset(GENS, f"m:{SMALL}", 1)  # a failover to a replica that missed purges
    await state.client.hdel(GENS, f"t:alpha:{SMALL}")
    await cache.client.hset(GENS, f"m:{SMALL}", 6)  # a purge this process has not heard of yet
    await proxy.refresh()
    assert proxy.token(SMALL, "alpha") == "6.2"
    assert await state.client.hgetall(GENS) == {f"m:{SMALL}".encode(): b"6", f"t:alpha:{SMALL}".encode(): b"2"}
    assert await cache.client.hgetall(GENS) == {f"m:{SMALL}".encode(): b"6", f"t:alpha:{SMALL}".encode(): b"2"}

    late = CacheGenerations(state, RedisKeys(), [SMALL], "team", cache_store=cache)
    await state.client.flushall()
    await late.refresh()  # started after the state store lost them: the copy is enough
    assert late.token(SMALL, "alpha") == "6.2"


async def test_an_announcement_no_one_can_read_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    gens = CacheGenerations(Store(in_process_redis(), RedisSettings(), embedded=True), RedisKeys(), [SMALL], "shared")
    await gens.refresh()
    for data in ["² m:x".encode(), b"-1 m:x", b"1", "٣ m:x".encode()]:  # superscript two, Arabic-Indic three
        gens.announced(data)
    assert gens.generations() == {}
    assert len([m for m in caplog.messages if m.startswith("unreadable cache purge announcement")]) == 4


async def test_a_message_its_handler_cannot_take_keeps_the_subscription(
    make_proxy: Any, upstream: Upstream, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who can reach Redis can PUBLISH: a message the purge handler chokes on must not drop the one
    subscription that also carries key revocations (here it would come back only after retry_interval_s)."""
    config = "[cache]\ngenerations_refresh_s = 600\n[redis]\nretry_interval_s = 60\n"
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config))
    assert generation(proxy) == ""
    r = redis.Redis.from_url(redis_url)
    await until(lambda: r.pubsub_numsub("ep:cache-gen:changed")[0][1] == 1)
    r.publish("ep:cache-gen:changed", "² m:x".encode())
    r.publish("ep:cache-gen:changed", f"7 m:{SMALL}")  # a purge announced without the hash (no re-read)
    await until(lambda: generation(proxy) == "7")
    assert not [m for m in caplog.messages if "subscription" in m]


# --- an instance cut off from every store ---------------------------------------------------------------------


async def test_an_instance_cut_off_from_its_only_store_stops_serving_its_memory_tier(
    make_proxy: Any, upstream: Upstream, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One Redis for state and cache: b, cut off from it, cannot learn of a purge at all. After three refresh
    intervals without any store confirming the generations, it bypasses the cache (its in-process tier too)."""
    config = "[cache]\ngenerations_refresh_s = 0.2\n[redis]\nretry_interval_s = 0.2\n"
    fwd = Forwarder(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await fwd.start()
    try:
        a = await make_proxy(make_settings(upstream.base_url, redis_url, config, PROXY_ADMIN_KEY=ADMIN))
        b = await make_proxy(make_settings(upstream.base_url, fwd.url, config))
        key = await a.new_key()
        assert await x_cache(a, key, "cut off") == "miss"
        await settle(a)
        assert await x_cache(b, key, "cut off") == "hit"  # now in b's in-process tier as well

        await fwd.close()
        resp = await a.client.post("/admin/cache/purge", json={"model": SMALL}, headers=AS_ADMIN)
        assert resp.status == 200
        await until(lambda: b.app[CACHE].generations.loaded is False)
        assert await x_cache(b, key, "cut off") == "miss"  # bypassed: neither tier is read
        assert any(m.startswith("no store has confirmed the cache purge generations for 0.6s") for m in caplog.messages)

        await fwd.start()  # back: the purge is learnt, the cache used again
        await until(lambda: generation(b) == "1")
        assert b.app[CACHE].generations.loaded is True
    finally:
        await fwd.close()


# --- stats when a store fails ---------------------------------------------------------------------------------


async def test_stats_with_the_cache_store_down_name_it(
    make_proxy: Any, upstream: Upstream, redis_url: str, own_redis: RedisServer
) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN,
                                           CACHE_REDIS_URL=own_redis.url))
    assert (await proxy.client.get("/admin/cache", headers=AS_ADMIN)).status == 200
    own_redis.stop()
    resp = await proxy.client.get("/admin/cache", headers=AS_ADMIN)
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "service_unavailable"
    assert error["message"].startswith("The cache store (CACHE_REDIS_URL) is unreachable: ConnectionError: ")
    assert error["message"].endswith(". Please retry.")


def test_cli_stats_when_the_sentinels_no_longer_know_the_master_is_one_line(sentinel_set: SentinelSet) -> None:
    for s in sentinel_set.sentinels:
        s.client().execute_command("SENTINEL", "REMOVE", SENTINEL_MASTER)
    env = {**os.environ, "REDIS_URL": sentinel_set.url, "REDIS_TYPE": "sentinel"}
    env.pop("PROXY_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "proxy", "cache", "stats"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        "error: the key and quota store (REDIS_URL) is unreachable: TopologyError: no sentinel knows a master named "
        f"'{SENTINEL_MASTER}' (the first item of the sentinel URL)\n")


# --- what a purge request means -------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["team", "shared"])
async def test_an_empty_team_is_refused_never_every_team(
    make_proxy: Any, upstream: Upstream, redis_url: str, scope: str
) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, f'[cache]\nscope = "{scope}"\n',
                                           PROXY_ADMIN_KEY=ADMIN))
    resp = await proxy.client.post("/admin/cache/purge", json={"model": SMALL, "team": ""}, headers=AS_ADMIN)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "team" and error["type"] == "invalid_request_error"
    if scope == "team":
        assert error["message"].startswith("Invalid team name: team names are 1-63 characters")
    assert proxy.app[CACHE].generations.generations() == {}  # nothing was purged
    assert redis.Redis.from_url(redis_url).hgetall(GENS) == {}
    resp = await proxy.client.post("/admin/cache/purge", json={"model": SMALL, "team": None}, headers=AS_ADMIN)
    assert resp.status == 200 and (await resp.json())["team"] is None  # null, like no team: every team
    assert generation(proxy) == "1"
