"""Redis failures are counted: every call that fails from its caller's view adds one to
embedding_proxy_redis_errors_total{op}, refused-while-down calls and error replies inside a pipeline included."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import NoScriptError, ResponseError

from proxy.config import RedisSettings
from proxy.config.limits import Limits
from proxy.http.app import KEYSTORE, METRICS
from proxy.stores.guard import Store, StoreUnavailable
from proxy.telemetry.metrics import REDIS_OPS
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import Clock
from tests.stack import Samples, delta

MODEL = "text-embedding-3-small"
PROXY = Path(__file__).resolve().parent.parent / "proxy"


def _store(clock: Clock) -> tuple[Store, Counter[str]]:
    errors: Counter[str] = Counter()
    settings = RedisSettings(url="redis://unused", socket_timeout_s=0.05, retry_interval_s=5.0)
    return Store(object(), settings, clock=clock, on_error=lambda op: errors.update([op])), errors


async def _fails(r: Any) -> None:
    raise redis.ConnectionError("connection refused")


async def _ok(r: Any) -> str:
    return "ok"


async def _hangs(r: Any) -> None:
    await asyncio.sleep(10)


async def test_failed_and_refused_calls_are_counted() -> None:
    clock = Clock(1000.0)
    store, errors = _store(clock)
    with pytest.raises(StoreUnavailable):
        await store.call("mget", _fails)
    assert errors == {"mget": 1} and not store.available
    # while Redis is left alone, calls are refused at once: each one failed for its caller, so each one counts
    for op in ("set", "set", "key-get"):
        with pytest.raises(StoreUnavailable):
            await store.call(op, _ok)
    assert not await store.ping()
    assert errors == {"mget": 1, "set": 2, "key-get": 1, "ping": 1}

    clock.now += 5.0  # retry_interval_s later: tried again, and a working call counts nothing
    assert await store.call("set", _ok) == "ok"
    assert errors == {"mget": 1, "set": 2, "key-get": 1, "ping": 1}
    with pytest.raises(StoreUnavailable):
        await store.call("quota", _hangs)  # timed out
    assert errors["quota"] == 1


async def test_error_replies_inside_a_pipeline_are_counted() -> None:
    store, errors = _store(Clock(1000.0))

    async def mget_refused(r: Any) -> list[Any]:
        return [ResponseError("NOPERM this user has no permissions to run the 'mget' command"), [1, 2]]

    async def script_not_loaded(r: Any) -> list[Any]:
        return [[None, None], NoScriptError("NOSCRIPT No matching script")]

    replies = await store.call("mget", mget_refused)
    assert isinstance(replies[0], ResponseError) and errors == {"mget": 1}
    assert store.available  # an error reply is not an outage
    await store.call("mget", script_not_loaded)  # the caller sends the script again: not a failure
    assert errors == {"mget": 1}


def test_every_store_operation_is_exported_at_zero() -> None:
    used = {m for path in PROXY.rglob("*.py") for m in re.findall(r'\.(?:operator_)?call\(\s*"([a-z-]+)"',
                                                                            path.read_text())}
    used.add("ping")  # Store.ping
    assert used == set(REDIS_OPS)


def _metrics(proxy: Proxy) -> Samples:
    text = proxy.app[METRICS].render().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.redis
async def test_exact_counts_while_redis_is_gone(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing reads Redis on a timer during the test: team limits, purge generations and the ledger are not re-read
    # or flushed.
    config = ("[redis]\nsocket_timeout_s = 0.5\nretry_interval_s = 600\n[keys]\ncache_s = 600\n"
              "[cache]\ngenerations_refresh_s = 600\n"
              "[quotas]\nteam_cache_s = 600\n[usage]\nflush_interval_s = 600\n")
    proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, config))
    key, _ = await proxy.app[KEYSTORE].create("search")
    assert (await proxy.embed(key, {"model": MODEL, "input": ["warm"]})).status == 200
    await settle(proxy)
    before = _metrics(proxy)

    own_redis.stop()
    # the key-change subscription drops with Redis, and the key is then looked up again on every request
    for _ in range(200):
        if "subscription to key changes and cache purges lost" in caplog.text:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the key-change subscription did not notice that Redis is gone")
    for text in ("one", "two"):
        resp = await proxy.embed(key, {"model": MODEL, "input": [text]})
        assert resp.status == 200 and resp.headers["x-cache"] == "miss"
        await settle(proxy)  # each request's cache write on its own (writes close in time share one pipeline)
    ready = await proxy.client.get("/readyz")  # still serving its verified key: ready, degraded (issue 15, 6)
    assert ready.status == 200 and (await ready.json())["state_store"] == "degraded"
    after = _metrics(proxy)

    def d(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    # request 1: its key lookup fails (Redis is then left alone), its MGET and cache write are refused at once;
    # request 2: all three refused; the readiness probe's PING refused too
    assert d("embedding_proxy_redis_errors_total", op="key-get") == 2
    assert d("embedding_proxy_redis_errors_total", op="mget") == 2
    assert d("embedding_proxy_redis_errors_total", op="set") == 2
    assert d("embedding_proxy_redis_errors_total", op="ping") == 1
    assert d("embedding_proxy_redis_errors_total") == 7
    assert d("embedding_proxy_cache_lookups_total", result="error") == 2
    assert d("embedding_proxy_cache_write_errors_total") == 2


@pytest.mark.redis
async def test_mget_error_reply_in_the_quota_pipeline_is_counted(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    # A key with limits reads the cache and checks its quota in one pipeline; Redis refuses the MGET alone.
    proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, "[keys]\ncache_s = 600\n"))
    key, _ = await proxy.app[KEYSTORE].create("search", limits=Limits(rpm=100))
    assert (await proxy.embed(key, {"model": MODEL, "input": ["warm"]})).status == 200
    await settle(proxy)  # its cache write has landed: the next request reads "warm" in the quota pipeline
    before = _metrics(proxy)
    client = own_redis.client()
    client.execute_command("ACL", "SETUSER", "default", "-mget")
    try:
        resp = await proxy.embed(key, {"model": MODEL, "input": ["warm"]})
    finally:
        client.execute_command("ACL", "SETUSER", "default", "+mget")
        client.close()
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"  # the cache was bypassed
    after = _metrics(proxy)
    assert delta(before, after, "embedding_proxy_redis_errors_total", op="mget") == 1
    assert delta(before, after, "embedding_proxy_redis_errors_total") == 1
    assert delta(before, after, "embedding_proxy_cache_lookups_total", result="error") == 1


async def test_a_timeout_caused_by_a_blocked_event_loop_does_not_mark_redis_down() -> None:
    """A reply that could not be read because this process was busy is not Redis failing: only that call gives up,
    and Redis stays in use for everyone else (marking it down would send every request upstream)."""
    import time

    clock = Clock(1000.0)
    store, errors = _store(clock)  # socket_timeout_s = 0.05

    async def blocks_the_loop(r: Any) -> None:
        time.sleep(0.2)  # noqa: ASYNC251 - the point: the loop cannot run the timeout until this returns
        await asyncio.sleep(10)

    with pytest.raises(StoreUnavailable):
        await store.call("mget", blocks_the_loop)
    assert errors == {"mget": 1} and store.available
    with pytest.raises(StoreUnavailable):  # Redis itself too slow: the timeout fires on time
        await store.call("mget", _hangs)
    assert errors == {"mget": 2} and not store.available
