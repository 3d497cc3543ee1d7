"""Issue 15 point 10: `x-cache`, the access log and the cache metrics follow what happened. An input is a miss only if
this request's own upstream call fetched it; one served by another request's call (in flight, or just answered and
being written) cost it nothing, and is a hit, as its usage says (every token cached)."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from proxy.http.accesslog import AccessLog
from proxy.http.app import METRICS
from tests.conftest import ProxyFactory, Upstream, make_settings
from tests.helpers import until
from tests.test_fleet import access_lines, metric

pytestmark = pytest.mark.redis
MODEL = "text-embedding-3-small"


async def test_a_repeat_served_by_the_first_requests_call_is_a_hit(
    make_proxy: ProxyFactory, upstream: Upstream, redis_url: str
) -> None:
    proxy = await make_proxy(make_settings(upstream.base_url, redis_url),
                             access_log=AccessLog(io.BytesIO(), flush_interval_s=3600))
    key = await proxy.new_key()
    upstream.settings.latency_ms = 500
    first = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": "the same input"}))
    await until(lambda: upstream.state.requests == 1)  # its call is in flight
    second, third = await asyncio.gather(
        proxy.embed(key, {"model": MODEL, "input": "the same input"}),  # joins it: no call of its own
        proxy.embed(key, {"model": MODEL, "input": ["the same input", "another input"], "user": "u"}))
    first_resp = await first
    assert upstream.state.requests == 2  # the first's call, and the third's for its other input

    def usage(body: dict[str, Any]) -> tuple[int, int]:
        return body["usage"]["prompt_tokens"], body["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert first_resp.headers["x-cache"] == "miss" and usage(await first_resp.json()) == (3, 0)
    assert second.headers["x-cache"] == "hit" and usage(await second.json()) == (3, 3)
    assert third.headers["x-cache"] == "partial" and usage(await third.json()) == (5, 3)
    lines = {line["request_id"]: line for line in access_lines(proxy)}
    logged = [lines[r.headers["x-request-id"]] for r in (first_resp, second, third)]
    assert [(line["cache"], line["cache_hits"], line["upstream_inputs"]) for line in logged] == [
        ("miss", 0, 1), ("hit", 1, 0), ("partial", 1, 1)]
    assert metric(proxy, "embedding_proxy_cache_lookups_total", result="hit") == 2
    assert metric(proxy, "embedding_proxy_cache_lookups_total", result="miss") == 2
    m = proxy.app[METRICS]
    m.flush()
    by_cache = {s.labels["cache"]: s.value for family in m.registry.collect() for s in family.samples
                if s.name == "embedding_proxy_requests_total"}
    assert by_cache == {"miss": 1, "hit": 1, "partial": 1}
