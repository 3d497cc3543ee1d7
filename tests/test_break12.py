"""Defects found by trying to break issue 12's console, cache stats and purges, and the metrics token (break12).

Each test reproduces one defect against real servers (private redis-servers, the mock upstream, the proxy on a real
socket) and fails on the code as it was when found."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.http.admin import CACHE
from proxy.stores.guard import StoreUnavailable
from tests.conftest import RedisServer, Upstream, make_settings, settle
from tests.console_browser import ADMIN as CONSOLE_ADMIN
from tests.console_browser import CONFIG as CONSOLE_CONFIG
from tests.console_browser import _chromium, _playwright, expect_ui, sign_in
from tests.forwarder import Forwarder
from tests.redis_servers import SENTINEL_MASTER, SentinelSet
from tests.stack import start_mock, start_proxy, wait_http
from tests.test_cache_purge import ADMIN, AS_ADMIN, LARGE, SMALL, purge, x_cache

pytestmark = pytest.mark.redis
NO_REREAD = "[cache]\ngenerations_refresh_s = 600\n[redis]\nretry_interval_s = 0.2\n"


async def again(call: Any) -> Any:
    """`call()` until the proxy's store answers again after a Redis restart (at most 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await call()
        except StoreUnavailable:
            assert time.monotonic() < deadline, "redis did not come back within 10 s"
            await asyncio.sleep(0.1)


async def test_a_purge_after_the_state_store_lost_its_generations_still_purges(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    """A running proxy knows generation 1 of a model; the state store restarts without its data (no persistence,
    a crash before the RDB save, a failover to a replica that had not got the HINCRBY). The next purge's HINCRBY
    answers 1 again: the proxy already has 1, so nothing changes and the vector the purge was meant to drop is still
    served from its in-process tier (and from Redis, when the cache store is another server). Root cause:
    generations.py:176 HINCRBY counts from what the state store holds, while _merge (generations.py:115) only takes
    a number above the one the process knows."""
    settings = make_settings(upstream.base_url, own_redis.url, NO_REREAD, PROXY_ADMIN_KEY=ADMIN)
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await purge(proxy, {"model": SMALL}))[1]["generation"] == 1
    assert await x_cache(proxy, key, SMALL, "model v2 text") == "miss"
    await settle(proxy)
    assert await x_cache(proxy, key, SMALL, "model v2 text") == "hit"

    own_redis.stop()
    own_redis.start()  # empty: no generations any more (and no keys: the test makes its key again)
    key = await again(lambda: proxy.new_key())
    status, body = await purge(proxy, {"model": SMALL})
    assert status == 200, body
    assert await x_cache(proxy, key, SMALL, "model v2 text") == "miss"


async def test_an_instance_started_after_the_state_store_lost_its_generations_does_not_serve_purged_entries(
    make_proxy: Any, upstream: Upstream, redis_url: str, own_redis: RedisServer
) -> None:
    """Entries live in the cache store, their model's generation in the state store. When the state store comes
    back without its data while the cache store kept its entries, an instance that starts then reads no generation
    (0): its keys are the keys from before the first purge, and it serves the purged vectors again. This is the
    topology deploy/kubernetes/secret.yaml recommends (CACHE_REDIS_URL, PROXY_CACHE_SECRET). Root cause: the
    generation that makes old entries unreadable lives only in the state store (generations.py:78 reads a missing
    field as 0, which is also the never-purged key layout, rediskeys.py _prefix_state)."""
    settings = make_settings(upstream.base_url, own_redis.url, NO_REREAD, PROXY_ADMIN_KEY=ADMIN,
                             CACHE_REDIS_URL=redis_url, PROXY_CACHE_SECRET="break12-cache-secret")
    a = await make_proxy(settings)
    key = await a.new_key()
    assert await x_cache(a, key, SMALL, "model v1 text") == "miss"
    await settle(a)
    assert (await purge(a, {"model": SMALL}))[1]["generation"] == 1  # the model behind the name changed
    # a's own next request is not checked here: it would write the new generation's entry, which `late` may serve
    assert a.app[CACHE].generations.token(SMALL, None) == "1"

    own_redis.stop()
    own_redis.start()  # the state store, empty; the cache store still holds the entries of both generations
    late = await make_proxy(settings)
    key = await again(lambda: late.new_key())
    assert await x_cache(late, key, SMALL, "model v1 text") == "miss"


