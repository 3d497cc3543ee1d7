"""Issue 20: the providers' own authentication through their libraries, the mocks' strictness, and failover across
kinds.

Bedrock: botocore signs (SigV4Auth, its credential chain reading the test keys from the environment) and the mock
recomputes the signature with botocore; a wrong secret or a body changed after signing is refused. Vertex:
google-auth signs a JWT assertion with a test service-account key and sends it to the key file's loopback
token_uri, whose endpoint verifies it with google-auth's own verifier; the Vertex mock accepts only the tokens it
issued, and a token inside google-auth's refresh threshold is refreshed before the next call.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

import aiohttp
import orjson
import pytest
import yarl

from proxy.mock.providers.bedrock import check_signature
from tests.conftest import ProxyFactory
from tests.helpers import assert_same_vectors, vectors
from tests.providers import (
    ADMIN,
    AWS_KEY_ID,
    AWS_SECRET,
    KINDS,
    PROVIDER_KEY,
    REGION,
    Mock,
    Mocks,
    provider_settings,
)

pytestmark = pytest.mark.redis


async def post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(yarl.URL(url, encoded=True), data=orjson.dumps(body),
                                                    headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def signed(url: str, body: bytes, secret: str = AWS_SECRET, token: str | None = None) -> dict[str, str]:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    request = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(AWS_KEY_ID, secret, token), "bedrock", REGION).add_auth(request)
    return dict(request.headers.items())


async def test_the_bedrock_mock_verifies_sigv4_with_botocore(provider_mocks: Mocks) -> None:
    mock = await provider_mocks("bedrock")
    url = f"{mock.base_url}/model/amazon.titan-embed-text-v2%3A0/invoke"
    body = orjson.dumps({"inputText": "hello"})
    assert (await post(url, orjson.loads(body), signed(url, body)))[0] == 200
    assert (await post(url, orjson.loads(body), signed(url, body, token="session-token")))[0] == 200
    status, doc = await post(url, {"inputText": "hellO"}, signed(url, body))  # the body changed after signing
    assert status == 403 and "signature we calculated does not match" in doc["message"]
    assert (await post(url, orjson.loads(body), signed(url, body, secret="wrong" + AWS_SECRET)))[0] == 403
    assert (await post(url, orjson.loads(body), {"Content-Type": "application/json"}))[0] == 403  # unsigned
    status, doc = await post(url, {"inputText": "hello", "extra": 1}, signed(url, orjson.dumps(
        {"inputText": "hello", "extra": 1})))
    assert status == 400 and "extra" in doc["message"]  # an unknown field, refused as Bedrock does
    assert mock.state.billed_tokens == 2 * (1 + 1)  # the two valid calls only ("hello": 1 token, +1 of its own)


async def test_the_signature_check_refuses_an_old_date(provider_mocks: Mocks) -> None:
    mock = await provider_mocks("bedrock")
    url = f"{mock.base_url}/model/amazon.titan-embed-text-v2%3A0/invoke"
    body = orjson.dumps({"inputText": "hello"})
    headers = signed(url, body)
    old = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)).strftime("%Y%m%dT%H%M%SZ")
    headers["X-Amz-Date"] = old
    status, doc = await post(url, orjson.loads(body), headers)
    assert status == 403 and "expired" in doc["message"]
    assert callable(check_signature)


async def test_a_wrong_aws_secret_is_the_proxys_credential_failure(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mock = await provider_mocks("bedrock")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    proxy = await make_proxy(provider_settings(redis_url, mock.upstream_toml("b", max_retries=0),
                                               mock.spec.model_toml("b")))
    resp = await proxy.embed(await proxy.new_key(), {"model": "titan-v2", "input": "hello"})
    assert resp.status == 502
    assert AWS_SECRET not in await resp.text() and mock.state.billed_tokens == 0


async def test_vertex_tokens_come_from_the_service_accounts_token_uri_and_are_reused(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock = await provider_mocks("vertex")
    proxy = await make_proxy(provider_settings(redis_url, mock.upstream_toml("v"), mock.spec.model_toml("v")))
    key = await proxy.new_key()
    for text in ("one", "two"):
        resp = await proxy.embed(key, {"model": "text-embedding-005", "input": text, "input_type": "query"})
        assert resp.status == 200, await resp.text()
    assert mock.issued is not None and len(mock.issued.tokens) == 1  # one token, valid for an hour: reused
    claims = mock.issued.assertions[0]
    assert claims["iss"] == mock.issued.client_email
    assert "https://www.googleapis.com/auth/cloud-platform" in str(claims["scope"])


async def test_a_vertex_token_near_its_expiry_is_refreshed_before_the_next_call(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    # 60 s left is inside google-auth's refresh threshold (minutes): each call gets a fresh token first
    mock = await provider_mocks("vertex", token_lifetime_s=60)
    proxy = await make_proxy(provider_settings(redis_url, mock.upstream_toml("v"), mock.spec.model_toml("v")))
    key = await proxy.new_key()
    for text in ("one", "two"):
        resp = await proxy.embed(key, {"model": "text-embedding-005", "input": text})
        assert resp.status == 200, await resp.text()
    assert mock.issued is not None and len(mock.issued.tokens) == 2 and len(mock.issued.assertions) == 2


async def test_the_vertex_mock_takes_only_tokens_its_endpoint_issued(provider_mocks: Mocks) -> None:
    mock = await provider_mocks("vertex")
    url = f"{mock.base_url}/projects/p/locations/l/publishers/google/models/text-embedding-005:predict"
    status, doc = await post(url, {"instances": [{"content": "x"}]}, {"Authorization": "Bearer ya29.forged"})
    assert status == 401 and doc["error"]["status"] == "UNAUTHENTICATED"


@pytest.mark.parametrize(("name", "path", "body", "auth"), [
    ("cohere", "/v2/embed", {"model": "embed-v4.0", "texts": ["x"], "input_type": "search_query", "user": "u"},
     {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("cohere", "/v2/embed", {"model": "embed-v4.0", "texts": ["x"]}, {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("cohere", "/v2/embed", {"model": "embed-v4.0", "texts": ["x"], "input_type": "query"},
     {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("cohere", "/v2/embed", {"model": "embed-v4.0", "texts": ["x"], "input_type": "search_query"},
     {"Authorization": "Bearer wrong"}),
    ("voyage", "/embeddings", {"model": "voyage-3.5", "input": ["x"], "dimensions": 256},
     {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("voyage", "/embeddings", {"model": "voyage-3.5", "input": ["x"], "input_type": "classification"},
     {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("jina", "/embeddings", {"model": "jina-embeddings-v3", "input": ["x"], "input_type": "query"},
     {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("jina", "/embeddings", {"input": ["x"]}, {"Authorization": f"Bearer {PROVIDER_KEY}"}),
    ("gemini", "/models/gemini-embedding-001:batchEmbedContents",
     {"requests": [{"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "x"}]},
                    "task_type": "RETRIEVAL_QUERY"}]}, {"x-goog-api-key": PROVIDER_KEY}),
    ("gemini", "/models/gemini-embedding-001:batchEmbedContents",
     {"requests": [{"model": "models/other", "content": {"parts": [{"text": "x"}]}}]},
     {"x-goog-api-key": PROVIDER_KEY}),
    ("gemini", "/models/gemini-embedding-001:batchEmbedContents",
     {"requests": [{"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "x"}]}}]}, {}),
])
async def test_the_mocks_refuse_what_their_providers_refuse(provider_mocks: Mocks, name: str, path: str,
                                                             body: dict[str, Any], auth: dict[str, str]) -> None:
    mock = await provider_mocks(name)
    status, _ = await post(mock.base_url + path, body, {"Content-Type": "application/json", **auth})
    assert 400 <= status < 500
    assert mock.state.billed_tokens == 0 and not mock.state.bodies


async def test_a_wrong_gemini_key_is_the_proxys_credential_failure(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """Google answers an invalid key with a 400 (reason API_KEY_INVALID): not the client's input, a 502."""
    mock = await provider_mocks("gemini")
    mock.settings.api_key = "another-key"
    proxy = await make_proxy(provider_settings(redis_url, mock.upstream_toml("g", max_retries=0),
                                               mock.spec.model_toml("g")))
    resp = await proxy.embed(await proxy.new_key(), {"model": "gemini-embedding-001", "input": "x"})
    assert resp.status == 502 and PROVIDER_KEY not in await resp.text()


