"""The usage ledger against a real Redis: idempotent flushes, reports that cannot take the hot path down, money."""

from __future__ import annotations

import asyncio
import calendar
import csv
import datetime as dt
import io
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fractions import Fraction
from typing import Any

import orjson
import pytest
from redis.crc import key_slot

from proxy.accounts.usage import REPORT_CHUNK, UsageLedger, day_of, report_format
from proxy.config import RedisSettings
from proxy.http.app import KEYSTORE, STORE
from proxy.stores.guard import Store, StoreUnavailable, connect
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.forwarder import Forwarder
from tests.helpers import Clock

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "admin-secret-for-tests-0123456789"
DAY = "2026-11-05"
NOON = float(calendar.timegm((2026, 11, 5, 12, 0, 0)))
# Keeps Redis busy for ARGV[1] microseconds: every other client waits, and what they sent meanwhile is executed
# afterwards (as when a long script or a slow command stalls a real server).
BUSY = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1])
repeat t = redis.call('TIME') until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return 1
"""


@asynccontextmanager
async def busy_redis(server: RedisServer, seconds: float) -> AsyncIterator[asyncio.Task[Any]]:
    """Redis stalled by a busy Lua script for `seconds`, starting now; yields the task that ends with it."""
    client = server.client()
    task = asyncio.create_task(asyncio.to_thread(client.eval, BUSY, 0, int(seconds * 1e6)))
    await asyncio.sleep(0.05)  # the script is running
    try:
        yield task
    finally:
        await task
        client.close()


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[Any]:
    made: list[Store] = []

    def make(**redis: Any) -> Store:
        settings = RedisSettings(url=redis_url, **redis)
        store = Store(connect(settings)[0], settings)
        made.append(store)
        return store

    yield make
    for s in made:
        await s.close()


async def test_operator_calls_have_their_own_time_limit_and_never_mark_redis_down() -> None:
    now = Clock(100.0)
    errors: list[str] = []
    # operator_timeout_s far above the 50 ms call: a loaded machine (load 4) once made it miss a 0.2 s limit
    store = Store(object(), RedisSettings(socket_timeout_s=0.01, operator_timeout_s=2.0, retry_interval_s=5),
                  clock=now, on_error=errors.append)

    async def slow(_: Any) -> str:
        await asyncio.sleep(0.05)
        return "done"

    assert await store.call("report", slow, timeout_s=store.operator_timeout_s, mark_down=False) == "done"
    with pytest.raises(StoreUnavailable):
        await store.call("report", slow, timeout_s=0.02, mark_down=False)
    assert store.available and errors == ["report"]  # counted, but the hot path keeps using Redis
    with pytest.raises(StoreUnavailable):
        await store.call("mget", slow)  # the hot path's own limit: marks Redis down
    assert not store.available and errors == ["report", "mget"]
    # while the hot path bypasses Redis, operator work still tries it, and its success does not end the bypass
    assert await store.call("report", slow, timeout_s=store.operator_timeout_s, mark_down=False) == "done"
    assert not store.available
    with pytest.raises(StoreUnavailable, match="marked unavailable"):
        await store.call("mget", slow)


def test_ledger_key_formats_are_literal_and_share_a_slot() -> None:
    k = RedisKeys("ep")
    assert k.usage("search", DAY) == "ep:usage:search:2026-11-05"
    assert k.usage_flushes("search", DAY) == "ep:usage-flushes:{ep:usage:search:2026-11-05}"
    assert k.usage_teams() == "ep:usage-teams"
    assert key_slot(k.usage_flushes("search", DAY).encode()) == key_slot(k.usage("search", DAY).encode())


async def test_a_flush_that_timed_out_after_redis_applied_it_is_not_counted_twice(
    redis_server: RedisServer, stores: Any
) -> None:
    # The flush's time limit (0.3 s) is shorter than the stall (1 s): the client gives up, then Redis applies the
    # pipeline it had already received. The retry must be recognised as the same batch.
    store = stores(socket_timeout_s=0.1, operator_timeout_s=0.3)
    ledger = UsageLedger(store, RedisKeys("ep"), clock=Clock(NOON))
    ledger.record("ads", "key_z", MODEL, prompt_tokens=1, upstream_tokens=1)
    await ledger.flush()  # an earlier flush: the connection is open and the script loaded, as in a running proxy
    ledger.record("search", "key_a", MODEL, prompt_tokens=10, upstream_tokens=10)
    async with busy_redis(redis_server, 1.0) as stall:
        with pytest.raises(StoreUnavailable):
            await ledger.flush()
        ledger.record("search", "key_a", MODEL, prompt_tokens=4, upstream_tokens=1)  # lands in the next batch
        await stall
    assert store.available  # a slow background write does not make the hot path bypass Redis
    raw = redis_server.client()
    assert raw.hget("ep:usage:search:2026-11-05", "key_a|text-embedding-3-small|requests") == b"1"  # applied
    await ledger.flush()  # the same batch again (skipped), then the new one
    await ledger.flush()  # nothing left
    got = {k.decode(): int(v) for k, v in raw.hgetall("ep:usage:search:2026-11-05").items()}
    assert got == {"key_a|text-embedding-3-small|requests": 2, "key_a|text-embedding-3-small|upstream_tokens": 11,
                   "key_a|text-embedding-3-small|cached_tokens": 3}
    marks = raw.hgetall("ep:usage-flushes:{ep:usage:search:2026-11-05}")
    assert list(marks.values()) == [b"3"] and raw.ttl("ep:usage-flushes:{ep:usage:search:2026-11-05}") > 0


async def test_operator_work_waits_for_a_slow_connect_and_the_hot_path_does_not(redis_server: RedisServer) -> None:
    """Connecting to Redis took over socket_timeout_s on a loaded CI host (50 admin writes opening connections at
    once): each operator call failed although it had 5 s. A connect is now bounded by the call's own limit: an
    operator call waits for it, a hot-path call still gives up at socket_timeout_s (and marks Redis down)."""
    fwd = Forwarder(redis_server.port, accept_after_s=0.5)  # a new connection takes about 1 s
    await fwd.start()
    settings = RedisSettings(url=fwd.url, socket_timeout_s=0.25, operator_timeout_s=5.0)
    store = Store(connect(settings)[0], settings)
    try:
        hot = asyncio.create_task(store.call("mget", lambda r: r.ping()))
        started = time.monotonic()
        assert await store.operator_call("key-create", lambda r: r.ping()) is True
        assert 0.5 < time.monotonic() - started < 4.0
        with pytest.raises(StoreUnavailable):
            await hot
        assert not store.available
    finally:
        await store.close()
        await fwd.close()


async def test_start_up_reads_the_cache_secret_as_operator_work(
    make_proxy: Any, upstream: Upstream, redis_server: RedisServer
) -> None:
    """Redis 0.3 s a round trip away (a cluster still forming, a loaded host): reading the shared cache secret at
    start-up is not a request's call, so it gets operator_timeout_s and never marks Redis down. Before: it had
    socket_timeout_s (0.25 s), timed out, and Redis was bypassed, so the first requests with a key this process had
    not verified got 503 (a CI run on a Redis Cluster)."""
    fwd = Forwarder(redis_server.port, delay_s=0.15)
    await fwd.start()
    try:
        p: Proxy = await make_proxy(make_settings(upstream.base_url, fwd.url, ""))
        assert p.app[STORE].available
        stored = redis_server.client().get("ep:meta:cache-secret")
        assert stored is not None  # the secret this process adopted is the fleet's
    finally:
        await fwd.close()


async def test_start_up_does_not_wait_out_the_operator_limit_on_a_redis_that_never_answers(
    make_proxy: Any, upstream: Upstream, redis_server: RedisServer
) -> None:
    """Redis's host gone (SYNs dropped, nothing refused) and operator_timeout_s 10 s (long usage reports): with the
    cache secret read at start-up as operator work, the port opened only after all of it, so /healthz (liveness)
    went unanswered that long (break-it review of the change above). Start-up now gives the read at most
    START_READ_S (2 s); it took socket_timeout_s before that change."""
    fwd = Forwarder(redis_server.port, accept_after_s=60.0)  # SYNs dropped for the whole test
    await fwd.start()
    try:
        settings = make_settings(upstream.base_url, fwd.url, "[redis]\noperator_timeout_s = 10.0\n")
        async with asyncio.timeout(4.0):
            p: Proxy = await make_proxy(settings)
            assert (await p.client.get("/healthz")).status == 200
    finally:
        await fwd.close()


async def test_flush_reloads_its_script_after_a_redis_script_flush(redis_server: RedisServer, stores: Any) -> None:
    store = stores()
    ledger = UsageLedger(store, RedisKeys("ep"), clock=Clock(NOON))
    ledger.record("ads", "key_b", MODEL, prompt_tokens=3, upstream_tokens=0)
    redis_server.client().script_flush()
    await ledger.flush()
    rows = await ledger.report("ads", dt.date(2026, 11, 5), dt.date(2026, 11, 5), None, {})
    assert [(r["requests"], r["cached_tokens"]) for r in rows] == [(1, 3)]


async def test_report_reads_in_bounded_chunks_with_the_operator_time_limit(stores: Any) -> None:
    store = stores(operator_timeout_s=7.0)
    keys = RedisKeys("ep")
    ledger = UsageLedger(store, keys, retention_days=REPORT_CHUNK + 1)  # a report covers at most the retention
    calls: list[tuple[str, Any, Any]] = []
    real_call = store.call

    async def spy(op: str, fn: Any, **kw: Any) -> Any:
        calls.append((op, kw.get("timeout_s"), kw.get("mark_down", True)))
        return await real_call(op, fn, **kw)

    store.call = spy  # type: ignore[method-assign]
    since = dt.date(2026, 1, 1)
    until = since + dt.timedelta(days=REPORT_CHUNK)  # REPORT_CHUNK + 1 days of one team, in 17 months
    assert await ledger.report("search", since, until, None, {}) == []
    # one pipeline sizes the 17 month roll-ups, two read the sizes and flush marks of the months' 527 days
    assert calls == [("usage-report", 7.0, False)] * 3
    calls.clear()
    await ledger.report(None, since, since, "key", {})  # all teams: the team index is read first
    assert calls == [("usage-report", 7.0, False)]


async def test_money_is_text_with_6_decimals_and_rows_are_priced_per_model(stores: Any) -> None:
    store = stores()
    ledger = UsageLedger(store, RedisKeys("ep"), clock=Clock(NOON))
    prices = {MODEL: 0.02, "text-embedding-3-large": 0.13}
    for key_id, model, prompt, upstream in [("key_a", MODEL, 7, 3), ("key_b", MODEL, 5, 5),
                                            ("key_c", "text-embedding-3-large", 11, 2), ("key_a", MODEL, 1, 0),
                                            ("key_d", "text-embedding-3-large", 40_000, 30_000)]:
        ledger.record("search", key_id, model, prompt, upstream)
    await ledger.flush()
    day = dt.date(2026, 11, 5)
    (team,) = await ledger.report("search", day, day, None, prices)
    assert team["upstream_tokens"] == 30_010 and team["cached_tokens"] == 10_014
    # upstream: 8 x 0.02 + 30,002 x 0.13 = 3900.42 per million; cached: 5 x 0.02 + 10,009 x 0.13 = 1301.27
    assert (team["upstream_cost_usd"], team["saved_usd"]) == ("0.003900", "0.001301")
    by_key = {r["key"]: r for r in await ledger.report("search", day, day, "key", prices)}
    assert by_key["key_d"]["upstream_cost_usd"] == "0.003900" and by_key["key_d"]["saved_usd"] == "0.001300"
    assert by_key["key_b"]["upstream_cost_usd"] == "0.000000"  # 5 x 0.02 / 1e6: below half a micro-dollar
    for count in ("requests", "upstream_tokens", "cached_tokens", "total_tokens"):
        assert sum(r[count] for r in by_key.values()) == team[count]
    csv_row = report_format(None).csv([team]).splitlines()[1].split(",")
    assert csv_row[5:7] == ["0.003900", "0.001301"]
    assert "0.003900" in report_format(None).table([team])


async def test_money_prints_as_6_decimals_in_csv_and_json(
    stores: Any, make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    """2,763 upstream tokens and 14 cached at 0.02 per million: the chargeback CSV held `5.5259999999999996e-05`
    and `2.8e-07` (repr of binary floats); now `0.000055` and `0.000000`, in CSV and JSON, CLI and admin API."""
    ledger = UsageLedger(stores(), RedisKeys("ep"), clock=Clock(NOON))
    ledger.record("search", "key_a", MODEL, 2_777, 2_763)
    await ledger.flush()
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "REDIS_", "CACHE_REDIS_"))}
    cli_env["REDIS_URL"] = redis_url
    outputs: dict[str, str] = {}
    for fmt in ("csv", "json", "table"):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", "usage", "--since", DAY, "--until", DAY, "--format", fmt],
            env=cli_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        outputs[fmt] = done.stdout
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    for fmt in ("csv", "json"):
        resp = await p.client.get(f"/admin/usage?since={DAY}&until={DAY}&format={fmt}",
                                  headers={"Authorization": f"Bearer {ADMIN}"})
        assert resp.status == 200
        outputs["admin " + fmt] = await resp.text()
    for name in ("csv", "admin csv"):
        (row,) = csv.DictReader(io.StringIO(outputs[name]))
        assert (row["upstream_tokens"], row["cached_tokens"]) == ("2763", "14")
        assert (row["upstream_cost_usd"], row["saved_usd"]) == ("0.000055", "0.000000"), name
    for rows in (orjson.loads(outputs["json"]), orjson.loads(outputs["admin json"])["data"]):
        assert (rows[0]["upstream_cost_usd"], rows[0]["saved_usd"]) == ("0.000055", "0.000000")  # JSON strings
    assert "0.000055" in outputs["table"]
    for text in outputs.values():
        assert "e-0" not in text and "5.5259" not in text


async def test_a_report_by_key_names_each_key_beside_its_id(
    stores: Any, make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    """Issue 18: usage by key showed key ids only. Each row by key now carries the key's name (its team is the row's
    team): in the admin API's JSON and CSV (a last column, so the others keep their places), in the CLI's JSON and
    CSV alike, and beside the id in the CLI's table. A key without a name has "", one whose record is gone null."""
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, PROXY_ADMIN_KEY=ADMIN))
    keystore = p.app[KEYSTORE]
    _, named = await keystore.create("search", name="nightly index")
    _, unnamed = await keystore.create("search")
    _, quoted = await keystore.create("ads", name='batch, "eu"')  # a comma and quotes: CSV must quote it
    await keystore.create("ads", name="never used")  # not in the report: not in its rows
    ledger = UsageLedger(stores(), RedisKeys("ep"), clock=Clock(NOON))
    for team, key_id in [("search", named.id), ("search", unnamed.id), ("ads", quoted.id), ("ads", "key_gone")]:
        ledger.record(team, key_id, MODEL, 10, 4)
    await ledger.flush()
    expected = {named.id: ("search", "nightly index"), unnamed.id: ("search", ""), quoted.id: ("ads", 'batch, "eu"'),
                "key_gone": ("ads", None)}
    auth = {"Authorization": f"Bearer {ADMIN}"}
    resp = await p.client.get(f"/admin/usage?since={DAY}&until={DAY}&by=key", headers=auth)
    assert resp.status == 200
    rows = (await resp.json())["data"]
    assert {r["key"]: (r["team"], r["key_name"]) for r in rows} == expected
    resp = await p.client.get(f"/admin/usage?since={DAY}&until={DAY}&by=key&format=csv", headers=auth)
    admin_csv = await resp.text()
    header, *_ = admin_csv.splitlines()
    assert header == ("team,key,requests,upstream_tokens,cached_tokens,total_tokens,upstream_cost_usd,saved_usd,"
                      "failed_tokens,unconfirmed_tokens,key_name")  # appended: the old columns keep their places
    assert {r["key"]: (r["team"], r["key_name"]) for r in csv.DictReader(io.StringIO(admin_csv))} == {
        k: (team, name or "") for k, (team, name) in expected.items()}
    by_model = await (await p.client.get(f"/admin/usage?since={DAY}&until={DAY}&by=model&format=csv",
                                         headers=auth)).text()
    assert "key_name" not in by_model  # only a report by key names keys

    cli_env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "REDIS_", "CACHE_REDIS_"))}
    cli_env["REDIS_URL"] = redis_url
    out: dict[str, str] = {}
    for fmt in ("json", "csv", "table"):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy", "usage", "--since", DAY, "--until", DAY, "--by", "key",
                             "--format", fmt], env=cli_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        out[fmt] = done.stdout
    assert orjson.loads(out["json"]) == rows and out["csv"] == admin_csv  # the CLI and the API give the same rows
    head, *lines = out["table"].splitlines()
    assert head.split()[:4] == ["team", "key", "key_name", "requests"]  # the name beside the id
    for key_id, (team, name) in expected.items():
        (line,) = [ln for ln in lines if key_id in ln]
        assert line.split(key_id)[0].split() == [team]
        assert line.split(key_id)[1].lstrip().startswith(name or "-")


