"""Races between requests that miss on the same input while one of them awaits (cache read, quota, counting):
an input that another request fetched meanwhile is read again, not fetched twice; tokens are reserved for
exactly what a request sends upstream, so a limit holds even when the request it waited on failed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from proxy.embeddings.coalesce import InFlight
from proxy.http.app import SERVICE
from proxy.stores.cache import EmbeddingCache
from proxy.tokens import Tokenizer
from tests.conftest import Proxy, Upstream, make_settings, settle

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"
TOK = Tokenizer("cl100k_base")


def slow_reads(proxy: Proxy, when: str, delay_s: float) -> None:
    """Make the cache reads of the one request whose batch includes `when`'s key take `delay_s` longer."""
    cache: EmbeddingCache = proxy.app[SERVICE]._cache
    real = cache.get_many

    async def get_many(keys: Sequence[str], dims: int, also: Any = None) -> Any:
        result = await real(keys, dims, also)
        if any(k.endswith(when) for k in keys):
            await asyncio.sleep(delay_s)
        return result

    cache.get_many = get_many  # type: ignore[method-assign]


def key_of(proxy: Proxy, text: str) -> str:
    from proxy.stores.rediskeys import DigestBuilder

    seed = proxy.app[SERVICE]._cache._seed
    assert seed is not None
    return DigestBuilder(seed, MODEL, None, "s").text(text)


def test_released_since() -> None:
    flight = InFlight(recent=2)
    e0 = flight.epoch()
    flight.release(["a"])
    assert flight.released_since("a", e0) and not flight.released_since("b", e0)
    e1 = flight.epoch()
    assert not flight.released_since("a", e1)
    flight.release(["b"], written=False)  # not written: nothing to read back
    assert not flight.released_since("b", e0)
    flight.release(["c", "d"])  # "a" is forgotten: anyone who started before it must look again
    assert flight.released_since("zzz", e0) and not flight.released_since("zzz", flight.epoch())


async def test_an_input_fetched_meanwhile_is_read_not_fetched_again(proxy: Proxy, upstream: Upstream) -> None:
    key = await proxy.new_key()
    upstream.settings.latency_ms = 100
    await proxy.embed(key, {"model": MODEL, "input": "warm-up"})  # the cache secret is known from here on
    await settle(proxy)
    upstream.state.reset()
    slow_reads(proxy, key_of(proxy, "other"), 0.4)
    a = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": ["K"]}))
    await asyncio.sleep(0.03)  # A owns K and waits for the upstream
    b = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": ["K", "other"]}))
    # B skips reading K (A is fetching it); A's answer and cache write land while B's read of "other" is slow
    ra, rb = await a, await b
    assert ra.status == 200 and rb.status == 200
    assert [body["input"] for body in upstream.state.bodies] == [["K"], ["other"]]
    usage = (await rb.json())["usage"]
    assert usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"] == TOK.count("other")
    assert rb.headers["x-cache"] == "partial"


async def test_tokens_are_reserved_for_what_a_request_sends_after_the_one_it_waited_on_failed(
    make_proxy: Any, upstream: Upstream, redis_url: str
) -> None:
    both = TOK.count("K") + TOK.count("other")
    config = f"max_retries = 0\n[teams.t]\ntpm = {both - 1}\n"  # the first line is in [upstreams.default]
    proxy: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, config))
    key = await proxy.new_key("t")
    await proxy.embed(await proxy.new_key("free"), {"model": MODEL, "input": "w"})  # not on t's allowance
    await settle(proxy)
    upstream.settings.latency_ms = 100
    upstream.state.reset()
    upstream.state.fail_next("status", times=1, status=500)  # A's call fails
    slow_reads(proxy, key_of(proxy, "other"), 0.4)
    a = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": ["K"]}))
    await asyncio.sleep(0.03)
    b = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": ["K", "other"]}))
    ra, rb = await a, await b
    assert ra.status == 502
    # B would now send both inputs itself: it must reserve both, which the limit does not allow
    assert rb.status == 429, await rb.text()
    assert (await rb.json())["error"]["code"] == "rate_limit_exceeded"
    assert upstream.state.inputs == 1  # only A's failed call went out
