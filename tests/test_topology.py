"""Redis settings per topology (no server): URL forms, environment variables, secrets, and the hash slots that keep
every Lua script's keys together on a cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from proxy.config import ConfigError, RedisSettings, parse
from proxy.stores.guard import StoreUnavailable
from proxy.stores.rediskeys import RedisKeys
from proxy.stores.topology import (
    Endpoint,
    MasterUncertain,
    TopologyError,
    build_client,
    confirm_master,
    describe,
    parse_endpoint,
)


def endpoint(url: str, type_: str) -> Endpoint:
    return parse_endpoint(RedisSettings(url=url, type=type_))  # type: ignore[arg-type]


def test_url_forms_per_type() -> None:
    assert endpoint("rediss://u:p@h:6380/2", "single") == Endpoint("single", url="rediss://u:p@h:6380/2")
    assert endpoint("10.0.0.1:7000, 10.0.0.2:7001", "cluster") == Endpoint(
        "cluster", nodes=(("10.0.0.1", 7000), ("10.0.0.2", 7001)))
    assert endpoint("redis://h:7000", "cluster") == Endpoint("cluster", url="redis://h:7000")
    assert endpoint("[::1]:7000", "cluster") == Endpoint("cluster", nodes=(("::1", 7000),))
    assert endpoint("mymaster,s1:26379,s2:26379", "sentinel") == Endpoint(
        "sentinel", nodes=(("s1", 26379), ("s2", 26379)), master="mymaster")


@pytest.mark.parametrize(("url", "type_", "message"), [
    ("h:6379", "single", "REDIS_URL must be a redis:// or rediss:// URL for a single Redis (type single), not "
                         "'h:6379'; a cluster or sentinel set needs REDIS_TYPE"),
    ("h:7000,redis://h:7001", "cluster", "REDIS_URL for a cluster is host:port,host:port,... (seed nodes) or one "
                                         "node's redis:// URL, not 'h:7000,redis://h:7001'"),
    ("h:70000", "cluster", "REDIS_URL (cluster seed nodes): 'h:70000' is not host:port"),
    ("h1:26379,h2:26379", "sentinel", "REDIS_URL for sentinel is MASTER_NAME,host:port,host:port,... (the master's "
                                      "name, then the sentinels), not 'h1:26379,h2:26379'"),
    ("mymaster", "sentinel", "REDIS_URL for sentinel is MASTER_NAME,host:port,host:port,... (the master's name, "
                             "then the sentinels), not 'mymaster'"),
    ("mymaster,s1", "sentinel", "REDIS_URL (sentinels): 's1' is not host:port"),
    ("redis://user:secret@h:1,x", "single", "REDIS_URL must be a redis:// or rediss:// URL for a single Redis "
                                            "(type single), not 'redis://***@h:1,x'"),
    ("redis://h:port", "single", "REDIS_URL must be a redis:// or rediss:// URL for a single Redis (type single), "
                                 "not 'redis://h:port'"),
    # a sentinel given as a URL parsed as the host 'redis://s1' (it never connects)
    ("m,redis://s1:26379", "sentinel", "REDIS_URL (sentinels): 'redis://s1:26379' is not host:port"),
    ("m,s1:26379,u:pw@s2:26379", "sentinel", "REDIS_URL (sentinels): 'u:pw@s2:26379' is not host:port"),
    ("::1:7000", "cluster", "REDIS_URL (cluster seed nodes): '::1:7000' is not host:port"),  # IPv6: in brackets
    ("[s1]:7000", "cluster", "REDIS_URL (cluster seed nodes): '[s1]:7000' is not host:port"),
    ("unix:///tmp/r.sock", "cluster", "REDIS_URL: a cluster cannot be reached over a unix socket"),
])
def test_malformed_urls_get_one_line_naming_the_variable(url: str, type_: str, message: str) -> None:
    with pytest.raises(TopologyError) as err:
        endpoint(url, type_)
    assert str(err.value).startswith(message)
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


def test_host_forms_that_are_accepted() -> None:
    assert endpoint("m,redis-0.redis.svc.cluster.local:26379,10.0.0.2:26379,[fe80::1%eth0]:26379", "sentinel") == \
        Endpoint("sentinel", nodes=(("redis-0.redis.svc.cluster.local", 26379), ("10.0.0.2", 26379),
                                    ("fe80::1%eth0", 26379)), master="m")


def test_tls_asked_for_a_plain_single_url_is_refused() -> None:
    """REDIS_TLS=true with type single and a redis:// URL connected in plaintext, silently."""
    with pytest.raises(TopologyError) as err:
        parse_endpoint(RedisSettings(url="redis://h:6379", tls=True))
    assert str(err.value) == ("REDIS_TLS is true but REDIS_URL is 'redis://h:6379': a single Redis takes TLS from "
                              "its URL; use rediss://")
    with pytest.raises(TopologyError, match=r"^CACHE_REDIS_TLS is true but CACHE_REDIS_URL"):
        parse_endpoint(RedisSettings(url="redis://h:6379", tls=True), "CACHE_REDIS_URL")
    assert parse_endpoint(RedisSettings(url="rediss://h:6379", tls=True)) == Endpoint("single",
                                                                                      url="rediss://h:6379")


