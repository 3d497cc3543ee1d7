"""/readyz says whether this process can serve (issue 15, points 6 and 10), against a real redis-server and the
mock upstream as a real server.

Before: /readyz answered 503 whenever the state Redis was down, so a shared-store outage emptied the Service although
each process went on serving its verified keys; and a hidden default upstream (api.openai.com, $UPSTREAM_API_KEY)
kept a config with only self-hosted upstreams "not ready" for good.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.config import load
from proxy.http.app import KEYSTORE
from proxy.mock.upstream import MockSettings, create_mock_app
from tests.conftest import Proxy, RedisServer, Upstream, make_settings

MODEL = "text-embedding-3-small"
BODY = {"model": MODEL, "input": ["hello"]}
FAST = "[redis]\nsocket_timeout_s = 0.2\n"


async def readyz(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    resp = await proxy.client.get("/readyz")
    return resp.status, await resp.json()


async def until_ready_is(proxy: Proxy, status: int) -> dict[str, Any]:
    """Polls /readyz until it answers `status`; 20 s at most (generous: the machine may be loaded)."""
    deadline = time.monotonic() + 20
    while True:
        got, body = await readyz(proxy)
        if got == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz still {got} {body} after 20s")
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_ready_and_degraded_while_redis_is_down_and_known_keys_are_served(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    proxy: Proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, FAST))
    known = await proxy.new_key()
    never_used = await proxy.new_key()
    assert (await proxy.embed(known, BODY)).status == 200
    assert await readyz(proxy) == (200, {"status": "ready", "state_store": "ok", "redis": "ok", "upstream": "ok"})

    own_redis.stop()
    status, body = await readyz(proxy)
    assert status == 200, body  # before: 503, and every pod left the Service
    assert body["status"] == "ready" and body["state_store"] == "degraded" and body["redis"] == "unreachable"
    assert body["quotas"] == "per process" and 60 < body["offline_grace_left_s"] <= 120
    resp = await proxy.embed(known, {"model": MODEL, "input": ["during the outage"]})
    assert resp.status == 200, await resp.text()  # it does serve, as readiness says
    assert (await proxy.embed(never_used, BODY)).status == 503  # a key it cannot vouch for: refused

    own_redis.start()  # back: "ok" again, without a restart
    deadline = time.monotonic() + 20
    while (await readyz(proxy))[1]["state_store"] != "ok":
        assert time.monotonic() < deadline, "Redis is back but /readyz does not say so"
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_not_ready_before_any_key_was_verified_with_redis_down_at_start(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    own_redis.stop()
    proxy: Proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, FAST))
    status, body = await readyz(proxy)
    assert status == 503 and body["status"] == "not ready" and body["state_store"] == "unavailable", body
    assert body["reasons"] == ["the state store is unreachable and no key this process verified is within "
                               "keys.offline_grace_s (none verified since start, or the grace is over)"]
    own_redis.start()
    await until_ready_is(proxy, 200)
    key = await proxy.new_key()
    assert (await proxy.embed(key, BODY)).status == 200


@pytest.mark.redis
async def test_not_ready_once_the_offline_grace_is_over(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    config = "[redis]\nsocket_timeout_s = 0.2\n[keys]\noffline_grace_s = 0.5\ncache_s = 0\n"
    proxy: Proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, config))
    known = await proxy.new_key()
    started = time.monotonic()  # the grace counts from the last answer of the state store: this request's, or later
    assert (await proxy.embed(known, BODY)).status == 200
    own_redis.stop()
    body = await until_ready_is(proxy, 503)
    assert time.monotonic() - started >= 0.5  # not before the grace
    assert body["state_store"] == "unavailable" and body["status"] == "not ready"
    assert (await proxy.embed(known, BODY)).status == 503  # the grace is over for the proxy too


async def test_not_ready_when_no_model_has_an_upstream_it_can_call(make_proxy: Any, redis_url: str,
                                                                   tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text("")
    settings = load(str(tmp_path / "p.toml"), env={"REDIS_URL": redis_url})  # api.openai.com, no key
    proxy: Proxy = await make_proxy(settings)
    status, body = await readyz(proxy)
    assert status == 503 and body["state_store"] == "ok"
    assert body["upstream"] == ['upstream default: $UPSTREAM_API_KEY is not set (set it, or api_key_env = "" for '
                                "a server without a key)"]
    assert body["reasons"] == ["no model has an upstream that can be called"]


@pytest.fixture
async def keyless_upstream() -> AsyncIterator[str]:
    """A self-hosted server without a key (the mock, answering without Authorization)."""
    server = TestServer(create_mock_app(MockSettings(api_key=None)), host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


@pytest.mark.redis
async def test_ready_with_only_a_self_hosted_upstream(
    make_proxy: Any, keyless_upstream: str, redis_url: str, tmp_path: Path
) -> None:
    """Point 10: only upstreams some model uses are checked; the built-in default one is none of them here."""
    path = tmp_path / "self-hosted.toml"
    path.write_text(f'[upstreams.local]\nbase_url = "{keyless_upstream}"\napi_key_env = ""\n'
                    f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "local" }}]\n')
    settings = load(str(path), env={"REDIS_URL": redis_url})  # no UPSTREAM_API_KEY, no UPSTREAM_BASE_URL
    proxy: Proxy = await make_proxy(settings)
    status, body = await readyz(proxy)
    assert status == 200, body  # before: 503 "upstream default: $UPSTREAM_API_KEY is not set", for good
    assert body["upstream"] == "ok" and body["status"] == "ready"
    key, _ = await proxy.app[KEYSTORE].create("search")
    assert (await proxy.embed(key, BODY)).status == 200
