"""Issue 15, points 3, 10 (first bullet) and 11 (first bullet): every token the upstream may have billed is in the
ledger, and a client's own input never takes a deployment out of rotation. Real servers: the mock upstream (one
per deployment), a real redis-server, the proxy app on a real socket. Every test here fails on the code it was
written against."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import time

import pytest
import redis

from proxy.http.app import KEYSTORE, LEDGER, SERVICE
from proxy.tokens import get_encoding
from tests import test_fleet
from tests.conftest import Proxy, ProxyFactory, RedisServer, Upstream, free_port
from tests.test_break11 import one_model, up_toml
from tests.test_cli import cli
from tests.test_fleet import ADMIN, MODEL, Mocks, admin_upstreams, fleet_settings, metric

pytestmark = pytest.mark.redis
mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment
TEAM = "billing"
LIMITS = f"[teams.{TEAM}]\ntpm = 100000000\n"  # a limit: every request is charged, so the quota counters exist
MIS_SET = '{ upstream = "b", upstream_model = "text-embedding-3-large" }'  # 3072-d vectors for a 1536-d model


def tokens(text: str) -> int:
    return len(get_encoding("cl100k_base").encode_ordinary(text))


async def flushed(proxy: Proxy) -> None:
    await proxy.app[SERVICE].drain()
    await proxy.app[LEDGER].flush()


def ledger(r: redis.Redis) -> dict[str, int]:
    """The team's ledger, every day, key and model summed by column."""
    out = {"requests": 0, "upstream_tokens": 0, "cached_tokens": 0, "failed_tokens": 0, "unconfirmed_tokens": 0}
    for name in r.scan_iter(f"ep:usage:{TEAM}:*"):
        for field, value in r.hgetall(name).items():
            out[field.decode().rsplit("|", 1)[1]] += int(value)
    return out


def quota_tokens(r: redis.Redis) -> int:
    return sum(int(r.get(k) or 0) for k in r.scan_iter(f"ep:q:{{{TEAM}}}:t:tok:m*"))


# --- point 3: answers the upstream billed but the proxy refused ------------------------------------------------


