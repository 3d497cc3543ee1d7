"""Quotas, keys and the admin API over HTTP, against a real Redis and the mock upstream."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from proxy.accounts.keys import KeyStore, hash_key
from proxy.accounts.usage import day_of
from proxy.config.limits import Limits
from proxy.http.app import KEYSTORE, LEDGER, STORE
from proxy.stores.rediskeys import RedisKeys
from tests.conftest import Proxy, Upstream, make_settings, settle
from tests.helpers import count_store_calls

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADMIN = "admin-secret-for-tests-0123456789"
QUICK = "[quotas]\nteam_cache_s = 0.0\n"


async def make(make_proxy: Any, upstream: Upstream, redis_url: str, config: str = "", *, quotas: str = "",
               upstream_config: str = "") -> Proxy:
    """A proxy whose [upstreams.default] gets `upstream_config`, [quotas] gets `quotas`, then `config`."""
    toml = upstream_config + QUICK + quotas + config
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, toml, PROXY_ADMIN_KEY=ADMIN))
    return p


async def admin(p: Proxy, method: str, path: str, body: Any = None, key: str = ADMIN) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await p.client.request(method, path, json=body, headers=headers)


def assert_openai_error(body: dict[str, Any], type_: str, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_ and body["error"]["code"] == code


async def test_requests_per_minute_429_shape_and_headers(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url, "[teams.search]\nrpm = 2\ntpm = 1000\n")
    key = await p.new_key("search")
    for remaining in ("1", "0"):
        ok = await p.embed(key, {"model": MODEL, "input": "hello"})
        assert ok.status == 200
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
        assert ok.headers["x-ratelimit-remaining-requests"] == remaining
        assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
        assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    upstream.state.reset()
    refused = await p.embed(key, {"model": MODEL, "input": "never sent"})
    assert refused.status == 429
    assert_openai_error(await refused.json(), "requests", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-limit-tokens"] == "1000"  # the other side too, as OpenAI sends both
    assert refused.headers["x-ratelimit-remaining-tokens"] == ok.headers["x-ratelimit-remaining-tokens"]
    assert refused.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert refused.headers["x-request-id"]
    assert upstream.state.requests == 0  # nothing went upstream
    other = await p.new_key("ads")  # another team is not affected
    assert (await p.embed(other, {"model": MODEL, "input": "hello"})).status == 200


async def test_tokens_per_minute_429_has_type_tokens_and_both_headers(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await make(make_proxy, upstream, redis_url, "[teams.search]\nrpm = 10\ntpm = 5\n")
    key = await p.new_key("search")
    assert (await p.embed(key, {"model": MODEL, "input": "one two three"})).status == 200
    refused = await p.embed(key, {"model": MODEL, "input": "four five six"})
    assert refused.status == 429
    body = await refused.json()
    assert_openai_error(body, "tokens", "rate_limit_exceeded")
    assert "limit 5, used 3, requested 3" in body["error"]["message"]
    assert {h: refused.headers[h] for h in ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                                            "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")} == {
        "x-ratelimit-limit-tokens": "5", "x-ratelimit-remaining-tokens": "2",
        "x-ratelimit-limit-requests": "10", "x-ratelimit-remaining-requests": "9",  # the refused one took no slot
    }
    assert refused.headers["x-ratelimit-reset-requests"] == refused.headers["x-ratelimit-reset-tokens"]


async def test_day_budget_is_insufficient_quota_and_cache_hits_are_free(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await make(make_proxy, upstream, redis_url)
    key = await p.new_key("search", limits=Limits(tokens_per_day=6))
    body = {"model": MODEL, "input": ["one two three", "four five six"]}  # 3 + 3 tokens
    first = await p.embed(key, body)
    assert first.status == 200 and first.headers["x-ratelimit-remaining-tokens"] == "0"
    await settle(p)
    again = await p.embed(key, body)  # all cached: billable tokens 0, so it still fits
    assert again.status == 200 and again.headers["x-cache"] == "hit"
    assert (await again.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 6
    over = await p.embed(key, {"model": MODEL, "input": "new"})
    assert over.status == 429
    assert_openai_error(await over.json(), "insufficient_quota", "insufficient_quota")
    assert int(over.headers["Retry-After"]) <= 86400


async def test_count_all_tokens_charges_cache_hits(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url, quotas='count = "all"\n')
    key = await p.new_key("search", limits=Limits(tpm=4))
    assert (await p.embed(key, {"model": MODEL, "input": "one two three"})).status == 200
    await settle(p)
    hit = await p.embed(key, {"model": MODEL, "input": "one two three"})
    assert hit.status == 429  # 3 + 3 > 4: under count = "all" a cache hit costs its tokens too


async def test_tokens_reserved_for_a_failed_request_are_given_back(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await make(make_proxy, upstream, redis_url, upstream_config="max_retries = 0\n")
    key = await p.new_key("search", limits=Limits(tpm=3))
    body = {"model": MODEL, "input": "one two three"}
    upstream.state.fail_next("status", times=1, status=500)
    failed = await p.embed(key, body)
    assert failed.status == 502
    ok = await p.embed(key, body)  # the 3 tokens came back: the retry fits exactly
    assert ok.status == 200, await ok.text()
    assert ok.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_model_allow_list_expiry_and_rotation_grace(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    ks = p.app[KEYSTORE]
    only_small, _ = await ks.create("search", models=(MODEL,))
    denied = await p.embed(only_small, {"model": "text-embedding-3-large", "input": "x"})
    assert denied.status == 403
    assert_openai_error(await denied.json(), "invalid_request_error", "model_not_allowed")
    models = await p.client.get("/v1/models", headers={"Authorization": f"Bearer {only_small}"})
    assert [m["id"] for m in (await models.json())["data"]] == [MODEL]

    expired, _ = await ks.create("search", expires_at=time.time() - 1)
    gone = await p.embed(expired, {"model": MODEL, "input": "x"})
    assert gone.status == 401 and (await gone.json())["error"]["code"] == "api_key_expired"

    old, record = await ks.create("search", name="svc", limits=Limits(rpm=3))
    rotated = await ks.rotate(record.id, grace_s=3600)
    assert rotated is not None
    new, new_record, old_record = rotated
    assert new_record.team == "search" and new_record.name == "svc" and new_record.limits == Limits(rpm=3)
    assert old_record.expires_at is None and old_record.grace_until is not None  # its own expiry is kept
    for k in (old, new):  # both work during the grace period, on one allowance: the key's rpm of 3
        assert (await p.embed(k, {"model": MODEL, "input": "x"})).status == 200
    assert (await p.embed(new, {"model": MODEL, "input": "x"})).status == 200
    for k in (old, new):
        assert (await p.embed(k, {"model": MODEL, "input": "x"})).status == 429

    # A grace period that is over (rotated on a clock an hour behind): the old key is refused, the new one works.
    late = KeyStore(p.app[STORE], RedisKeys("ep"), clock=lambda: time.time() - 3600)
    old2, record2 = await ks.create("search")
    rotated2 = await late.rotate(record2.id, grace_s=60)
    assert rotated2 is not None
    after = await p.embed(old2, {"model": MODEL, "input": "x"})
    assert after.status == 401 and (await after.json())["error"]["code"] == "api_key_expired"
    assert (await p.embed(rotated2[0], {"model": MODEL, "input": "x"})).status == 200


async def test_admin_api_authentication(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    gateway_key = await p.new_key("search")
    assert (await admin(p, "GET", "/admin/keys", key="")).status == 401
    assert (await admin(p, "GET", "/admin/keys", key="wrong")).status == 401
    refused = await admin(p, "GET", "/admin/keys", key=gateway_key)
    assert refused.status == 403
    assert_openai_error(await refused.json(), "invalid_request_error", "not_admin_key")
    assert (await admin(p, "GET", "/admin/keys")).status == 200
    # the admin key is not a gateway key either
    assert (await p.embed(ADMIN, {"model": MODEL, "input": "x"})).status == 401
    disabled: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    assert (await admin(disabled, "GET", "/admin/keys")).status == 403


async def test_admin_keys_and_teams(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    created = await admin(p, "POST", "/admin/keys", {"team": "ads", "name": "batch", "rpm": 1,
                                                       "models": [MODEL], "expires_in_s": 3600})
    assert created.status == 201
    doc = await created.json()
    key, key_id = doc["key"], doc["id"]
    assert doc["limits"]["rpm"] == 1 and doc["models"] == [MODEL] and doc["expires_at"] > time.time()
    assert (await p.embed(key, {"model": MODEL, "input": "a"})).status == 200
    assert (await p.embed(key, {"model": MODEL, "input": "b"})).status == 429
    patched = await admin(p, "PATCH", f"/admin/keys/{key_id}", {"rpm": None})
    assert (await patched.json())["limits"]["rpm"] is None
    assert (await p.embed(key, {"model": MODEL, "input": "b"})).status == 200

    listed = await (await admin(p, "GET", "/admin/keys?team=ads")).text()
    assert key_id in listed and key not in listed and hash_key(key) not in listed
    shown = await (await admin(p, "GET", f"/admin/keys/{key_id}")).json()
    assert shown["name"] == "batch" and "key" not in shown
    assert (await admin(p, "GET", "/admin/keys/key_nope")).status == 404

    team = await admin(p, "PUT", "/admin/teams/ads", {"tpm": 2})
    assert (await team.json())["limits"]["tpm"] == 2
    over = await p.embed(key, {"model": MODEL, "input": "three new tokens here"})
    assert over.status == 429 and "team 'ads'" in (await over.json())["error"]["message"]
    teams = await (await admin(p, "GET", "/admin/teams")).json()
    assert {"team": "ads", "limits": {"rpm": None, "tpm": 2, "tokens_per_day": None, "tokens_per_month": None},
            "source": "runtime", "keys": 1} in teams["data"]
    bad = await admin(p, "DELETE", "/admin/teams/Not%20A%20Team")
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "team"
    reset = await admin(p, "DELETE", "/admin/teams/ads")  # back to the config (none for ads): unlimited again
    assert reset.status == 200 and (await reset.json())["limits"]["tpm"] is None
    assert (await p.embed(key, {"model": MODEL, "input": "three new tokens here"})).status == 200
    # no limits of its own any more: listed for its key alone, with no source
    assert [t["source"] for t in (await (await admin(p, "GET", "/admin/teams")).json())["data"]
            if t["team"] == "ads"] == [None]
    await admin(p, "PUT", "/admin/teams/ads", {"tpm": 2})

    rotated = await admin(p, "POST", f"/admin/keys/{key_id}/rotate", {"grace_s": 60})
    assert rotated.status == 201
    new = await rotated.json()
    assert new["key"] != key and new["previous"]["id"] == key_id and new["previous"]["grace_until"] <= time.time() + 60
    assert new["expires_at"] == doc["expires_at"] == new["previous"]["expires_at"]  # the key's own expiry
    assert new["lineage"] == key_id == new["previous"]["lineage"]
    again = await (await admin(p, "POST", f"/admin/keys/{key_id}/rotate", {"grace_s": 60})).json()
    assert again["expires_at"] == doc["expires_at"]  # a second rotation: still the original expiry
    revoked = await admin(p, "POST", f"/admin/keys/{key_id}/revoke")
    assert (await revoked.json())["revoked"] is True
    assert (await p.embed(key, {"model": MODEL, "input": "a"})).status == 401
    refused = await admin(p, "POST", f"/admin/keys/{key_id}/rotate", {"grace_s": 60})
    assert refused.status == 409
    assert_openai_error(await refused.json(), "invalid_request_error", "key_revoked")
    _, lapsed_record = await p.app[KEYSTORE].create("ads", expires_at=time.time() - 1)
    refused = await admin(p, "POST", f"/admin/keys/{lapsed_record.id}/rotate")
    assert refused.status == 409
    assert_openai_error(await refused.json(), "invalid_request_error", "key_expired")

    for bad in ({"team": "Bad Team"}, {"team": "ads", "rpm": -1}, {"team": "ads", "color": "red"},
                {"team": "ads", "models": ["nope"]}, {}):
        r = await admin(p, "POST", "/admin/keys", bad)
        assert r.status == 400, bad
        assert_openai_error(await r.json(), "invalid_request_error", (await r.json())["error"]["code"])
    bad_json = await p.client.post("/admin/keys", data=b"{", headers={"Authorization": f"Bearer {ADMIN}"})
    assert bad_json.status == 400


async def test_key_names_are_at_most_200_characters(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    p = await make(make_proxy, upstream, redis_url)
    at_bound = await admin(p, "POST", "/admin/keys", {"team": "ads", "name": "é" * 200})
    assert at_bound.status == 201 and (await at_bound.json())["name"] == "é" * 200
    beyond = await admin(p, "POST", "/admin/keys", {"team": "ads", "name": "n" * 201})
    assert beyond.status == 400
    assert (await beyond.json())["error"] == {
        "message": "Key names are at most 200 characters (this one has 201).", "type": "invalid_request_error",
        "param": "name", "code": None}
    assert [r["name"] for r in (await (await admin(p, "GET", "/admin/keys?team=ads")).json())["data"]] == ["é" * 200]


async def test_usage_report_adds_up_to_what_clients_were_told(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await make(make_proxy, upstream, redis_url)
    k1 = await p.new_key("search", name="one")
    k2 = await p.new_key("search", name="two")
    k3 = await p.new_key("ads")
    told: dict[tuple[str, str], list[int]] = {}  # (team, model) -> [requests, prompt, cached]
    traffic = [
        (k1, "search", MODEL, ["alpha beta", "gamma"]),
        (k1, "search", MODEL, ["alpha beta", "gamma", "delta"]),  # partial hit
        (k2, "search", "text-embedding-3-large", "gamma delta epsilon"),
        (k2, "search", MODEL, ["gamma", "gamma", "gamma"]),  # hits and repeats
        (k3, "ads", MODEL, [[791, 4062], [14198]]),
    ]
    for key, team, model, inp in traffic:
        resp = await p.embed(key, {"model": model, "input": inp})
        assert resp.status == 200
        usage = (await resp.json())["usage"]
        t = told.setdefault((team, model), [0, 0, 0])
        t[0] += 1
        t[1] += usage["prompt_tokens"]
        t[2] += usage["prompt_tokens_details"]["cached_tokens"]
        await settle(p)
    assert (await p.embed(k1, {"model": MODEL, "input": ""})).status == 400  # refused: not in the ledger

    await p.client.close()  # shutdown flushes the ledger; a new proxy reads it back from Redis
    q: Proxy = await make(make_proxy, upstream, redis_url)
    today = day_of(time.time())
    resp = await admin(q, "GET", f"/admin/usage?since={today}&until={today}&by=model")
    rows = (await resp.json())["data"]
    got = {(r["team"], r["model"]): [r["requests"], r["total_tokens"], r["cached_tokens"]] for r in rows}
    assert got == {k: v for k, v in told.items()}
    for r in rows:
        assert r["upstream_tokens"] + r["cached_tokens"] == r["total_tokens"]
        price = {MODEL: 0.02, "text-embedding-3-large": 0.13}[r["model"]]
        for money, tokens in (("upstream_cost_usd", "upstream_tokens"), ("saved_usd", "cached_tokens")):
            exact = Decimal(r[tokens]) * Decimal(str(price)) / 10**6  # money is text with 6 decimals, half up
            assert r[money] == str(exact.quantize(Decimal("0.000001"), ROUND_HALF_UP))

    by_key = await (await admin(q, "GET", f"/admin/usage?team=search&since={today}&until={today}&by=key"
                                "&format=csv")).text()
    table = list(csv.DictReader(io.StringIO(by_key)))
    assert {r["team"] for r in table} == {"search"} and len(table) == 2
    assert sum(int(r["requests"]) for r in table) == 4
    assert sum(int(r["total_tokens"]) for r in table) == sum(v[1] for k, v in told.items() if k[0] == "search")
    assert (await admin(q, "GET", "/admin/usage?by=color")).status == 400
    assert (await admin(q, "GET", "/admin/usage?since=yesterday")).status == 400
    assert q.app[LEDGER] is not p.app[LEDGER]


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_down_quota_behaviour_is_the_configured_one(
    make_proxy: Any, upstream: Upstream, own_redis: Any, mode: str
) -> None:
    config = "[redis]\nsocket_timeout_s = 0.2\nretry_interval_s = 0.3\n[teams.search]\nrpm = 2\n"
    p = await make(make_proxy, upstream, own_redis.url, config, quotas=f'on_redis_down = "{mode}"\n')
    key = await p.new_key("search")
    assert (await p.embed(key, {"model": MODEL, "input": "warm"})).status == 200  # key verified, team read
    own_redis.stop()
    statuses = [(await p.embed(key, {"model": MODEL, "input": f"x{i}"})).status for i in range(3)]
    if mode == "open":
        # the limit holds in this process alone, starting from the 1 of 2 Redis had counted ("warm")
        assert statuses == [200, 429, 429]
    else:
        assert statuses == [503, 503, 503]
        body = await (await p.embed(key, {"model": MODEL, "input": "y"})).json()
        assert_openai_error(body, "server_error", "service_unavailable")


async def test_reservation_is_corrected_to_the_upstreams_usage(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    p = await make(make_proxy, upstream, redis_url)
    key = await p.new_key("search", limits=Limits(tpm=100))
    upstream.settings.token_skew = 2  # the upstream counts 2 more tokens per input than cl100k_base does
    resp = await p.embed(key, {"model": MODEL, "input": ["one two three", "four"]})  # 3 + 1 locally
    assert (await resp.json())["usage"]["prompt_tokens"] == 8  # the upstream's count is the authority
    assert resp.headers["x-ratelimit-remaining-tokens"] == "92"  # 4 reserved, corrected to 8
    upstream.settings.token_skew = 0
    nxt = await p.embed(key, {"model": MODEL, "input": "five"})
    assert nxt.headers["x-ratelimit-remaining-tokens"] == str(100 - 8 - 1)


async def test_key_changes_reach_other_instances_at_once(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    # Both instances trust a verified key for a minute; only the published change can make B read it again.
    a = await make(make_proxy, upstream, redis_url, "[keys]\ncache_s = 60.0\n")
    b = await make(make_proxy, upstream, redis_url, "[keys]\ncache_s = 60.0\n")
    key, record = await a.app[KEYSTORE].create("search")
    assert (await b.embed(key, {"model": MODEL, "input": "x"})).status == 200  # cached in B from now on
    await a.app[KEYSTORE].set_limits(record.id, {"rpm": 1})
    await a.app[KEYSTORE].revoke(record.id)
    statuses = []
    for _ in range(50):
        statuses.append((await b.embed(key, {"model": MODEL, "input": "x"})).status)
        if statuses[-1] == 401:
            break
        await asyncio.sleep(0.01)
    assert statuses[-1] == 401 and len(statuses) <= 20, statuses  # well under the minute B would otherwise trust it


async def test_a_cache_hit_with_quotas_costs_one_redis_round_trip(
    make_proxy: Any, upstream: Upstream, redis_url: str, redis_server: Any
) -> None:
    p: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url,
                                              "[teams.search]\nrpm = 100\ntpm = 1000\n"
                                              "[quotas]\nteam_cache_s = 60.0\n[keys]\ncache_s = 60.0\n"))
    store = p.app[STORE]
    key = await p.new_key("search", limits=Limits(rpm=50))
    body = {"model": MODEL, "input": "one two three"}
    assert (await p.embed(key, body)).status == 200  # verifies the key, reads the team, fills the cache
    await settle(p)
    await p.app[LEDGER].flush()  # so that the periodic flush has nothing to do during the count
    calls = count_store_calls(store)
    hit = await p.embed(key, body)
    assert hit.status == 200 and hit.headers["x-cache"] == "hit"
    assert calls == ["mget"]  # cache read and request quota in one pipeline; key and team from memory
    assert hit.headers["x-ratelimit-remaining-requests"] == "48"  # the key's 50, twice used

    calls.clear()
    miss = await p.embed(key, {"model": MODEL, "input": "four five"})
    assert miss.headers["x-cache"] == "miss" and calls[:2] == ["mget", "quota"]  # + the tokens, once known
    assert miss.headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 - 2)

    redis_server.client().script_flush()  # e.g. Redis restarted: the pipelined EVALSHA answers NOSCRIPT
    again = await p.embed(key, body)
    assert again.status == 200 and again.headers["x-ratelimit-remaining-requests"] == "46"
