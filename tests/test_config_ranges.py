"""Issue 15, point 5: settings that cannot work are refused when the config is loaded, naming the file, the key and
the allowed range (declared next to each field: proxy/ranges.py); a Redis error reply is logged in Redis's words,
never with a key or an input. `check-config` itself: tests/test_check_config.py.

Before: `cache.ttl_s = 0` was accepted, then every cache write failed with "invalid expire time" and the log said
only `redis set failed (ResponseError)`.
"""

from __future__ import annotations

import dataclasses
import logging
import typing

import numpy as np
import pytest
import redis.asyncio as aioredis

from proxy.config import (
    CacheSettings,
    ConfigError,
    ConnectionSettings,
    DeploymentSettings,
    KeySettings,
    ModelSettings,
    QuotaSettings,
    RedisSettings,
    ServerSettings,
    UpstreamSettings,
    UsageSettings,
    parse,
)
from proxy.config.limits import Limits
from proxy.config.ranges import range_of
from proxy.stores.cache import EmbeddingCache
from proxy.stores.entrycodec import Entry
from proxy.stores.guard import Store, StoreUnavailable
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import RedisServer

SOURCE = "/etc/proxy.toml"
MODEL = '[models.m]\ndimensions = 8\n'
# (the table a bad value goes in, the key, the value as written, the range the error must name)
BAD = [
    ("server", "port", "-1", "from 0 to 65535"),
    ("server", "port", "65536", "from 0 to 65535"),
    ("server", "max_body_bytes", "0", "at least 1024"),
    ("server", "max_body_bytes", "1023", "at least 1024"),
    ("upstreams.default", "deadline_s", "0", "above 0"),
    ("upstreams.default", "deadline_s", "-1.5", "above 0"),
    ("upstreams.default", "attempt_timeout_s", "0", "above 0"),
    ("upstreams.default", "max_retries", "-1", "at least 0"),
    ("upstreams.default", "backoff_base_s", "-0.1", "at least 0"),
    ("upstreams.default", "max_concurrency", "0", "at least 1"),
    ("upstreams.default", "pool_size", "0", "at least 1"),
    ("upstreams.default", "allowed_fails", "0", "at least 1"),
    ("upstreams.default", "cooldown_s", "0", "above 0"),
    ("upstreams.default", "silent_after_s", "-0.5", "at least 0"),
    ("upstreams.default", "max_queue_wait_s", "-1", "at least 0"),
    ("upstreams.default", "rpm", "-1", "at least 0"),
    ("upstreams.default", "tpm", "-1", "at least 0"),
    ("upstreams.default", "max_in_flight", "-1", "at least 0"),
    ("models.m.deployments[0]", "rpm", "-1", "at least 0"),
    ("models.m.deployments[0]", "tpm", "-5", "at least 0"),
    ("models.m.deployments[0]", "max_in_flight", "-2", "at least 0"),
    ("models.m.deployments[0]", "weight", "0", "above 0"),
    ("models.m.deployments[0]", "priority", "-1", "at least 0"),
    ("models.m", "dimensions", "0", "at least 1"),
    ("models.m", "max_batch_items", "0", "at least 1"),
    ("models.m", "max_batch_tokens", "0", "at least 1"),
    ("models.m", "max_input_tokens", "-3", "at least 1"),
    ("models.m", "max_request_tokens", "0", "at least 1"),
    ("models.m", "price_per_million_tokens", "-0.01", "at least 0"),
    ("models.m", "allowed_dimensions", "[4, 0]", "at least 1"),
    ("redis", "socket_timeout_s", "0", "above 0"),
    ("redis", "operator_timeout_s", "0", "above 0"),
    ("redis", "retry_interval_s", "-1", "at least 0"),
    ("redis", "max_connections", "1", "at least 2"),
    ("cache_redis", "socket_timeout_s", "-0.25", "above 0"),
    ("cache_redis", "operator_timeout_s", "0", "above 0"),
    ("cache_redis", "retry_interval_s", "-1", "at least 0"),
    ("cache_redis", "max_connections", "0", "at least 2"),
    ("cache", "ttl_s", "0", "from 1 to 3153600000"),
    ("cache", "ttl_s", "-60", "from 1 to 3153600000"),
    ("cache", "ttl_s", "3153600001", "from 1 to 3153600000"),
    ("cache", "local_max_mb", "-1", "at least 0"),
    ("cache", "local_ttl_s", "0", "above 0"),
    ("cache", "generations_refresh_s", "0.05", "at least 0.1"),
    ("keys", "offline_grace_s", "-1", "at least 0"),
    ("keys", "cache_s", "-0.5", "at least 0"),
    ("quotas", "team_cache_s", "-1", "at least 0"),
    ("usage", "flush_interval_s", "0", "at least 0.1"),
    ("usage", "retention_days", "0", "from 1 to 36600"),
    ("teams.t", "rpm", "0", "from 1 to 9007199254740991"),
    ("teams.t", "tpm", "-1", "from 1 to 9007199254740991"),
    ("teams.t", "tokens_per_day", "0", "from 1 to 9007199254740991"),
    ("teams.t", "tokens_per_month", "0", "from 1 to 9007199254740991"),
    ("teams.t", "tokens_per_day", "9007199254740992", "from 1 to 9007199254740991"),
    ("usage", "retention_days", "100000000000", "from 1 to 36600"),
    ("connections", "header_timeout_s", "0", "above 0 and at most 3600"),
    ("connections", "keepalive_timeout_s", "0", "above 0 and at most 86400"),
    ("connections", "min_body_rate_bytes_s", "-1", "at least 0"),
    ("connections", "body_grace_s", "-1", "from 0 to 3600"),
    ("connections", "max_connections", "0", "at least 1"),
]


