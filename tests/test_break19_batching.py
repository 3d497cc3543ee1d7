"""Issue 19 point 4 review: breaking micro-batching (proxy/upstream/batching.py) against real servers: the mock
upstreams (OpenAI's and the providers') as real HTTP servers, a real redis-server, the proxy app on a real socket.
Every test here fails on the code it was written against."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.http.app import LEDGER
from proxy.tokens import get_encoding
from proxy.upstream import batching
from tests import test_fleet
from tests.conftest import ProxyFactory, RedisServer, settle
from tests.helpers import until
from tests.providers import Mocks as ProviderMocks
from tests.test_break11 import one_model, up_toml
from tests.test_break15_billing import LIMITS, TEAM, ledger, quota_tokens
from tests.test_break20 import body, full_ledger, start
from tests.test_fleet import MODEL, Mocks, fleet_settings

pytestmark = pytest.mark.redis
mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment


def cl100k(text: str) -> int:
    return len(get_encoding("cl100k_base").encode_ordinary(text))


async def test_a_merged_vertex_call_bills_each_input_its_own_exact_count(
    provider_mocks: ProviderMocks, make_proxy: ProxyFactory, redis_url: str, redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Vertex counts each prediction's tokens (statistics.token_count): "the ledger takes them exactly, per input"
    (kinds/vertex.py). A merged call threw them away for the local cl100k counts whenever they differed (always: the
    provider's tokenizer is its own): 30 concurrent requests billed 300 tokens, the ledger and the clients got 271,
    and each request's usage depended on whether it happened to be merged."""
    monkeypatch.setattr(batching, "JOIN_WINDOW_S", 5.0)  # misses wait for the call in flight: merged on any machine
    mock, proxy, key = await start(provider_mocks, make_proxy, redis_url, "vertex")
    texts = [f"text number {i} " * (1 + i % 3) for i in range(30)]
    resps = await asyncio.gather(*(proxy.embed(key, body("vertex", t)) for t in texts))
    assert [r.status for r in resps] == [200] * 30
    assert max(mock.state.call_sizes) > 1  # merged
    extra = mock.settings.extra_tokens  # the provider's count: its own tokenizer's, not cl100k's
    assert [(await r.json())["usage"]["prompt_tokens"] for r in resps] == [cl100k(t) + extra for t in texts]
    await settle(proxy)
    await proxy.app[LEDGER].flush()
    assert full_ledger(redis_server.client(), "tvertex")["upstream_tokens"] == mock.state.billed_tokens


async def merged(proxy: Any, up: Any, key: str, texts: list[str]) -> list[dict[str, Any]]:
    """One request per text, all carried by one merged upstream call (while another request's call is in flight)."""
    requests = up.state.requests
    up.settings.latency_ms = 1000  # long enough for the others to join, under any load
    blocker = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": f"in flight {requests}"}))
    await until(lambda: up.state.requests == requests + 1)
    up.settings.latency_ms = 0
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": t}) for t in texts))
    assert (await blocker).status == 200
    assert [r.status for r in resps] == [200] * len(texts)
    assert up.state.requests == requests + 2 and sorted(up.state.bodies[-1]["input"]) == sorted(texts)  # merged
    return [await r.json() for r in resps]


async def test_what_a_merged_call_billed_beyond_the_local_counts_is_in_the_ledger_and_the_quota(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream that counts more than the local counts (a provider's own tokenizer, special tokens): a merged call
    tells each request its inputs' local counts (never its neighbours'), and the rest of what the upstream billed was
    "billed to no request": in a metric, missing from the ledger and the team's token quota. Now it is the merged
    requests' failed tokens (billed, served to nobody), shared by their local counts; their usage is unchanged."""
    monkeypatch.setattr(batching, "JOIN_WINDOW_S", 5.0)
    up = await mocks(token_skew=2)
    proxy = await make_proxy(fleet_settings(redis_url, up_toml("a", up) + LIMITS, one_model('{ upstream = "a" }')))
    keys = [await proxy.new_key(TEAM), await proxy.new_key(TEAM)]
    texts = ["short", "a somewhat longer text here", "mid sized text", "x"]
    got = await merged(proxy, up, keys[0], texts[:2])
    got += await merged(proxy, up, keys[1], texts[2:])
    assert [d["usage"]["prompt_tokens"] for d in got] == [cl100k(t) for t in texts]  # each its own local count
    await settle(proxy)
    await proxy.app[LEDGER].flush()
    r = redis_server.client()
    book = ledger(r)
    assert book["upstream_tokens"] == up.state.billed_tokens
    assert book["failed_tokens"] == 2 * len(texts)  # the merged calls' difference: billed, told to no client
    assert book["upstream_tokens"] - book["failed_tokens"] == sum(d["usage"]["prompt_tokens"] for d in got) + 2 * (
        cl100k("in flight 0") + 2)  # the two blockers, alone in their calls: the upstream's count
    assert quota_tokens(r) == book["upstream_tokens"]


async def test_a_fresh_request_is_not_cut_to_an_old_requests_deadline_by_merging(
    mocks: Mocks, redis_url: str
) -> None:
    """A merged call's deadline is its earliest request's (batching.py): right for misses collected together, which
    asked within a few ms of each other. But a request that sends inputs again after a shared call failed keeps its
    first deadline (misses.py), seconds old: merged with it, a request that just asked got the old request's few ms
    left, and a 504 from an upstream that answers well within its own deadline. The fleet client with the real mock
    upstream: a call in flight, then two misses of one lane, one asked 1.8 s ago (deadline 2 s), one now."""
    from proxy.errors import UpstreamTimeout
    from proxy.upstream import FleetClient

    up = await mocks(latency_ms=400)
    fleet = FleetClient(fleet_settings(redis_url, up_toml("a", up, deadline_s=2.0), one_model('{ upstream = "a" }')))
    await fleet.start()
    try:
        blocker = asyncio.create_task(fleet.embed(MODEL, ["in flight"], [2], None, None))
        await until(lambda: up.state.requests == 1)  # the lane has a call in flight: the next misses are collected
        old = fleet.embed(MODEL, ["old"], [1], None, None, asked=fleet.now() - 1.8)
        fresh = fleet.embed(MODEL, ["fresh"], [1], None, None)
        old_result, fresh_result = await asyncio.gather(old, fresh, return_exceptions=True)
        await blocker
    finally:
        await fleet.close()
    assert isinstance(old_result, UpstreamTimeout)  # its own deadline: 0.2 s left for a 0.4 s upstream
    assert not isinstance(fresh_result, BaseException), fresh_result  # 2 s of its own: answered
    assert fresh_result.tokens == [1]