def test_a_cache_store_url_equal_to_the_state_store_is_the_shared_store() -> None:
    """Two Store objects on one Redis: the cache's entries in the state store, checked as if they were apart."""
    for state, cache in [("redis://h:6379/0", "redis://h:6379"), ("redis://h:6379", "redis://h:6379/"),
                         ("a:1,b:2", "b:2, a:1")]:
        kind = "cluster" if "," in state else "single"
        s = parse("", "f.toml", {"REDIS_URL": state, "CACHE_REDIS_URL": cache, "REDIS_TYPE": kind,
                                 "CACHE_REDIS_TYPE": kind})
        assert (s.redis.url, s.cache_redis.url) == (state, ""), (state, cache)
    apart = parse("", "f.toml", {"REDIS_URL": "redis://h:6379/0", "CACHE_REDIS_URL": "redis://h:6379/1"})
    assert apart.cache_redis.url == "redis://h:6379/1"


def test_describe_says_a_timeout_in_words() -> None:
    """check-config said "unreachable (CancelledError: CancelledError)": asyncio.timeout raises a TimeoutError
    from the task's cancellation, neither with a message."""
    try:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError as cancelled:
            raise TimeoutError from cancelled
    except TimeoutError as exc:
        assert describe(exc) == "TimeoutError: no answer in time"
    try:
        try:
            raise TimeoutError
        except TimeoutError as timeout:
            raise StoreUnavailable("redis key-create failed: TimeoutError") from timeout
    except StoreUnavailable as exc:
        assert describe(exc) == "TimeoutError: no answer in time"
    assert describe(ConnectionError("Error 111 connecting")) == "Error 111 connecting"


def test_environment_names_type_credentials_and_the_cache_store() -> None:
    env = {"REDIS_URL": "a:1,b:2", "REDIS_TYPE": "cluster", "REDIS_PASSWORD": "pw", "REDIS_USERNAME": "u",
           "REDIS_TLS": "true", "REDIS_SENTINEL_PASSWORD": "sp", "CACHE_REDIS_URL": "m,s:26379",
           "CACHE_REDIS_TYPE": "sentinel", "CACHE_REDIS_PASSWORD": "cpw"}
    s = parse("[redis]\nallow_evicting_state = true\n[cache_redis]\nsocket_timeout_s = 0.1\n", "f.toml", env)
    assert (s.redis.url, s.redis.type, s.redis.tls, s.redis.allow_evicting_state) == ("a:1,b:2", "cluster", True, True)
    assert (s.redis.username, s.redis.password, s.redis.sentinel_password) == ("u", "pw", "sp")
    assert (s.cache_redis.url, s.cache_redis.type, s.cache_redis.password, s.cache_redis.tls) == (
        "m,s:26379", "sentinel", "cpw", False)
    assert s.cache_redis.socket_timeout_s == 0.1
    assert "pw" not in repr(s)
    assert parse("", "<defaults>", {"REDIS_URL": "redis://h"}).cache_redis.url == ""  # unset: the state store


