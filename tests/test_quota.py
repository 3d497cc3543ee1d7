"""Quotas against a real Redis with a pinned clock: windows, atomic reserve, refunds, corrections, scopes."""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.accounts.keys import KeyRecord
from proxy.accounts.quota import Quotas, Ticket, format_reset, window
from proxy.accounts.teams import TeamStore
from proxy.config import QuotaSettings, RedisSettings
from proxy.config.limits import Limits
from proxy.errors import QuotaExceeded, RateLimited, ServiceUnavailable, TokensRateLimited
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from proxy.telemetry.metrics import Metrics
from tests.helpers import Clock

pytestmark = pytest.mark.redis
T0 = calendar.timegm((2026, 12, 31, 23, 59, 30))  # 30 s before a minute, a day, a month and a year all end


def test_windows_roll_over_in_utc() -> None:
    assert window("minute", T0) == (f"m{T0 // 60}", T0 + 30)
    assert window("day", T0) == ("d20261231", T0 + 30)
    assert window("month", T0) == ("mo202612", T0 + 30)
    after = T0 + 30
    assert window("minute", after)[0] == f"m{T0 // 60 + 1}"
    assert window("day", after) == ("d20270101", after + 86400)
    assert window("month", after) == ("mo202701", float(calendar.timegm((2027, 2, 1, 0, 0, 0))))
    feb = calendar.timegm((2028, 2, 29, 12, 0, 0))  # leap day
    assert window("month", feb) == ("mo202802", float(calendar.timegm((2028, 3, 1, 0, 0, 0))))


def test_reset_format_is_openais() -> None:
    assert [format_reset(s) for s in (0.25, 1, 12.4, 60, 361, 3 * 3600 + 121)] == [
        "250ms", "1s", "12s", "1m0s", "6m1s", "3h2m1s",
    ]


def test_counter_keys_share_a_cluster_slot_per_team() -> None:
    k = RedisKeys("ep")
    assert k.quota_counter("search", None, "tok", "m100") == "ep:q:{search}:t:tok:m100"
    assert k.quota_counter("search", "key_ab", "req", "d20261231") == "ep:q:{search}:k.key_ab:req:d20261231"


@dataclasses.dataclass
class Env:
    quotas: Quotas
    teams: TeamStore
    clock: Clock
    metrics: Metrics
    store: Store


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[Any]:
    made: list[Store] = []

    async def make(team_limits: dict[str, Limits] | None = None, url: str = redis_url, **quota: Any) -> Env:
        settings = RedisSettings(url=url, socket_timeout_s=0.5, retry_interval_s=0.2)
        client, _ = connect(settings)
        store = Store(client, settings)
        made.append(store)
        clock = Clock(T0)
        keys = RedisKeys("ep")
        teams = TeamStore(store, keys, team_limits or {}, cache_s=0)
        metrics = Metrics()
        quotas = Quotas(store, keys, teams, QuotaSettings(**quota), metrics, clock=clock)
        return Env(quotas, teams, clock, metrics, store)

    yield make
    for s in made:
        await s.close()


async def admit(quotas: Quotas, k: KeyRecord, billable: int, all_tokens: int) -> Ticket:
    """What the embeddings path does: the request, then its tokens."""
    ticket = await quotas.ticket(k)
    if ticket is None:
        return Ticket(quotas, k, [], 0.0, False)
    await ticket.charge_request()
    await ticket.charge_tokens(all_tokens if ticket.counts_all else billable)
    return ticket


def key(team: str = "search", kid: str = "key_1", **limits: int) -> KeyRecord:
    return KeyRecord(kid, team, limits=Limits(**limits))


async def test_tokens_per_minute_exhaust_then_reset_at_the_minute(env: Any) -> None:
    e: Env = await env({"search": Limits(tpm=100)})
    k = key()
    a = await admit(e.quotas, k, 60, 60)
    assert a.headers["x-ratelimit-limit-tokens"] == "100"
    assert a.headers["x-ratelimit-remaining-tokens"] == "40"
    assert a.headers["x-ratelimit-reset-tokens"] == "30s"
    await admit(e.quotas, k, 40, 40)  # exactly fills the allowance: fits
    with pytest.raises(RateLimited) as err:
        await admit(e.quotas, k, 1, 1)
    assert err.value.code == "rate_limit_exceeded" and err.value.retry_after == 30
    assert err.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "limit 100, used 100, requested 1" in err.value.message
    # a request that does not fit consumes nothing: a smaller one admitted after the refusal still fits exactly
    e.clock.now = T0 + 29.9
    with pytest.raises(RateLimited):
        await admit(e.quotas, k, 100, 100)
    e.clock.now = T0 + 30  # next minute: a fresh allowance
    assert (await admit(e.quotas, k, 100, 100)).headers["x-ratelimit-remaining-tokens"] == "0"
    rejected = e.metrics.quota_rejections.labels("search", "team", "tpm")._value.get()
    assert rejected == 2