def _toml(table: str, line: str) -> str:
    if table == "models.m.deployments[0]":
        return f'{MODEL}deployments = [{{ upstream = "default", {line} }}]\n'
    if table == "models.m":
        return f"{MODEL}{line}\n" if not line.startswith("dimensions") else f"[models.m]\n{line}\n"
    return f"[{table}]\n{line}\n"


@pytest.mark.parametrize(("table", "key", "value", "allowed"), BAD, ids=[f"{t}.{k}={v}" for t, k, v, _ in BAD])
def test_a_value_that_cannot_work_is_refused_naming_file_key_and_range(
        table: str, key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(_toml(table, f"{key} = {value}"), SOURCE, {})
    assert str(err.value) == f"{SOURCE}: {table}.{key} must be {allowed}, not {value}"


@pytest.mark.parametrize(("table", "line"), [
    ("server", "port = 0"), ("server", "max_body_bytes = 1024"), ("upstreams.default", "max_retries = 0"),
    ("upstreams.default", "backoff_base_s = 0"), ("upstreams.default", "max_queue_wait_s = 0"),
    ("models.m.deployments[0]", "priority = 0"), ("models.m", "dimensions = 1"),
    ("models.m", "price_per_million_tokens = 0"), ("models.m", "allowed_dimensions = [1, 8]"),
    ("redis", "retry_interval_s = 0"), ("redis", "max_connections = 2"),
    ("cache", "ttl_s = 1"), ("cache", "ttl_s = 3153600000"), ("cache", "local_max_mb = 0"),
    ("cache", "generations_refresh_s = 0.1"), ("keys", "offline_grace_s = 0"), ("keys", "cache_s = 0"),
    ("quotas", "team_cache_s = 0"), ("usage", "flush_interval_s = 0.1"), ("teams.t", "rpm = 1"),
    ("connections", "min_body_rate_bytes_s = 0"), ("connections", "body_grace_s = 0"),
    ("connections", "max_connections = 1"), ("connections", "header_timeout_s = 3600"),
])
def test_the_edges_of_each_range_are_accepted(table: str, line: str) -> None:
    parse(_toml(table, line), SOURCE, {})


SECTIONS: list[tuple[str, type]] = [
    ("server", ServerSettings), ("upstreams.default", UpstreamSettings),
    ("models.m.deployments[0]", DeploymentSettings), ("models.m", ModelSettings), ("redis", RedisSettings),
    ("cache_redis", RedisSettings), ("cache", CacheSettings), ("keys", KeySettings), ("quotas", QuotaSettings),
    ("usage", UsageSettings), ("teams.t", Limits), ("connections", ConnectionSettings),
]


def test_every_numeric_setting_declares_its_range_and_is_tested_above() -> None:
    """The sweep stays a sweep: a numeric setting added later without a range, or without a bad value in BAD,
    fails here."""
    tested = {(table, key) for table, key, _, _ in BAD}
    for table, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name])))
            if not numeric or hints[f.name] is bool:
                continue
            assert range_of(f) is not None, f"{table}.{f.name} has no declared range"
            assert (table, f.name) in tested, f"{table}.{f.name} has no bad value in BAD"


