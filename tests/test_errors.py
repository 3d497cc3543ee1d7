"""Bad input, bad keys and upstream trouble: OpenAI-shaped errors, nothing sent upstream, nothing cached."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from proxy.http.app import KEYSTORE, METRICS
from tests.conftest import UPSTREAM_KEY, Proxy, RedisServer, Upstream, free_port, make_settings, settle
from tests.helpers import assert_same_vectors, direct, vectors

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
ADA = "text-embedding-ada-002"


def assert_openai_error(body: Any, *, param: str | None = "__any__", code: str | None = "__any__") -> None:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and UPSTREAM_KEY not in err["message"]
    if param != "__any__":
        assert err["param"] == param
    if code != "__any__":
        assert err["code"] == code


def upstream_errors(proxy: Proxy) -> dict[str, float]:
    """kind -> count of embedding_proxy_upstream_errors_total, for the kinds seen so far."""
    return {s.labels["kind"]: s.value for f in proxy.app[METRICS].upstream_errors.collect() for s in f.samples
            if s.name.endswith("_total") and s.value}


INPUT = "invalid_input"
# name, body, status, param, code, a fragment the message must contain (so a case cannot pass for another reason)
BAD_BODIES: list[tuple[str, Any, int, str | None, str | None, str]] = [
    ("empty string", {"model": MODEL, "input": ""}, 400, "input", INPUT, "empty string"),
    ("empty list", {"model": MODEL, "input": []}, 400, "input", INPUT, "empty array"),
    ("object input", {"model": MODEL, "input": {}}, 400, "input", INPUT, "must be a string"),
    ("float in ids", {"model": MODEL, "input": [1.5]}, 400, "input", INPUT, "must be a string"),
    ("float among ids", {"model": MODEL, "input": [1, 2.5]}, 400, "input", INPUT, "integer token ids"),
    ("empty inner list", {"model": MODEL, "input": [[]]}, 400, "input", INPUT, "empty array of tokens"),
    ("negative id", {"model": MODEL, "input": [-1]}, 400, "input", INPUT, "non-negative integer"),
    ("bool id", {"model": MODEL, "input": [True]}, 400, "input", INPUT, "must be a string"),
    ("id outside vocabulary", {"model": MODEL, "input": [100277]}, 400, "input", INPUT, "vocabulary of 100277"),
    ("id of 2**32", {"model": MODEL, "input": [4294967296]}, 400, "input", INPUT, "4294967296"),
    ("id of 2**32 in a list", {"model": MODEL, "input": [[1], [4294967296]]}, 400, "input", INPUT, "input[1]"),
    ("id of 2**64-1", {"model": MODEL, "input": [18446744073709551615]}, 400, "input", INPUT, "vocabulary"),
    ("id beyond 2**64", {"model": MODEL, "input": [2**70]}, 400, "input", INPUT, "must be a string"),
    ("mixed strings and ids", {"model": MODEL, "input": ["a", 1]}, 400, "input", INPUT, "input[1]"),
    ("mixed ids and lists", {"model": MODEL, "input": [1, [2]]}, 400, "input", INPUT, "integer token ids"),
    ("empty string in list", {"model": MODEL, "input": ["a", ""]}, 400, "input", INPUT, "input[1]"),
    ("too many items", {"model": MODEL, "input": ["x"] * 2049}, 400, "input", INPUT, "2049 items"),
    ("too many token lists", {"model": MODEL, "input": [[1]] * 2049}, 400, "input", INPUT, "2049 items"),
    ("too many ids in one item", {"model": MODEL, "input": [1] * 8193}, 400, "input", INPUT, "8193 tokens"),
    ("too many ids in a listed item", {"model": MODEL, "input": [[1], [1] * 8193]}, 400, "input", INPUT,
     "'input[1]' has 8193 tokens"),
    ("too many tokens in one text", {"model": MODEL, "input": "hello " * 8200}, 400, "input", INPUT,
     "8201 tokens"),
    ("too many tokens in the request", {"model": MODEL, "input": ["hello " * 8000] * 38}, 400, "input", INPUT,
     "304038 tokens; at most 300000"),
    ("missing model", {"input": "x"}, 400, "model", None, "model"),
    ("model not a string", {"model": 3, "input": "x"}, 400, "model", None, "model"),
    ("unknown model", {"model": "gpt-embed-9", "input": "x"}, 404, "model", "model_not_found", "gpt-embed-9"),
    ("missing input", {"model": MODEL}, 400, "input", None, "input parameter"),  # code null, as OpenAI
    ("dimensions zero", {"model": MODEL, "input": "x", "dimensions": 0}, 400, "dimensions", None, "1 to 1536"),
    ("dimensions too big", {"model": MODEL, "input": "x", "dimensions": 1537}, 400, "dimensions", None, "1536"),
    ("dimensions not int", {"model": MODEL, "input": "x", "dimensions": "8"}, 400, "dimensions", None, "integer"),
    ("dimensions on ada", {"model": ADA, "input": "x", "dimensions": 8}, 400, "dimensions", None, "not support"),
    ("bad encoding", {"model": MODEL, "input": "x", "encoding_format": "hex"}, 400, "encoding_format", None,
     "base64"),
    ("user not a string", {"model": MODEL, "input": "x", "user": 5}, 400, "user", None, "string"),
    ("unknown field", {"model": MODEL, "input": "x", "temperature": 1}, 400, "temperature", None,
     "Unrecognized request argument supplied: temperature"),
    ("body is a list", ["x"], 400, None, None, "JSON object"),
]


@pytest.mark.parametrize(("name", "body", "status", "param", "code", "says"), BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
async def test_bad_requests_are_refused_before_upstream_and_cache(
    proxy: Proxy, upstream: Upstream, redis_server: RedisServer, name: str, body: Any, status: int,
    param: str | None, code: str | None, says: str,
) -> None:
    key = await proxy.new_key()
    resp = await proxy.embed(key, body)
    assert resp.status == status, await resp.text()
    doc = await resp.json()
    assert_openai_error(doc, param=param, code=code)
    assert says in doc["error"]["message"]
    await settle(proxy)  # a cache write, had there been one, would have landed by now
    assert upstream.state.requests == 0
    assert not redis_server.client().keys("ep:emb:*")


async def test_one_flat_token_array_is_one_input_limited_by_tokens(proxy: Proxy, upstream: Upstream) -> None:
    """A flat array of token ids is one input: the 2048-item limit does not apply, the 8192-token limit does."""
    key = await proxy.new_key()
    for body in ({"model": MODEL, "input": [1] * 8192}, {"model": MODEL, "input": [1820] * 3000}):
        upstream.state.reset()
        resp = await proxy.embed(key, body)
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        n = len(body["input"])
        assert doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"] == n
        assert [d["index"] for d in doc["data"]] == [0]
        assert upstream.state.inputs == 1
        assert_same_vectors(vectors(doc), vectors(await direct(upstream.base_url, body)))
    resp = await proxy.embed(key, {"model": MODEL, "input": [[1] * 8192] * 2})  # token lists at the limit
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["prompt_tokens"] == 2 * 8192


async def test_token_ids_at_the_uint32_edge_reach_the_vocabulary_check(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": MODEL, "input": [[1], [2**32 - 1]]})
    assert resp.status == 400
    doc = await resp.json()
    assert_openai_error(doc, param="input", code="invalid_input")
    assert "vocabulary of 100277" in doc["error"]["message"]
    resp = await proxy.embed(key, {"model": MODEL, "input": [100276, 0]})  # the last id of the vocabulary
    assert resp.status == 200, await resp.text()
    assert upstream.state.requests == 1


async def test_malformed_json_and_oversized_body(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "[server]\nmax_body_bytes = 4096\n"))
    key = await proxy.new_key()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    resp = await proxy.client.post("/v1/embeddings", data=b'{"model": "text-emb', headers=headers)
    assert resp.status == 400
    assert_openai_error(await resp.json(), param=None)
    resp = await proxy.client.post("/v1/embeddings", data=b'{"input": "' + b"a" * 5000 + b'"}', headers=headers)
    assert resp.status == 413
    assert_openai_error(await resp.json(), code="request_too_large")
    assert upstream.state.requests == 0


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer sk-gateway-" + "A" * 43}, "invalid_api_key"),
        ({"Authorization": "Bearer not-a-gateway-key"}, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "missing_api_key"),
    ],
)
async def test_missing_or_unknown_key_is_401(proxy: Proxy, upstream: Upstream, headers: Any, code: str) -> None:
    resp = await proxy.client.post("/v1/embeddings", json={"model": MODEL, "input": "x"}, headers=headers)
    assert resp.status == 401
    assert_openai_error(await resp.json(), code=code)
    assert upstream.state.requests == 0


async def test_revoked_key_is_refused_at_once(proxy: Proxy) -> None:
    key, record = await proxy.app[KEYSTORE].create("search")
    assert (await proxy.embed(key, {"model": MODEL, "input": "x"})).status == 200
    await proxy.app[KEYSTORE].revoke(record.id)
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"})
    assert resp.status == 401
    assert_openai_error(await resp.json(), code="api_key_revoked")


async def test_expired_key_and_model_allow_list(proxy: Proxy) -> None:
    expired = await proxy.new_key(expires_at=1.0)
    resp = await proxy.embed(expired, {"model": MODEL, "input": "x"})
    assert resp.status == 401
    assert_openai_error(await resp.json(), code="api_key_expired")
    limited = await proxy.new_key(models=("text-embedding-3-large",))
    resp = await proxy.embed(limited, {"model": MODEL, "input": "x"})
    assert resp.status == 403
    assert_openai_error(await resp.json(), param="model")


async def test_unknown_route_is_openai_404(proxy: Proxy) -> None:
    resp = await proxy.client.get("/v1/nothing-here")
    assert resp.status in (401, 404)  # /v1 routes are authenticated first
    resp = await proxy.client.get("/nothing-here")
    assert resp.status == 404
    assert_openai_error(await resp.json())


# --- upstream trouble ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["status", "disconnect", "garbage", "wrong_count", "wrong_dims", "nan"])
async def test_transient_upstream_failure_is_retried(proxy: Proxy, upstream: Upstream, mode: str) -> None:
    key = await proxy.new_key()
    upstream.state.fail_next(mode, times=2, status=503)
    body = {"model": MODEL, "input": ["r1", "r2"]}
    resp = await proxy.embed(key, body)
    assert resp.status == 200, await resp.text()
    assert upstream.state.requests == 3
    assert_same_vectors(vectors(await resp.json()), vectors(await direct(upstream.base_url, body)))


@pytest.mark.parametrize(
    ("mode", "status", "expected", "kind"),
    [
        ("status", 500, 502, "bad_gateway"),
        ("status", 503, 503, "unavailable"),
        ("status", 429, 429, "rate_limited"),
        ("disconnect", 0, 502, "connect"),
        ("wrong_count", 0, 502, "bad_gateway"),
        ("wrong_dims", 0, 502, "bad_gateway"),
        ("nan", 0, 502, "bad_gateway"),
        ("garbage", 0, 502, "bad_gateway"),
    ],
)
async def test_persistent_upstream_failure_maps_to_openai_error_and_caches_nothing(
    proxy: Proxy, upstream: Upstream, redis_server: RedisServer, mode: str, status: int, expected: int, kind: str
) -> None:
    key = await proxy.new_key()
    upstream.state.fail_next(mode, times=10, status=status or 500)
    resp = await proxy.embed(key, {"model": MODEL, "input": ["f1", "f2"]})
    assert resp.status == expected, await resp.text()
    assert_openai_error(await resp.json())
    if expected == 502:
        assert (await resp.json())["error"]["code"] == "upstream_error"  # whatever the kind: clients see one code
    assert upstream_errors(proxy) == {kind: 1}
    if expected == 429:
        assert int(resp.headers["Retry-After"]) >= 1
    assert upstream.state.requests == 4  # first try and max_retries = 3
    await settle(proxy)
    assert not redis_server.client().keys("ep:emb:*")
    # the next good answer is served and cached normally
    upstream.state.reset()
    resp = await proxy.embed(key, {"model": MODEL, "input": ["f1", "f2"]})
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    await settle(proxy)
    assert len(redis_server.client().keys("ep:emb:*")) == 2


async def test_retry_after_is_honoured(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    upstream.state.fail_next("status", times=1, status=429, retry_after=0.3)
    started = time.monotonic()
    resp = await proxy.embed(key, {"model": MODEL, "input": "ra"})
    assert resp.status == 200
    assert time.monotonic() - started >= 0.3
    assert upstream.state.requests == 2


async def test_upstream_timeout_becomes_504(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    settings = make_settings(upstream.base_url, redis_url)

    ups = dict(settings.upstreams)
    ups["default"] = dataclasses.replace(ups["default"], deadline_s=0.6, attempt_timeout_s=0.25)
    proxy = await make_proxy(dataclasses.replace(settings, upstreams=ups))
    key = await proxy.new_key()
    upstream.state.fail_next("timeout", times=10)
    resp = await proxy.embed(key, {"model": MODEL, "input": "slow"})
    assert resp.status == 504
    assert_openai_error(await resp.json(), code="upstream_timeout")


async def test_upstream_credentials_refused_is_502_without_leaking(
    make_proxy: Any, upstream: Upstream, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, UPSTREAM_API_KEY="sk-wrong-upstream-key"))
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"})
    assert resp.status == 502
    text = await resp.text()
    assert "sk-wrong-upstream-key" not in text
    assert "sk-wrong-upstream-key" not in caplog.text and UPSTREAM_KEY not in caplog.text
    assert_openai_error(await resp.json(), code="upstream_error")
    assert upstream_errors(proxy) == {"auth": 1}  # not retried, and told apart from a bad answer


async def test_unreachable_upstream_and_refused_input_are_their_own_kinds(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    proxy = await make_proxy(make_settings(nowhere, redis_url, "max_retries = 0\n"))
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"})
    assert resp.status == 502
    assert_openai_error(await resp.json(), code="upstream_error")
    assert upstream_errors(proxy) == {"connect": 1}

    # an upstream 400 is the client's own input: counted apart, and left out of the upstream error-ratio alert
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    upstream.state.fail_next("status", times=1, status=400)
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"})
    assert resp.status == 400
    assert upstream_errors(proxy) == {"invalid_request": 1}
