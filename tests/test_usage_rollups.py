"""Issue 18 point 14: usage reports over months read the month roll-ups kept as the days are written, and give
exactly the rows a day-by-day report gives (money and tokens), on a single Redis and on a Cluster."""

from __future__ import annotations

import calendar
import datetime as dt
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.accounts import rollups
from proxy.accounts.usage import UsageLedger
from proxy.accounts.usagereport import GroupBy, Tally, read_hashes
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Proxy, RedisServer, Upstream, make_settings
from tests.helpers import Clock
from tests.redis_servers import Cluster

pytestmark = pytest.mark.redis
KEYS = RedisKeys("ep")
ADMIN = "admin-secret-for-tests-0123456789"
MODEL = "text-embedding-3-small"
PRICES = {"m-small": 0.02, "m-large": 0.13, "m-odd": 0.0173}
START = dt.date(2026, 1, 20)  # the data: 2026-01-20 to 2026-04-10, across three month ends
END = dt.date(2026, 4, 10)
TODAY = float(calendar.timegm((2026, 4, 10, 18, 0, 0)))


def _store(url: str, kind: str = "single") -> Store:
    settings = RedisSettings(url=url, type=kind, socket_timeout_s=5, operator_timeout_s=30)  # type: ignore[arg-type]
    return Store(connect(settings)[0], settings)


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    redis_server.flush()
    s = _store(redis_server.url)
    yield s
    await s.close()


async def day_by_day(store: Store, team: str | None, since: dt.date, until: dt.date,
                     by: GroupBy | None) -> list[dict[str, Any]]:
    """The report as it was before the roll-ups: every day's ledger hash, added up."""
    teams = [team] if team else sorted(t.decode() for t in await store.client.smembers(KEYS.usage_teams()))
    slots = [(t, (since + dt.timedelta(days=n)).isoformat()) for t in teams for n in range((until - since).days + 1)]
    tally = Tally(by)
    async for part, hashes in read_hashes(store, [KEYS.usage(t, d) for t, d in slots]):
        for _ in tally.add([slots[i] for i in part], hashes):
            pass
    return await tally.priced(PRICES)


async def fill(ledgers: list[UsageLedger], seed: int, days: tuple[dt.date, dt.date] = (START, END),
               n: int = 3000) -> None:
    """Random usage of 3 teams, 12 keys and 3 models over `days`, recorded by several writers, flushed often."""
    rng = random.Random(seed)
    span = (days[1] - days[0]).days + 1
    first = calendar.timegm(days[0].timetuple())
    for i in range(n):
        ledger = rng.choice(ledgers)
        team = rng.choice(["ads", "search", "ml"])
        key, model = f"{team}-k{rng.randrange(4)}", rng.choice(list(PRICES))
        at = first + rng.randrange(span * 86400)
        kind = rng.random()
        if kind < 0.8:
            tokens = rng.randrange(1, 5000)
            ledger.record(team, key, model, tokens, rng.randrange(tokens + 1), at=at)
        elif kind < 0.9:
            ledger.record_failed(team, key, model, rng.randrange(1, 900), at=at)
        else:
            ledger.record_unconfirmed(team, key, model, rng.randrange(1, 900), at=at)
        if i % 97 == 0:
            await ledger.flush()
    for ledger in ledgers:
        await ledger.flush()


def _ranges(rng: random.Random, n: int) -> list[tuple[dt.date, dt.date]]:
    fixed = [(START, END), (dt.date(2026, 2, 1), dt.date(2026, 2, 28)), (dt.date(2026, 1, 31), dt.date(2026, 3, 1)),
             (dt.date(2026, 2, 1), dt.date(2026, 3, 29)), (dt.date(2026, 1, 1), dt.date(2026, 12, 31)),
             (dt.date(2026, 2, 3), dt.date(2026, 2, 3))]
    span = (END - START).days
    for _ in range(n):
        a = START + dt.timedelta(days=rng.randrange(span))
        fixed.append((a, min(END, a + dt.timedelta(days=rng.randrange(80)))))
    return fixed


