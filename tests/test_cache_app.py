"""What the app writes to a real Redis: default TTL, the shared cache secret, and answers from float-only or
shuffled upstreams (cached and replayed float32-exact, in order)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from proxy.mock.upstream import vector_for
from proxy.stores.rediskeys import DigestBuilder, seed_from_secret
from proxy.tokens import get_encoding
from tests.conftest import Proxy, RedisServer, Upstream, make_settings, settle
from tests.helpers import vectors

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
THIRTY_DAYS = 30 * 24 * 3600


def in_order(doc: dict[str, Any]) -> list[np.ndarray]:
    """The answer's vectors as listed, after checking the list is in index order."""
    assert [d["index"] for d in doc["data"]] == list(range(len(doc["data"])))
    return vectors(doc)


async def test_entries_written_with_default_settings_live_30_days(
    proxy: Proxy, redis_server: RedisServer
) -> None:
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": ["ttl one", "ttl two"]})).status == 200
    await settle(proxy)
    client = redis_server.client()
    entries = client.keys("ep:emb:*")
    assert len(entries) == 2
    for entry in entries:
        assert THIRTY_DAYS - 60 <= client.ttl(entry) <= THIRTY_DAYS


async def test_instances_without_a_secret_adopt_the_stored_one_and_share_entries(
    make_proxy: Any, upstream: Upstream, redis_server: RedisServer, redis_url: str
) -> None:
    settings = make_settings(upstream.base_url, redis_url)
    assert settings.cache_secret == ""
    a, b = await make_proxy(settings), await make_proxy(settings)
    key_a, key_b = await a.new_key(), await b.new_key()
    # both instances meet an empty Redis at once: each proposes a secret, both must end up with the first one
    first = await asyncio.gather(a.embed(key_a, {"model": MODEL, "input": "from a"}),
                                 b.embed(key_b, {"model": MODEL, "input": "from b"}))
    assert [r.headers["x-cache"] for r in first] == ["miss", "miss"]
    await settle(a)
    await settle(b)
    stored = redis_server.client().get("ep:meta:cache-secret")
    assert stored
    digest = DigestBuilder(seed_from_secret(stored.decode()), MODEL, None, "s")
    assert set(redis_server.client().keys("ep:emb:*")) == {f"ep:emb:v2:s:{digest.text(t)}".encode()
                                                             for t in ("from a", "from b")}
    upstream.state.reset()
    resp = await b.embed(key_b, {"model": MODEL, "input": ["from a", "from b"]})
    assert resp.headers["x-cache"] == "hit"
    resp = await a.embed(key_a, {"model": MODEL, "input": ["from b", "from a"]})
    assert resp.headers["x-cache"] == "hit"
    assert upstream.state.inputs == 0


@pytest.mark.parametrize(
    ("config", "mock", "asked"),
    [
        ('[models."text-embedding-3-small"]\ndimensions = 1536\nsupports_dimensions = true\n'
         "upstream_base64 = false\n", {"shuffle": True}, None),
        ("", {"shuffle": True, "floats_only": True}, "base64"),  # asked for base64, answered with floats
    ],
    ids=["upstream_base64_false", "floats_only_upstream"],
)
async def test_float_and_shuffled_upstream_answers_stay_exact_and_in_order(
    make_proxy: Any, upstream: Upstream, redis_url: str, config: str, mock: dict[str, bool], asked: str | None
) -> None:
    for name, value in mock.items():
        setattr(upstream.settings, name, value)
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config))
    key = await proxy.new_key()
    enc = get_encoding("cl100k_base")
    texts = ["first of four", "second", "third one here", "the fourth"]
    for dims in (None, 256):
        expected = [vector_for(MODEL, enc.encode_ordinary(t), 1536, dims) for t in texts]
        for round_, fmt in (("miss", "float"), ("hit", "base64"), ("hit", "float")):
            body: dict[str, Any] = {"model": MODEL, "input": texts, "encoding_format": fmt}
            if dims:
                body["dimensions"] = dims
            resp = await proxy.embed(key, body)
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-cache"] == round_
            got = in_order(await resp.json())
            assert all(g.dtype == np.float32 and np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
            await settle(proxy)
        sent = upstream.state.bodies[-1]
        assert sent.get("encoding_format") == asked
    assert upstream.state.requests == 2
    # a partial hit mixes cached and fresh vectors, still in the client's order
    resp = await proxy.embed(key, {"model": MODEL, "input": ["new one", texts[2], "new two", texts[0]]})
    assert resp.headers["x-cache"] == "partial"
    expected = [vector_for(MODEL, enc.encode_ordinary(t), 1536, None)
                for t in ("new one", texts[2], "new two", texts[0])]
    assert all(np.array_equal(g, e) for g, e in zip(in_order(await resp.json()), expected, strict=True))
