"""Issue 15 point 10: per-input token counts follow how the server counts, and never depend on other requests.

The mock upstream plays Infinity (a tokenizer.json, special tokens not counted: `add_special_tokens=False`) as a real
HTTP server; concurrent misses are merged into one upstream call by the proxy's micro-batching (its join window
widened here so that they always meet, whatever the machine's load).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.tokens import HFTokenizer
from proxy.upstream import batching
from proxy.upstream.batching import MicroBatcher
from proxy.upstream.http import UpstreamResult
from tests import test_fleet
from tests.conftest import Proxy, ProxyFactory
from tests.helpers import assert_same_vectors, direct, until, vectors
from tests.test_fleet import Mocks, fleet_settings, metric, settle
from tests.test_fleet_units import make_tokenizer_file

pytestmark = pytest.mark.redis
mocks = test_fleet.mocks  # the fixture: real mock upstreams
TEXTS = ["hello", "hello world", "the quick brown fox", "jumps over the lazy dog", "lazy dog", "brown fox jumps"]


async def infinity(mocks: Mocks, tmp_path: Path, redis_url: str, make_proxy: ProxyFactory,
                   model_options: str) -> tuple[Proxy, Any, Path]:
    path = make_tokenizer_file(tmp_path)
    from proxy.mock.upstream import MockModel

    up = await mocks(api_key=None, models={"mini": MockModel(16, False, str(path), special_tokens=False)})
    settings = fleet_settings(redis_url, f'[upstreams.inf]\nbase_url = "{up.base_url}"\napi_key_env = ""\n',
                              f'[models.mini]\ndimensions = 16\ntokenizer = "hf:{path}"\n{model_options}'
                              'deployments = [{ upstream = "inf" }]\n')
    proxy: Proxy = await make_proxy(settings)
    return proxy, up, path


async def merged(proxy: Proxy, up: Any, key: str, texts: list[str]) -> list[dict[str, Any]]:
    """One request per text, all carried by one merged upstream call (while another request's call is in flight)."""
    requests = up.state.requests
    up.settings.latency_ms = 1000  # long enough for the others to join, under any load
    blocker = asyncio.create_task(proxy.embed(key, {"model": "mini", "input": f"in flight {requests}"}))
    await until(lambda: up.state.requests == requests + 1)
    resps = await asyncio.gather(*(proxy.embed(key, {"model": "mini", "input": t}) for t in texts))
    up.settings.latency_ms = 0
    assert (await blocker).status == 200
    assert all(r.status == 200 for r in resps)
    # one merged call, its inputs in the order the requests arrived (concurrent requests may arrive in any order)
    assert up.state.requests == requests + 2 and sorted(up.state.bodies[-1]["input"]) == sorted(texts)
    return [await r.json() for r in resps]


async def test_infinity_counts_are_each_inputs_own_alone_merged_and_cached(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "JOIN_WINDOW_S", 5.0)
    proxy, up, _ = await infinity(mocks, tmp_path, redis_url, make_proxy, "count_special_tokens = false\n")
    key = await proxy.new_key()
    truth = {t: (await direct(up.base_url, {"model": "mini", "input": t}))["usage"]["prompt_tokens"] for t in TEXTS}
    assert truth["hello"] == 1  # Infinity's count: no [CLS], no [SEP]

    bodies = await merged(proxy, up, key, TEXTS)
    assert [b["usage"]["prompt_tokens"] for b in bodies] == [truth[t] for t in TEXTS]
    for body, t in zip(bodies, TEXTS, strict=True):
        assert_same_vectors(vectors(body), vectors(await direct(up.base_url, {"model": "mini", "input": t})))
    await settle(proxy)
    for t in TEXTS:  # cached: the same count as when it was fetched, and as Infinity's
        resp = await proxy.embed(key, {"model": "mini", "input": t})
        body = await resp.json()
        assert resp.headers["x-cache"] == "hit"
        assert body["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens_details"]["cached_tokens"] == truth[t]
    own = {"model": "mini", "input": ["quick brown", "the lazy fox"]}  # a request alone in its call
    alone = await (await proxy.embed(key, own)).json()
    assert alone["usage"]["prompt_tokens"] == (await direct(up.base_url, own))["usage"]["prompt_tokens"]
    assert metric(proxy, "embedding_proxy_usage_mismatch_tokens_total", model="mini", direction="under") == 0


async def test_a_merged_call_that_does_not_match_the_local_counts_bills_no_request_the_difference(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """count_special_tokens left at true in front of an Infinity: each merged request is told its inputs' local counts
    (what it would be told with any other neighbours); the difference is in the metric and a warning."""
    monkeypatch.setattr(batching, "JOIN_WINDOW_S", 5.0)
    proxy, up, path = await infinity(mocks, tmp_path, redis_url, make_proxy, "")
    key = await proxy.new_key()
    local = dict(zip(TEXTS, HFTokenizer(f"hf:{path}").count_many(TEXTS), strict=True))
    with caplog.at_level(logging.WARNING, logger="proxy.upstream"):
        first = await merged(proxy, up, key, TEXTS[:3])
        second = await merged(proxy, up, key, [TEXTS[0] + " again", *TEXTS[3:]])
    assert [b["usage"]["prompt_tokens"] for b in first + second[1:]] == [local[t] for t in TEXTS]
    assert metric(proxy, "embedding_proxy_usage_mismatch_tokens_total", model="mini", direction="under") \
        == 2 * len(TEXTS) + 2  # [CLS] and [SEP] of each input, counted locally and not by the server
    assert sum("check the model's tokenizer and count_special_tokens" in r.message for r in caplog.records) == 1


async def test_the_batcher_gives_merged_callers_their_local_counts_and_a_lone_caller_the_upstreams() -> None:
    answers: list[list[int]] = []

    async def call(model: str, inputs: Any, counts: list[int], dims: Any, user: Any, asked: float, lost: Any = None,
                   gave_up: Any = None, input_type: Any = None) -> Any:
        await asyncio.sleep(0.05)
        tokens = answers.pop(0)
        return UpstreamResult(np.zeros((len(inputs), 2), dtype="<f4"), tokens), "up"

    seen: list[tuple[str, int]] = []
    b = MicroBatcher(call, lambda model: (100, 10_000), on_mismatch=lambda m, d: seen.append((m, d)))
    answers[:] = [[7], [2, 3, 4]]  # alone: the upstream's 7; merged: 9 where the local counts say 12
    lone = asyncio.create_task(b.submit("m", ["a"], [5], None, None))
    await asyncio.sleep(0.01)
    parts = await asyncio.gather(b.submit("m", ["b"], [4], None, None), b.submit("m", ["c", "d"], [4, 4], None, None))
    assert (await lone)[0].tokens == [7]
    assert [p[0].tokens for p in parts] == [[4], [4, 4]]
    assert seen == [("m", -3)]
    answers[:] = [[8], [3, 5]]  # merged and matching: each its local count, nothing reported
    lone = asyncio.create_task(b.submit("m", ["e"], [8], None, None))
    await asyncio.sleep(0.01)
    parts = await asyncio.gather(b.submit("m", ["f"], [3], None, None), b.submit("m", ["g"], [5], None, None))
    assert (await lone)[0].tokens == [8] and [p[0].tokens for p in parts] == [[3], [5]]
    assert seen == [("m", -3)]


def test_count_special_tokens_is_for_hf_tokenizers_only(tmp_path: Path) -> None:
    from proxy import config

    path = make_tokenizer_file(tmp_path)
    s = config.parse(f"[models.bge]\ndimensions = 4\ntokenizer = 'hf:{path}'\ncount_special_tokens = false\n",
                     "/etc/proxy.toml", {})
    assert s.models["bge"].count_special_tokens is False
    assert config.parse(f"[models.bge]\ndimensions = 4\ntokenizer = 'hf:{path}'\n", "/etc/proxy.toml",
                        {}).models["bge"].count_special_tokens is True  # TEI's and vLLM's way
    with pytest.raises(config.ConfigError, match=r"/etc/proxy.toml: models.m.count_special_tokens: only for an"):
        config.parse("[models.m]\ndimensions = 4\ncount_special_tokens = false\n", "/etc/proxy.toml", {})


async def test_an_implausible_usage_says_what_to_change(make_proxy: ProxyFactory, upstream: Any,
                                                        redis_url: str) -> None:
    """Infinity without --lengths-via-tokenize reports characters: "255 tokens for 1 inputs (expected 1 to 252)"
    told nobody what to change."""
    from tests.conftest import make_settings

    proxy: Proxy = await make_proxy(make_settings(upstream.base_url, redis_url, "max_retries = 0\n"))
    upstream.settings.token_skew = 300  # far more than any tokenizer counts for "hello"
    resp = await proxy.embed(await proxy.new_key(), {"model": "text-embedding-3-small", "input": "hello"})
    assert resp.status == 502
    message = (await resp.json())["error"]["message"]
    assert "reported 301 tokens for 1 inputs (expected 1 to 12)" in message
    assert "--lengths-via-tokenize" in message and "count_special_tokens" in message