async def compare(store: Store, ledger: UsageLedger, seed: int, n: int = 10) -> None:
    """Every grouping over fixed and random ranges, all teams and one: the same rows as day by day, and the
    daily rows beside them the same as a report by day."""
    rng = random.Random(seed)
    for since, until in _ranges(rng, n):
        for team in (None, "search"):
            for by in ("team", "key", "model", "day"):
                expected = await day_by_day(store, team, since, until, by)
                rows, daily = await ledger.report_daily(team, since, until, by, PRICES)
                assert rows == expected, (since, until, team, by)
                assert daily == await day_by_day(store, team, since, until, "day")


def days_read(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ledger days (and month totals) a report reads, as Redis keys."""
    seen: list[str] = []
    real = read_hashes

    def spy(store: Store, names: Any, sizes: Any = None) -> Any:
        seen.extend(names)
        return real(store, names, sizes)

    monkeypatch.setattr(rollups, "read_hashes", spy)
    return seen


def ledger_of(store: Store, writer: str | None = None) -> UsageLedger:
    return UsageLedger(store, KEYS, clock=Clock(TODAY), writer=writer)


async def test_reports_from_roll_ups_equal_the_day_by_day_sums(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    ledgers = [ledger_of(store) for _ in range(3)]
    await fill(ledgers, seed=1)
    seen = days_read(monkeypatch)
    await compare(store, ledgers[0], seed=2)
    # a report over whole months read no ledger day: February and March from their roll-ups
    seen.clear()
    rows = await ledgers[0].report(None, dt.date(2026, 2, 1), dt.date(2026, 3, 31), "key", PRICES)
    assert rows == await day_by_day(store, None, dt.date(2026, 2, 1), dt.date(2026, 3, 31), "key")
    assert seen and not [k for k in seen if k.startswith("ep:usage:")]
    seen.clear()
    await ledgers[0].report(None, dt.date(2026, 1, 1), dt.date(2026, 4, 30), "day", PRICES)
    assert not [k for k in seen if not k.startswith("ep:usage-month-days:")]  # by day: the per-day roll-ups alone
    # by key over Feb 3 to Mar 29: February's totals less its Feb 1-2, March's totals less its Mar 30-31
    seen.clear()
    await ledgers[0].report("ads", dt.date(2026, 2, 3), dt.date(2026, 3, 29), "key", PRICES)
    assert sorted(k for k in seen if k.startswith("ep:usage:")) == [
        f"ep:usage:ads:{d}" for d in ("2026-02-01", "2026-02-02", "2026-03-30", "2026-03-31")]


async def test_a_batch_resent_after_a_lost_reply_counts_once_in_the_roll_up(store: Store) -> None:
    ledger = ledger_of(store, writer="w1")
    ledger.record("ads", "k1", "m-small", 100, 60, at=TODAY)
    ledger.record("ads", "k1", "m-small", 100, 60, at=TODAY - 40 * 86400)
    batch = rollups_batch(ledger)
    for _ in range(3):  # applied, then the same batch twice more (its reply lost each time)
        await store.client.ping()
        await ledger._write(store.client, batch=batch)
    totals = await store.client.hgetall(KEYS.usage_month("ads", "2026-04"))
    assert totals == {b"k1|m-small|requests": b"1", b"k1|m-small|upstream_tokens": b"60",
                      b"k1|m-small|cached_tokens": b"40"}
    march = await store.client.hgetall(KEYS.usage_month_days("ads", "2026-03"))
    assert march[b"2026-03-01|m-small|upstream_tokens"] == b"60" and march[b"#2026-03-01|w1"] == b"1"


def rollups_batch(ledger: UsageLedger) -> Any:
    """What the ledger recorded, as its next batch (taken out of it, as flush() does)."""
    from proxy.accounts.usage import _Batch, _slots
    batch = _Batch(1, ledger._pending)
    ledger._pending = _slots()
    return batch


async def test_usage_written_before_the_roll_ups_is_rolled_up_by_the_first_report(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Days written by a ledger without roll-ups (flush marks, or none at all), and a batch that reached a day but
    not its month (a process killed between them): reports read those months' days, give the exact sums, and
    write the roll-up; the next report reads the roll-up."""
    ledgers = [ledger_of(store) for _ in range(2)]
    await fill(ledgers, seed=3, days=(dt.date(2026, 1, 1), dt.date(2026, 3, 31)))
    await store.client.delete(*[KEYS.usage_month(t, m) for t in ("ads", "search", "ml")
                                for m in ("2026-01", "2026-02")],
                              *[KEYS.usage_month_days(t, m) for t in ("ads", "search", "ml")
                                for m in ("2026-01", "2026-02")])
    await store.client.hset(KEYS.usage("ads", "2026-02-10"), mapping={"old|m-odd|requests": 3,
                                                                       "old|m-odd|upstream_tokens": 999})
    await store.client.hset(KEYS.usage("ml", "2026-02-11"), mapping={"older|m-odd|cached_tokens": 77})
    await store.client.sadd(KEYS.usage_teams(), "ml")
    # March: one batch of a writer reached the day, never the month
    await store.client.evalsha(ledgers[0]._apply.sha, 2, KEYS.usage("search", "2026-03-05"),
                               KEYS.usage_flushes("search", "2026-03-05"), "lost-writer", 1, 86400, 0,
                               "k9|m-large|upstream_tokens", 12345)
    seen = days_read(monkeypatch)
    since, until = dt.date(2026, 1, 1), dt.date(2026, 3, 31)
    for by in ("key", "team"):
        assert await ledgers[0].report(None, since, until, by, PRICES) == await day_by_day(
            store, None, since, until, by)
    assert "ep:usage:ads:2026-02-10" in seen and "ep:usage:search:2026-03-05" in seen
    seen.clear()
    rows = await ledgers[0].report(None, since, until, "key", PRICES)
    assert not [k for k in seen if k.startswith("ep:usage:")]  # every month rolled up now
    assert rows == await day_by_day(store, None, since, until, "key")
    assert next(r for r in rows if r["key"] == "k9")["upstream_tokens"] == 12345


async def test_a_rebuild_never_writes_over_a_flush_made_meanwhile(store: Store) -> None:
    ledger = ledger_of(store)
    await fill([ledger], seed=4, days=(dt.date(2026, 2, 1), dt.date(2026, 2, 28)), n=300)
    await store.client.delete(KEYS.usage_month_days("ads", "2026-02"))  # February of ads to be rebuilt
    real = rollups._write_rebuilt

    async def flush_first(*args: Any) -> None:  # a flush lands between the report's reads and its rebuild
        ledger.record("ads", "late", "m-small", 10, 10, at=calendar.timegm((2026, 2, 14, 1, 0, 0)))
        await ledger.flush()
        await real(*args)

    rollups._write_rebuilt = flush_first  # type: ignore[assignment]
    try:
        await ledger.report("ads", dt.date(2026, 2, 1), dt.date(2026, 2, 28), "key", PRICES)
    finally:
        rollups._write_rebuilt = real  # type: ignore[assignment]
    feb = (dt.date(2026, 2, 1), dt.date(2026, 2, 28))
    for by in ("key", "day"):
        assert await ledger.report("ads", *feb, by, PRICES) == await day_by_day(
            store, "ads", *feb, by)


async def test_roll_ups_outlive_the_days_they_sum(store: Store) -> None:
    """Days expire after usage.retention_days; their month's roll-up twice as long, and reports by team, model or
    day over such a month still answer from it."""
    ledger = UsageLedger(store, KEYS, retention_days=30, clock=Clock(TODAY))
    await fill([ledger], seed=5, days=(dt.date(2026, 2, 1), dt.date(2026, 2, 28)), n=300)
    feb = (dt.date(2026, 2, 1), dt.date(2026, 2, 28))
    expected = {by: await day_by_day(store, None, *feb, by) for by in ("team", "model", "day")}
    assert 0 < await store.client.ttl(KEYS.usage("ads", "2026-02-03")) <= 30 * 86400
    assert 30 * 86400 < await store.client.ttl(KEYS.usage_month("ads", "2026-02")) <= 60 * 86400
    days = [(t, f"2026-02-{d:02d}") for t in ("ads", "search", "ml") for d in range(1, 29)]
    await store.client.delete(*[KEYS.usage(*s) for s in days], *[KEYS.usage_flushes(*s) for s in days])  # expired
    for by, rows in expected.items():
        assert await ledger.report(None, *feb, by, PRICES) == rows  # type: ignore[arg-type]


async def test_reports_from_roll_ups_on_a_cluster(cluster: Cluster) -> None:
    store = _store(cluster.seeds, "cluster")
    try:
        ledgers = [ledger_of(store) for _ in range(2)]
        await fill(ledgers, seed=6, n=1500)
        await compare(store, ledgers[0], seed=7, n=3)
    finally:
        await store.close()


async def test_the_admin_report_gives_its_rows_by_day_beside_on_request(
        make_proxy: Any, upstream: Upstream, redis_server: RedisServer) -> None:
    """`daily=1`: the rows and, from the same reads, the rows by day (the console's chart): one request, not two."""
    redis_server.flush()
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_server.url, PROXY_ADMIN_KEY=ADMIN))
    key = await p.new_key("search")
    for i in range(3):
        assert (await p.embed(key, {"model": MODEL, "input": [f"rolled {i}", "same"]})).status == 200
    auth = {"Authorization": f"Bearer {ADMIN}"}
    today = dt.datetime.now(dt.UTC).date()
    since = today - dt.timedelta(days=40)

    async def get(query: str) -> Any:
        resp = await p.client.get(f"/admin/usage?since={since}&until={today}&{query}", headers=auth)
        return resp.status, await resp.json()

    status, both = await get("by=key&daily=1")
    assert status == 200 and both["data"] == (await get("by=key"))[1]["data"]
    assert both["daily"] == (await get("by=day"))[1]["data"] and both["daily"][0]["requests"] == 3
    assert "daily" not in (await get("by=key"))[1]
    for bad in ("daily=2", "daily=yes", "daily=1&format=csv"):
        status, err = await get(bad)
        assert status == 400 and err["error"]["param"] == "daily", bad


