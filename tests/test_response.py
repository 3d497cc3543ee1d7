"""The answer's bytes: the hand-assembled base64 body must be exactly what orjson writes for the same document."""

from __future__ import annotations

import base64
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson

from proxy.embeddings.request import EmbeddingRequest
from proxy.embeddings.service import Outcome
from proxy.http.response import chunks, render
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


def test_streamed_pieces_are_the_whole_answer_byte_for_byte() -> None:
    """`chunks` (what a large answer is streamed as) joins to exactly `render`'s bytes, for both encodings, with
    repeats in the batch, texts kept in the in-process tier, and any piece size."""
    rng = np.random.default_rng(5)
    raw = [rng.standard_normal(dims, dtype=np.float32).tobytes() for dims in (1536, 1536, 1536)]
    entries = [Entry(memoryview(b"\x05" + v)[1:], 3 + i) for i, v in enumerate(raw)]
    outcome = Outcome(entries, [2, 0, 1, 0, 2, 2, 1], 21, 3, "partial", None, ["k0", "k1", "k2"])
    for fmt in ("float", "base64"):
        req = EmbeddingRequest("m", "s", list("abcdefg"), fmt, None, None)  # type: ignore[arg-type]
        whole = render(req, outcome)
        for size in (1, 5000, 20_000, 1 << 20):
            pieces = list(chunks(req, outcome, None, size))
            assert b"".join(pieces) == whole
            if size == 1:  # a piece per vector, then the tail
                assert len(pieces) == len(outcome.positions) + 1
            if size == 1 << 20:
                assert len(pieces) == 1
            if size < len(whole) // 4:
                assert max(map(len, pieces)) < size + 20_000  # one vector's text past the size at most
        local = LocalCache(max_bytes=1 << 20, ttl_s=60)
        local.put("k1", entries[1])
        assert b"".join(chunks(req, outcome, local, 5000)) == whole
        if fmt == "float":
            assert local.rendered("k1") is not None  # formatted once, kept for the next answer
            assert b"".join(chunks(req, outcome, local, 5000)) == whole


async def test_a_streamed_answer_that_fails_midway_is_cut_not_cut_short(
        make_proxy: Any, upstream: Any, redis_url: str, monkeypatch: Any) -> None:
    """Once a streamed answer's 200 is sent, a failure cannot become an error answer: the connection is closed
    before the last chunk, so the client sees a broken transfer, never a short JSON document that parses."""
    import aiohttp

    from proxy.http import stream
    from tests.conftest import make_settings

    def failing(*args: Any, **kw: Any) -> Any:
        yield b'{"object":"list","data":['
        raise RuntimeError("encoding failed")

    monkeypatch.setattr(stream, "chunks", failing)
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url))
    key = await proxy.new_key()
    resp = await proxy.embed(key, {"model": "text-embedding-3-small", "input": [f"x {k}" for k in range(100)]})
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    try:
        body = await resp.read()
    except aiohttp.ClientPayloadError:
        return
    raise AssertionError(f"the broken answer read as complete: {body[:80]!r}")