async def test_refused_request_consumes_nothing_in_any_counter(env: Any) -> None:
    e: Env = await env({"search": Limits(rpm=10, tokens_per_day=50)})
    k = key()
    await admit(e.quotas, k, 50, 50)
    with pytest.raises(QuotaExceeded) as err:
        await admit(e.quotas, k, 1, 1)
    assert err.value.status == 429 and err.value.code == "insufficient_quota"
    ok = await admit(e.quotas, k, 0, 0)  # a full cache hit still fits: the refused one took no request slot
    assert ok.headers["x-ratelimit-remaining-requests"] == "8"


async def test_day_and_month_budgets_roll_over_at_utc_midnight_and_month_start(env: Any) -> None:
    e: Env = await env({"search": Limits(tokens_per_day=10, tokens_per_month=15)})
    k = key()
    await admit(e.quotas, k, 10, 10)
    with pytest.raises(QuotaExceeded) as err:
        await admit(e.quotas, k, 1, 1)
    assert err.value.retry_after == 30  # midnight
    e.clock.now = T0 + 30  # 2027-01-01: new day and new month
    a = await admit(e.quotas, k, 10, 10)
    assert a.headers["x-ratelimit-remaining-tokens"] == "0"  # the day's 10 are the tightest
    e.clock.now = T0 + 30 + 86400  # 2027-01-02: new day, same month
    await admit(e.quotas, k, 5, 5)
    with pytest.raises(QuotaExceeded) as month:
        await admit(e.quotas, k, 1, 1)
    assert "tokens per month" in month.value.message
    assert month.value.retry_after == calendar.timegm((2027, 2, 1, 0, 0, 0)) - e.clock.now


async def test_key_and_team_limits_both_apply_and_teams_are_separate(env: Any) -> None:
    e: Env = await env({"search": Limits(rpm=3), "ads": Limits(rpm=1)})
    narrow = key(kid="key_narrow", rpm=1)
    wide = key(kid="key_wide")
    await admit(e.quotas, narrow, 0, 0)
    with pytest.raises(RateLimited) as err:
        await admit(e.quotas, narrow, 0, 0)
    assert "key key_narrow" in err.value.message
    assert e.metrics.quota_rejections.labels("search", "key", "rpm")._value.get() == 1
    await admit(e.quotas, wide, 0, 0)
    await admit(e.quotas, wide, 0, 0)  # team: 3 of 3 used (narrow 1 + wide 2)
    with pytest.raises(RateLimited) as team_err:
        await admit(e.quotas, wide, 0, 0)
    assert "team 'search'" in team_err.value.message
    await admit(e.quotas, key("ads", "key_ads"), 0, 0)  # another team's allowance is untouched


async def test_refund_and_correction_from_upstream_usage(env: Any, redis_server: Any) -> None:
    e: Env = await env({"search": Limits(tpm=100)})
    k = key()
    a = await admit(e.quotas, k, 70, 70)
    await a.refund()  # the request failed: its tokens come back
    b = await admit(e.quotas, k, 100, 100)
    await b.settle(90)  # the upstream counted 90, not 100
    c = await admit(e.quotas, k, 10, 10)
    assert c.headers["x-ratelimit-remaining-tokens"] == "0"
    # a late refund into a window that has expired never creates a counter without an expiry
    raw = redis_server.client()
    for counter in c.counters:
        raw.delete(counter.key)
    await c.refund()
    assert not any(raw.exists(counter.key) for counter in c.counters)
    e.clock.now = T0 + 30
    ttl_key = (await admit(e.quotas, k, 5, 5)).counters[0].key
    assert raw.expiretime(ttl_key) == T0 + 30 + 60 + 60  # the window's end (pinned clock) plus a minute


