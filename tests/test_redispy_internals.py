"""The redis-py internals the proxy's workarounds lean on, checked against the redis-py installed (issue 15).

Each workaround relies on something redis-py does not promise: a private attribute, a hook a subclass overrides, a
behaviour one release has and another lacks. A redis-py upgrade that changes one fails here, naming the workaround
and its file, instead of letting the workaround stop working without a sound. Each test checks the shape first
(the attribute or hook exists as the code uses it), then the behaviour against real servers.

Checked elsewhere against real servers: the pipeline error text `guard.failure` cuts (test_config_ranges.py) and
the cluster errors `topology._initialize` recognises (test_cluster.py, test_stores.py).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.maint_notifications import MaintNotificationsConfig

from proxy.config import RedisSettings
from proxy.stores.guard import Store, StoreUnavailable, connect
from tests.conftest import RedisServer
from tests.redis_servers import Cluster, SentinelSet

pytestmark = pytest.mark.redis
GUARD, TOPOLOGY = "proxy/stores/guard.py", "proxy/stores/topology.py"
MAINT = f"connect() turns maintenance notifications off so a pooled connection the server closed is replaced ({GUARD})"
REREAD = f"Store.call sets `client._initialize = True` after a failure on a cluster ({GUARD})"
SUBSCRIBER = f"NodeSubscriber.pubsub falls back on `nodes_manager.startup_nodes` ({TOPOLOGY})"
MASTER_POOL = f"_MasterPool overrides SentinelConnectionPool's get_master_address and ensure_connection ({TOPOLOGY})"


def changed(workaround: str, what: str) -> str:
    return f"{workaround}: redis-py {redis.__version__} changed {what}"


def is_coroutine_method(cls: type, name: str, params: list[str]) -> bool:
    method = getattr(cls, name, None)
    return inspect.iscoroutinefunction(method) and list(inspect.signature(method).parameters)[:len(params)] == params


# --- 1. guard.connect: MaintNotificationsConfig(enabled=False) --------------------------------------------------------

def test_connect_turns_maintenance_notifications_off_on_every_topology() -> None:
    assert "enabled" in inspect.signature(MaintNotificationsConfig).parameters, \
        changed(MAINT, "MaintNotificationsConfig: no `enabled` parameter")
    for url, type_ in [("redis://127.0.0.1:1/0", "single"), ("127.0.0.1:1", "cluster"), ("m,127.0.0.1:1", "sentinel")]:
        try:  # the option reaches each client class (and through Sentinel, its pool) without a TypeError
            client, _ = connect(RedisSettings(url=url, type=type_))  # type: ignore[arg-type]
        except TypeError as exc:
            raise AssertionError(changed(MAINT, f"the {type_} client's options: {exc}")) from exc
        if type_ == "cluster":
            assert client.maint_notifications_config.enabled is False, \
                changed(MAINT, "RedisCluster: maint_notifications_config is not the one given")
        else:
            pool = client.connection_pool
            assert callable(getattr(pool, "maint_notifications_enabled", None)), \
                changed(MAINT, f"{type(pool).__name__}: no maint_notifications_enabled()")
            assert not pool.maint_notifications_enabled(), \
                changed(MAINT, f"{type(pool).__name__}: maintenance notifications stay on")
    assert is_coroutine_method(ConnectionPool, "ensure_connection", ["self", "connection"]), \
        changed(MAINT, "ConnectionPool.ensure_connection (the check of a connection taken from the pool)")


async def test_a_pooled_connection_the_server_closed_is_replaced_and_its_command_runs_once(
        own_redis: RedisServer) -> None:
    """redis-py 8.1 with maintenance notifications on (its default) sent the command on the dead connection."""
    settings = RedisSettings(url=own_redis.url, socket_timeout_s=2.0, retry_interval_s=30.0)
    store = Store(connect(settings)[0], settings)
    depth = 8
    try:
        async def burst() -> list[Any]:  # concurrent calls: one pooled connection each
            return await asyncio.gather(*(store.call("incr", lambda r: r.incr("n")) for _ in range(depth)),
                                        return_exceptions=True)

        assert sorted(await burst()) == list(range(1, depth + 1))
        admin = own_redis.client()
        assert admin.client_kill_filter(_type="normal", skipme=True) == depth
        for _ in range(100):  # Redis closes a killed client's socket after its reply to CLIENT KILL: wait for it
            if len(admin.client_list(_type="normal")) == 1:  # `admin` alone
                break
            await asyncio.sleep(0.02)
        assert len(admin.client_list(_type="normal")) == 1  # every pooled connection is now closed by the server
        await asyncio.sleep(0.1)  # and this process has read their end, as it has long before they are next used
        after = await burst()
        assert not any(isinstance(r, BaseException) for r in after), changed(MAINT, f"a dead pooled connection was "
                                                                                    f"used, not replaced: {after}")
        assert sorted(after) == list(range(depth + 1, 2 * depth + 1))
        assert admin.get("n") == str(2 * depth).encode()  # each INCR ran once
    finally:
        await store.close()


# --- 2. guard.Store.call: client._initialize = True on a cluster ------------------------------------------------------

def slot_map_reads(cluster: Cluster) -> int:
    """CLUSTER SLOTS and CLUSTER SHARDS run on every node of the cluster so far."""
    total = 0
    for node in cluster.nodes:
        stats = node.client().info("commandstats")
        total += sum(int(stats.get(f"cmdstat_cluster|{c}", {}).get("calls", 0)) for c in ("slots", "shards"))
    return total


async def test_after_a_failed_call_the_cluster_client_rereads_the_slot_map_before_its_next_pipeline(
        cluster: Cluster) -> None:
    """redis-py asks for the re-read itself after a connection error in a single command (and, since 8.2, in a
    pipeline), not after a call the proxy's own time limit cut short: a frozen master promoted away was never found."""
    settings = RedisSettings(url=cluster.seeds, type="cluster", socket_timeout_s=2.0, retry_interval_s=0.0)
    store = Store(connect(settings)[0], settings)
    client = store.client
    assert "_initialize" in getattr(RedisCluster, "__slots__", ()) or hasattr(client, "_initialize"), \
        changed(REREAD, "RedisCluster: no `_initialize` attribute")

    async def piped(r: Any) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        pipe.set("ep:internals", b"v")
        pipe.get("ep:internals")
        return list(await pipe.execute())

    try:
        assert client._initialize is True, changed(REREAD, "`_initialize` of a client not yet initialized")
        assert await store.call("piped", piped) == [True, b"v"]
        assert client._initialize is False, changed(REREAD, "`_initialize` no longer clears once the slot map is read")
        before = slot_map_reads(cluster)
        node = client.get_node_from_key("ep:internals")
        with redis.Redis(port=node.port) as paused:
            paused.client_pause(300)  # the pipeline's node answers nothing for 0.3 s: the call times out
            with pytest.raises(StoreUnavailable):
                await store.call("piped", piped, timeout_s=0.05)
        await asyncio.sleep(0.3)
        for _ in range(50):  # redis-py 8.2 runs a requested re-read at most once a second (and then at once)
            assert await store.call("piped", piped) == [True, b"v"]
            if slot_map_reads(cluster) > before:
                break
            await asyncio.sleep(0.1)
        assert slot_map_reads(cluster) > before, changed(REREAD, "when `_initialize = True` makes it read the slot "
                                                                 "map again (no pipeline since read it)")
    finally:
        await store.close()