async def test_refused_answers_of_a_mis_set_deployment_are_failed_tokens(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    """A model with a good 1536-d deployment and a mis-set one answering 3072-d vectors: the clients get 200s, the
    mis-set deployment's answers are refused (wrong size) but billed, and their usage is the request's failed
    tokens (in upstream_tokens, the quota and the cost), so the ledger holds what the mocks billed."""
    good, bad = await mocks(), await mocks()
    settings = fleet_settings(redis_url, up_toml("a", good) + up_toml("b", bad) + LIMITS,
                              one_model('{ upstream = "a", priority = 1 }', MIS_SET))  # b first, until it cools down
    proxy = await make_proxy(settings)
    key = await proxy.new_key(TEAM)
    served = 0
    for i in range(40):
        resp = await proxy.embed(key, {"model": MODEL, "input": [f"request {i} first", f"request {i} second"]})
        assert resp.status == 200, await resp.text()
        served += (await resp.json())["usage"]["prompt_tokens"]
    await flushed(proxy)
    assert bad.state.requests == 3 and bad.state.billed_tokens > 0  # allowed_fails = 3, then its cooldown
    got, r = ledger(redis_server.client()), redis_server.client()
    assert got["failed_tokens"] == bad.state.billed_tokens
    assert got["upstream_tokens"] == good.state.billed_tokens + bad.state.billed_tokens
    assert (got["requests"], got["upstream_tokens"] - got["failed_tokens"] + got["cached_tokens"]) == (40, served)
    assert quota_tokens(r) == got["upstream_tokens"]


async def test_refused_answers_of_a_models_only_deployment_are_failed_tokens(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    """The same mistake on a model's only deployment: every request is a 502, and every token billed is in the
    ledger as failed (the issue: 10 client 502s, 320 tokens billed, the ledger empty)."""
    bad = await mocks()
    proxy = await make_proxy(fleet_settings(redis_url, up_toml("b", bad) + LIMITS, one_model(MIS_SET)))
    key = await proxy.new_key(TEAM)
    for i in range(10):
        resp = await proxy.embed(key, {"model": MODEL, "input": f"only deployment {i}"})
        assert resp.status == 502
    await flushed(proxy)
    got = ledger(redis_server.client())
    assert bad.state.requests == 40 and bad.state.billed_tokens > 0  # max_retries = 3: four attempts each
    assert got == {"requests": 0, "upstream_tokens": bad.state.billed_tokens, "cached_tokens": 0,
                   "failed_tokens": bad.state.billed_tokens, "unconfirmed_tokens": 0}
    assert quota_tokens(redis_server.client()) == bad.state.billed_tokens


async def test_a_refused_answer_whose_usage_cannot_be_trusted_is_unconfirmed(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    """An answer whose usage is implausible (2**63 - 1 tokens) was billed by an amount nobody can read: its
    local count is unconfirmed, never its reported figure in upstream_tokens."""
    up = await mocks()
    proxy = await make_proxy(fleet_settings(redis_url, up_toml("a", up) + LIMITS, one_model('{ upstream = "a" }')))
    key = await proxy.new_key(TEAM)
    up.state.fail_next("usage_huge")
    up.state.fail_next("wrong_dims")
    text = "an answer with a lying usage"
    resp = await proxy.embed(key, {"model": MODEL, "input": text})
    assert resp.status == 200
    await flushed(proxy)
    assert up.state.requests == 3
    assert ledger(redis_server.client()) == {"requests": 1, "upstream_tokens": 2 * tokens(text), "cached_tokens": 0,
                                             "failed_tokens": tokens(text), "unconfirmed_tokens": tokens(text)}


# --- point 10: a client's own input takes deployments out of rotation ------------------------------------------


async def infinity_like_pair(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> tuple[Proxy, str, Upstream,
                                                                                               Upstream]:
    """Two deployments that behave as Infinity was measured to: whitespace-only inputs are 0 tokens (200), an
    input over 122,880 characters is a FastAPI 422. cooldown_s = 30: a deployment cooled down would show."""
    a, b = await mocks(strip_empty=True, max_chars=122_880), await mocks(strip_empty=True, max_chars=122_880)
    settings = fleet_settings(redis_url, up_toml("a", a, allowed_fails=1, cooldown_s=30.0) +
                              up_toml("b", b, allowed_fails=1, cooldown_s=30.0),
                              one_model('{ upstream = "a" }', '{ upstream = "b" }'))
    proxy = await make_proxy(settings)
    return proxy, await proxy.new_key(TEAM), a, b


async def assert_in_rotation(proxy: Proxy, key: str) -> None:
    for name, state in (await admin_upstreams(proxy)).items():
        assert (state["state"], state["consecutive_failures"], state["cooldowns"]) == ("healthy", 0, 0), name
    started = time.monotonic()
    resp = await proxy.embed(key, {"model": MODEL, "input": f"an ordinary request {started}"})
    assert resp.status == 200 and time.monotonic() - started < 5.0  # not a wait for a cooldown (30 s)


@pytest.mark.parametrize("blank", [" ", "\n", "\u200b", " \t\u200b\n"])
async def test_a_whitespace_only_input_is_a_zero_token_200(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, blank: str
) -> None:
    """The upstream strips it and answers 200 with 0 tokens: a valid answer (200, 0 tokens), not a malformed one
    retried on every deployment and counted against them. It is never cached (an entry always has tokens)."""
    proxy, key, a, b = await infinity_like_pair(make_proxy, mocks, redis_url)
    for _ in range(2):
        resp = await proxy.embed(key, {"model": MODEL, "input": blank})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["usage"]["prompt_tokens"] == 0 and len(body["data"][0]["embedding"]) == 1536
        await proxy.app[SERVICE].drain()
    assert a.state.requests + b.state.requests == 2  # once each: no retry, and the repeat was not a cache hit
    resp = await proxy.embed(key, {"model": MODEL, "input": ["visible", blank, "text"]})
    assert resp.status == 200
    assert (await resp.json())["usage"]["prompt_tokens"] == tokens("visible") + tokens("text")
    await assert_in_rotation(proxy, key)


async def test_an_input_the_upstream_refuses_is_the_clients_400_and_no_deployments_failure(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """125,000 characters (979 tokens, under max_input_tokens): the upstream's 422 is relayed as a 400 with its
    reason (not its echo of the input), sent to one deployment only, and no deployment is cooled down. Infinity's
    answer echoes the input twice (twice the request: more than the proxy keeps of an error answer), so its
    reasons are read from the part kept: before, the client was told only "It refused the request (status 422)"."""
    proxy, key, a, b = await infinity_like_pair(make_proxy, mocks, redis_url)
    text = "x" + " " * 124_998 + "y"
    for n in range(1, 3):
        resp = await proxy.embed(key, {"model": MODEL, "input": text})
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert error["message"] == ("Upstream: text.input.list[constrained-str]: String should have at most 122880 "
                                    "characters; text.input.constrained-str: Input should be a valid string")
        assert a.state.requests + b.state.requests == n
    await assert_in_rotation(proxy, key)
    assert metric(proxy, "embedding_proxy_upstream_errors_total", model=MODEL, kind="invalid_request") == 2


# --- point 11: billed but never read -----------------------------------------------------------------------------


async def test_attempts_that_timed_out_are_unconfirmed_tokens_in_ledger_reports_and_metrics(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    """Each attempt that was sent and timed out carries the request's tokens to unconfirmed_tokens (its own
    column, not upstream_tokens), in the ledger, every usage report and the metrics; the retries counter with
    reason upstream_timeout counts the timed-out attempts that were retried, which excludes a call's last one."""
    up = await mocks()
    proxy = await make_proxy(fleet_settings(
        redis_url, up_toml("a", up, attempt_timeout_s=0.5, deadline_s=10.0, max_retries=3),
        one_model('{ upstream = "a" }')))
    key, record = await proxy.app[KEYSTORE].create(TEAM)
    text = "stalled twice then answered"
    up.state.fail_next("timeout", times=2)
    assert (await proxy.embed(key, {"model": MODEL, "input": text})).status == 200
    other = "stalled on every attempt"
    up.state.fail_next("timeout", times=4)
    assert (await proxy.embed(key, {"model": MODEL, "input": other})).status == 504
    await flushed(proxy)
    unconfirmed = 2 * tokens(text) + 4 * tokens(other)
    assert ledger(redis_server.client()) == {"requests": 1, "upstream_tokens": tokens(text), "cached_tokens": 0,
                                             "failed_tokens": 0, "unconfirmed_tokens": unconfirmed}
    assert metric(proxy, "embedding_proxy_upstream_unconfirmed_tokens_total", team=TEAM, key_id=record.id,
                  model=MODEL) == unconfirmed
    assert metric(proxy, "embedding_proxy_upstream_unconfirmed_attempts_total", model=MODEL, upstream="a",
                  reason="timeout") == 6
    assert metric(proxy, "embedding_proxy_upstream_retries_total", model=MODEL, reason="upstream_timeout") == 5

    today = dt.datetime.now(dt.UTC).date().isoformat()
    auth = {"Authorization": f"Bearer {ADMIN}"}
    resp = await proxy.client.get(f"/admin/usage?since={today}&until={today}", headers=auth)
    assert [(r["team"], r["unconfirmed_tokens"]) for r in (await resp.json())["data"]] == [(TEAM, unconfirmed)]
    resp = await proxy.client.get(f"/admin/usage?since={today}&until={today}&format=csv", headers=auth)
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert list(rows[0])[-2:] == ["failed_tokens", "unconfirmed_tokens"]
    assert [(r["team"], r["unconfirmed_tokens"]) for r in rows] == [(TEAM, str(unconfirmed))]
    out = await asyncio.to_thread(cli, redis_url, "usage", "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [(r["team"], r["unconfirmed_tokens"]) for r in rows] == [(TEAM, str(unconfirmed))]


async def test_a_cut_connection_is_unconfirmed_and_a_refused_one_is_not(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer
) -> None:
    """A connection dropped after the request was sent may have been billed: unconfirmed. One that was never made
    (nothing listens) cannot have been: not counted."""
    up = await mocks()
    closed = f"http://127.0.0.1:{free_port()}/v1"
    settings = fleet_settings(
        redis_url, up_toml("a", up) + up_toml("dead", up).replace(up.base_url, closed),
        one_model('{ upstream = "dead" }', '{ upstream = "a", priority = 1 }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key(TEAM)
    up.state.fail_next("disconnect")
    text = "sent, then the connection dropped"
    assert (await proxy.embed(key, {"model": MODEL, "input": text})).status == 200
    await flushed(proxy)
    assert metric(proxy, "embedding_proxy_deployment_calls_total", model=MODEL, upstream="dead",
                  outcome="connect") >= 1
    assert ledger(redis_server.client()) == {"requests": 1, "upstream_tokens": tokens(text), "cached_tokens": 0,
                                             "failed_tokens": 0, "unconfirmed_tokens": tokens(text)}
    assert metric(proxy, "embedding_proxy_upstream_unconfirmed_attempts_total", model=MODEL, upstream="a",
                  reason="cut") == 1
    assert metric(proxy, "embedding_proxy_upstream_unconfirmed_attempts_total", model=MODEL, upstream="dead",
                  reason="cut") == 0
