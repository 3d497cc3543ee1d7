"""Failover without a restart: a Sentinel master switch and a Cluster replica promotion, under load. During the switch
the proxy degrades as when Redis is down (no client request fails); soon after, the cache and key creation work."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Upstream, make_settings, settle
from tests.failover import Load, cache_works_again, eventually, keys_can_be_created
from tests.redis_servers import Cluster, SentinelSet

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
# Quick to give up on a dead master and quick to try again; the team has a quota, so every request is charged.
CONFIG = """
[redis]
socket_timeout_s = 0.5
retry_interval_s = 0.3
[cache]
local_max_mb = 0
[teams.search]
tpm = 100000000
"""


async def test_sentinel_master_killed_under_load(sentinel_set: SentinelSet, make_proxy: Any,
                                                 upstream: Upstream) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, sentinel_set.url, CONFIG, REDIS_TYPE="sentinel"))
    key = await proxy.new_key("search")
    assert (await proxy.embed(key, {"model": MODEL, "input": ["warm"]})).status == 200
    await settle(proxy)
    old = sentinel_set.master.port
    load = Load(proxy, key)
    try:
        await asyncio.sleep(0.3)
        sentinel_set.master.kill()

        async def promoted() -> bool:
            return await asyncio.to_thread(sentinel_set.current_master_port) != old

        await eventually(promoted, 30, "a sentinel names the replica as master")
        assert sentinel_set.current_master_port() == sentinel_set.replica.port
        took = await eventually(lambda: cache_works_again(proxy, key, "sentinel"), 10,
                                "cache read and written on the new master")
        await eventually(lambda: keys_can_be_created(proxy), 10, "a key created on the new master")
        await asyncio.sleep(0.3)
    finally:
        await load.stop()
    print(f"cache back {took:.2f}s after the promotion was visible")
    assert load.errors == [] and set(load.statuses) == {200}
    assert len(load.statuses) > 40


def test_check_config_names_an_unknown_sentinel_master(sentinel_set: SentinelSet) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_CONFIG", "REDIS_URL")}

    def check(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy", "check-config"], capture_output=True, text=True,
                              env={**env, "REDIS_URL": url, "REDIS_TYPE": "sentinel"}, timeout=60)

    ok = check(sentinel_set.url)
    assert ok.returncode == 0 and "store: redis (sentinel)" in ok.stdout, ok.stderr
    unknown = check(sentinel_set.url.replace("ep-master", "no-such-master"))
    assert unknown.returncode == 1
    assert unknown.stderr == ("error: no sentinel knows a master named 'no-such-master' (the first item of the "
                              "sentinel URL)\n")


async def test_cluster_master_killed_under_load(own_cluster: Cluster, make_proxy: Any, upstream: Upstream) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, own_cluster.seeds, CONFIG, REDIS_TYPE="cluster"))
    key = await proxy.new_key("search")
    assert (await proxy.embed(key, {"model": MODEL, "input": ["warm"]})).status == 200
    await settle(proxy)
    victim = next(m for m in own_cluster.masters() if m not in own_cluster.nodes[:2])  # keep the seeds alive
    replica = own_cluster.replica_of(victim)
    load = Load(proxy, key)
    try:
        await asyncio.sleep(0.3)
        victim.kill()

        async def promoted() -> bool:
            return await asyncio.to_thread(lambda: replica.client().execute_command("ROLE")[0] == b"master")

        await eventually(promoted, 30, "the replica promoted")
        took = await eventually(lambda: cache_works_again(proxy, key, "cluster"), 10,
                                "cache read and written on every master")
        await eventually(lambda: keys_can_be_created(proxy), 10, "a key created")
        await asyncio.sleep(0.3)
    finally:
        await load.stop()
    print(f"cache back {took:.2f}s after the promotion was visible")
    assert load.errors == [] and set(load.statuses) == {200}
    assert len(load.statuses) > 40
