"""Issue 20 review: breaking the provider kinds against their strict mocks, the real proxy and a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from proxy.http.app import LEDGER
from tests.conftest import Proxy, ProxyFactory, settle
from tests.providers import KINDS, PROVIDER_KEY, Mock, Mocks, provider_settings

pytestmark = pytest.mark.redis


COHERE_ON_TWO = ('[models."embed-v4.0"]\ndimensions = 1536\nallowed_dimensions = [256, 512, 1024, 1536]\n'
                 'input_type = "required"\ndeployments = [{ upstream = "co", priority = 0 }, '
                 '{ upstream = "br", upstream_model = "cohere.embed-v4:0", priority = 1 }]\n')


def full_ledger(r: redis.Redis, team: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in r.scan_iter(f"ep:usage:{team}:*"):
        for field, value in r.hgetall(name).items():
            metric = field.decode().rsplit("|", 1)[1]
            out[metric] = out.get(metric, 0) + int(value)
    return out


async def start(provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, name: str,
                upstream: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                **mock_options: Any) -> tuple[Mock, Proxy, str]:
    mock = await provider_mocks(name, **mock_options)
    settings = provider_settings(redis_url, mock.upstream_toml("p", **(upstream or {})),
                                 mock.spec.model_toml("p", **(model or {})))
    proxy: Proxy = await make_proxy(settings)
    return mock, proxy, await proxy.new_key("t" + name.replace("-", ""))


def body(name: str, inputs: Any, **fields: Any) -> dict[str, Any]:
    spec = KINDS[name]
    out: dict[str, Any] = {"model": spec.model, "input": inputs}
    if spec.input_types:
        out["input_type"] = "query"
    out.update(fields)
    return out


@pytest.mark.parametrize(("name", "status", "message"), [
    ("cohere", 498, "invalid api token"),  # Cohere's own status for a wrong key (its SDK's InvalidTokenError)
    ("jina", 402, "Insufficient balance"),
    ("voyage", 402, "Payment required"),
])
async def test_the_proxys_account_or_key_refused_is_no_clients_400(
        name: str, status: int, message: str, provider_mocks: Mocks, make_proxy: ProxyFactory,
        redis_url: str) -> None:
    """Finding 1: a provider's 402 (the proxy's account out of credit) or Cohere's 498 (the proxy's key invalid)
    was relayed as the client's 400 "Upstream: ..." and no failure of the deployment."""
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name, upstream={"max_retries": 0})
    mock.state.fail_next(status, message)
    resp = await proxy.embed(key, body(name, "hello"))
    assert resp.status == 502, await resp.text()
    assert (await resp.json())["error"]["code"] == "upstream_error"