async def test_a_day_written_without_flush_marks_then_flushed_into_is_not_read_from_a_roll_up_without_it(
        store: Store) -> None:
    """A day's fields written by a ledger without flush marks (before an upgrade), then a batch flushed into the
    same day: the month's roll-up holds the batch alone, and its marks must not agree with the day's."""
    await store.client.hset(KEYS.usage("ads", "2026-03-01"), mapping={"old|m-odd|requests": 3,
                                                                       "old|m-odd|upstream_tokens": 999})
    await store.client.sadd(KEYS.usage_teams(), "ads")
    ledger = ledger_of(store)
    ledger.record("ads", "k1", "m-small", 100, 60, at=calendar.timegm((2026, 3, 1, 12, 0, 0)))
    await ledger.flush()
    march = (dt.date(2026, 3, 1), dt.date(2026, 3, 31))
    for _ in range(2):  # read from the days (and rolled up), then from the rebuilt roll-up
        for by in ("team", "key", "day"):
            rows = await ledger.report("ads", *march, by, PRICES)  # type: ignore[arg-type]
            assert rows == await day_by_day(store, "ads", *march, by), by  # type: ignore[arg-type]
    assert rows[0]["requests"] == 4 and rows[0]["upstream_tokens"] == 1059


async def test_a_report_over_the_last_month_of_the_calendar_is_empty_not_an_overflow(store: Store) -> None:
    ledger = ledger_of(store)
    for since in (dt.date(9999, 12, 1), dt.date(9999, 12, 31)):
        assert await ledger.report_daily(None, since, dt.date(9999, 12, 31), "day", PRICES) == ([], [])