async def test_gauges_follow_charges_corrections_and_refunds_with_window_ends(env: Any) -> None:
    e: Env = await env({"search": Limits(tpm=100, tokens_per_day=1000)})
    k = key(rpm=5)

    def gauges() -> dict[tuple[str, str, str], float]:
        m = e.metrics
        return {(name, key_id, limit): gauge.labels("search", key_id, limit)._value.get()
                for name, gauge in (("limit", m.quota_limit), ("remaining", m.quota_remaining),
                                    ("ends", m.quota_window_end))
                for key_id, limit in (("", "tpm"), ("", "tokens_per_day"), ("key_1", "rpm"))}

    a = await admit(e.quotas, k, 60, 60)
    assert gauges() == {
        ("limit", "", "tpm"): 100, ("limit", "", "tokens_per_day"): 1000, ("limit", "key_1", "rpm"): 5,
        ("remaining", "", "tpm"): 40, ("remaining", "", "tokens_per_day"): 940, ("remaining", "key_1", "rpm"): 4,
        # T0 is 30 s before a minute and a day end (the day's window ends with the minute's)
        ("ends", "", "tpm"): T0 + 30, ("ends", "", "tokens_per_day"): T0 + 30, ("ends", "key_1", "rpm"): T0 + 30,
    }
    await a.settle(50)  # the upstream counted 50: the gauges say so at once
    assert gauges()[("remaining", "", "tpm")] == 50 and gauges()[("remaining", "", "tokens_per_day")] == 950
    await a.refund()
    assert gauges()[("remaining", "", "tpm")] == 100 and gauges()[("remaining", "key_1", "rpm")] == 4
    e.clock.now = T0 + 30  # the next minute and day: new windows, new ends
    await admit(e.quotas, k, 10, 10)
    assert gauges()[("ends", "", "tpm")] == T0 + 90 and gauges()[("ends", "", "tokens_per_day")] == T0 + 30 + 86400


async def test_count_all_tokens_switch(env: Any) -> None:
    e: Env = await env({"search": Limits(tpm=100)}, count="all")
    a = await admit(e.quotas, key(), 0, 80)  # a full cache hit of 80 tokens: counted under "all"
    assert a.headers["x-ratelimit-remaining-tokens"] == "20"
    billable: Env = await env({"search": Limits(tpm=100)})
    b = await admit(billable.quotas, key(kid="key_2", team="other"), 0, 80)
    assert b.headers == {}  # team "other" has no limits: nothing counted, no headers


async def test_team_limits_set_at_run_time_replace_configured_ones(env: Any) -> None:
    e: Env = await env({"search": Limits(rpm=1, tpm=100)})
    assert await e.teams.limits("search") == Limits(rpm=1, tpm=100)
    assert await e.teams.set("search", {"rpm": 5}) == Limits(rpm=5, tpm=100)
    assert await e.teams.set("search", {"tpm": 0}) == Limits(rpm=5)
    assert await e.teams.limits("search") == Limits(rpm=5)
    listed = await e.teams.all()
    assert listed["search"] == (Limits(rpm=5), "runtime")
    with pytest.raises(ValueError):
        await e.teams.set("Bad Team", {"rpm": 1})


async def test_redis_down_fail_open_keeps_limits_per_process_fail_closed_refuses(env: Any, own_redis: Any) -> None:
    url = own_redis.url
    opened: Env = await env({"search": Limits(rpm=2)}, url=url)
    closed: Env = await env({"search": Limits(rpm=2)}, url=url, on_redis_down="closed")
    await opened.teams.limits("search")  # read once while Redis is up
    own_redis.stop()
    k = key()
    await admit(opened.quotas, k, 0, 0)
    await admit(opened.quotas, k, 0, 0)
    with pytest.raises(RateLimited):
        await admit(opened.quotas, k, 0, 0)  # still enforced, in this process
    with pytest.raises(ServiceUnavailable):
        await admit(closed.quotas, k, 0, 0)


async def test_a_rotated_key_spends_its_predecessors_allowance(env: Any) -> None:
    e: Env = await env()
    old = key(kid="key_old", rpm=2)
    new = KeyRecord("key_new", "search", limits=Limits(rpm=2), lineage="key_old")  # what rotation writes
    first = await admit(e.quotas, old, 0, 0)
    assert first.counters[0].key == f"ep:q:{{search}}:k.key_old:req:m{T0 // 60}"
    assert (await admit(e.quotas, new, 0, 0)).headers["x-ratelimit-remaining-requests"] == "0"
    for k in (new, old):  # one allowance for both during the grace period, not one each
        with pytest.raises(RateLimited):
            await admit(e.quotas, k, 0, 0)
    legacy = key(kid="key_legacy", rpm=1)  # a record without a lineage counts under its own id
    assert (await admit(e.quotas, legacy, 0, 0)).counters[0].key.endswith(":k.key_legacy:req:" + f"m{T0 // 60}")