async def failover_proxy(provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str,
                         **cohere_upstream: Any) -> tuple[Mock, Mock, Any, str]:
    cohere, bedrock = await provider_mocks("cohere"), await provider_mocks("bedrock-cohere")
    model = ('[models."embed-v4.0"]\ndimensions = 1536\nallowed_dimensions = [256, 512, 1024, 1536]\n'
             'input_type = "required"\ndeployments = [{ upstream = "cohere" }, '
             '{ upstream = "bedrock", upstream_model = "cohere.embed-v4:0", priority = 1 }]\n')
    upstreams = cohere.upstream_toml("cohere", **cohere_upstream) + bedrock.upstream_toml("bedrock")
    proxy = await make_proxy(provider_settings(redis_url, upstreams, model))
    return cohere, bedrock, proxy, await proxy.new_key("fail")


async def test_failover_from_a_cohere_deployment_to_a_bedrock_one(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    cohere, bedrock, proxy, key = await failover_proxy(provider_mocks, make_proxy, redis_url)
    cohere.state.fail_next(500, "internal error", times=10)
    resp = await proxy.embed(key, {"model": "embed-v4.0", "input": ["a", "bb"], "input_type": "document"})
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert_same_vectors(vectors(doc), [bedrock.state.sent[(t, "search_document", None)] for t in ["a", "bb"]])
    assert bedrock.state.input_types == ["search_document"] and cohere.state.billed_tokens == 0
    assert doc["usage"]["prompt_tokens"] == bedrock.state.billed_tokens


async def test_a_cohere_429_pauses_it_and_bedrock_takes_the_calls(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    cohere, bedrock, proxy, key = await failover_proxy(provider_mocks, make_proxy, redis_url)
    cohere.state.fail_next(429, "Too many requests", {"Retry-After": "30"})
    for text in ("first", "second"):
        resp = await proxy.embed(key, {"model": "embed-v4.0", "input": text, "input_type": "query"})
        assert resp.status == 200
    assert cohere.state.requests == 1 and bedrock.state.requests == 2  # paused: the second went to Bedrock at once
    status = await proxy.client.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"})
    states = {row["upstream"]: (row["kind"], row["state"]) for row in (await status.json())["data"]}
    assert states == {"cohere": ("cohere", "paused"), "bedrock": ("bedrock", "healthy")}
    assert KINDS["bedrock-cohere"].upstream_model == "cohere.embed-v4:0"


async def test_a_stalled_token_endpoint_costs_each_call_its_attempt_time_and_one_refresh(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """Getting a token is part of the attempt: while Google's token endpoint stalls, each call fails at its attempt's
    time limit (504, nothing sent to Vertex) and the calls share one refresh, which goes on after they gave up and
    serves the next call once the endpoint answers. Before: the refresh was outside the attempt's time (urllib3's
    10 s), the calls queued behind it one refresh each, and the first answer came after 10 s."""
    mock = await provider_mocks("vertex")
    assert mock.issued is not None
    mock.issued.stall = asyncio.Event()
    upstream = mock.upstream_toml("v").replace("attempt_timeout_s = 5.0", "attempt_timeout_s = 1.0\nmax_retries = 0")
    proxy = await make_proxy(provider_settings(redis_url, upstream, mock.spec.model_toml("v")))
    key = await proxy.new_key()
    started = time.monotonic()
    answers = await asyncio.gather(*(proxy.embed(key, {"model": "text-embedding-005", "input": f"text {i}"})
                                     for i in range(6)))
    took = time.monotonic() - started
    assert [a.status for a in answers] == [504] * 6
    assert "credentials" in (await answers[0].json())["error"]["message"]
    assert mock.issued.requests == 1  # one refresh in flight for all of them
    assert mock.state.requests == 0  # nothing went to Vertex without a token
    assert took < 8.0, took  # each at its 1 s attempt limit (with room for a loaded machine), not after 10 s
    mock.issued.stall.set()  # the endpoint answers the refresh still in flight: the next call has its token
    for _ in range(100):
        resp = await proxy.embed(key, {"model": "text-embedding-005", "input": "after"})
        if resp.status == 200:
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200, await resp.text()
    assert mock.issued.requests == 1 and len(mock.issued.tokens) == 1
