"""Invariant: a misbehaving upstream never poisons the cache and never crashes the proxy.

Every malformed 200 the mock can send is refused (a 502 in OpenAI's shape once retries are spent), retried (a
one-off fault is invisible to the client), and never cached: the next healthy answer goes upstream, and Redis then
holds exactly the right vectors, each with at least one token. An absurd `Retry-After` never reaches a client
unbounded and never makes the proxy sleep past its deadline. Real Redis, the mock as a real server, the proxy app.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from proxy.mock.upstream import HUGE_BODY_BYTES
from proxy.stores.cache import decode_entry
from tests.conftest import Proxy, RedisServer, Upstream, settle
from tests.helpers import assert_same_vectors, direct, vectors
from tests.test_errors import assert_openai_error

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
DIMS = 1536
MALFORMED = ["strings", "booleans", "nested", "short_base64", "extra_float", "repeated_index", "missing_index",
             "usage_huge", "usage_negative", "usage_zero", "usage_float", "usage_few", "huge_body"]
ATTEMPTS = 4  # the test settings' max_retries = 3, plus the first try


async def assert_cache_holds_exactly(proxy: Proxy, upstream: Upstream, redis_server: RedisServer,
                                     body: dict[str, Any]) -> None:
    """Redis holds one entry per input: the upstream's own vector, and tokens (>= 1 each) adding up to its usage."""
    await settle(proxy)
    truth = await direct(upstream.base_url, {**body, "encoding_format": "base64"})
    r = redis_server.client()
    keys = r.keys("ep:emb:*")
    entries = [decode_entry(v, DIMS) for v in r.mget(keys)]
    assert len(entries) == len(body["input"]) and all(e is not None for e in entries)
    stored = sorted(bytes(e.vector) for e in entries if e is not None)
    assert stored == sorted(v.tobytes() for v in vectors(truth))
    assert all(e is not None and e.tokens >= 1 for e in entries)
    assert sum(e.tokens for e in entries if e is not None) == truth["usage"]["prompt_tokens"]


@pytest.mark.parametrize("mode", MALFORMED)
async def test_a_persistent_malformed_answer_is_a_502_and_never_cached(
    proxy: Proxy, upstream: Upstream, redis_server: RedisServer, mode: str
) -> None:
    key = await proxy.new_key()
    body = {"model": MODEL, "input": [f"first {mode}", f"second {mode}"]}
    upstream.state.fail_next(mode, times=ATTEMPTS)
    resp = await proxy.embed(key, body)
    assert resp.status == 502, await resp.text()
    assert_openai_error(await resp.json(), code="upstream_error")
    assert (await resp.json())["error"]["type"] == "server_error"
    assert upstream.state.requests == ATTEMPTS  # refused and retried, like any malformed answer
    await settle(proxy)
    assert redis_server.client().keys("ep:emb:*") == []
    if mode == "huge_body":  # the proxy hung up on each one long before its end
        assert upstream.state.huge_body_sent < HUGE_BODY_BYTES

    resp = await proxy.embed(key, body)  # the upstream is healthy again: nothing was cached, in Redis or in process
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    assert upstream.state.requests == ATTEMPTS + 1
    got = await resp.json()
    assert_same_vectors(vectors(got), vectors(await direct(upstream.base_url, body)))
    await assert_cache_holds_exactly(proxy, upstream, redis_server, body)