async def test_429s_carry_request_and_token_headers_and_openais_error_type(env: Any) -> None:
    e: Env = await env({"search": Limits(rpm=5, tpm=100)})
    k = key(tokens_per_day=150)
    e.clock.now = T0 - 70  # 40 s before its minute ends
    await admit(e.quotas, k, 60, 60)
    with pytest.raises(TokensRateLimited) as tpm:
        await admit(e.quotas, k, 50, 50)
    assert tpm.value.type == "tokens" and tpm.value.code == "rate_limit_exceeded"
    assert tpm.value.headers == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "4",  # the refused one gave its slot back
        "x-ratelimit-reset-requests": "40s",
        "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "40", "x-ratelimit-reset-tokens": "40s",
    }
    for _ in range(4):
        await admit(e.quotas, k, 0, 0)
    with pytest.raises(RateLimited) as rpm:
        await admit(e.quotas, k, 10, 10)
    assert type(rpm.value) is RateLimited and rpm.value.body()["error"]["type"] == "requests"
    assert rpm.value.headers == {
        "x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "40s",
        "x-ratelimit-limit-tokens": "100", "x-ratelimit-remaining-tokens": "40", "x-ratelimit-reset-tokens": "40s",
    }
    e.clock.now = T0 - 20  # the next minute, same day: tpm fits again, the key's day budget (150, 60 used) does not
    with pytest.raises(QuotaExceeded) as day:
        await admit(e.quotas, k, 91, 91)
    assert day.value.type == "insufficient_quota"
    assert day.value.headers["x-ratelimit-limit-tokens"] == "150"  # the refusing counter, as it stands
    assert day.value.headers["x-ratelimit-remaining-tokens"] == "90"
    assert day.value.headers["x-ratelimit-reset-tokens"] == "50s" == f"{day.value.retry_after:.0f}s"
    assert day.value.headers["x-ratelimit-remaining-requests"] == "5"


async def test_corrections_go_to_the_store_the_charge_went_to(env: Any, own_redis: Any) -> None:
    e: Env = await env({"search": Limits(tpm=1000)}, url=own_redis.url)
    await e.teams.limits("search")
    own_redis.stop()
    a = await admit(e.quotas, key(kid="key_a"), 600, 600)  # Redis down: charged in process
    own_redis.start()
    await asyncio.sleep(0.3)  # the store leaves Redis alone for retry_interval_s (0.2 s) after a failure
    b = await admit(e.quotas, key(kid="key_b"), 600, 600)  # Redis is back: charged there
    await a.refund()  # A's tokens go back where they were taken, not out of B's 600 in Redis
    assert own_redis.client().get(b.counters[0].key) == b"600"
    with pytest.raises(RateLimited):
        await admit(e.quotas, key(kid="key_c"), 900, 900)
    own_redis.stop()
    await b.refund()  # due in Redis, which is down: dropped, never applied to the in-process counter
    await admit(e.quotas, key(kid="key_d"), 400, 400)  # in process: started from the 600 seen, A's 600 given back
    with pytest.raises(RateLimited):
        await admit(e.quotas, key(kid="key_e"), 1, 1)


async def test_the_in_process_fallback_starts_from_the_last_counts_seen(env: Any, own_redis: Any) -> None:
    e: Env = await env({"search": Limits(tpm=1000)}, url=own_redis.url)
    fresh: Env = await env({"search": Limits(tpm=1000)}, url=own_redis.url)  # another process
    await fresh.teams.limits("search")
    await admit(e.quotas, key(), 600, 600)  # Redis holds 600
    own_redis.stop()
    with pytest.raises(RateLimited):
        await admit(e.quotas, key(), 500, 500)  # in process, from the 600 this process saw: 1100 > 1000
    assert (await admit(e.quotas, key(), 400, 400)).headers["x-ratelimit-remaining-tokens"] == "0"
    # A process that never saw the counter starts from zero: with N processes a window that holds an outage
    # admits at most (N + 1) times a limit (README, Quotas).
    await admit(fresh.quotas, key(), 1000, 1000)
