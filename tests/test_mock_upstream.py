"""The deterministic fake upstream: vectors, the OpenAI request/answer shape, validation, failures, counters."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from typing import Any

import aiohttp
import numpy as np
import pytest
import xxhash

from proxy.mock.upstream import (
    HUGE_BODY_BYTES,
    MOCK_STATE,
    MockModel,
    MockSettings,
    create_mock_app,
    serve_mock,
    vector_for,
)
from proxy.tokens import get_encoding

SMALL, LARGE, ADA = "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"
HELLO_IDS = [15339, 1917]  # cl100k_base for "hello world"


@pytest.fixture
def enc() -> Any:
    return get_encoding("cl100k_base")


async def make_client(aiohttp_client: Any, **settings: Any) -> Any:
    return await aiohttp_client(create_mock_app(MockSettings(**settings)))


async def embed(client: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = await client.post("/v1/embeddings", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    doc: dict[str, Any] = await resp.json()
    return doc


def vectors(doc: dict[str, Any]) -> list[np.ndarray]:
    items = sorted(doc["data"], key=lambda d: d["index"])
    return [np.asarray(d["embedding"], dtype=np.float32) for d in items]


def recipe(model: str, ids: list[int], dims: int) -> np.ndarray:
    """The documented recipe, written independently of the module (struct packing, float64 norm)."""
    seed = xxhash.xxh64_intdigest(model.encode() + b"\0" + struct.pack(f"<{len(ids)}I", *ids))
    v = np.random.default_rng(seed).standard_normal(dims, dtype=np.float32).astype(np.float64)
    return v / math.sqrt(float(v @ v))


# --- vectors ------------------------------------------------------------------------------------------------


def test_vector_for_follows_the_recipe() -> None:
    v = vector_for(SMALL, HELLO_IDS, 1536, None)
    assert v.dtype == np.float32 and v.shape == (1536,)
    assert abs(float(np.linalg.norm(v.astype(np.float64))) - 1.0) < 1e-6
    np.testing.assert_allclose(v, recipe(SMALL, HELLO_IDS, 1536), rtol=0, atol=1e-7)
    assert np.array_equal(v, vector_for(SMALL, np.array(HELLO_IDS), 1536, None))  # list or array, same vector
    assert not np.allclose(v, vector_for(LARGE, HELLO_IDS, 1536, None))  # the model is part of the seed
    assert not np.allclose(v, vector_for(SMALL, HELLO_IDS[::-1], 1536, None))  # order matters


def test_vector_for_dimensions_truncates_and_renormalises() -> None:
    native = recipe(LARGE, [1, 2, 3], 3072)
    v = vector_for(LARGE, [1, 2, 3], 3072, 256)
    assert v.dtype == np.float32 and v.shape == (256,)
    np.testing.assert_allclose(v, native[:256] / np.linalg.norm(native[:256]), rtol=0, atol=1e-7)
    assert abs(float(np.linalg.norm(v.astype(np.float64))) - 1.0) < 1e-6


def test_hello_world_token_ids(enc: Any) -> None:
    assert enc.encode_ordinary("hello world") == HELLO_IDS


# --- answers ------------------------------------------------------------------------------------------------


async def test_float_answer_shape_and_values(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.post("/v1/embeddings", json={"input": "hello world", "model": SMALL})
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    assert doc["object"] == "list" and doc["model"] == SMALL
    assert doc["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    [item] = doc["data"]
    assert item["object"] == "embedding" and item["index"] == 0 and len(item["embedding"]) == 1536
    # every float parses back to the exact float32 the mock computed
    assert np.array_equal(np.asarray(item["embedding"], dtype=np.float32), vector_for(SMALL, HELLO_IDS, 1536, None))


async def test_same_request_twice_and_across_apps_gives_identical_vectors(aiohttp_client: Any) -> None:
    body = {"input": ["alpha", "beta", "gamma"], "model": SMALL}
    a = await make_client(aiohttp_client)
    b = await make_client(aiohttp_client)
    first, second, other = await embed(a, body), await embed(a, body), await embed(b, body)
    assert first == second == other
    va = vectors(first)
    assert not np.array_equal(va[0], va[1])


async def test_string_and_its_token_ids_embed_alike(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    as_text = vectors(await embed(client, {"input": "hello world", "model": SMALL}))
    as_ids = vectors(await embed(client, {"input": HELLO_IDS, "model": SMALL}))
    as_id_lists = vectors(await embed(client, {"input": [HELLO_IDS, [15339]], "model": SMALL}))
    hello = vectors(await embed(client, {"input": ["hello"], "model": SMALL}))
    assert np.array_equal(as_text[0], as_ids[0])
    assert np.array_equal(as_text[0], as_id_lists[0])
    assert np.array_equal(hello[0], as_id_lists[1])


async def test_vectors_have_unit_norm_and_native_size(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    for model, size in ((SMALL, 1536), (LARGE, 3072), (ADA, 1536)):
        [v] = vectors(await embed(client, {"input": "x", "model": model}))
        assert v.shape == (size,)
        assert abs(float(np.linalg.norm(v.astype(np.float64))) - 1.0) < 1e-6


async def test_dimensions_is_truncation_and_renormalisation(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    [native] = vectors(await embed(client, {"input": "some text", "model": SMALL}))
    [short] = vectors(await embed(client, {"input": "some text", "model": SMALL, "dimensions": 64}))
    assert short.shape == (64,)
    expected = native[:64].astype(np.float64) / np.linalg.norm(native[:64].astype(np.float64))
    np.testing.assert_allclose(short, expected, rtol=0, atol=1e-7)
    [full] = vectors(await embed(client, {"input": "some text", "model": SMALL, "dimensions": 1536}))
    np.testing.assert_allclose(full, native, rtol=0, atol=1e-7)


async def test_base64_decodes_to_the_float_values(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    body = {"input": ["one", "two"], "model": LARGE, "dimensions": 100}
    floats = vectors(await embed(client, body))
    b64 = await embed(client, {**body, "encoding_format": "base64"})
    for item, expected in zip(b64["data"], floats, strict=True):
        raw = base64.b64decode(item["embedding"], validate=True)
        assert len(raw) == 4 * 100
        assert np.array_equal(np.frombuffer(raw, dtype="<f4"), expected)
    float_doc = await embed(client, {**body, "encoding_format": "float"})
    assert [np.asarray(d["embedding"], dtype=np.float32).tolist() for d in float_doc["data"]] == \
        [v.tolist() for v in floats]


async def test_usage_is_the_tiktoken_count(aiohttp_client: Any, enc: Any) -> None:
    texts = ["The quick brown fox jumped over the lazy dog", "héllo wörld 😀", "<|endoftext|> is plain text here"]
    expected = sum(len(enc.encode_ordinary(t)) for t in texts)
    assert expected > len(texts)
    client = await make_client(aiohttp_client)
    doc = await embed(client, {"input": texts, "model": SMALL})
    assert doc["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    doc = await embed(client, {"input": [[1, 2, 3], [4]], "model": SMALL})
    assert doc["usage"]["prompt_tokens"] == 4


async def test_token_skew_is_added_per_input(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, token_skew=5)
    doc = await embed(client, {"input": ["hello world", "hello world", "hello world"], "model": SMALL})
    assert doc["usage"] == {"prompt_tokens": 3 * 2 + 3 * 5, "total_tokens": 21}


async def test_shuffle_reverses_items_and_keeps_indexes(aiohttp_client: Any) -> None:
    texts = ["a", "b", "c", "d"]
    plain = vectors(await embed(await make_client(aiohttp_client), {"input": texts, "model": SMALL}))
    doc = await embed(await make_client(aiohttp_client, shuffle=True), {"input": texts, "model": SMALL})
    assert [d["index"] for d in doc["data"]] == [3, 2, 1, 0]
    for item in doc["data"]:
        assert np.array_equal(np.asarray(item["embedding"], dtype=np.float32), plain[item["index"]])


async def test_user_and_null_options_are_accepted(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    doc = await embed(client, {"input": "x", "model": SMALL, "user": "user-1234", "dimensions": None,
                               "encoding_format": None})
    assert len(doc["data"][0]["embedding"]) == 1536


async def test_unknown_fields_are_refused_as_openai_does(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    for extra in ({"whatever": {"a": 1}}, {"temperature": 0}, {"zz": 1, "aa": None}):
        resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL, **extra})
        assert resp.status == 400
        err = (await resp.json())["error"]
        assert err == {"message": f"Unrecognized request argument supplied: {min(extra)}",
                       "type": "invalid_request_error", "param": None, "code": None}
    assert client.server.app[MOCK_STATE].requests == 3


async def test_floats_only_answers_floats_when_asked_for_base64(aiohttp_client: Any) -> None:
    body = {"input": ["one", "two"], "model": LARGE, "dimensions": 100}
    expected = vectors(await embed(await make_client(aiohttp_client), body))
    client = await make_client(aiohttp_client, floats_only=True)
    doc = await embed(client, {**body, "encoding_format": "base64"})
    assert all(isinstance(d["embedding"], list) for d in doc["data"])
    assert [d["index"] for d in doc["data"]] == [0, 1]
    for got, want in zip(vectors(doc), expected, strict=True):
        assert np.array_equal(got, want)


async def test_models_list(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, models={"m1": MockModel(8, True), "m2": MockModel(4, False)})
    resp = await client.get("/v1/models")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["object"] == "list"
    assert [(m["id"], m["object"]) for m in doc["data"]] == [("m1", "model"), ("m2", "model")]
    [v] = vectors(await embed(client, {"input": "x", "model": "m2"}))
    assert np.array_equal(v, vector_for("m2", [87], 4, None))  # "x" is token 87


# --- validation ---------------------------------------------------------------------------------------------

VOCAB = 100277

INVALID: list[tuple[str, Any, int, str | None, str | None]] = [
    ("not an object", ["input", "model"], 400, None, None),
    ("missing model", {"input": "x"}, 400, "model", None),
    ("model not a string", {"input": "x", "model": 3}, 400, "model", None),
    ("missing input", {"model": SMALL}, 400, "input", None),
    ("unknown model", {"input": "x", "model": "nope"}, 404, None, "model_not_found"),
    ("empty string", {"input": "", "model": SMALL}, 400, "input", None),
    ("empty string in list", {"input": ["a", ""], "model": SMALL}, 400, "input", None),
    ("empty list", {"input": [], "model": SMALL}, 400, "input", None),
    ("empty inner list", {"input": [[1], []], "model": SMALL}, 400, "input", None),
    ("null input", {"input": None, "model": SMALL}, 400, "input", None),
    ("number input", {"input": 5, "model": SMALL}, 400, "input", None),
    ("object input", {"input": {"a": 1}, "model": SMALL}, 400, "input", None),
    ("too many inputs", {"input": ["a"] * 2049, "model": SMALL}, 400, "input", None),
    ("floats", {"input": [1.0, 2.0], "model": SMALL}, 400, "input", None),
    ("float among ints", {"input": [1, 2.5], "model": SMALL}, 400, "input", None),
    ("bools", {"input": [True, False], "model": SMALL}, 400, "input", None),
    ("bool among ints", {"input": [[1, True]], "model": SMALL}, 400, "input", None),
    ("negative id", {"input": [-1], "model": SMALL}, 400, "input", None),
    ("id at vocab size", {"input": [VOCAB], "model": SMALL}, 400, "input", None),
    ("huge id", {"input": [[2**70]], "model": SMALL}, 400, "input", None),
    ("strings with ints", {"input": ["a", 1], "model": SMALL}, 400, "input", None),
    ("ints with strings", {"input": [1, "a"], "model": SMALL}, 400, "input", None),
    ("ints with lists", {"input": [1, [2]], "model": SMALL}, 400, "input", None),
    ("lists with ints", {"input": [[1], 2], "model": SMALL}, 400, "input", None),
    ("strings inside lists", {"input": [["a"]], "model": SMALL}, 400, "input", None),
    ("nulls in list", {"input": [None], "model": SMALL}, 400, "input", None),
    ("input over 8192 tokens", {"input": [1] * 8193, "model": SMALL}, 400, "input", None),
    ("text over 8192 tokens", {"input": " hello" * 8193, "model": SMALL}, 400, "input", None),
    ("request over 300000 tokens", {"input": [[1] * 8192] * 37, "model": SMALL}, 400, "input", None),
    ("bad encoding_format", {"input": "x", "model": SMALL, "encoding_format": "int8"}, 400, "encoding_format", None),
    ("dimensions zero", {"input": "x", "model": SMALL, "dimensions": 0}, 400, "dimensions", None),
    ("dimensions negative", {"input": "x", "model": SMALL, "dimensions": -3}, 400, "dimensions", None),
    ("dimensions float", {"input": "x", "model": SMALL, "dimensions": 64.0}, 400, "dimensions", None),
    ("dimensions string", {"input": "x", "model": SMALL, "dimensions": "64"}, 400, "dimensions", None),
    ("dimensions bool", {"input": "x", "model": SMALL, "dimensions": True}, 400, "dimensions", None),
    ("dimensions too big", {"input": "x", "model": SMALL, "dimensions": 1537}, 400, "dimensions", None),
    ("dimensions on ada", {"input": "x", "model": ADA, "dimensions": 256}, 400, "dimensions", None),
    ("user not a string", {"input": "x", "model": SMALL, "user": 12}, 400, "user", None),
    ("unknown field", {"input": "x", "model": SMALL, "temperature": 1}, 400, None, None),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_requests(aiohttp_client: Any, body: Any, status: int, param: str | None,
                                code: str | None) -> None:
    client = await make_client(aiohttp_client)
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status == status
    doc = await resp.json()
    assert set(doc) == {"error"}
    err = doc["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert (err["param"], err["code"]) == (param, code)


async def test_malformed_json(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    for raw in (b'{"input": "x", "model": ', b"", b"\xff\xfe"):
        resp = await client.post("/v1/embeddings", data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 400
        err = (await resp.json())["error"]
        assert err["type"] == "invalid_request_error" and err["param"] is None and err["code"] is None


async def test_limits_are_inclusive(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    doc = await embed(client, {"input": [[i % 100] for i in range(2048)], "model": SMALL})
    assert len(doc["data"]) == 2048 and doc["usage"]["prompt_tokens"] == 2048
    doc = await embed(client, {"input": [1] * 8192, "model": SMALL})
    assert doc["usage"]["prompt_tokens"] == 8192
    doc = await embed(client, {"input": [[1] * 8192] * 36 + [[2] * 5088], "model": SMALL, "encoding_format": "base64"})
    assert doc["usage"]["prompt_tokens"] == 300_000
    doc = await embed(client, {"input": [VOCAB - 1, 0], "model": SMALL})
    assert doc["usage"]["prompt_tokens"] == 2


# --- injected failures --------------------------------------------------------------------------------------


async def test_fail_status_with_retry_after_then_recovers(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("status", times=2, status=503, retry_after=2)
    for _ in range(2):
        resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "2"
        err = (await resp.json())["error"]
        assert err["type"] == "server_error" and err["message"]
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
    assert resp.status == 200


async def test_fail_status_429_and_no_retry_after(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    state = client.server.app[MOCK_STATE]
    state.fail_next("status", status=429, retry_after=0.5)
    state.fail_next("status")
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
    assert resp.status == 429 and resp.headers["Retry-After"] == "0.5"
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
    assert resp.status == 500 and "Retry-After" not in resp.headers


async def test_fail_status_even_for_an_invalid_request(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("status", status=502)
    resp = await client.post("/v1/embeddings", json={"model": "nope"})
    assert resp.status == 502


async def test_fail_disconnect(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("disconnect")
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
    await embed(client, {"input": "x", "model": SMALL})
    assert client.server.app[MOCK_STATE].requests == 2


async def test_fail_timeout_stalls_and_does_not_hold_up_shutdown(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("timeout")
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/embeddings", json={"input": "x", "model": SMALL},
                          timeout=aiohttp.ClientTimeout(total=0.3))
    await embed(client, {"input": "x", "model": SMALL})
    await client.close()  # the stalled handler must not keep the server up for 60 s
    assert time.monotonic() - started < 10


async def test_fail_wrong_count(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("wrong_count")
    doc = await embed(client, {"input": ["a", "b", "c"], "model": SMALL})
    assert [d["index"] for d in doc["data"]] == [0, 1]
    assert len((await embed(client, {"input": ["a", "b", "c"], "model": SMALL}))["data"]) == 3


async def test_fail_wrong_dims(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    state = client.server.app[MOCK_STATE]
    state.fail_next("wrong_dims", times=3)
    doc = await embed(client, {"input": ["a", "b"], "model": SMALL, "dimensions": 10})
    assert [len(d["embedding"]) for d in doc["data"]] == [9, 9]
    doc = await embed(client, {"input": "a", "model": SMALL, "dimensions": 1})
    assert doc["data"][0]["embedding"] == []
    doc = await embed(client, {"input": "a", "model": SMALL, "encoding_format": "base64"})
    assert len(base64.b64decode(doc["data"][0]["embedding"])) == 4 * 1535


async def test_fail_nan(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("nan", times=2)
    expected = vector_for(SMALL, HELLO_IDS, 1536, None)
    resp = await client.post("/v1/embeddings", json={"input": ["hello world", "hello world"], "model": SMALL})
    assert resp.status == 200
    doc = json.loads(await resp.read())  # the literal NaN is not strict JSON; Python's json module reads it
    first, second = (np.asarray(d["embedding"], dtype=np.float32) for d in doc["data"])
    assert math.isnan(first[0]) and np.array_equal(first[1:], expected[1:])
    assert np.array_equal(second, expected)
    doc = await embed(client, {"input": "hello world", "model": SMALL, "encoding_format": "base64"})
    v = np.frombuffer(base64.b64decode(doc["data"][0]["embedding"]), dtype="<f4")
    assert math.isnan(v[0]) and np.array_equal(v[1:], expected[1:])


async def test_fail_garbage(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    client.server.app[MOCK_STATE].fail_next("garbage")
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
    assert resp.status == 200
    with pytest.raises(ValueError):
        json.loads(await resp.read())


async def test_malformed_answers_are_the_correct_answer_changed(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    state = client.server.app[MOCK_STATE]
    body = {"input": ["hello world", "b", "c"], "model": SMALL, "dimensions": 4, "encoding_format": "base64"}
    good = await embed(client, body)
    want = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in good["data"]]
    tokens = good["usage"]["prompt_tokens"]
    got = {}
    for mode in ("strings", "booleans", "nested", "short_base64", "extra_float", "repeated_index", "missing_index",
                 "usage_huge", "usage_negative", "usage_zero", "usage_float", "usage_few"):
        state.fail_next(mode)
        resp = await client.post("/v1/embeddings", json=body)
        assert resp.status == 200
        got[mode] = json.loads(await resp.read())
    first = got["strings"]["data"][0]["embedding"]
    assert first == [repr(float(x)) for x in want[0]] and all(isinstance(x, str) for x in first)
    assert got["booleans"]["data"][1]["embedding"] == [bool(x > 0) for x in want[1]]
    assert got["nested"]["data"][2]["embedding"] == [[float(x)] for x in want[2]]
    assert base64.b64decode(got["short_base64"]["data"][0]["embedding"]) == want[0].tobytes()[:-2]
    assert got["extra_float"]["data"][0]["embedding"] == [*map(float, want[0]), 0.5]
    assert [d["index"] for d in got["repeated_index"]["data"]] == [0, 1, 0]
    assert [d["index"] for d in got["missing_index"]["data"]] == [0, 1, 3]
    usage = {m: got[m]["usage"]["prompt_tokens"] for m in got if m.startswith("usage_")}
    assert usage == {"usage_huge": 2**63 - 1, "usage_negative": -5, "usage_zero": 0, "usage_float": float(tokens),
                     "usage_few": 2}
    assert isinstance(usage["usage_float"], float)
    for mode in ("repeated_index", "missing_index", "usage_huge"):  # the vectors themselves are right
        doc = got[mode]
        assert [base64.b64decode(d["embedding"]) for d in doc["data"]][:2] == [want[0].tobytes(), want[1].tobytes()]
    state.fail_next("repeated_index")
    one = await embed(client, {"input": "x", "model": SMALL, "dimensions": 2})
    assert [d["index"] for d in one["data"]] == [0, 0]  # one input: listed twice
    assert await embed(client, body) == good  # consumed: the next answer is correct again


async def test_huge_body_is_a_correct_answer_padded_and_streamed(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    state = client.server.app[MOCK_STATE]
    body = {"input": "x", "model": SMALL, "dimensions": 2}
    good = await embed(client, body)
    state.fail_next("huge_body")
    resp = await client.post("/v1/embeddings", json=body)
    assert resp.status == 200 and resp.content_length is None  # chunked: no length to refuse it by
    head = await resp.content.read(4096)
    assert head.startswith(b'{"object":"list"')
    resp.close()  # hang up early: the mock stops writing
    await embed(client, body)
    assert state.huge_body_sent < HUGE_BODY_BYTES
    state.fail_next("huge_body")
    raw = await (await client.post("/v1/embeddings", json=body)).read()
    assert len(raw) > HUGE_BODY_BYTES and json.loads(raw) == good  # valid JSON: whitespace after the answer


async def test_retry_after_strings_are_sent_verbatim(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    state = client.server.app[MOCK_STATE]
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    state.fail_next("status", status=429, retry_after="1e309")
    state.fail_next("status", status=503, retry_after=date, retry_after_ms="-5")
    state.fail_next("status", status=503, retry_after_ms="1e300")
    seen = []
    for _ in range(3):
        resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
        seen.append((resp.status, resp.headers.get("Retry-After"), resp.headers.get("retry-after-ms")))
    assert seen == [(429, "1e309", None), (503, date, "-5"), (503, None, "1e300")]
    resp = await client.post("/_mock/fail", json={"mode": "status", "status": 429, "retry_after": "soon",
                                                  "retry_after_ms": "1e309"})
    assert resp.status == 200
    resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
    assert (resp.headers["Retry-After"], resp.headers["retry-after-ms"]) == ("soon", "1e309")


def test_fail_next_rejects_bad_arguments() -> None:
    state = create_mock_app()[MOCK_STATE]
    with pytest.raises(ValueError):
        state.fail_next("explode")
    with pytest.raises(ValueError):
        state.fail_next("status", times=0)
    with pytest.raises(ValueError):
        state.fail_next("status", status=99)


# --- auth, counters, control endpoints ---------------------------------------------------------------------


async def test_api_key_is_enforced(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, api_key="sk-test")
    body = {"input": "x", "model": SMALL}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-test"}):
        for resp in (await client.post("/v1/embeddings", json=body, headers=headers),
                     await client.get("/v1/models", headers=headers)):
            assert resp.status == 401
            err = (await resp.json())["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    good = {"Authorization": "Bearer sk-test"}
    await embed(client, body, good)
    assert (await client.get("/v1/models", headers=good)).status == 200
    state = client.server.app[MOCK_STATE]
    assert state.last_authorization == "Bearer sk-test"
    assert state.requests == 4  # refused requests count too
    assert (await client.get("/_mock/stats")).status == 200  # control endpoints sit outside auth


async def test_counters_bodies_and_reset(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    state = client.server.app[MOCK_STATE]
    await embed(client, {"input": "x", "model": SMALL}, {"Authorization": "Bearer abc"})
    await embed(client, {"input": ["a", "b", "c"], "model": SMALL})
    await embed(client, {"input": [1, 2, 3], "model": SMALL})
    await embed(client, {"input": [[1], [2]], "model": SMALL})
    state.fail_next("status")
    await client.post("/v1/embeddings", json={"input": ["p", "q"], "model": SMALL})
    await client.post("/v1/embeddings", json={"input": "x", "model": "nope"})
    assert (state.requests, state.inputs) == (6, 1 + 3 + 1 + 2 + 2 + 1)
    assert state.last_authorization is None
    assert state.bodies[0] == {"input": "x", "model": SMALL}
    assert state.bodies[-1] == {"input": "x", "model": "nope"}
    for i in range(100):
        await embed(client, {"input": f"n{i}", "model": SMALL})
    assert len(state.bodies) == 100 and state.bodies[0]["input"] == "n0" and state.bodies[-1]["input"] == "n99"
    state.fail_next("status", times=3)
    state.reset()
    assert (state.requests, state.inputs, state.bodies, state.last_authorization) == (0, 0, [], None)
    await embed(client, {"input": "x", "model": SMALL})  # pending failures are gone too
    assert state.requests == 1


async def test_control_endpoints(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client)
    await embed(client, {"input": ["a", "b"], "model": SMALL})
    await embed(client, {"input": ["a b c"], "model": SMALL, "user": "team-a"})
    await client.post("/_mock/fail", json={"mode": "wrong_count"})
    # a faulty 200 is billed all the same, as an upstream bills the work (issue 15: the proxy records its usage)
    await client.post("/v1/embeddings", json={"input": ["a", "b"], "model": SMALL})
    assert await (await client.get("/_mock/stats")).json() == {
        "requests": 3, "inputs": 5, "billed_tokens": 7, "billed": {"": 4, "team-a": 3}, "rate_limited": 0,
        "peak_in_flight": 1, "busiest_window": {"requests": 3, "tokens": 7},
    }
    resp = await client.post("/_mock/fail", json={"mode": "status", "times": 2, "status": 429, "retry_after": 1.5})
    assert resp.status == 200
    for _ in range(2):
        resp = await client.post("/v1/embeddings", json={"input": "x", "model": SMALL})
        assert resp.status == 429 and resp.headers["Retry-After"] == "1.5"
    assert (await client.post("/_mock/fail", json={"mode": "bogus"})).status == 400
    assert (await client.post("/_mock/fail", data=b"{")).status == 400
    assert (await client.post("/_mock/fail", json={"mode": "garbage"})).status == 200
    assert (await client.post("/_mock/reset")).status == 200
    assert await (await client.get("/_mock/stats")).json() == {"requests": 0, "inputs": 0, "billed_tokens": 0,
                                                               "billed": {}, "rate_limited": 0, "peak_in_flight": 0,
                                                               "busiest_window": {"requests": 0, "tokens": 0}}
    await embed(client, {"input": "x", "model": SMALL})  # the reset dropped the queued garbage answer


async def test_stats_count_the_rate_limit_429s(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, rpm=2)
    statuses = [(await client.post("/v1/embeddings", json={"input": f"r{i}", "model": SMALL})).status
                for i in range(5)]
    assert statuses == [200, 200, 429, 429, 429]
    stats = await (await client.get("/_mock/stats")).json()
    assert (stats["requests"], stats["rate_limited"]) == (5, 3)


async def test_latency(aiohttp_client: Any) -> None:
    client = await make_client(aiohttp_client, latency_ms=150)
    started = time.monotonic()
    await embed(client, {"input": "x", "model": SMALL})
    assert time.monotonic() - started >= 0.14


# --- serving ------------------------------------------------------------------------------------------------


async def test_serve_mock_on_a_real_port() -> None:
    runner = await serve_mock("127.0.0.1", 0, MockSettings(api_key="k"))
    try:
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/v1/embeddings"
        body = {"input": "hello world", "model": SMALL}
        async with aiohttp.ClientSession() as session, \
                session.post(url, headers={"Authorization": "Bearer k"}, json=body) as resp:
            assert resp.status == 200
            doc = await resp.json()
    finally:
        await runner.cleanup()
    assert np.array_equal(vectors(doc)[0], vector_for(SMALL, HELLO_IDS, 1536, None))


def test_cli_shuffle_and_floats_only_flags() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "proxy", "mock-upstream", "--port", str(port), "--shuffle", "--floats-only"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"mock upstream listening on http://127.0.0.1:{port}/v1"
        body = json.dumps({"input": ["a", "b", "c"], "model": SMALL, "encoding_format": "base64"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                doc = json.loads(resp.read())
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert [d["index"] for d in doc["data"]] == [2, 1, 0]
    assert all(isinstance(d["embedding"], list) and len(d["embedding"]) == 1536 for d in doc["data"])


def test_run_prints_its_address_and_serves() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from proxy.mock.upstream import MockSettings, run; run('127.0.0.1', {port}, MockSettings())"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"mock upstream listening on http://127.0.0.1:{port}/v1"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /_mock/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b'{"requests":0,"inputs":0,"billed_tokens":0,"billed":{},"rate_limited":0,'
                          b'"peak_in_flight":0,"busiest_window":{"requests":0,"tokens":0}}')
