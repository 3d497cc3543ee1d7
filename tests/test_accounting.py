"""Every token the upstream billed is in the ledger and the quota counters, attributed to the request that sent
it, whatever became of that request: shared calls that fail, own chunks that fail, cancellation, cache reads whose
quota reply is lost, and the day boundary. Real Redis, the mock upstream as a real server."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

from proxy.config.limits import Limits
from proxy.embeddings.request import parse_request
from proxy.embeddings.service import Trace
from proxy.http.app import KEYSTORE, LEDGER, QUOTAS, SERVICE
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import Clock

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
X, Y, Z = "shared input x", "only mine y", "a third one z"  # 3, 3 and 4 tokens (cl100k_base)
# The first line lands in [upstreams.default]: one attempt per call, so an injected failure is final.
QUICK = "max_retries = 0\n[quotas]\nteam_cache_s = 60.0\n"
TEAMS = "[teams.alpha]\ntpm = 100000\n[teams.beta]\ntpm = 100000\n"


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a condition the test does not control the timing of (a request reaching the mock)."""
    for _ in range(2000):  # 10 s at most
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def ledger(r: redis.Redis, team: str) -> dict[str, int]:
    """A team's ledger, every day, key and model summed by metric."""
    out = {"requests": 0, "upstream_tokens": 0, "cached_tokens": 0, "failed_tokens": 0}
    for name in r.scan_iter(f"ep:usage:{team}:*"):
        for field, value in r.hgetall(name).items():
            out[field.decode().rsplit("|", 1)[1]] += int(value)
    return out


def counted(r: redis.Redis, team: str, metric: str = "tok") -> int:
    """A team's quota counters of `metric`, every window (minute keys: a test may cross a minute)."""
    return sum(int(r.get(k) or 0) for k in r.scan_iter(f"ep:q:{{{team}}}:t:{metric}:m*"))


async def flushed(p: Proxy) -> None:
    await settle(p)
    await p.app[LEDGER].flush()


@pytest.mark.parametrize(
    ("a_inputs", "status", "a_status", "b_status", "beta"),
    [
        # A's call failed for a reason that is not B's input: B sends x itself, is answered, pays for x and y
        ([X], 500, 502, 200, {"requests": 1, "upstream_tokens": 6, "cached_tokens": 0, "failed_tokens": 0}),
        # A 400 for a call that also carried A's own z may be about z (and its message is A's): B sends x itself
        ([X, Z], 400, 400, 200, {"requests": 1, "upstream_tokens": 6, "cached_tokens": 0, "failed_tokens": 0}),
        # A 400 for a call of x alone is about x: relayed to B, whose own y was billed all the same
        ([X], 400, 400, 400, {"requests": 0, "upstream_tokens": 3, "cached_tokens": 0, "failed_tokens": 3}),
    ],
)
async def test_a_request_sharing_a_failed_call_keeps_what_it_was_billed_for(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer,
    a_inputs: list[str], status: int, a_status: int, b_status: int, beta: dict[str, int],
) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, QUICK + TEAMS))
    ka, kb = await p.new_key("alpha"), await p.new_key("beta")
    upstream.settings.latency_ms = 300
    a = asyncio.create_task(p.embed(ka, {"model": MODEL, "input": a_inputs, "user": "alpha"}))
    await until(lambda: upstream.state.requests == 1)
    upstream.state.fail_next("status", status=status)  # A's call is at the mock: the failure is its answer
    b = await p.embed(kb, {"model": MODEL, "input": [X, Y], "user": "beta"})  # shares A's x, sends y itself
    assert ((await a).status, b.status) == (a_status, b_status)
    if b_status == 200:
        assert (await b.json())["usage"]["prompt_tokens"] == 6
    await flushed(p)
    r = redis_server.client()
    assert ledger(r, "beta") == beta
    assert ledger(r, "alpha") == {"requests": 0, "upstream_tokens": 0, "cached_tokens": 0, "failed_tokens": 0}
    assert dict(upstream.state.billed) == {"beta": beta["upstream_tokens"]}  # what the mock billed, by `user`
    assert counted(r, "beta") == beta["upstream_tokens"] and counted(r, "alpha") == 0


async def test_a_request_whose_own_chunk_fails_keeps_the_chunks_that_were_billed(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    two = '[models."text-embedding-3-small"]\ndimensions = 1536\nmax_batch_items = 2\n'
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, QUICK + TEAMS + two))
    key = await p.new_key("alpha")
    upstream.state.fail_next("status", status=400)  # one of its two calls is refused, the other one is billed
    resp = await p.embed(key, {"model": MODEL, "input": ["one", "two", "three", "four"], "user": "alpha"})
    assert resp.status == 400 and upstream.state.requests == 2
    await flushed(p)
    r = redis_server.client()
    assert dict(upstream.state.billed) == {"alpha": 2}
    assert ledger(r, "alpha") == {"requests": 0, "upstream_tokens": 2, "cached_tokens": 0, "failed_tokens": 2}
    assert counted(r, "alpha") == 2
    report = await p.app[LEDGER].report("alpha", *_days(r, "alpha"), None, {MODEL: 500.0})
    assert [(row["requests"], row["upstream_tokens"], row["failed_tokens"], row["total_tokens"]) for row in report] \
        == [(0, 2, 2, 0)]  # billed, priced, never served
    assert report[0]["upstream_cost_usd"] == "0.001000"  # 2 tokens at 500 per million, as text (money.py)