class _Only:
    """A connection whose pipelines send only the EVALSHAs of one script (the others are dropped): a flush's
    commands landing on a cluster's nodes in any order."""

    def __init__(self, r: Any, sha: str) -> None:
        self._r, self._sha = r, sha

    def pipeline(self, transaction: bool = False) -> Any:
        pipe, sha = self._r.pipeline(transaction=transaction), self._sha

        class Pipe:
            def execute_command(self, *args: Any) -> None:
                if args[0] != "EVALSHA" or args[1] == sha:
                    pipe.execute_command(*args)

            def sadd(self, *args: Any) -> None:
                pipe.sadd(*args)

            async def execute(self) -> Any:
                return await pipe.execute()

        return Pipe()


async def test_a_rebuild_between_a_batch_reaching_the_month_and_reaching_its_day_loses_nothing(store: Store) -> None:
    """On a Cluster a flush's month script may run before its day's (other nodes): a report rebuilding the month in
    between must not roll the month back below that batch, or the writer's next batch makes the marks agree
    while the month lacks the batch in flight."""
    ledger = ledger_of(store, writer="w1")
    at = calendar.timegm((2026, 3, 5, 12, 0, 0))
    ledger.record("ads", "k1", "m-small", 100, 60, at=at)
    await ledger.flush()  # batch 1: day and month
    ledger.record("ads", "k1", "m-small", 1000, 600, at=at)
    batch = rollups_batch(ledger)
    batch = type(batch)(2, batch.slots)
    await ledger._write(_Only(store.client, ledger._rollup.sha), batch=batch)  # batch 2 reaches the month
    march = (dt.date(2026, 3, 1), dt.date(2026, 3, 31))
    assert await ledger.report("ads", *march, "team", PRICES) == await day_by_day(store, "ads", *march, "team")
    await ledger._write(_Only(store.client, ledger._apply.sha), batch=batch)  # then its day
    ledger._seq = 2
    ledger.record("ads", "k1", "m-small", 10, 6, at=at)
    await ledger.flush()  # batch 3
    for by in ("team", "key", "day"):
        rows = await ledger.report("ads", *march, by, PRICES)  # type: ignore[arg-type]
        assert rows == await day_by_day(store, "ads", *march, by), by  # type: ignore[arg-type]
    assert rows[0]["upstream_tokens"] == 666