async def test_a_sum_of_many_small_costs_is_exact(stores: Any) -> None:
    """1,005 models at 0.1 per million, one token each: 100.5 per million, so 0.0001005, half up 0.000101. Added
    as binary floats the same costs make 100.49999999999859 per million (0.000100)."""
    models = [f"model-{i}" for i in range(1005)]
    prices = dict.fromkeys(models, 0.1)
    assert f"{sum(1 * prices[m] for m in models) / 1e6:.6f}" == "0.000100"  # the drift the report must not have
    ledger = UsageLedger(stores(), RedisKeys("ep"), clock=Clock(NOON))
    for m in models:
        ledger.record("search", "key_a", m, 2, 1)  # one token upstream, one cached
    await ledger.flush()
    day = dt.date(2026, 11, 5)
    (team,) = await ledger.report("search", day, day, None, prices)
    assert team["upstream_tokens"] == 1005
    assert (team["upstream_cost_usd"], team["saved_usd"]) == ("0.000101", "0.000101")
    exact = Fraction(1005, 10) / 10**6  # the oracle, in rationals
    assert Fraction(team["upstream_cost_usd"]) == Fraction(int(exact * 10**6 + Fraction(1, 2)), 10**6)


async def test_a_slow_admin_report_does_not_take_the_cache_down(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    # The hot path gives Redis 0.25 s; the report waits 0.8 s for a stalled Redis, within its own limit.
    settings = make_settings(upstream.base_url, redis_url, "[redis]\nsocket_timeout_s = 0.25\n"
                             "retry_interval_s = 5.0\noperator_timeout_s = 5.0\n", PROXY_ADMIN_KEY=ADMIN)
    p: Proxy = await make_proxy(settings)
    key = await p.new_key("search")
    body = {"model": MODEL, "input": "hello there"}
    assert (await p.embed(key, body)).headers["x-cache"] == "miss"
    await settle(p)
    today = day_of(time.time())
    async with busy_redis(redis_server, 0.8):
        started = time.monotonic()
        report = await p.client.get(f"/admin/usage?since={today}&until={today}&by=key",
                                    headers={"Authorization": f"Bearer {ADMIN}"})
        waited = time.monotonic() - started
    assert report.status == 200, await report.text()
    assert waited > 0.25  # it did outlast the hot path's limit
    assert [r["requests"] for r in (await report.json())["data"]] == [1]
    assert p.app[STORE].available
    hit = await p.embed(key, body)  # right after: the cache is still in use
    assert hit.status == 200 and hit.headers["x-cache"] == "hit"


async def test_usage_lands_on_the_utc_day_it_happened(stores: Any) -> None:
    clock = Clock(float(calendar.timegm((2026, 11, 5, 23, 59, 59))))
    ledger = UsageLedger(stores(), RedisKeys("ep"), clock=clock)
    ledger.record("search", "key_a", MODEL, 4, 4)
    clock.now += 1  # 00:00:00 UTC: the next day
    ledger.record("search", "key_a", MODEL, 2, 0)
    ledger.record("search", "key_a", MODEL, 1, 1)
    await ledger.flush()
    by_day = await ledger.report("search", dt.date(2026, 11, 5), dt.date(2026, 11, 6), "day", {MODEL: 0.02})
    assert [(r["day"], r["requests"], r["total_tokens"]) for r in by_day] == [("2026-11-05", 1, 4),
                                                                              ("2026-11-06", 2, 3)]


async def test_a_flush_writes_what_was_pending_when_it_began_however_busy_the_process_is(stores: Any) -> None:
    # Traffic that records usage during every round trip: a flush that chased it would never end.
    store = stores()
    ledger = UsageLedger(store, RedisKeys("ep"), clock=Clock(NOON))
    writes: list[str] = []
    real = store.operator_call

    async def busy(op: str, fn: Any) -> Any:
        writes.append(op)
        # during each flush's round trips (a report's, however many, record nothing); bounded, so a flush that
        # chases new usage ends too (and fails the test)
        if op == "usage-flush" and len(writes) < 50:
            ledger.record("search", "key_a", MODEL, prompt_tokens=1, upstream_tokens=1)
        return await real(op, fn)

    store.operator_call = busy  # type: ignore[method-assign]
    ledger.record("search", "key_a", MODEL, prompt_tokens=5, upstream_tokens=5)
    await ledger.flush()
    assert writes == ["usage-flush"]  # one batch: the usage recorded during it waits for the next flush
    rows = await ledger.report("search", dt.date(2026, 11, 5), dt.date(2026, 11, 5), None, {})
    assert [(r["requests"], r["upstream_tokens"]) for r in rows] == [(1, 5)]
    writes.clear()
    await ledger.flush()
    assert writes == ["usage-flush"]
    rows = await ledger.report("search", dt.date(2026, 11, 5), dt.date(2026, 11, 5), None, {})
    assert [(r["requests"], r["upstream_tokens"]) for r in rows] == [(2, 6)]  # + 1 recorded during the first flush


async def test_a_report_waits_for_the_flush_only_so_long(redis_server: RedisServer, stores: Any) -> None:
    store = stores(operator_timeout_s=5.0)
    ledger = UsageLedger(store, RedisKeys("ep"), clock=Clock(NOON))
    ledger.record("ads", "key_z", MODEL, prompt_tokens=1, upstream_tokens=1)
    await ledger.flush()  # connection open, script loaded
    ledger.record("search", "key_a", MODEL, prompt_tokens=10, upstream_tokens=10)
    async with busy_redis(redis_server, 1.0):
        # within operator_timeout_s the flush would succeed once Redis is free; the report does not wait for it
        with pytest.raises(StoreUnavailable, match=r"usage flush took over 0\.2s"):
            await ledger.flush(wait_s=0.2)
    await ledger.flush()  # the batch given up on, resent as itself: applied once
    raw = redis_server.client()
    got = {k.decode(): int(v) for k, v in raw.hgetall("ep:usage:search:2026-11-05").items()}
    assert got == {"key_a|text-embedding-3-small|requests": 1, "key_a|text-embedding-3-small|upstream_tokens": 10}


@pytest.fixture
async def distant_redis(redis_server: RedisServer, redis_url: str) -> AsyncIterator[Forwarder]:
    """The test Redis 10 ms away each way (request it before make_proxy: the proxy closes first)."""
    fwd = Forwarder(redis_server.port, delay_s=0.01)
    await fwd.start()
    yield fwd
    await fwd.close()


async def test_invariant_ledger_writes_once_per_interval_and_reports_answer_under_traffic(
    distant_redis: Forwarder, make_proxy: Any, upstream: Upstream, redis_server: RedisServer
) -> None:
    """Redis 20 ms away and steady traffic: the ledger is written about once per flush interval, and
    GET /admin/usage answers within a second while the traffic goes on."""
    interval, seconds = 0.5, 3.0
    fwd = distant_redis
    config = f"[usage]\nflush_interval_s = {interval}\n[redis]\nsocket_timeout_s = 2.0\n"
    p: Proxy = await make_proxy(make_settings(upstream.base_url, fwd.url, config, PROXY_ADMIN_KEY=ADMIN))
    key = await p.new_key("search")
    stop = asyncio.Event()
    answered = 0

    async def traffic(worker: int) -> None:
        nonlocal answered
        for n in range(100_000):  # bounded; ends when told
            if stop.is_set():
                return
            resp = await p.embed(key, {"model": MODEL, "input": [f"hot {n % 4}", f"w{worker} {n % 50}"]})
            assert resp.status == 200
            answered += 1

    started = time.monotonic()
    load = [asyncio.create_task(traffic(w)) for w in range(16)]
    try:
        await asyncio.sleep(seconds / 2)
        asked = time.monotonic()
        today = day_of(time.time())
        report = await asyncio.wait_for(p.client.get(f"/admin/usage?since={today}&until={today}",
                                                     headers={"Authorization": f"Bearer {ADMIN}"}), 30)
        waited = time.monotonic() - asked
        assert report.status == 200 and answered > 0
        await asyncio.sleep(seconds / 2)
    finally:
        stop.set()
        await asyncio.gather(*load)
    ran = time.monotonic() - started
    assert waited < 1.0, f"the report waited {waited:.2f}s for the flush"
    marks = redis_server.client().hgetall(f"ep:usage-flushes:{{ep:usage:search:{today}}}")
    assert len(marks) == 1  # one process, one writer
    batches = int(next(iter(marks.values())))  # its batches are numbered 1, 2, ...: the last is the count
    assert answered > 10 * batches  # the traffic went on between writes
    assert 2 <= batches <= ran / interval + 2  # the periodic flushes, plus the report's