@pytest.mark.parametrize(("line", "message"), [
    ('base_url = "ftp://files.example/v1"', "upstreams.default.base_url must be an http:// or https:// URL"),
    ('base_url = "api.openai.com/v1"', "upstreams.default.base_url must be an http:// or https:// URL"),
    ('base_url = "http://h:0/v1"', "upstreams.default.base_url must be an http:// or https:// URL"),
    ('base_url = "http://h:99999/v1"', "upstreams.default.base_url must be an http:// or https:// URL"),
    ('api_key_env = "MY KEY"', "upstreams.default.api_key_env must name an environment variable"),
])
def test_an_upstream_that_cannot_be_called_is_refused(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(f"[upstreams.default]\n{line}\n", SOURCE, {})
    assert str(err.value).startswith(f"{SOURCE}: {message}")


def test_a_bad_upstream_base_url_variable_is_named_without_its_credentials() -> None:
    with pytest.raises(ConfigError) as err:
        parse("", SOURCE, {"UPSTREAM_BASE_URL": "htp://user:hunter2@gw.example/v1"})
    assert str(err.value).startswith("environment: UPSTREAM_BASE_URL must be an http:// or https:// URL")
    assert "hunter2" not in str(err.value) and "user" not in str(err.value)


# --- a Redis error reply in the log ------------------------------------------------------------------------------


@pytest.mark.redis
async def test_a_redis_error_reply_is_logged_with_redis_s_message_and_no_key_or_input(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.store")
    client = aioredis.Redis.from_url(redis_server.url)
    store = Store(client, RedisSettings(url=redis_server.url))
    # what ttl_s = 0 did before it was refused at load time: every cache write refused by Redis
    cache = EmbeddingCache(store, RedisKeys(), ttl_s=0, secret="s")
    with pytest.raises(StoreUnavailable):
        await cache.set_many([("ep:emb:secret-key-name", Entry(np.zeros(8, dtype=np.float32), 1))])
    assert "redis set failed (ResponseError: invalid expire time in 'set' command); bypassing it" in caplog.text
    assert "secret-key-name" not in caplog.text
    caplog.clear()
    await client.ping()
    store = Store(client, RedisSettings(url=redis_server.url))
    with pytest.raises(StoreUnavailable):  # Redis quotes the first arguments of an unknown command: not logged
        await store.call("oops", lambda r: r.execute_command("NOSUCHCOMMAND", "ep:key:abc", "a user's input"))
    assert "redis oops failed (ResponseError: unknown command 'NOSUCHCOMMAND'); bypassing it" in caplog.text, \
        caplog.text
    assert "ep:key:abc" not in caplog.text and "a user's input" not in caplog.text
    caplog.clear()

    async def in_a_pipeline(r: aioredis.Redis) -> None:
        pipe = r.pipeline(transaction=False)
        pipe.execute_command("NOSUCHCOMMAND", "ep:key:abc", "a user's input")
        await pipe.execute()

    store = Store(client, RedisSettings(url=redis_server.url))
    with pytest.raises(StoreUnavailable):
        await store.call("piped", in_a_pipeline)
    assert "redis piped failed (ResponseError: unknown command 'NOSUCHCOMMAND'); bypassing it" in caplog.text, \
        caplog.text
    assert "ep:key:abc" not in caplog.text and "a user's input" not in caplog.text
    await client.aclose()
