"""Issue 20: every provider kind behind the same OpenAI interface, each against its strict mock as a real server,
through the real proxy and a real redis-server.

For each kind (cohere, voyage, jina, gemini, vertex, bedrock with Titan and with Cohere): exact vectors (float and
base64, single and batch) against what the mock itself answered; the portable input_type mapped to the provider's
word (the mock records it) and part of the cache key; dimensions mapped to the provider's field and checked before
anything is sent; usage and the ledger equal to what the mock billed (Gemini: the tokenizer's count, an estimate);
chunking at the provider's per-call limit; a 429 with Retry-After from the provider; a provider's 400 naming the
client's parameter; and the OpenAI SDK with `extra_body={"input_type": ...}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import openai
import pytest
import redis

from proxy.http.app import LEDGER
from proxy.tokens import get_encoding
from tests.conftest import Proxy, ProxyFactory, settle
from tests.helpers import assert_same_vectors, vectors
from tests.providers import KINDS, Kind, Mock, Mocks, provider_settings
from tests.test_accounting import ledger

pytestmark = pytest.mark.redis
NAMES = list(KINDS)
TEXTS = ["The quick brown fox", "jumps over the lazy dog, twice", "and sleeps."]


def tokens(text: str) -> int:
    return len(get_encoding("cl100k_base").encode(text))


async def start(provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str, name: str,
                upstream: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                **mock_options: Any) -> tuple[Mock, Proxy, str]:
    if name == "gemini":
        mock_options.setdefault("extra_tokens", 0)  # the proxy counts Gemini's tokens itself: an estimate
    mock = await provider_mocks(name, **mock_options)
    settings = provider_settings(redis_url, mock.upstream_toml("p", **(upstream or {})),
                                 mock.spec.model_toml("p", **(model or {})))
    proxy: Proxy = await make_proxy(settings)
    return mock, proxy, await proxy.new_key("team-" + name.replace("-", ""))


def portable(spec: Kind) -> str | None:
    return "query" if spec.input_types else None


def body(spec: Kind, inputs: Any, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": spec.model, "input": inputs, **fields}
    if "input_type" not in out and portable(spec):
        out["input_type"] = portable(spec)
    return {k: v for k, v in out.items() if v is not None}


def sent(mock: Mock, texts: list[str], input_type: str | None, dims: int | None) -> list[Any]:
    """What the mock answered for each text (its own vectors, as it sent them)."""
    provider_type = mock.spec.input_types.get(input_type) if input_type else None
    return [mock.state.sent[(t, provider_type, dims)] for t in texts]


@pytest.mark.parametrize("name", NAMES)
async def test_exact_vectors_usage_ledger_and_a_second_request_from_the_cache(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name)
    spec, dims = mock.spec, mock.spec.sizes[0]
    resp = await proxy.embed(key, body(spec, TEXTS, dimensions=dims, encoding_format="base64"))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert [d["index"] for d in doc["data"]] == [0, 1, 2]
    assert_same_vectors(vectors(doc), sent(mock, TEXTS, portable(spec), dims))
    billed = mock.state.billed_tokens
    assert billed == sum(tokens(t) + mock.settings.extra_tokens for t in TEXTS)
    assert doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"] == billed
    calls = mock.state.requests
    # the same again, as floats: from the cache, the same usage, nothing sent
    again = await proxy.embed(key, body(spec, TEXTS, dimensions=dims))
    assert again.headers["x-cache"] == "hit"
    doc2 = await again.json()
    assert doc2["usage"]["prompt_tokens"] == billed
    assert doc2["usage"]["prompt_tokens_details"]["cached_tokens"] == billed
    assert_same_vectors(vectors(doc2), sent(mock, TEXTS, portable(spec), dims))
    assert mock.state.requests == calls
    # one input alone, native size, floats: its own exact vector and its own billed count
    one = await proxy.embed(key, body(spec, "a single new input"))
    assert one.status == 200
    doc3 = await one.json()
    assert_same_vectors(vectors(doc3), sent(mock, ["a single new input"], portable(spec), None))
    assert doc3["usage"]["prompt_tokens"] == tokens("a single new input") + mock.settings.extra_tokens
    await settle(proxy)
    await proxy.app[LEDGER].flush()
    team = ledger(redis.Redis.from_url(redis_url), "team-" + name.replace("-", ""))
    assert team["upstream_tokens"] == mock.state.billed_tokens  # the ledger holds exactly what the provider billed
    assert team["cached_tokens"] == billed and team["requests"] == 3


@pytest.mark.parametrize("name", [n for n in NAMES if KINDS[n].input_types])
async def test_input_type_is_mapped_and_a_query_and_a_document_are_two_cache_entries(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name)
    spec = mock.spec
    answers = {}
    for value in ("query", "document", "classification", "clustering"):
        resp = await proxy.embed(key, body(spec, "same text", input_type=value))
        assert resp.status == 200, await resp.text()
        answers[value] = vectors(await resp.json())[0]
        assert mock.state.input_types[-1] == spec.input_types[value]  # the provider's own word, or none
    assert mock.state.requests == 4  # four entries: none served for another
    assert not (answers["query"] == answers["document"]).all()
    for value in ("query", "document"):
        resp = await proxy.embed(key, body(spec, "same text", input_type=value))
        assert resp.headers["x-cache"] == "hit"
        assert_same_vectors(vectors(await resp.json()), [answers[value]])
    assert mock.state.requests == 4


@pytest.mark.parametrize("name", NAMES)
async def test_dimensions_are_mapped_and_checked_before_anything_is_sent(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name)
    spec = mock.spec
    field = {"cohere": "output_dimension", "voyage": "output_dimension", "jina": "dimensions",
             "bedrock": "output_dimension" if spec.upstream_model.startswith("cohere.") else "dimensions"}
    resp = await proxy.embed(key, body(spec, "sized", dimensions=spec.sizes[1]))
    assert resp.status == 200
    assert len(vectors(await resp.json())[0]) == spec.sizes[1]
    sent_body = mock.state.bodies[-1]
    if spec.kind == "gemini":
        assert sent_body["requests"][0]["outputDimensionality"] == spec.sizes[1]
    elif spec.kind == "vertex":
        assert sent_body["parameters"]["outputDimensionality"] == spec.sizes[1]
    else:
        assert sent_body[field[spec.kind]] == spec.sizes[1]
    calls = mock.state.requests
    for bad in (spec.sizes[0] + 1, max(spec.sizes) * 2):
        refused = await proxy.embed(key, body(spec, "sized", dimensions=bad))
        assert refused.status == 400
        assert (await refused.json())["error"]["param"] == "dimensions"
    assert mock.state.requests == calls  # refused before anything went upstream


@pytest.mark.parametrize("name", NAMES)
async def test_a_providers_own_refusal_names_the_clients_parameter(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """The proxy allows a size the provider does not: the provider's 400 reaches the client with param."""
    spec = KINDS[name]
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name,
                                   model={"allowed_dimensions": [*spec.sizes, 7]})
    resp = await proxy.embed(key, body(spec, "sized", dimensions=7))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "dimensions" and error["message"].startswith("Upstream: ")
    assert mock.state.billed_tokens == 0


