"""Two stores: the state store (keys, limits, quotas, ledger) must not evict; the cache store (CACHE_REDIS_URL) may.
Start-up checks of the eviction policy and persistence; each store degrades on its own."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.config import Settings
from proxy.http.app import LEDGER
from proxy.stores.checks import Finding, check_stores
from tests.conftest import Upstream, _redis_binary, free_port, make_settings, settle
from tests.redis_servers import Server

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def url(server: Server) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts with its own flags; removed at the end."""
    made: list[Server] = []
    yield made
    for s in made:
        s.remove()


def start(servers: list[Server], *args: str) -> Server:
    server = Server(_redis_binary(), free_port(), args)
    servers.append(server)
    server.start()
    return server


def proxy_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "REDIS_URL", "CACHE_REDIS_URL")}
    return subprocess.run([sys.executable, "-m", "proxy", *args], env={**full, **env}, capture_output=True,
                          text=True, timeout=60)


async def test_a_flood_evicts_old_cache_entries_only(
    servers: list[Server], make_proxy: Any, upstream: Upstream
) -> None:
    state = start(servers, "--maxmemory-policy", "noeviction", "--appendonly", "yes")
    cache = start(servers, "--maxmemory", "40mb", "--maxmemory-policy", "allkeys-lru")
    config = "[cache]\nlocal_max_mb = 0\n[teams.search]\ntpm = 10000000\n"
    settings = make_settings(upstream.base_url, url(state), config, CACHE_REDIS_URL=url(cache))
    proxy = await make_proxy(settings)
    key = await proxy.new_key("search")
    other = await proxy.new_key("search")  # never used until after the flood

    # 40 MB holds about 5,500 entries of 1536 floats: 9,000 new inputs must evict
    for n in range(18):
        batch = [f"flood {n} {i}" for i in range(500)]
        resp = await proxy.embed(key, {"model": MODEL, "input": batch, "encoding_format": "base64"})
        assert resp.status == 200, await resp.text()
        await resp.read()
        await settle(proxy)
    stats = cache.client().info("stats")
    assert stats["evicted_keys"] > 0
    assert cache.client().dbsize() < 9000

    upstream.state.reset()
    recent = {"model": MODEL, "input": ["flood 17 499", "flood 17 250"]}
    resp = await proxy.embed(key, recent)
    assert resp.status == 200 and resp.headers["x-cache"] == "hit"  # the cache keeps caching
    assert upstream.state.inputs == 0
    assert (await proxy.embed(other, recent)).status == 200  # keys live in the state store, never evicted

    await proxy.app[LEDGER].flush()
    today = datetime.datetime.now(datetime.UTC).date()
    assert [r["requests"] for r in await proxy.app[LEDGER].report("search", today, today, None, {})] == [20]
    s = state.client()
    assert s.info("stats")["evicted_keys"] == 0
    assert s.keys("ep:emb:*") == []  # no cache entry in the state store
    assert len(s.keys("ep:key:*")) == 2
    assert s.exists("ep:meta:cache-secret") == 1 and cache.client().exists("ep:meta:cache-secret") == 0


async def test_each_store_degrades_alone(servers: list[Server], make_proxy: Any, upstream: Upstream) -> None:
    state = start(servers)
    cache = start(servers)
    config = "[cache]\nlocal_max_mb = 0\n[redis]\nsocket_timeout_s = 0.2\nretry_interval_s = 0.3\n" \
             "[cache_redis]\nsocket_timeout_s = 0.2\nretry_interval_s = 0.3\n"
    proxy = await make_proxy(make_settings(upstream.base_url, url(state), config, CACHE_REDIS_URL=url(cache)))
    key = await proxy.new_key("search")
    fresh = await proxy.new_key("search")
    body = {"model": MODEL, "input": ["kept"]}
    assert (await proxy.embed(key, body)).headers["x-cache"] == "miss"
    await settle(proxy)

    # the cache store hangs: the cache is bypassed, but a key never verified here is still checked in the state store
    assert cache.proc is not None
    os.kill(cache.proc.pid, signal.SIGSTOP)
    try:
        resp = await proxy.embed(fresh, body)
        assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    finally:
        os.kill(cache.proc.pid, signal.SIGCONT)
    await asyncio.sleep(0.4)  # the cache store's retry interval

    # the state store hangs: a verified key works on its grace, and the cache is still read
    assert state.proc is not None
    os.kill(state.proc.pid, signal.SIGSTOP)
    try:
        upstream.state.reset()
        resp = await proxy.embed(key, body)
        assert resp.status == 200 and resp.headers["x-cache"] == "hit"
        assert upstream.state.inputs == 0
    finally:
        os.kill(state.proc.pid, signal.SIGCONT)


