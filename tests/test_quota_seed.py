"""Issue 15 point 7: a day or month limit set part-way through its window counts what the ledger holds for it.

Against a real redis-server (and a cluster), the proxy in process with the mock upstream as a real server, and the
`embedding-proxy` CLI as a subprocess where the operator would use it.
"""

from __future__ import annotations

import asyncio
import calendar
from typing import Any

import pytest

from proxy.accounts.keys import KeyRecord
from proxy.accounts.quota import Quotas
from proxy.accounts.teams import TeamStore
from proxy.accounts.usage import UsageLedger
from proxy.config import QuotaSettings, RedisSettings
from proxy.config.limits import Limits
from proxy.errors import QuotaExceeded
from proxy.http.app import KEYSTORE, LEDGER
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from proxy.telemetry.metrics import Metrics
from tests.conftest import Proxy, Upstream, make_settings
from tests.helpers import Clock
from tests.redis_servers import Cluster
from tests.test_cli import cli
from tests.test_quota_http import ADMIN, QUICK, admin

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


def text(tag: str, n: int) -> str:
    """A distinct input of about `n` tokens."""
    return tag + " hello" * (n - 2)


async def use(p: Proxy, key: str, tag: str, requests: int, size: int) -> int:
    """Send `requests` misses of about `size` tokens each; the tokens the upstream billed for them."""
    used = 0
    for i in range(requests):
        resp = await p.embed(key, {"model": MODEL, "input": text(f"{tag}{i}", size)})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        used += body["usage"]["prompt_tokens"]
    await p.app[LEDGER].flush()  # what the ledger holds: every process writes it each usage.flush_interval_s
    return used


async def proxy(make_proxy: Any, upstream: Upstream, redis_url: str, **options: Any) -> Proxy:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, QUICK, PROXY_ADMIN_KEY=ADMIN), **options)
    return p


