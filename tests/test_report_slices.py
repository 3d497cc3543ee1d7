"""Issue 21, point 6: long admin work (usage reports over many days and keys, key lists) reaches the event loop in
bounded pieces. Before, a report read up to 500 days in one pipeline (300 keys x 5 fields: 750,000 fields in one
reply, parsed and added up without a pause) and a key list read every record in one go.
The same against a real proxy process with live traffic: tests/test_report_beside_traffic.py.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import functools
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.accounts import usagereport
from proxy.accounts.keyindex import LIST_CHUNK
from proxy.accounts.keys import KeyStore
from proxy.accounts.slices import mapped
from proxy.accounts.usage import UsageLedger
from proxy.accounts.usagereport import REPORT_FIELDS_PER_READ, Tally, parts
from proxy.config import RedisSettings
from proxy.stores.guard import Store, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import RedisServer
from tests.helpers import Clock
from tests.redis_servers import Cluster
from tests.test_report_beside_traffic import write_ledger

pytestmark = pytest.mark.redis
PRICES = {"m-small": 0.02, "m-large": 0.13}


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    settings = RedisSettings(url=redis_url)
    s = Store(connect(settings)[0], settings)
    yield s
    await s.close()


def _spy(store: Store) -> list[tuple[str, Any]]:
    """Every operator call's op and result."""
    seen: list[tuple[str, Any]] = []
    real = store.operator_call

    async def spy(op: str, fn: Any) -> Any:
        result = await real(op, fn)
        seen.append((op, result))
        return result

    store.operator_call = spy  # type: ignore[method-assign]
    return seen