@pytest.mark.parametrize("name", NAMES)
async def test_misses_are_chunked_at_the_providers_limit(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    spec = KINDS[name]
    limit = spec.per_call if spec.per_call < 2048 else 64  # Jina's 2,048 is a whole request: a lower model limit
    model = {"max_batch_items": limit} if limit != spec.per_call else {}
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name, model=model)
    inputs = [f"input number {i}" for i in range(limit + 1)]
    resp = await proxy.embed(key, body(spec, inputs))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert sorted(mock.state.call_sizes) == sorted([limit, 1]) if limit > 1 else mock.state.call_sizes == [1, 1]
    assert_same_vectors(vectors(doc), sent(mock, inputs, portable(spec), None))
    assert doc["usage"]["prompt_tokens"] == mock.state.billed_tokens


@pytest.mark.parametrize("name", NAMES)
async def test_a_provider_429_is_a_429_with_its_retry_after(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name,
                                   upstream={"max_retries": 0, "max_queue_wait_s": 0.0})
    wait = {"x-retry-delay": "7s"} if mock.spec.kind in ("gemini", "vertex") else {"Retry-After": "7"}
    mock.state.fail_next(429, "Too many requests, slow down.", wait)
    resp = await proxy.embed(key, body(mock.spec, "rate limited"))
    assert resp.status == 429, await resp.text()
    assert 6 <= int(resp.headers["Retry-After"]) <= 7
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("name", NAMES)
async def test_the_openai_sdk_with_extra_body(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name)
    spec = mock.spec
    client = openai.AsyncOpenAI(base_url=str(proxy.client.make_url("/v1")), api_key=key, max_retries=0)
    extra = {"input_type": "document"} if spec.input_types else None
    result = await client.embeddings.create(model=spec.model, input=TEXTS[:2], dimensions=spec.sizes[-1],
                                            extra_body=extra)  # the SDK asks for base64
    got = [np.asarray(d.embedding, dtype="<f4") for d in result.data]
    assert_same_vectors(got, sent(mock, TEXTS[:2], extra and "document", spec.sizes[-1]))
    assert result.usage.prompt_tokens == mock.state.billed_tokens
    if not spec.input_types:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.embeddings.create(model=spec.model, input="x", extra_body={"input_type": "query"})
        assert bad.value.body["param"] == "input_type"  # type: ignore[index]
    await client.close()


async def test_a_cohere_answer_echoing_long_texts_is_read_whole(
        provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """Cohere's answer echoes every text: with long texts and small vectors it is larger than the vectors alone
    allow (the bound OpenAI answers get), and must still be read."""
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "cohere")
    texts = [f"{i} " + "word " * 6000 for i in range(20)]
    resp = await proxy.embed(key, body(mock.spec, texts, dimensions=256))
    assert resp.status == 200, await resp.text()
    assert_same_vectors(vectors(await resp.json()), sent(mock, texts, "query", 256))


@pytest.mark.parametrize("name", ["cohere", "voyage", "jina", "vertex", "bedrock-cohere"])
async def test_over_long_inputs_are_refused_unless_the_model_lets_the_provider_truncate(
        name: str, provider_mocks: Mocks, make_proxy: ProxyFactory, redis_url: str) -> None:
    """The provider takes fewer tokens per input than the model's max_input_tokens: each call asks it not to
    truncate, so the over-long input is the client's 400 (param input); `provider_truncation = true` lets it."""
    long_text = "word " * 50
    for truncate in (False, True):
        mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, name,
                                       model={"provider_truncation": truncate})
        model = mock.settings.models[mock.spec.upstream_model]
        mock.settings.models[mock.spec.upstream_model] = dataclasses.replace(model, max_input_tokens=10)
        resp = await proxy.embed(key, body(mock.spec, long_text))
        if truncate:
            assert resp.status == 200, await resp.text()
        else:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "input" and mock.state.billed_tokens == 0