async def test_a_flush_during_a_report_by_key_adds_nothing_from_outside_its_range(store: Store) -> None:
    """A report by key over March 1-20 reads March's totals less its days after the 20th (today, the 25th, among
    them): a flush into today between the two reads must not add today's usage to the report."""
    today = calendar.timegm((2026, 3, 25, 18, 0, 0))
    ledger = UsageLedger(store, KEYS, clock=Clock(today))
    for d in range(1, 26):
        ledger.record("ads", "k1", "m-small", 100, 60, at=calendar.timegm((2026, 3, d, 12, 0, 0)))
    await ledger.flush()
    real = rollups._add_days

    async def flush_after(*args: Any, **kwargs: Any) -> None:  # a flush lands while the report reads
        await real(*args, **kwargs)
        ledger.record("ads", "k1", "m-small", 5000, 5000, at=today)
        await ledger.flush()

    rollups._add_days = flush_after  # type: ignore[assignment]
    try:
        rows = await ledger.report("ads", dt.date(2026, 3, 1), dt.date(2026, 3, 20), "key", PRICES)
    finally:
        rollups._add_days = real  # type: ignore[assignment]
    assert rows == await day_by_day(store, "ads", dt.date(2026, 3, 1), dt.date(2026, 3, 20), "key")
    assert rows[0]["requests"] == 20