# --- 3. topology.NodeSubscriber: nodes_manager.startup_nodes ----------------------------------------------------------

async def test_the_node_subscriber_of_a_cluster_client_not_yet_initialized_uses_its_seed_nodes(
        cluster: Cluster) -> None:
    settings = RedisSettings(url=cluster.seeds, type="cluster", socket_timeout_s=5.0)
    store = Store(connect(settings)[0], settings)
    try:
        seeds = getattr(getattr(store.client, "nodes_manager", None), "startup_nodes", None)
        assert isinstance(seeds, dict) and seeds, changed(SUBSCRIBER, "RedisCluster.nodes_manager.startup_nodes "
                                                                      "(a dict of the seed nodes)")
        assert all(isinstance(n, ClusterNode) and n.name == f"{n.host}:{n.port}" for n in seeds.values()), \
            changed(SUBSCRIBER, f"the seed nodes: {seeds}")
        assert store.client.get_nodes() == []  # before the slot map is read: hence the fallback
        async with store.subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:  # the first call in a process
            await pubsub.subscribe("ep:internals")
            assert pubsub.connection_pool.connection_kwargs["port"] in {n.port for n in cluster.nodes[:2]}
            with redis.Redis(port=cluster.nodes[3].port) as other:  # PUBLISH on any node reaches every node
                other.publish("ep:internals", b"hello")
            message = None
            for _ in range(10):
                message = message or await pubsub.get_message(timeout=1)
            assert message is not None and message["data"] == b"hello"
    finally:
        await store.close()