def _days(r: redis.Redis, team: str) -> tuple[dt.date, dt.date]:
    days = sorted(dt.date.fromisoformat(k.decode().rsplit(":", 1)[1]) for k in r.scan_iter(f"ep:usage:{team}:*"))
    return days[0], days[-1]


async def test_a_cancelled_request_gives_back_only_the_tokens_that_were_not_billed(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, QUICK + TEAMS))
    _, record = await p.app[KEYSTORE].create("alpha")
    upstream.settings.latency_ms = 300
    service, quotas, models = p.app[SERVICE], p.app[QUOTAS], p.app[SERVICE]._settings.models

    async def start(text: str, user: str) -> asyncio.Task[Any]:
        req = parse_request(orjson.dumps({"model": MODEL, "input": [text], "user": user}), models)
        return asyncio.create_task(service.embed(req, record, await quotas.ticket(record), Trace()))

    failing = await start(X, "alpha")
    await until(lambda: upstream.state.requests == 1)
    upstream.state.fail_next("status", status=500)  # the first call's answer, after its request is cancelled
    billed = await start(Z, "alpha-z")  # another `user`: a call of its own now, not micro-batched after X's
    await until(lambda: upstream.state.requests == 2)
    r = redis_server.client()
    assert counted(r, "alpha") == 3 + 4  # both reserved
    failing.cancel()
    billed.cancel()  # as at shutdown, once the shutdown timeout is over
    for task in (failing, billed):
        with pytest.raises(asyncio.CancelledError):
            await task
    await flushed(p)
    assert counted(r, "alpha") == 4  # X's reservation given back, Z's billed tokens kept
    assert ledger(r, "alpha") == {"requests": 0, "upstream_tokens": 4, "cached_tokens": 0, "failed_tokens": 4}
    assert dict(upstream.state.billed) == {"alpha-z": 4}


async def test_a_quota_reply_is_kept_when_only_the_cache_read_beside_it_failed(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, QUICK + "[teams.alpha]\nrpm = 10\n"))
    key = await p.new_key("alpha")
    assert (await p.embed(key, {"model": MODEL, "input": "one"})).status == 200  # the quota script is loaded
    r = own_redis.client()
    r.execute_command("ACL", "SETUSER", "default", "-mget")  # MGET answers an error; the quota script runs
    resp = await p.embed(key, {"model": MODEL, "input": "two"})
    assert resp.status == 200 and resp.headers["x-ratelimit-remaining-requests"] == "8"
    assert counted(r, "alpha", "req") == 2  # charged once, not once in the pipeline and again alone


async def test_a_charge_whose_reply_was_lost_is_not_charged_again_in_process(
    make_proxy: Any, upstream: Upstream, own_redis: RedisServer
) -> None:
    config = QUICK + '[redis]\nsocket_timeout_s = 0.2\nretry_interval_s = 30.0\n[cache]\nlocal_max_mb = 0\n'
    p: Proxy = await make_proxy(make_settings(upstream.base_url, own_redis.url, config))
    warm = await p.new_key("alpha")
    key = await p.new_key("alpha", limits=Limits(rpm=2))
    assert (await p.embed(warm, {"model": MODEL, "input": "warm"})).status == 200  # team limits read (none)
    assert (await p.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status == 200  # verified
    r = own_redis.client()
    r.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # Redis takes the pipeline and answers too late
    statuses = [(await p.embed(key, {"model": MODEL, "input": f"x{i}"})).status for i in range(4)]
    # The first request's charge went to Redis in its cache read's pipeline (its reply lost): it counts there,
    # not also in process, where the next two fit the key's rpm of 2 (the bound during an outage, see README).
    assert statuses == [200, 200, 200, 429]


async def test_quotas_and_ledger_put_a_request_on_the_day_it_started(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: RedisServer
) -> None:
    midnight = calendar.timegm((2100, 1, 1, 0, 0, 0))
    clock = Clock(midnight - 0.5)
    config = QUICK + "[teams.alpha]\ntokens_per_day = 1000\n"
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config), clock=clock)
    key, record = await p.app[KEYSTORE].create("alpha")
    upstream.settings.latency_ms = 200
    resp = asyncio.create_task(p.embed(key, {"model": MODEL, "input": "the quick brown fox"}))
    await until(lambda: upstream.state.requests == 1)
    clock.now = midnight + 0.5  # the upstream answers after midnight
    assert (await resp).status == 200
    await flushed(p)
    r = redis_server.client()
    base = f"{record.id}|{MODEL}|"
    assert r.hgetall("ep:usage:alpha:2099-12-31") == {  # fields at 0 are not written
        (base + "requests").encode(): b"1", (base + "upstream_tokens").encode(): b"4",
    }
    assert not r.exists("ep:usage:alpha:2100-01-01")
    assert r.get("ep:q:{alpha}:t:tok:d20991231") == b"4" and not r.exists("ep:q:{alpha}:t:tok:d21000101")