@pytest.mark.parametrize(("text", "env", "message"), [
    ("[redis]\npassword = \"x\"\n", {}, "f.toml: redis.password is a secret: set REDIS_PASSWORD in the environment"),
    ("[cache_redis]\nsentinel_password = \"x\"\n", {},
     "f.toml: cache_redis.sentinel_password is a secret: set CACHE_REDIS_SENTINEL_PASSWORD in the environment"),
    ("", {"REDIS_TYPE": "replicated"}, "environment: REDIS_TYPE must be one of ('single', 'cluster', 'sentinel')"),
    ("", {"REDIS_TLS": "maybe"}, "environment: REDIS_TLS must be true or false, not 'maybe'"),
    ("[redis]\ntype = \"ring\"\n", {}, "f.toml: redis.type must be one of ('single', 'cluster', 'sentinel')"),
    ("[cache_redis]\nallow_evicting_state = true\n", {}, "f.toml: cache_redis.allow_evicting_state: only [redis]"),
    ("", {"CACHE_REDIS_URL": "redis://c"}, "f.toml: CACHE_REDIS_URL (cache_redis.url) needs REDIS_URL too"),
    # braces in the prefix would move the quota counters' and the ledger's hash tags
    ("[cache]\nkey_prefix = \"ep{a}\"\n", {}, "f.toml: cache.key_prefix must not contain '{' or '}'"),
    ("[cache]\nkey_prefix = \"ep}\"\n", {}, "f.toml: cache.key_prefix must not contain '{' or '}'"),
])
def test_config_errors(text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(text, "f.toml", env)
    assert str(err.value).startswith(message)


def test_one_place_builds_each_client() -> None:
    cluster = build_client(RedisSettings(url="127.0.0.1:7000,127.0.0.1:7001", type="cluster", password="pw"))
    assert isinstance(cluster, RedisCluster)
    assert sorted(cluster.nodes_manager.startup_nodes) == ["127.0.0.1:7000", "127.0.0.1:7001"]
    master = build_client(RedisSettings(url="m,127.0.0.1:26379", type="sentinel", password="pw",
                                        sentinel_password="spw"))
    assert master.connection_pool.service_name == "m"
    assert master.connection_pool.connection_kwargs["password"] == "pw"
    assert master.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["password"] == "spw"


def test_every_script_keeps_its_keys_in_one_slot() -> None:
    k = RedisKeys("ep")
    # the quota script: the team's and a key's counters, every window
    counters = [k.quota_counter("search", key_id, metric, window) for key_id in (None, "key_1", "key_2")
                for metric in ("req", "tok") for window in ("m29000000", "d20260101", "mo202601")]
    assert len({key_slot(c.encode()) for c in counters}) == 1
    assert k.quota_counter("search", "key_1", "tok", "m1") == "ep:q:{search}:k.key_1:tok:m1"
    # the ledger script: a ledger hash and its flush marks
    assert k.usage_flushes("search", "2026-01-01") == "ep:usage-flushes:{ep:usage:search:2026-01-01}"
    assert key_slot(k.usage("search", "2026-01-01").encode()) == key_slot(
        k.usage_flushes("search", "2026-01-01").encode())


class StubSentinel:
    """A sentinel's answer to SENTINEL MASTER (or its failure)."""

    def __init__(self, answer: dict[str, Any] | Exception) -> None:
        self.answer = answer

    async def sentinel_master(self, name: str) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def sentinel_master_client(*answers: dict[str, Any] | Exception) -> Any:
    master = build_client(RedisSettings(url="m,127.0.0.1:26379", type="sentinel"))
    master.sentinel_manager.sentinels = [StubSentinel(a) for a in answers]
    return master


def named(port: int, flags: str = "master") -> dict[str, Any]:
    return {"ip": "127.0.0.1", "port": port, "flags": flags}


async def test_an_operator_write_on_sentinel_needs_the_sentinels_to_agree_on_the_master() -> None:
    """redis-py trusts the first sentinel that answers: during a switch a key was written to the demoted master and
    lost. Agreement of every sentinel that answers (a majority must), none failing over, else MasterUncertain."""
    down = redis.exceptions.TimeoutError("Timeout reading from socket")
    agreed = sentinel_master_client(named(7001), down, named(7001))
    await confirm_master(agreed)
    assert agreed.connection_pool.master_address == ("127.0.0.1", 7001)  # its connections now go there
    for answers, message in [
        ((named(7001), named(7002), named(7001)), "the sentinels name different masters (a failover is under way): "
                                                  "127.0.0.1:7001, 127.0.0.1:7002"),
        ((named(7002, "master,failover_in_progress"), named(7001), named(7001)),
         "a sentinel is failing the master over"),
        ((named(7001), down, down), "1 of 3 sentinels answered; a majority must name the master"),
    ]:
        client = sentinel_master_client(*answers)
        with pytest.raises(MasterUncertain) as err:
            await confirm_master(client)
        assert str(err.value) == message
        assert client.connection_pool.master_address is None  # not pointed anywhere
    assert isinstance(MasterUncertain(), redis.exceptions.RedisError)  # Store.call makes it StoreUnavailable


async def test_master_discovery_is_one_query_and_outlives_the_caller_that_gave_up() -> None:
    """Each new connection asked the sentinels itself, inside its request's 0.25 s; a hung sentinel first in the list
    made every discovery time out before it reached (and promoted) a sentinel that answers."""
    master = sentinel_master_client()
    pool = master.connection_pool
    asked = 0

    async def discover_master(name: str) -> tuple[str, int]:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.2)
        return "127.0.0.1", 7001

    master.sentinel_manager.discover_master = discover_master
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await pool.get_master_address()
    assert await asyncio.gather(*(pool.get_master_address() for _ in range(10))) == [("127.0.0.1", 7001)] * 10
    assert asked == 1  # the first caller's query, finished after it gave up, shared by ten more
    assert pool.master_address == ("127.0.0.1", 7001)


async def test_a_connection_to_another_server_than_the_named_master_is_not_used() -> None:
    """redis-py drops idle connections when the master changes, not those in use then: back in the pool, they kept
    writing to the demoted master."""
    pool = sentinel_master_client().connection_pool
    pool.master_address = ("127.0.0.1", 7002)
    events: list[str] = []

    class Connection:
        host, port, is_connected = "127.0.0.1", 7001, True

        async def disconnect(self) -> None:
            events.append("disconnect")

        async def connect(self) -> None:
            events.append("connect")

        async def can_read(self) -> bool:
            return False

    await pool.ensure_connection(Connection())
    assert events == ["disconnect", "connect"]
    events.clear()
    Connection.port = 7002
    await pool.ensure_connection(Connection())
    assert events == ["connect"]