def messages(findings: list[Finding]) -> list[tuple[bool, str]]:
    return [(f.error, f.message) for f in findings]


def settings_for(server: Server, config: str = "", **env: str) -> Settings:
    return make_settings("http://127.0.0.1:9/v1", url(server), config, **env)


def test_serve_refuses_an_evicting_state_store(servers: list[Server]) -> None:
    state = start(servers, "--maxmemory-policy", "allkeys-lru")
    done = proxy_cli({"REDIS_URL": url(state)}, "serve", "--port", str(free_port()), "--workers", "1")
    assert done.returncode == 1
    line = ("error: the state store REDIS_URL has maxmemory-policy allkeys-lru: Redis may evict gateway keys, team "
            "limits, quota counters and the usage ledger. Set maxmemory-policy noeviction on it and give the cache a "
            "store of its own that may evict (CACHE_REDIS_URL), or set redis.allow_evicting_state = true to accept "
            "the risk\n")
    assert done.stderr.endswith(line), done.stderr  # after the warnings (here: no persistence)
    assert "Traceback" not in done.stderr
    assert state.client().dbsize() == 0  # nothing written
    checked = proxy_cli({"REDIS_URL": url(state)}, "check-config")
    assert checked.returncode == 1 and checked.stderr.endswith(line) and checked.stdout == ""


async def test_policy_read_from_info_where_config_is_disabled(servers: list[Server]) -> None:
    state = start(servers, "--maxmemory-policy", "volatile-lru", "--rename-command", "CONFIG", "")
    findings = await check_stores(settings_for(state))
    assert findings[0].error and findings[0].message.startswith(
        "the state store REDIS_URL has maxmemory-policy volatile-lru: Redis may evict")
    accepted = await check_stores(settings_for(state, "[redis]\nallow_evicting_state = true\n"))
    assert [f.error for f in accepted] == [False]  # the same message, as a warning; persistence unknown via INFO


async def test_unreadable_policy_is_a_warning(servers: list[Server]) -> None:
    state = start(servers, "--rename-command", "CONFIG", "", "--rename-command", "INFO", "")
    assert messages(await check_stores(settings_for(state))) == [(False, (
        "could not read maxmemory-policy of the state store REDIS_URL (CONFIG and INFO refused): make sure it is "
        "noeviction, or keys, limits and the ledger may be evicted"))]


async def test_shared_store_and_persistence_warnings(servers: list[Server]) -> None:
    bare = start(servers)  # noeviction, no AOF, no RDB
    assert messages(await check_stores(settings_for(bare))) == [
        (False, "the cache shares the state store REDIS_URL, whose maxmemory-policy is noeviction: once its memory is "
                "full the cache stops admitting entries; give the cache its own store with allkeys-lru "
                "(CACHE_REDIS_URL)"),
        (False, "the state store REDIS_URL has neither AOF (appendonly) nor RDB snapshots (save): a restart of it "
                "loses every key, limit and the usage ledger; set appendonly yes"),
    ]
    durable = start(servers, "--appendonly", "yes")
    cache = start(servers, "--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru")
    assert await check_stores(settings_for(durable, CACHE_REDIS_URL=url(cache))) == []
    unreachable = await check_stores(settings_for(durable, CACHE_REDIS_URL=f"redis://127.0.0.1:{free_port()}"))
    assert [(f.error, f.message.split(" (")[0]) for f in unreachable] == [(False, "the cache store")]


def test_malformed_or_unknown_topologies_fail_check_config_in_one_line() -> None:
    for env, line in [
        ({"REDIS_URL": "127.0.0.1:6379"}, "error: REDIS_URL must be a redis:// or rediss:// URL for a single Redis"),
        ({"REDIS_URL": "127.0.0.1:7000", "REDIS_TYPE": "sentinel"},
         "error: REDIS_URL for sentinel is MASTER_NAME,host:port,host:port,..."),
        ({"REDIS_URL": "redis://127.0.0.1:6379", "CACHE_REDIS_URL": "a:1,b", "CACHE_REDIS_TYPE": "cluster"},
         "error: CACHE_REDIS_URL (cluster seed nodes): 'b' is not host:port"),
    ]:
        done = proxy_cli(env, "check-config")
        assert done.returncode == 1, done.stderr
        errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(line), done.stderr
        assert "Traceback" not in done.stderr