@pytest.mark.parametrize("mode", MALFORMED)
async def test_a_one_off_malformed_answer_is_retried_and_the_client_gets_the_right_vectors(
    proxy: Proxy, upstream: Upstream, redis_server: RedisServer, mode: str
) -> None:
    key = await proxy.new_key()
    body = {"model": MODEL, "input": [f"one {mode}", f"two {mode}", f"three {mode}"]}
    upstream.state.fail_next(mode)
    resp = await proxy.embed(key, body)
    assert resp.status == 200, await resp.text()
    assert upstream.state.requests == 2
    got = await resp.json()
    truth = await direct(upstream.base_url, body)
    assert_same_vectors(vectors(got), vectors(truth))
    assert got["usage"]["prompt_tokens"] == truth["usage"]["prompt_tokens"]  # the good answer's usage, not the bad
    await assert_cache_holds_exactly(proxy, upstream, redis_server, body)
    before = upstream.state.requests
    again = await proxy.embed(key, body)
    assert again.headers["x-cache"] == "hit" and upstream.state.requests == before
    assert_same_vectors(vectors(await again.json()), vectors(got))


CLAMPED = ["1e309", "1e300", "inf", "3601"]  # an hour at most
IGNORED = ["-5", "nan", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"]  # as if absent: the usual backoff


@pytest.mark.parametrize("header", ["Retry-After", "retry-after-ms"])
@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("value", CLAMPED + IGNORED)
async def test_absurd_retry_after_never_crashes_and_never_reaches_clients_unbounded(
    proxy: Proxy, upstream: Upstream, status: int, value: str, header: str
) -> None:
    key = await proxy.new_key()
    clamped = value in CLAMPED
    if header == "retry-after-ms" and value == "3601":
        value = "3601000"  # the same hour and a second, in milliseconds
    wait, wait_ms = (value, None) if header == "Retry-After" else (None, value)

    upstream.state.fail_next("status", status=status, retry_after=wait, retry_after_ms=wait_ms)
    resp = await proxy.embed(key, {"model": MODEL, "input": f"ra {status} {header} {value}"})
    if clamped:  # an hour is past the 5 s deadline: not waited for; a 429 tells the client the bounded wait
        assert resp.status == status, await resp.text()
        assert resp.headers.get("Retry-After") == ("3600" if status == 429 else None)
        assert upstream.state.requests == 1
    else:  # retried after the usual backoff
        assert resp.status == 200, await resp.text()
        assert upstream.state.requests == 2

    upstream.state.reset()
    upstream.state.fail_next("status", times=ATTEMPTS, status=status, retry_after=wait, retry_after_ms=wait_ms)
    resp = await proxy.embed(key, {"model": MODEL, "input": f"ra persistent {status} {header} {value}"})
    assert resp.status == status, await resp.text()
    assert_openai_error(await resp.json())
    told = resp.headers.get("Retry-After")
    if status == 503:
        assert told is None  # the proxy's 503 never relays the upstream's wait
    if clamped and status == 429:  # the first 429 paused the deployment for the bounded hour: no upstream call
        assert upstream.state.requests == 0
        assert told is not None and 3590 <= int(told) <= 3600
    elif clamped:
        assert upstream.state.requests == 1
        assert told is None
    else:
        assert upstream.state.requests == ATTEMPTS
        assert told == ("1" if status == 429 else None)  # a 429 always says when
    assert told is None or (told.isdigit() and 1 <= int(told) <= 3600)


async def test_a_float_answer_that_mixes_booleans_with_numbers_is_refused(
    proxy: Proxy, upstream: Upstream, redis_server: RedisServer
) -> None:
    """With dimensions = 1 every real value is +-1.0, exactly what a boolean becomes: the element check must run."""
    upstream.settings.floats_only = True
    key = await proxy.new_key()
    body = {"model": MODEL, "input": ["d1", "d2"], "dimensions": 1}
    upstream.state.fail_next("booleans", times=ATTEMPTS)
    resp = await proxy.embed(key, body)
    assert resp.status == 502
    await settle(proxy)
    assert redis_server.client().keys("ep:emb:*") == []
    resp = await proxy.embed(key, body)
    assert resp.status == 200
    assert [abs(float(v[0])) for v in vectors(await resp.json())] == [1.0, 1.0]
    assert np.array_equal(vectors(await resp.json())[0], vectors(await direct(upstream.base_url, body))[0])
