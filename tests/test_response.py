"""The answer's bytes: the hand-assembled base64 body must be exactly what orjson writes for the same document."""

from __future__ import annotations

import base64
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from proxy.request import EmbeddingRequest
from proxy.response import render
from proxy.service import Outcome
from proxy.stores.cache import EmbeddingCache, Entry
from proxy.stores.localcache import LocalCache
from proxy.stores.rediskeys import RedisKeys


def _outcome(vectors: list[bytes | memoryview], positions: list[int]) -> Outcome:
    entries = [Entry(v, 3 + i) for i, v in enumerate(vectors)]
    prompt = sum(entries[p].tokens for p in positions)
    return Outcome(entries, positions, prompt, 3, "partial")


def test_base64_body_is_byte_identical_to_orjson() -> None:
    rng = np.random.default_rng(3)
    raw = [rng.standard_normal(dims, dtype=np.float32).tobytes() for dims in (1536, 1536, 7)]
    # a view into a larger buffer, as cache reads return it
    vectors: list[bytes | memoryview] = [raw[0], memoryview(b"\x05\x00\x00\x00" + raw[1])[4:], raw[2]]
    outcome = _outcome(vectors, [0, 1, 0, 2, 1])  # repeats inside the batch
    req = EmbeddingRequest('model "quoted" \\ name', "s", ["a", "b", "a", "c", "b"], "base64", None, None)
    expected = orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": base64.b64encode(bytes(vectors[u])).decode()}
                 for i, u in enumerate(outcome.positions)],
        "model": req.model,
        "usage": {"prompt_tokens": outcome.prompt_tokens, "total_tokens": outcome.prompt_tokens,
                  "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}},
    })
    assert render(req, outcome) == expected


def test_float_body_is_byte_identical_to_orjson_and_kept_for_hot_entries() -> None:
    rng = np.random.default_rng(4)
    raw = [rng.standard_normal(dims, dtype=np.float32).tobytes() for dims in (1536, 7)]
    vectors: list[bytes | memoryview] = [memoryview(b"\x05\x00\x00\x00" + raw[0])[4:], raw[1]]
    entries = [Entry(v, 3 + i) for i, v in enumerate(vectors)]
    outcome = Outcome(entries, [1, 0, 1], 9, 3, "partial", None, ["k0", "k1"])
    req = EmbeddingRequest("m", "s", ["b", "a", "b"], "float", None, None)
    expected = orjson.dumps({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": np.frombuffer(bytes(vectors[u]), dtype="<f4")}
                 for i, u in enumerate(outcome.positions)],
        "model": "m",
        "usage": {"prompt_tokens": 9, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 6}},
    }, option=orjson.OPT_SERIALIZE_NUMPY)
    assert render(req, outcome) == expected
    local = LocalCache(max_bytes=1 << 20, ttl_s=60)
    local.put("k0", entries[0])  # only k0 is held in process
    before = local.bytes
    assert render(req, outcome, local) == expected
    text = local.rendered("k0")
    assert text is not None and orjson.loads(text) == orjson.loads(orjson.dumps(np.frombuffer(raw[0], "<f4"),
                                                                                option=orjson.OPT_SERIALIZE_NUMPY))
    assert local.rendered("k1") is None and local.bytes == before + sys.getsizeof(text)
    assert render(req, outcome, local) == expected  # from the kept text


def test_float_body_round_trips_float32_exactly() -> None:
    vec = np.array([0.1, -1e-8, 3.4028235e38, 1.17549435e-38], dtype="<f4")
    outcome = _outcome([memoryview(vec.tobytes())], [0])
    req = EmbeddingRequest("m", "s", ["x"], "float", None, None)
    doc = orjson.loads(render(req, outcome))
    assert np.array_equal(np.asarray(doc["data"][0]["embedding"], dtype=np.float64).astype(np.float32), vec)


async def test_cache_reads_are_views_and_bad_sizes_are_misses() -> None:
    class FakeStore:
        embedded = False
        cluster = False

        async def call(self, op: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
            return await fn(FakeRedis())

    class FakeRedis:
        async def mget(self, keys: list[str]) -> list[bytes | None]:
            vec = np.arange(3, dtype="<f4").tobytes()
            return [b"\xb2\x02\x00\x00\x00" + vec, None, b"\xb2\x02\x00\x00\x00" + vec[:-1]]

    cache = EmbeddingCache(FakeStore(), RedisKeys(), ttl_s=60, secret="s")  # type: ignore[arg-type]
    got, _ = await cache.get_many(["a", "b", "c"], 3)
    assert got[0] is not None and got[0].tokens == 2 and bytes(got[0].vector) == np.arange(3, dtype="<f4").tobytes()
    assert isinstance(got[0].vector, memoryview)
    assert got[1] is None and got[2] is None