def test_parts_are_runs_of_bounded_fields_without_the_empty_days() -> None:
    slots = [("t", f"d{n}") for n in range(6)]
    f = REPORT_FIELDS_PER_READ
    sizes = [f * 6 // 10, 0, f * 3 // 10, f * 2 // 10, f * 18 // 10, 0]  # the 4th does not fit with the first two
    assert list(parts(slots, sizes)) == [[("t", "d0"), ("t", "d2")], [("t", "d3")], [("t", "d4")]]
    assert list(parts(slots, [0] * 6)) == []


async def test_a_report_brings_a_bounded_number_of_fields_per_round_trip(
        redis_server: RedisServer, store: Store) -> None:
    first = write_ledger(redis_server, "chargeback", keys=300, days=30)  # 1,500 fields a day
    ledger = UsageLedger(store, RedisKeys("ep"))
    seen = _spy(store)
    rows = await ledger.report("chargeback", first, first + dt.timedelta(days=29), "key", {})
    assert len(rows) == 300 and {r["requests"] for r in rows} == {2 * 30}
    hashes = [result for op, result in seen if op == "usage-report" and result and isinstance(result[0], dict)]
    assert sum(len(h) for h in hashes) == 30  # every day read once
    assert max(sum(len(fields) for fields in h) for h in hashes) <= REPORT_FIELDS_PER_READ


async def test_a_report_lets_other_tasks_run_while_it_adds_up(
        redis_server: RedisServer, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """After each Redis round trip the report adds up what it brought, in slices with other tasks running between
    them (here a slice is as short as can be, so every few hundred fields)."""
    monkeypatch.setattr("proxy.accounts.usagereport.SLICE_S", 0.0)
    first = write_ledger(redis_server, "chargeback", keys=300, days=30)
    ledger = UsageLedger(store, RedisKeys("ep"))
    turns, idle_turns, in_call = 0, 0, False

    async def ticker() -> None:  # counts the turns it gets while the report has no Redis call in flight
        nonlocal turns, idle_turns
        while True:
            await asyncio.sleep(0)
            turns += 1
            idle_turns += not in_call

    real = store.operator_call

    async def marked(op: str, fn: Any) -> Any:
        nonlocal in_call
        in_call = True
        try:
            return await real(op, fn)
        finally:
            in_call = False

    store.operator_call = marked  # type: ignore[method-assign]
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await ledger.report("chargeback", first, first + dt.timedelta(days=29), "key", {})
    task.cancel()
    # 45,000 fields added up in slices of a few hundred: the ticker ran between them
    assert idle_turns >= 45_000 // 512, (idle_turns, turns)


async def test_a_key_list_reads_in_slices(store: Store) -> None:
    keystore = KeyStore(store, RedisKeys("ep"))
    made = {(await keystore.create("search" if n % 2 else "ads"))[1].id for n in range(LIST_CHUNK * 2 + 5)}
    seen = _spy(store)
    listed = await keystore.list()
    assert {r.id for r in listed} == made
    # at most LIST_CHUNK records per round trip (keyindex.py): three slices for 205 keys, each its own call
    assert [op for op, _ in seen] == ["key-list"] * len(seen) and len(seen) >= 3
    assert {r.id for r in await keystore.list("ads")} == {r.id for r in listed if r.team == "ads"}


async def test_mapped_keeps_order_and_lets_the_loop_turn() -> None:
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    def slow(n: int) -> int:
        sum(range(2000))  # some microseconds each
        return n * 2

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    assert await mapped(range(20_000), slow) == [n * 2 for n in range(20_000)]
    task.cancel()
    assert turns > 10


async def _truth(store: Store, team: str, since: dt.date, until: dt.date) -> list[dict[str, Any]]:
    """A report by key as every day's ledger hash read whole (HGETALL) and added up."""
    days = [(since + dt.timedelta(days=n)).isoformat() for n in range((until - since).days + 1)]
    tally = Tally("key")
    for d in days:
        for _ in tally.add([(team, d)], [await store.client.hgetall(RedisKeys("ep").usage(team, d))]):
            pass
    return await tally.priced(PRICES)


def _scans(store: Store, repeat: bool = False) -> list[tuple[str, int]]:
    """Every HSCAN piece a report reads (hash, fields); with `repeat`, each piece brings the previous piece's fields
    again too, as HSCAN may while the hash is rehashed."""
    seen: list[tuple[str, int]] = []
    real = store.operator_call
    last: dict[bytes, bytes] = {}

    async def spy(op: str, fn: Any) -> Any:
        nonlocal last
        result = await real(op, fn)
        if isinstance(fn, functools.partial) and fn.func is usagereport._hscan:
            seen.append((fn.args[0], len(result[1])))
            if repeat:
                result, last = (result[0], {**last, **result[1]}), result[1]
        return result

    store.operator_call = spy  # type: ignore[method-assign]
    return seen


async def _large_hashes_are_read_in_pieces(store: Store) -> None:
    """A month of 600 keys x 2 models (month totals of about 3,600 fields) and one day when every key was used:
    both larger than one read, so read in several HSCAN round trips, and the report is exact."""
    rng = random.Random(3)
    ledger = UsageLedger(store, RedisKeys("ep"), clock=Clock(float(calendar.timegm((2026, 3, 5, 12, 0, 0)))))
    busy = calendar.timegm((2026, 2, 10, 12, 0, 0))
    for k in range(600):
        for model in PRICES:
            for at in (busy, calendar.timegm((2026, 2, rng.randrange(1, 29), 9, 0, 0))):
                ledger.record("big", f"key_{k:04d}", model, rng.randrange(1, 900), rng.randrange(0, 9), at=at)
        if k % 100 == 99:
            await ledger.flush()
    await ledger.flush()
    month, day = RedisKeys("ep").usage_month("big", "2026-02"), RedisKeys("ep").usage("big", "2026-02-10")
    assert await store.client.hlen(month) > REPORT_FIELDS_PER_READ
    assert await store.client.hlen(day) > REPORT_FIELDS_PER_READ
    for since, until, large in [(dt.date(2026, 2, 1), dt.date(2026, 2, 28), month),
                                (dt.date(2026, 2, 3), dt.date(2026, 2, 27), month),
                                (dt.date(2026, 2, 10), dt.date(2026, 2, 10), day)]:
        for repeat in (False, True):
            vars(store).pop("operator_call", None)  # the previous spy
            seen = _scans(store, repeat)
            rows = await ledger.report("big", since, until, "key", PRICES)
            assert len(rows) == 600 and rows == await _truth(store, "big", since, until), (since, until, repeat)
            pieces = [n for name, n in seen if name == large]
            assert len(pieces) >= 2 and max(pieces) <= 2 * REPORT_FIELDS_PER_READ, pieces


async def test_large_hashes_are_read_in_pieces(store: Store) -> None:
    await store.client.flushall()
    await _large_hashes_are_read_in_pieces(store)


async def test_large_hashes_are_read_in_pieces_on_a_cluster(cluster: Cluster) -> None:
    settings = RedisSettings(url=cluster.seeds, type="cluster", operator_timeout_s=30)
    store = Store(connect(settings)[0], settings)
    try:
        await _large_hashes_are_read_in_pieces(store)
    finally:
        await store.close()


class _Name(bytes):
    """A field name that counts its decodes."""
    decodes = 0

    def decode(self, *args: Any, **kwargs: Any) -> str:
        _Name.decodes += 1
        return super().decode(*args, **kwargs)


def _added(tally: Tally, months: list[dict[bytes, bytes]], **kw: Any) -> list[dict[str, Any]]:
    for month in months:
        for _ in tally.add([("t", "")], [month], **kw):
            pass
    out: list[dict[str, Any]] = []
    for _ in tally.rows(PRICES, out):
        pass
    return out


def test_a_report_decodes_each_distinct_field_name_once() -> None:
    """A 400-day report by key reads the same names (key|model|metric) in each of its 14 months: each is decoded
    once, not once per month read (before: 14 times; the decoding was most of the report's CPU)."""
    months = [{_Name(f"key_{k:04d}|{m}|{metric}".encode()): str(k + n).encode()
               for k in range(50) for m in PRICES for metric in ("requests", "upstream_tokens")} for n in range(14)]
    _Name.decodes = 0
    rows = _added(Tally("key"), months)
    assert _Name.decodes == 50 * 2 * 2
    assert len(rows) == 50
    assert rows[3]["requests"] == sum(2 * (3 + n) for n in range(14))  # two models' requests, each month's value
    assert rows[3]["upstream_tokens"] == rows[3]["requests"]


def test_a_tally_over_many_distinct_names_folds_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A report by day over ledger days meets new names every day: they are added into rows once more than FOLD_AT
    are waiting, so memory holds the rows, not every field read; the rows are the same either way."""
    days = [{f"key_{k}|m-small|upstream_tokens".encode(): b"3" for k in range(40)} for _ in range(10)]

    def by_day(fold_at: int) -> list[dict[str, Any]]:
        monkeypatch.setattr(Tally, "FOLD_AT", fold_at)
        tally = Tally("day")
        for n, h in enumerate(days):
            for _ in tally.add([("t", f"2026-01-{n + 1:02d}")], [h]):
                pass
            assert tally._waiting <= fold_at + len(h)
        out: list[dict[str, Any]] = []
        for _ in tally.rows(PRICES, out):
            pass
        return out

    folded = by_day(50)
    assert folded == by_day(10**9)
    assert [(r["day"], r["upstream_tokens"]) for r in folded] == [(f"2026-01-{n:02d}", 120) for n in range(1, 11)]


class _Work:
    """A clock that advances only by the work a Tally does: each value parsed, name decoded or price looked up, one
    `unit`."""

    def __init__(self, unit: float) -> None:
        self.now, self.unit = 0.0, unit

    def perf_counter(self) -> float:
        return self.now

    def value(self, n: int) -> Any:
        work = self

        class Value:
            def __int__(self) -> int:
                work.now += work.unit
                return n
        return Value()

    def prices(self, prices: dict[str, float]) -> dict[str, float]:
        work = self

        class Prices(dict[str, float]):
            def get(self, *args: Any) -> Any:
                work.now += work.unit
                return super().get(*args)
        return Prices(prices)

    def name(self, text: str) -> bytes:
        work = self

        class Name(bytes):
            def decode(self, *args: Any, **kwargs: Any) -> str:
                work.now += work.unit
                return super().decode(*args, **kwargs)
        return Name(text.encode())


def _holds(work: _Work, steps: Any) -> list[float]:
    """How long (by `work`'s clock) each run of `steps` held the loop, from one resume to its next yield."""
    held = []
    while True:
        started = work.now
        try:
            next(steps)
        except StopIteration:
            held.append(work.now - started)
            return held
        held.append(work.now - started)


def test_folding_the_waiting_names_stays_in_the_slice_it_starts_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names are decoded (folded) within the slice `add` or `rows` is in, not in a fresh slice of their own:
    before, an `add` that had used most of its slice folded for a whole slice more before it let the loop turn
    (a live request waited for two slices; measured on a report by day over ledger days: 2 ms steps, never 1 ms
    before the names were summed raw), and so did `rows` after its fold."""
    slice_s = usagereport.SLICE_S
    work = _Work(slice_s / 1000)  # a slice: 1,000 values parsed or names decoded
    monkeypatch.setattr(usagereport, "time", work)
    monkeypatch.setattr(Tally, "FOLD_AT", 800)
    # by key: 900 names, 900 values parsed (most of a slice, in checks of 256), then 900 names to decode
    days = [{work.name(f"k{k}|m-small|requests"): work.value(1) for k in range(450 * d, 450 * d + 450)}
            for d in range(2)]
    tally = Tally("key")
    held = _holds(work, tally.add([("t", "2026-01-01"), ("t", "2026-01-02")], days))
    # one check of the clock (every 256 values in add) past the slice at most
    assert max(held) <= slice_s + 256 * work.unit, held
    assert len(tally._rows) == 900
    # rows: the names folded first (900 decoded: most of a slice), then the rows priced (a unit a price looked up)
    monkeypatch.setattr(Tally, "FOLD_AT", 100_000)
    tally = Tally("key")
    tokens = [{work.name(f"k{k}|m-small|upstream_tokens"): work.value(5) for k in range(900)}]
    for _ in tally.add([("t", "2026-01-01")], tokens):
        pass
    out: list[dict[str, Any]] = []
    held = _holds(work, tally.rows(work.prices(PRICES), out))
    assert max(held) <= slice_s + 32 * work.unit, held  # a check every 32 names or rows
    assert len(out) == 900 and all(r["upstream_tokens"] == 5 for r in out)