async def test_a_day_limit_set_mid_day_by_the_cli_counts_what_the_team_used(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await proxy(make_proxy, upstream, redis_url)
    key = await p.new_key("ads")
    used = await use(p, key, "a", 10, 195)  # no limit yet: nothing counts it but the ledger
    assert 1800 < used < 2100

    assert (await asyncio.to_thread(cli, redis_url, "teams", "set", "ads", "--tokens-per-day", "400")).returncode == 0
    refused = await p.embed(key, {"model": MODEL, "input": "one more"})
    assert refused.status == 429, await refused.text()
    assert f"limit 400, used {used}, requested 2" in (await refused.json())["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    hit = await p.embed(key, {"model": MODEL, "input": text("a0", 195)})  # a cache hit costs nothing, and says so
    assert hit.status == 200 and hit.headers["x-ratelimit-remaining-tokens"] == "0"

    assert (await asyncio.to_thread(cli, redis_url, "teams", "set", "ads", "--tokens-per-day", "3000")).returncode == 0
    ok = await p.embed(key, {"model": MODEL, "input": "one more"})
    assert ok.status == 200
    assert ok.headers["x-ratelimit-limit-tokens"] == "3000"
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(3000 - used - 2)


async def test_a_limit_lifted_then_set_again_counts_the_usage_in_between(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await proxy(make_proxy, upstream, redis_url)
    key = await p.new_key("ads")
    assert (await admin(p, "PUT", "/admin/teams/ads", {"tokens_per_day": 1000})).status == 200
    used = await use(p, key, "b", 2, 90)
    assert (await admin(p, "PUT", "/admin/teams/ads", {"tokens_per_day": None})).status == 200
    used += await use(p, key, "c", 4, 240)  # not counted by any counter: no limit is in force
    assert (await admin(p, "PUT", "/admin/teams/ads", {"tokens_per_day": 1000})).status == 200
    refused = await p.embed(key, {"model": MODEL, "input": "one more"})
    assert refused.status == 429
    assert f"limit 1000, used {used}," in (await refused.json())["error"]["message"]


async def test_a_key_month_limit_counts_its_rotation_chain_since_the_first(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    clock = Clock(calendar.timegm((2100, 3, 3, 12, 0, 0)))
    p = await proxy(make_proxy, upstream, redis_url, clock=clock)
    first, record = await p.app[KEYSTORE].create("search")
    other = await p.new_key("search")  # the team's other key does not count for this key
    used = await use(p, first, "d", 2, 150)
    await use(p, other, "e", 1, 300)

    async def rotate() -> tuple[str, str]:
        resp = await admin(p, "POST", f"/admin/keys/{record.id}/rotate", {})
        assert resp.status == 201
        body = await resp.json()
        return body["key"], body["id"]

    second, _ = await rotate()
    used += await use(p, second, "f", 1, 100)
    third, third_id = await rotate()  # rotated again during its grace period: a second replacement
    clock.now += 2 * 86400  # two days later, same month
    used += await use(p, third, "g", 1, 120)
    assert (await admin(p, "PATCH", f"/admin/keys/{third_id}", {"tokens_per_month": 5000})).status == 200

    resp = await p.embed(third, {"model": MODEL, "input": "one more"})
    assert resp.status == 200
    assert resp.headers["x-ratelimit-limit-tokens"] == "5000"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(5000 - used - 2)
    clock.now = calendar.timegm((2100, 4, 1, 0, 0, 0))  # a new month: the counter starts from its own ledger
    resp = await p.embed(third, {"model": MODEL, "input": "another one"})
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(5000 - 2)


async def test_concurrent_first_charges_seed_the_counter_once(redis_url: str) -> None:
    now = calendar.timegm((2100, 5, 20, 8, 0, 0))
    settings = RedisSettings(url=redis_url, socket_timeout_s=2.0)
    store = Store(connect(settings)[0], settings)
    keys = RedisKeys("ep")
    try:
        ledger = UsageLedger(store, keys, clock=lambda: now)
        ledger.record("search", "key_a", MODEL, 700, 650)  # 50 of them served from the cache: free
        ledger.record("search", "key_a", MODEL, 300, 300, at=now - 86400)  # yesterday: not today's window
        ledger.record_failed("search", "key_b", MODEL, 40)  # billed, not answered: it stays counted
        ledger.record("ads", "key_c", MODEL, 900, 900)  # another team
        await ledger.flush()
        teams = TeamStore(store, keys, {"search": Limits(tokens_per_day=1000)}, cache_s=0)
        quotas = Quotas(store, keys, teams, QuotaSettings(), Metrics(), clock=lambda: now)
        k = KeyRecord("key_a", "search")

        async def admit(tokens: int) -> int:
            ticket = await quotas.ticket(k)
            assert ticket is not None
            await ticket.charge_request()
            try:
                await ticket.charge_tokens(tokens)
            except QuotaExceeded:
                return 0
            return tokens

        admitted = sum(await asyncio.gather(*(admit(30) for _ in range(20))))
        assert admitted == 300  # 690 used before: ten of the twenty fit, none counted twice
        counter = keys.quota_counter("search", None, "tok", "d21000520")
        assert int(await store.client.get(counter)) == 690 + 300
    finally:
        await store.close()


async def test_seeding_on_a_cluster(make_proxy: Any, upstream: Upstream, cluster: Cluster) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, cluster.seeds, QUICK, REDIS_TYPE="cluster",
                                              PROXY_ADMIN_KEY=ADMIN))
    key = await p.new_key("ads")
    used = await use(p, key, "h", 3, 150)
    assert (await admin(p, "PUT", "/admin/teams/ads", {"tokens_per_day": 400, "tokens_per_month": 100_000})).status \
        == 200
    refused = await p.embed(key, {"model": MODEL, "input": "one more"})
    assert refused.status == 429
    assert f"limit 400, used {used}," in (await refused.json())["error"]["message"]