async def test_a_cohere_498_fails_over_to_bedrock(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """Finding 1, across kinds: the Cohere deployment's invalid key sends the call to the Bedrock one."""
    co = await provider_mocks("cohere")
    br = await provider_mocks("bedrock-cohere")
    ups = co.upstream_toml("co", max_retries=0) + br.upstream_toml("br", max_retries=0)
    proxy: Proxy = await make_proxy(provider_settings(redis_url, ups, COHERE_ON_TWO))
    key = await proxy.new_key("tfail")
    co.state.fail_next(498, "invalid api token")
    resp = await proxy.embed(key, body("cohere", ["a b c"]))
    assert resp.status == 200, await resp.text()
    assert co.state.requests == 1 and br.state.billed_tokens > 0


@pytest.mark.parametrize("name", ["cohere", "bedrock", "gemini"])
async def test_held_a_429_without_retry_after_still_carries_one(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name,
                                   upstream={"max_retries": 0, "max_queue_wait_s": 0.0})
    mock.state.fail_next(429, "Too many requests")
    resp = await proxy.embed(key, body(name, "hello"))
    assert resp.status == 429 and "Retry-After" in resp.headers


@pytest.mark.parametrize("value", [123, [], {}, "QUERY", "query\u0000", True, "\ud800x", "é" * 10000, 1.5])
async def test_held_bad_input_type_values_are_400s_before_anything_is_sent(
        value: Any, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "cohere")
    resp = await proxy.embed(key, body("cohere", "hello", input_type=value))
    assert resp.status == 400 and mock.state.requests == 0


async def test_held_a_failed_chunks_sibling_is_billed_in_the_ledger(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "cohere", upstream={"max_retries": 0})
    mock.state.fail_next(400, "invalid request: something odd")
    resp = await proxy.embed(key, body("cohere", [f"text {i}" for i in range(97)]))
    assert resp.status == 400  # the 96-input chunk refused; the other one answered and was billed
    await settle(proxy)
    await proxy.app[LEDGER].flush()
    got = full_ledger(redis.Redis.from_url(redis_url), "tcohere")
    assert got.get("upstream_tokens", 0) == mock.state.billed_tokens


async def test_held_failover_cohere_to_bedrock_ledger_is_what_both_billed(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    co = await provider_mocks("cohere")
    br = await provider_mocks("bedrock-cohere")
    ups = co.upstream_toml("co", max_retries=2) + br.upstream_toml("br", max_retries=2)
    proxy: Proxy = await make_proxy(provider_settings(redis_url, ups, COHERE_ON_TWO))
    key = await proxy.new_key("tfail2")
    co.state.fail_next(500, "boom", times=10)
    resp = await proxy.embed(key, body("cohere", ["a b c", "d e f"], dimensions=256))
    assert resp.status == 200
    doc = await resp.json()
    await settle(proxy)
    await proxy.app[LEDGER].flush()
    got = full_ledger(redis.Redis.from_url(redis_url), "tfail2")
    assert got["upstream_tokens"] == co.state.billed_tokens + br.state.billed_tokens
    assert doc["usage"]["prompt_tokens"] == br.state.billed_tokens


async def test_held_a_provider_key_echoed_in_an_error_is_not_relayed_or_logged(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "cohere", upstream={"max_retries": 0})
    mock.state.fail_next(400, f"invalid request: your key {PROVIDER_KEY} is odd")
    resp = await proxy.embed(key, body("cohere", "hello"))
    text = await resp.text()
    metrics = await (await proxy.client.get("/metrics")).text()
    out = capfd.readouterr()
    assert PROVIDER_KEY not in text and PROVIDER_KEY not in metrics
    assert PROVIDER_KEY not in out.out + out.err


async def test_held_many_calls_at_token_expiry_make_one_refresh(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    import datetime

    from proxy.http.app import UPSTREAM

    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "vertex")
    assert (await proxy.embed(key, body("vertex", "warm"))).status == 200
    assert mock.issued is not None
    first = len(mock.issued.tokens)
    d = proxy.app[UPSTREAM].router.models["text-embedding-005"][0]
    creds = d.auth._credentials  # type: ignore[union-attr]
    creds.expiry = datetime.datetime.utcnow() + datetime.timedelta(seconds=30)  # within google-auth's threshold
    resps = await asyncio.gather(*(proxy.embed(key, body("vertex", f"text {i}")) for i in range(30)))
    assert all(r.status == 200 for r in resps)
    assert len(mock.issued.tokens) == first + 1


async def test_a_token_google_refuses_is_replaced_by_one_refresh(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """Finding 2: Google answered 401 to a token google-auth still counted valid (revoked, or this host's clock
    behind Google's): every call was a 502 until the token's local expiry, up to an hour. Now the token is dropped
    and the calls refused together take one new token and pass."""
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "vertex")
    assert (await proxy.embed(key, body("vertex", "warm"))).status == 200
    assert mock.issued is not None
    mock.issued.tokens.clear()  # every token issued so far is now refused
    resps = await asyncio.gather(*(proxy.embed(key, body("vertex", f"after revoke {i}")) for i in range(12)))
    assert [r.status for r in resps] == [200] * 12, [await r.text() for r in resps]
    assert len(mock.issued.tokens) == 1  # one refresh for all the calls refused together


async def test_held_concurrent_query_and_document_requests_get_their_own_vectors(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "cohere")
    from tests.helpers import assert_same_vectors, vectors
    texts = [f"same {i}" for i in range(10)]
    reqs = [proxy.embed(key, body("cohere", texts, input_type=t)) for t in ("query", "document") * 5]
    resps = await asyncio.gather(*reqs)
    for i, r in enumerate(resps):
        assert r.status == 200
        want = "search_query" if i % 2 == 0 else "search_document"
        assert_same_vectors(vectors(await r.json()), [mock.state.sent[(t, want, None)] for t in texts])


async def test_held_bedrock_with_a_session_token_signs_and_leaks_nothing(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    token = "SESSION-TOKEN-must-not-leak-XYZ"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "bedrock", upstream={"max_retries": 0})
    resp = await proxy.embed(key, body("bedrock", "hello"))
    assert resp.status == 200
    mock.state.fail_next(400, "Malformed input request: bad")
    resp = await proxy.embed(key, body("bedrock", "hello again"))
    metrics = await (await proxy.client.get("/metrics")).text()
    out = capfd.readouterr()
    for secret in (token, "wJalrXUtnFEMI"):
        assert secret not in metrics and secret not in out.out + out.err