@pytest.mark.parametrize("lost", ["month", "day"])
async def test_a_roll_up_or_a_day_that_lost_its_last_batch_never_agrees_with_the_other_again(
        store: Store, lost: str) -> None:
    """A failover (asynchronous replication) or a restore can take a month's roll-up back to before its last batch
    while the day (another Cluster node) keeps it, or the other way round: the writer's next batch must not make
    the marks agree again over a roll-up that lacks a batch its day has, or has one its day lacks. Reports give
    the day-by-day sums, then the month is rebuilt and takes the next batch."""
    ledger = ledger_of(store, writer="w1")
    at = calendar.timegm((2026, 3, 1, 12, 0, 0))
    ledger.record("ads", "k1", "m-small", 100, 60, at=at)
    await ledger.flush()  # batch 1
    names = ([KEYS.usage_month("ads", "2026-03"), KEYS.usage_month_days("ads", "2026-03")] if lost == "month"
             else [KEYS.usage("ads", "2026-03-01"), KEYS.usage_flushes("ads", "2026-03-01")])
    saved = [await store.client.dump(k) for k in names]
    ledger.record("ads", "k1", "m-small", 1000, 600, at=at)
    await ledger.flush()  # batch 2
    for k, d in zip(names, saved, strict=True):  # back to before batch 2
        await store.client.restore(k, 0, d, replace=True)
    ledger.record("ads", "k1", "m-small", 10, 6, at=at)
    await ledger.flush()  # batch 3
    march = (dt.date(2026, 3, 1), dt.date(2026, 3, 31))
    for _ in range(2):  # read from the days (and rolled up again), then from the rebuilt roll-up
        for by in ("team", "key", "day"):
            rows = await ledger.report("ads", *march, by, PRICES)  # type: ignore[arg-type]
            assert rows == await day_by_day(store, "ads", *march, by), by  # type: ignore[arg-type]
    assert rows[0]["upstream_tokens"] == (666 if lost == "month" else 66)
    ledger.record("ads", "k1", "m-small", 1, 1, at=at)
    await ledger.flush()  # batch 4 onto the rebuilt roll-up
    assert await ledger.report("ads", *march, "team", PRICES) == await day_by_day(store, "ads", *march, "team")


async def test_a_report_failing_on_a_malformed_field_rolls_up_nothing(store: Store) -> None:
    """A month without a roll-up whose ledger day holds a malformed field (here a metric this version does not
    know): the report fails, as it always did, and writes no roll-up. Before, the fields were decoded only when
    the rows were made, after the roll-up had been rebuilt from the days read: the field went into the roll-up,
    which agrees with the days, so every report over that month kept failing after the field was removed from the
    day (until the roll-up expired, twice the ledger's retention)."""
    ledger = ledger_of(store)
    ledger.record("ads", "k1", "m-small", 100, 60, at=TODAY - 40 * 86400)  # 2026-03-01
    await ledger.flush()
    await store.client.delete(KEYS.usage_month("ads", "2026-03"), KEYS.usage_month_days("ads", "2026-03"))
    await store.client.hset(KEYS.usage("ads", "2026-03-01"), "k1|m-small|bogus_tokens", 5)
    since, until = dt.date(2026, 3, 1), dt.date(2026, 3, 31)
    for by in ("team", "key"):
        with pytest.raises(KeyError):
            await ledger.report("ads", since, until, by, PRICES)
    assert not await store.client.exists(KEYS.usage_month("ads", "2026-03"), KEYS.usage_month_days("ads", "2026-03"))
    await store.client.hdel(KEYS.usage("ads", "2026-03-01"), "k1|m-small|bogus_tokens")
    for by in ("team", "key", "day"):
        rows = await ledger.report("ads", since, until, by, PRICES)
        assert rows == await day_by_day(store, "ads", since, until, by)
        assert sum(r["upstream_tokens"] for r in rows) == 60
    assert await store.client.exists(KEYS.usage_month("ads", "2026-03"))  # rolled up now, without the field
    assert await ledger.report("ads", since, until, "key", PRICES) == await day_by_day(store, "ads", since, until,
                                                                                        "key")
