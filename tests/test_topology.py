"""Redis settings per topology (no server): URL forms, environment variables, secrets, and the hash slots that keep
every Lua script's keys together on a cluster."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from proxy.config import ConfigError, RedisSettings, parse
from proxy.rediskeys import RedisKeys
from proxy.stores.topology import Endpoint, TopologyError, build_client, parse_endpoint


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
])
def test_malformed_urls_get_one_line_naming_the_variable(url: str, type_: str, message: str) -> None:
    with pytest.raises(TopologyError) as err:
        endpoint(url, type_)
    assert str(err.value).startswith(message)
    assert "secret" not in str(err.value) and "\n" not in str(err.value)


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