async def test_cache_stats_when_the_sentinels_no_longer_know_the_master_is_not_a_500(
    make_proxy: Any, upstream: Upstream, sentinel_set: SentinelSet
) -> None:
    """The sentinels forget the master at run time (SENTINEL REMOVE, sentinels redeployed without their config):
    GET /admin/cache asks the sentinels for the master again (stores/topology.py:171 masters()), which raises
    TopologyError (topology.py:209); operator_call (store.py:124) only maps Redis and OS errors to
    StoreUnavailable, so it reaches the error middleware (app.py) as an unhandled exception: a 500 "internal
    error" instead of a 503 that says why.
    (Pooled connections to the master keep the other routes working meanwhile.)"""
    settings = make_settings(upstream.base_url, sentinel_set.url, PROXY_ADMIN_KEY=ADMIN, REDIS_TYPE="sentinel")
    proxy = await make_proxy(settings)
    resp = await proxy.client.get("/admin/cache", headers=AS_ADMIN)
    assert resp.status == 200, await resp.text()
    for s in sentinel_set.sentinels:
        s.client().execute_command("SENTINEL", "REMOVE", SENTINEL_MASTER)
    resp = await proxy.client.get("/admin/cache", headers=AS_ADMIN)
    assert resp.status == 503, await resp.text()


def test_a_console_reloaded_while_redis_is_down_keeps_its_sign_in(own_redis: RedisServer, tmp_path: Path) -> None:
    """Signed in, the operator reloads the console while the state store is down. The start-up sign-in with the
    saved key gets the admin API's 503, and app.js (`signIn(saved).catch((err) => signOut(err.message))`, at the
    end of the file) treats any failure as a refused key: it deletes the key from sessionStorage. Once Redis is
    back the console shows the sign-in form again and the admin key must be fetched and typed anew. Only a 401
    (the request() helper already signs out on it) means the key is wrong. Root cause: proxy/console/app.js:833."""
    chromium, sync_playwright = _chromium(), _playwright()
    expect = expect_ui()
    mock, mock_url = start_mock(tmp_path)
    servers = [mock]
    try:
        proxy, url = start_proxy(tmp_path, mock_url, own_redis.url, CONSOLE_CONFIG, workers=1,
                                 env={"PROXY_ADMIN_KEY": CONSOLE_ADMIN})
        servers.append(proxy)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(15_000)
                page.goto(url + "/admin/ui/")
                sign_in(page)
                own_redis.stop()
                page.reload()
                # the start-up sign-in got the admin API's 503, which comes after the key check: the key is kept,
                # and the screen says in its place what is down (issue 18: each screen keeps its layout)
                expect(page.get_by_role("alert").filter(has_text="could not be loaded")).to_contain_text(
                    "The key and quota store is unreachable. Please retry.")
                expect(page.get_by_role("button", name="Sign out")).to_be_visible()
                own_redis.start()
                wait_http(url + "/readyz")
                page.reload()
                expect(page.get_by_role("button", name="Sign out")).to_be_visible()
            finally:
                browser.close()
    finally:
        for s in reversed(servers):
            s.stop()


async def test_an_instance_cut_off_from_the_state_store_stops_serving_a_model_purged_meanwhile(
    make_proxy: Any, upstream: Upstream, redis_url: str, own_redis: RedisServer
) -> None:
    """Instance b loses its connection to the state store (a network partition: a goes on reaching it) but still
    reaches the cache store. a purges the model. b cannot hear the announcement nor re-read the generations
    (generations.py run(): the failure is suppressed and the last generations stay in force without limit), so b
    serves the purged vectors from its in-process tier and from the cache store for as long as the partition lasts,
    where the issue asks every instance to stop within seconds (generations.py:150 suppresses the failed re-read).
    Expected: generations not confirmed for a few
    refresh intervals count as unknown, and the cache is bypassed (as it is before the first read)."""
    config = "[cache]\ngenerations_refresh_s = 0.2\n[redis]\nretry_interval_s = 0.2\n"
    env = {"PROXY_ADMIN_KEY": ADMIN, "CACHE_REDIS_URL": own_redis.url, "PROXY_CACHE_SECRET": "break12-secret"}
    fwd = Forwarder(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await fwd.start()
    try:
        a = await make_proxy(make_settings(upstream.base_url, redis_url, config, **env))
        b = await make_proxy(make_settings(upstream.base_url, fwd.url, config, **env))
        key = await a.new_key()
        assert await x_cache(a, key, SMALL, "partitioned") == "miss"
        await settle(a)
        assert await x_cache(b, key, SMALL, "partitioned") == "hit"  # and now in b's memory tier
        assert await x_cache(b, key, LARGE, "other model") == "miss"

        await fwd.close()  # b is cut off from the state store; its key stays valid (keys.offline_grace_s)
        assert (await purge(a, {"model": SMALL}))[0] == 200
        # not a request to a: it would write the new generation's entry, which b may then serve (rightly)
        assert a.app[CACHE].generations.token(SMALL, None) == "1"

        for _ in range(100):  # 10 s at most
            seen = await x_cache(b, key, SMALL, "partitioned")
            if seen == "miss":
                break
            await asyncio.sleep(0.1)
        assert seen == "miss", "b still served the purged model's entry 10 s after the purge"
    finally:
        await fwd.close()