async def test_a_cache_store_url_naming_the_state_store_is_checked_as_the_shared_store(servers: list[Server]) -> None:
    """CACHE_REDIS_URL equal to REDIS_URL made two stores of one Redis: its noeviction was reported as the cache
    store's, not as one shared store that stops admitting entries when full."""
    durable = start(servers, "--appendonly", "yes")
    same = settings_for(durable, CACHE_REDIS_URL=f"redis://127.0.0.1:{durable.port}")
    assert same.cache_redis.url == ""
    assert messages(await check_stores(same)) == [
        (False, "the cache shares the state store REDIS_URL, whose maxmemory-policy is noeviction: once its memory is "
                "full the cache stops admitting entries; give the cache its own store with allkeys-lru "
                "(CACHE_REDIS_URL)")]


async def test_a_store_that_does_not_answer_is_said_in_words(servers: list[Server]) -> None:
    """A stopped (hung) state store was reported "unreachable at start-up (CancelledError: CancelledError)"."""
    hung = start(servers, "--appendonly", "yes")
    assert hung.proc is not None
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        found = await check_stores(settings_for(hung, "[redis]\noperator_timeout_s = 0.2\n"))
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    assert messages(found) == [(False, "the state store (REDIS_URL) is unreachable at start-up (no answer within "
                                       "1.4s); starting anyway: requests degrade until it answers, and its settings "
                                       "were not checked")]


async def test_tls_against_a_server_without_tls_is_one_warning_that_says_tls(servers: list[Server]) -> None:
    plain = start(servers, "--appendonly", "yes")
    config = "[redis]\nsocket_timeout_s = 0.2\noperator_timeout_s = 0.5\n"
    upstream = "http://127.0.0.1:9/v1"
    for settings in (make_settings(upstream, f"rediss://127.0.0.1:{plain.port}", config),
                     make_settings(upstream, plain.addr, config, REDIS_TYPE="cluster", REDIS_TLS="true")):
        found = await check_stores(settings)
        assert [f.error for f in found] == [False]
        assert found[0].message.startswith("the state store (REDIS_URL) is unreachable at start-up (")
        assert "TLS is on (REDIS_TLS or rediss://): is the server serving TLS?" in found[0].message


async def test_replicas_maxmemory_policy_is_checked_too(cluster: Any, sentinel_set: Any) -> None:
    """A replica becomes the state store at the next failover: its policy was never read, so an evicting replica
    passed the check and evicted keys once promoted."""
    replica = cluster.replica_of(cluster.masters()[0])
    replica.client().config_set("maxmemory-policy", "allkeys-lru")
    try:
        found = await check_stores(make_settings("http://127.0.0.1:9/v1", cluster.seeds, REDIS_TYPE="cluster"))
    finally:
        replica.client().config_set("maxmemory-policy", "noeviction")
    assert [f.message for f in found if f.error] == [evicting(f"REDIS_URL (replica {replica.addr})", "allkeys-lru")]
    sentinel_set.replica.client().config_set("maxmemory-policy", "volatile-lru")
    found = await check_stores(make_settings("http://127.0.0.1:9/v1", sentinel_set.url, REDIS_TYPE="sentinel"))
    assert [f.message for f in found if f.error] == [
        evicting(f"REDIS_URL (replica {sentinel_set.replica.addr})", "volatile-lru")]


def evicting(where: str, policy: str) -> str:
    return (f"the state store {where} has maxmemory-policy {policy}: Redis may evict gateway keys, team limits, quota "
            "counters and the usage ledger. Set maxmemory-policy noeviction on it and give the cache a store of its "
            "own that may evict (CACHE_REDIS_URL), or set redis.allow_evicting_state = true to accept the risk")


def test_cache_stats_against_a_redis_without_cluster_mode_is_one_line(servers: list[Server]) -> None:
    """`cache stats` asks every master, which initializes the cluster client: the one error a topology can raise
    there (no cluster mode, uncovered slots) left the CLI as a traceback."""
    plain = start(servers)
    for env, var in [({"REDIS_URL": plain.addr, "REDIS_TYPE": "cluster"}, "REDIS_URL"),
                     ({"REDIS_URL": url(plain), "CACHE_REDIS_URL": plain.addr, "CACHE_REDIS_TYPE": "cluster"},
                      "CACHE_REDIS_URL")]:
        done = proxy_cli(env, "cache", "stats")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("error: ") and (
            f"TopologyError: {var} names a Redis without cluster mode" in done.stderr), done.stderr
        assert len(done.stderr.splitlines()) == 1