# --- 4. topology._MasterPool and _SentinelMaster: redis-py's Sentinel pool hooks --------------------------------------

def test_the_sentinel_pool_hooks_the_master_pool_overrides_are_there() -> None:
    for cls, name, params in [(SentinelConnectionPool, "get_master_address", ["self"]),
                              (SentinelConnectionPool, "ensure_connection", ["self", "connection"]),
                              (SentinelConnectionPool, "disconnect", ["self", "inuse_connections"]),
                              (Sentinel, "discover_master", ["self", "service_name"]),
                              (Sentinel, "discover_slaves", ["self", "service_name"]),
                              (aioredis.Redis, "aclose", ["self", "close_connection_pool"])]:
        assert is_coroutine_method(cls, name, params), \
            changed(MASTER_POOL, f"{cls.__name__}.{name} (a coroutine taking {', '.join(params)})")
    assert {"redis_class", "connection_pool_class"} <= set(inspect.signature(Sentinel.master_for).parameters), \
        changed(MASTER_POOL, "Sentinel.master_for: no redis_class / connection_pool_class")
    client, _ = connect(RedisSettings(url="m,127.0.0.1:1", type="sentinel"))
    pool = client.connection_pool
    for attr in ("master_address", "service_name", "is_master"):
        assert hasattr(pool, attr), changed(MASTER_POOL, f"SentinelConnectionPool: no `{attr}`")
    assert isinstance(client.sentinel_manager.sentinels, list), changed(MASTER_POOL, "Sentinel.sentinels (a list)")


async def test_the_master_pool_hooks_run_on_a_real_sentinel_set(sentinel_set: SentinelSet) -> None:
    settings = RedisSettings(url=sentinel_set.url, type="sentinel", socket_timeout_s=2.0)
    client, _ = connect(settings)
    pool = client.connection_pool
    manager = client.sentinel_manager
    asked = 0
    discover = manager.discover_master

    async def counted(name: str) -> Any:
        nonlocal asked
        asked += 1
        return await discover(name)

    manager.discover_master = counted
    try:
        # get_master_address: each new connection asks its pool, and the pool asks the sentinels once for a burst
        assert await asyncio.gather(*(client.ping() for _ in range(10))) == [True] * 10
        assert asked == 1, changed(MASTER_POOL, f"who asks the sentinels: {asked} queries for one burst, not 1")
        # ensure_connection: a pooled connection to another server than the master named is not used
        first = await client.client_id()
        pool.master_address = ("127.0.0.1", sentinel_set.replica.port)
        assert await client.client_id() != first, \
            changed(MASTER_POOL, "the check of a connection taken from the pool (ensure_connection not called)")
        assert pool.master_address == ("127.0.0.1", sentinel_set.master.port)  # asked again: the master
    finally:
        await client.aclose()
