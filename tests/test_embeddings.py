"""The embeddings path against a real Redis and the mock upstream as a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.tokens import Tokenizer
from tests.conftest import Proxy, Upstream, make_settings, settle
from tests.helpers import assert_same_vectors, direct, vectors

pytestmark = pytest.mark.redis

MODEL = "text-embedding-3-small"
TOK = Tokenizer("cl100k_base")

INPUT_FORMS: list[Any] = [
    "The quick brown fox jumped over the lazy dog",
    ["first text", "second text", "third text"],
    [791, 4062, 14198, 39935],
    [[791, 4062], [14198, 39935, 927], [1820]],
]


@pytest.mark.parametrize("inp", INPUT_FORMS, ids=["string", "strings", "token_ids", "token_id_lists"])
@pytest.mark.parametrize("fmt", ["float", "base64"])
@pytest.mark.parametrize("dims", [None, 256])
async def test_answer_is_float32_identical_to_upstream(
    proxy: Proxy, upstream: Upstream, inp: Any, fmt: str, dims: int | None
) -> None:
    key = await proxy.new_key()
    body: dict[str, Any] = {"model": MODEL, "input": inp, "encoding_format": fmt}
    if dims:
        body["dimensions"] = dims
    expected = await direct(upstream.base_url, body)
    for round_ in ("miss", "hit"):
        resp = await proxy.embed(key, body)
        assert resp.status == 200, await resp.text()
        got = await resp.json()
        assert resp.headers["x-cache"] == round_
        assert got["object"] == "list" and got["model"] == MODEL
        assert [d["index"] for d in got["data"]] == list(range(len(got["data"])))
        assert all(isinstance(d["embedding"], str if fmt == "base64" else list) for d in got["data"])
        assert_same_vectors(vectors(got), vectors(expected))
        assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
        assert got["usage"]["total_tokens"] == expected["usage"]["total_tokens"]
        cached = got["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (0 if round_ == "miss" else expected["usage"]["prompt_tokens"])
        await settle(proxy)


async def test_cache_hit_does_not_call_upstream_and_formats_share_entries(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    body = {"model": MODEL, "input": ["alpha", "beta"]}
    assert (await proxy.embed(key, body)).status == 200
    await settle(proxy)
    before = (upstream.state.requests, upstream.state.inputs)
    r1 = await proxy.embed(key, {**body, "encoding_format": "base64"})
    r2 = await proxy.embed(key, body)
    assert r1.headers["x-cache"] == r2.headers["x-cache"] == "hit"
    assert (upstream.state.requests, upstream.state.inputs) == before
    assert_same_vectors(vectors(await r1.json()), vectors(await r2.json()))


async def test_partial_hit_sends_only_misses(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": ["a1", "a2"]})).status == 200
    await settle(proxy)
    upstream.state.reset()
    resp = await proxy.embed(key, {"model": MODEL, "input": ["a1", "b1", "a2", "b2"]})
    assert resp.status == 200
    assert resp.headers["x-cache"] == "partial"
    assert upstream.state.requests == 1 and upstream.state.inputs == 2
    assert upstream.state.bodies[-1]["input"] == ["b1", "b2"]
    got = await resp.json()
    expected = await direct(upstream.base_url, {"model": MODEL, "input": ["a1", "b1", "a2", "b2"]})
    assert_same_vectors(vectors(got), vectors(expected))
    cached = TOK.count("a1") + TOK.count("a2")
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


async def test_duplicates_in_a_batch_go_upstream_once(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    inputs = ["dup", "other", "dup", "dup", "other"]
    resp = await proxy.embed(key, {"model": MODEL, "input": inputs})
    assert resp.status == 200
    assert upstream.state.inputs == 2
    assert upstream.state.bodies[-1]["input"] == ["dup", "other"]
    got = await resp.json()
    vs = vectors(got)
    assert len(vs) == 5
    assert_same_vectors([vs[0], vs[2], vs[3]], [vs[0]] * 3)
    assert_same_vectors(vs, vectors(await direct(upstream.base_url, {"model": MODEL, "input": inputs})))
    # usage counts every position, as the upstream would
    assert got["usage"]["prompt_tokens"] == sum(TOK.count(s) for s in inputs)


async def test_concurrent_misses_share_one_upstream_call(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    upstream.settings.latency_ms = 200
    body = {"model": MODEL, "input": ["shared-1", "shared-2"]}
    responses = await asyncio.gather(*(proxy.embed(key, body) for _ in range(20)))
    assert all(r.status == 200 for r in responses)
    assert upstream.state.requests == 1 and upstream.state.inputs == 2
    answers = [vectors(await r.json()) for r in responses]
    for a in answers[1:]:
        assert_same_vectors(a, answers[0])
    # exactly one of them paid for the upstream call
    billed = [(await r.json())["usage"] for r in responses]
    assert sum(u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"] for u in billed) == (
        TOK.count("shared-1") + TOK.count("shared-2")
    )


async def test_model_dimensions_and_kind_are_part_of_the_key(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    text = "same text everywhere"
    ids = [int(t) for t in TOK._enc.encode_ordinary(text)]
    bodies: list[dict[str, Any]] = [
        {"model": MODEL, "input": text},
        {"model": MODEL, "input": text, "dimensions": 512},
        {"model": "text-embedding-3-large", "input": text},
        {"model": MODEL, "input": ids},
    ]
    for body in bodies:
        resp = await proxy.embed(key, body)
        assert resp.status == 200
        assert resp.headers["x-cache"] == "miss", body
        assert_same_vectors(vectors(await resp.json()), vectors(await direct(upstream.base_url, body)))
        await settle(proxy)
    assert upstream.state.inputs == 4 * 2  # each once through the proxy, once directly


async def test_large_batch_is_split_by_upstream_limits(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    config = '[models."text-embedding-3-small"]\ndimensions = 1536\nsupports_dimensions = true\n' \
             "max_batch_items = 10\nmax_batch_tokens = 100000\n"
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config))
    key = await proxy.new_key()
    inputs = [f"item number {i}" for i in range(25)]
    resp = await proxy.embed(key, {"model": MODEL, "input": inputs})
    assert resp.status == 200
    assert upstream.state.requests == 3
    assert sorted(len(b["input"]) for b in upstream.state.bodies) == [5, 10, 10]
    assert_same_vectors(
        vectors(await resp.json()), vectors(await direct(upstream.base_url, {"model": MODEL, "input": inputs}))
    )


async def test_upstream_usage_is_the_authority(make_proxy: Any, upstream: Upstream, redis_url: str) -> None:
    upstream.settings.token_skew = 3  # the upstream counts 3 more tokens per input than tiktoken
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    inputs = ["one", "two words", "three words here"]
    first = await (await proxy.embed(key, {"model": MODEL, "input": inputs})).json()
    reported = sum(TOK.count(s) + 3 for s in inputs)
    assert first["usage"]["prompt_tokens"] == reported
    await settle(proxy)
    again = await (await proxy.embed(key, {"model": MODEL, "input": inputs})).json()
    assert again["usage"]["prompt_tokens"] == reported
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == reported
    # a subset replays exactly the per-input split (local counts + 3 each here)
    one = await (await proxy.embed(key, {"model": MODEL, "input": ["two words"]})).json()
    assert one["usage"]["prompt_tokens"] == TOK.count("two words") + 3


async def test_upstream_is_asked_for_base64_with_the_upstream_key(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "x", "user": "u-1"})).status == 200
    sent = upstream.state.bodies[-1]
    assert sent["encoding_format"] == "base64"
    assert sent["user"] == "u-1"
    assert upstream.state.last_authorization == "Bearer sk-upstream-secret-DO-NOT-LEAK-1234567890"


async def test_request_id_is_echoed_or_made(proxy: Proxy) -> None:
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"}, **{"x-request-id": "req-123"})
    assert resp.headers["x-request-id"] == "req-123"
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"})
    assert len(resp.headers["x-request-id"]) == 32


@pytest.mark.parametrize("scope", ["shared", "team"])
async def test_cache_scope(make_proxy: Any, upstream: Upstream, redis_url: str, scope: str) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, f'[cache]\nscope = "{scope}"\n'))
    search, ads = await proxy.new_key("search"), await proxy.new_key("ads")
    body = {"model": MODEL, "input": "cross-team text"}
    assert (await proxy.embed(search, body)).headers["x-cache"] == "miss"
    await settle(proxy)
    resp = await proxy.embed(ads, body)
    assert resp.headers["x-cache"] == ("hit" if scope == "shared" else "miss")
    assert upstream.state.inputs == (1 if scope == "shared" else 2)
    await settle(proxy)
    assert (await proxy.embed(ads, body)).headers["x-cache"] == "hit"


async def test_models_endpoint_and_health(proxy: Proxy) -> None:
    key = await proxy.new_key(models=("text-embedding-3-small",))
    resp = await proxy.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    assert [m["id"] for m in (await resp.json())["data"]] == ["text-embedding-3-small"]
    resp = await proxy.client.get("/v1/models/text-embedding-3-large", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 404
    assert (await proxy.client.get("/healthz")).status == 200
    ready = await proxy.client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["redis"] == "ok"
    metrics = await (await proxy.client.get("/metrics")).text()
    assert "embedding_proxy_build_info" in metrics
