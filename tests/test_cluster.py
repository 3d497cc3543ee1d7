"""The proxy on a 3-master Redis Cluster (REDIS_TYPE=cluster): the embeddings path, keys, quotas, the ledger, key-change
notifications and the CLI, with the cache spread over every master."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.accounts.keys import KeyStore
from proxy.config import RedisSettings
from proxy.http.app import CACHE_STORE, LEDGER
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import UPSTREAM_KEY, Upstream, free_port, make_settings, settle
from tests.helpers import assert_same_vectors, count_store_calls, direct, vectors
from tests.redis_servers import Cluster
from tests.test_quota_processes import start_proxy, wait_ready

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": cluster.seeds, "REDIS_TYPE": "cluster"}
    env.pop("PROXY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_embeddings_quota_ledger_and_revocation_on_a_cluster(
    make_proxy: Any, upstream: Upstream, cluster: Cluster
) -> None:
    config = "[teams.search]\ntpm = 100000\n[cache]\nlocal_max_mb = 0\n[keys]\ncache_s = 60.0\n"
    proxy = await make_proxy(make_settings(upstream.base_url, cluster.seeds, config, REDIS_TYPE="cluster"))
    key = await proxy.new_key("search")  # one node's client would have answered MovedError
    inputs = [f"cluster input {i}" for i in range(60)]
    body = {"model": MODEL, "input": inputs}
    resp = await proxy.embed(key, body)
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-cache"] == "miss"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(100000 - (await resp.json())["usage"]["total_tokens"])
    await settle(proxy)
    per_master = [len(m.client().keys("ep:emb:*")) for m in cluster.masters()]
    assert sum(per_master) == 60 and min(per_master) > 0, per_master  # spread over every master

    upstream.state.reset()
    calls = count_store_calls(proxy.app[CACHE_STORE])
    resp = await proxy.embed(key, body)
    assert resp.status == 200 and resp.headers["x-cache"] == "hit"
    assert upstream.state.inputs == 0
    assert calls.count("mget") == 1  # the whole batch in one pipeline: one round trip per node, in parallel
    assert_same_vectors(vectors(await resp.json()), vectors(await direct(upstream.base_url, body)))
    upstream.state.reset()
    resp = await proxy.embed(key, {"model": MODEL, "input": [*inputs[:30], "new one", "new two"]})
    assert resp.headers["x-cache"] == "partial" and upstream.state.inputs == 2

    await proxy.app[LEDGER].flush()
    today = datetime.datetime.now(datetime.UTC).date()
    rows = await proxy.app[LEDGER].report("search", today, today, None, {})
    assert [r["requests"] for r in rows] == [3]
    assert rows[0]["cached_tokens"] > 0 and rows[0]["upstream_tokens"] > 0

    # revoked through another connection: only the published change can refuse it before cache_s (60 s)
    settings = RedisSettings(url=cluster.seeds, type="cluster", socket_timeout_s=5)
    other = Store(connect(settings)[0], settings)
    try:
        record = (await KeyStore(other, RedisKeys("ep")).list("search"))[0]
        assert (await KeyStore(other, RedisKeys("ep")).revoke(record.id)) is not None
    finally:
        await other.close()
    for _ in range(200):  # 10 s at most
        status = (await proxy.embed(key, body)).status
        if status != 200:
            break
        await asyncio.sleep(0.05)
    assert status == 401


def test_cli_keys_usage_and_check_config_on_a_cluster(cluster: Cluster) -> None:
    created = cli(cluster, "keys", "create", "--team", "ops", "--json")
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["id"]
    rotated = cli(cluster, "keys", "rotate", key_id, "--grace", "1h", "--json")  # a claim of one record, no MULTI
    assert rotated.returncode == 0, rotated.stderr
    new_id = json.loads(rotated.stdout)["id"]
    revoked = cli(cluster, "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    listed = cli(cluster, "keys", "list", "--json")
    assert {r["id"]: r["revoked"] for r in json.loads(listed.stdout)} == {key_id: True, new_id: False}
    assert cli(cluster, "teams", "set", "ops", "--rpm", "5").returncode == 0
    teams = cli(cluster, "teams", "list", "--json")
    assert json.loads(teams.stdout) == [{"team": "ops", "source": "runtime", "limits": {
        "rpm": 5, "tpm": None, "tokens_per_day": None, "tokens_per_month": None}}]
    usage = cli(cluster, "usage", "--format", "json")
    assert usage.returncode == 0 and json.loads(usage.stdout) == []
    checked = cli(cluster, "check-config")
    assert checked.returncode == 0, checked.stderr
    assert "store: redis (cluster)" in checked.stdout
    # the test cluster keeps nothing on disk and shares its memory with the cache: both are said, per master
    assert checked.stderr.count("neither AOF (appendonly) nor RDB snapshots") == 3, checked.stderr
    assert checked.stderr.count("once its memory is full the cache stops admitting entries") == 3


def test_a_cluster_with_uncovered_slots_is_refused_in_one_line(tmp_path: Path) -> None:
    from tests.conftest import _redis_binaries
    from tests.redis_servers import Server, cluster_port

    lone = Server(_redis_binaries()[0], cluster_port(), ["--cluster-enabled", "yes", "--cluster-config-file",
                                                           "nodes.conf"])
    lone.start()
    try:
        env = {**os.environ, "REDIS_URL": lone.addr, "REDIS_TYPE": "cluster"}
        env.pop("PROXY_CONFIG", None)
        for args in (["check-config"], ["serve", "--port", str(free_port()), "--workers", "1"]):
            done = subprocess.run([sys.executable, "-m", "proxy", *args], env=env, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 1, done.stderr
            assert done.stderr.startswith("error: the Redis cluster does not cover every hash slot"), done.stderr
            assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert lone.client().dbsize() == 0  # nothing written
    finally:
        lone.remove()


async def test_team_quota_exact_across_two_processes_on_a_cluster(
    tmp_path: Path, upstream: Upstream, cluster: Cluster
) -> None:
    tpm = 400
    config = tmp_path / "proxy.toml"
    config.write_text(f"[redis]\nsocket_timeout_s = 5.0\n[teams.burst]\ntpm = {tpm}\n")
    env = {**os.environ, "PROXY_CONFIG": str(config), "REDIS_URL": cluster.seeds, "REDIS_TYPE": "cluster",
           "UPSTREAM_BASE_URL": upstream.base_url, "UPSTREAM_API_KEY": UPSTREAM_KEY}
    ports = [free_port(), free_port()]
    procs = [start_proxy(port, env, tmp_path / f"proxy-{port}.log") for port in ports]
    try:
        settings = RedisSettings(url=cluster.seeds, type="cluster", socket_timeout_s=5)
        store = Store(connect(settings)[0], settings)
        key, _ = await KeyStore(store, RedisKeys("ep")).create("burst")
        await store.close()
        if time.time() % 60 > 45:  # one UTC minute for the whole burst
            await asyncio.sleep(60 - time.time() % 60 + 0.1)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            bases = [f"http://127.0.0.1:{port}" for port in ports]
            for base in bases:
                await wait_ready(session, base)

            async def one(i: int) -> tuple[int, int]:
                ids = [5000 + i * 20 + j for j in range(7)]  # 7 distinct tokens: every admitted one is a miss
                async with session.post(bases[i % 2] + "/v1/embeddings",
                                        json={"model": MODEL, "input": ids},
                                        headers={"Authorization": f"Bearer {key}"}) as resp:
                    body = await resp.json()
                    return resp.status, body["usage"]["prompt_tokens"] if resp.status == 200 else 0

            results = await asyncio.gather(*(one(i) for i in range(120)))  # 840 tokens asked of 400
        assert {s for s, _ in results} == {200, 429}
        admitted = sum(n for _, n in results)
        assert admitted == tpm - tpm % 7  # 57 requests of 7 fit; no other request could
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


async def test_key_changes_are_subscribed_on_one_node_then_the_next(cluster: Cluster) -> None:
    settings = RedisSettings(url=cluster.seeds, type="cluster", socket_timeout_s=5)
    store = Store(connect(settings)[0], settings)
    try:
        await store.client.initialize()
        nodes = []
        for _ in range(6):
            pubsub = store.subscriber.pubsub()
            kw = pubsub.connection_pool.connection_kwargs
            nodes.append(kw["port"])
            await pubsub.aclose()
        # every node the client knows (the masters, and replicas it has seen) in turn: a resubscription after a
        # failure moves on
        assert {n.port for n in cluster.masters()} <= set(nodes) <= {n.port for n in cluster.nodes}
        # any node hears a PUBLISH made through another
        async with store.subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe("ep:keys:changed")
            await store.client.publish("ep:keys:changed", b"digest")
            message = await pubsub.get_message(timeout=5)
            while message is None:
                message = await pubsub.get_message(timeout=5)
            assert message["data"] == b"digest"
    finally:
        await store.close()


async def test_operator_work_is_not_failed_by_a_seed_node_whose_host_is_gone(cluster: Cluster) -> None:
    """A seed (or, after a failover, a known node) whose host is gone drops SYNs rather than refusing them. A topology
    refresh asks the nodes one after another, in a random order: with the connect limit at operator_timeout_s, the
    dead node, asked first, took an operator call's whole limit and the call failed although the next node would
    have answered at once (before: 2 of 4 orders here). Each node now gets a share of it."""
    import random

    from tests.forwarder import Forwarder

    dead = Forwarder(cluster.nodes[0].port, accept_after_s=60.0)  # SYNs dropped for the whole test
    await dead.start()
    failed = 0
    try:
        for seed in range(4):
            random.seed(seed)  # the order the refresh asks the seeds in
            settings = RedisSettings(type="cluster", url=f"127.0.0.1:{dead.port},{cluster.nodes[1].addr}",
                                     socket_timeout_s=0.25, operator_timeout_s=2.0)
            store = Store(connect(settings)[0], settings)
            try:
                await store.operator_call("key-create", lambda r: r.set("op:dead-seed", b"1"))
            except Exception:
                failed += 1
            finally:
                await store.close()
    finally:
        await dead.close()
    assert failed == 0
