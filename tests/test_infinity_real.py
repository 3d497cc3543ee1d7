"""Issue 15 point 10 against the REAL self-hosted server: Infinity 0.0.78 on the CPU serving all-MiniLM-L6-v2 (from a
wheel, tests/infinity_servers.py), two processes as the model's two deployments, the proxy in front, a real
redis-server. The other self-hosted tests use the mock that plays Infinity; these check that it plays it right.

Needs `make infinity` (.ci/run runs it): without .infvenv they skip, saying so, except under CI (CI=true), where that
is a failure.
"""

from __future__ import annotations

import asyncio
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Settings, load
from proxy.tokens import HFTokenizer
from proxy.upstream import batching
from tests import infinity_servers
from tests.conftest import Proxy, ProxyFactory, free_port
from tests.helpers import assert_same_vectors, vectors
from tests.infinity_servers import SERVED_NAME, Infinity
from tests.test_fleet import admin_upstreams, fleet_settings, metric, settle

pytestmark = [pytest.mark.redis, pytest.mark.infinity, pytest.mark.timeout(600)]
MODEL = SERVED_NAME
TEXTS = ["hello", "hello world", "the quick brown fox", "jumps over the lazy dog", "x", "Ünïcödé naïve café"]
WHITESPACE = [" ", "\n", "\u200b"]  # measured: 200s with prompt_tokens 0
TOO_LONG = "x" + " " * 125_000 + "y"  # 2 tokens, over Infinity's 122,880 characters: its 422
INFINITY_SAYS = "String should have at most 122880 characters"


@pytest.fixture(scope="module")
def infinity() -> Iterator[tuple[Infinity, Infinity]]:
    why = infinity_servers.missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; under CI the real-Infinity tests must run")
        pytest.skip(why)
    servers = [Infinity(free_port(), "--lengths-via-tokenize") for _ in range(2)]
    try:
        infinity_servers.start_all(servers)
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()


def tokenizer_json() -> Path:
    return infinity_servers.model_dir() / "tokenizer.json"


def model_toml(name: str = MODEL, options: str = "count_special_tokens = false\n") -> str:
    return (f'[models.{name}]\ndimensions = 384\ntokenizer = "hf:{tokenizer_json()}"\n{options}'
            f'upstream_model = "{SERVED_NAME}"\ndeployments = [{{ upstream = "a" }}, {{ upstream = "b" }}]\n')


def upstreams_toml(a: Infinity, b: Infinity) -> str:
    """Keyless; one failure would cool a deployment down for a minute (so a 'no cooldown' assertion means it)."""
    return "".join(f'[upstreams.{n}]\nbase_url = "{s.base_url}"\napi_key_env = ""\nallowed_fails = 1\n'
                   'cooldown_s = 60.0\nbackoff_base_s = 0.01\nattempt_timeout_s = 60.0\ndeadline_s = 120.0\n'
                   for n, s in (("a", a), ("b", b)))


async def proxy_for(make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity],
                    models: str = "") -> Proxy:
    proxy: Proxy = await make_proxy(fleet_settings(redis_url, upstreams_toml(*infinity), models or model_toml()))
    return proxy


async def direct(server: Infinity, body: dict[str, Any]) -> dict[str, Any]:
    """Infinity's own answer to `body` (keyless)."""
    async with aiohttp.ClientSession() as s, s.post(server.base_url + "/embeddings", json=body) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


def refused_by(server: Infinity) -> float:
    """How many /embeddings requests the server answered with a 4xx (its own Prometheus counter)."""
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("http_requests_total{") and 'handler="/embeddings"' in line and '"4xx"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def assert_all_healthy(proxy: Proxy) -> None:
    states = await admin_upstreams(proxy)
    assert set(states) == {f"{MODEL}/a", f"{MODEL}/b"}
    for name, state in states.items():
        assert (state["state"], state["consecutive_failures"]) == ("healthy", 0), (name, state)


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_vectors_through_the_proxy_are_infinitys_own_bit_for_bit(
    make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity], encoding: str
) -> None:
    proxy = await proxy_for(make_proxy, redis_url, infinity)
    key = await proxy.new_key()
    texts = [f"{t} ({encoding})" for t in TEXTS]  # misses: the proxy asks Infinity for exactly this list
    body = {"model": MODEL, "input": texts, "encoding_format": encoding}
    resp = await proxy.embed(key, body)
    assert resp.status == 200, await resp.text()
    got = await resp.json()
    assert resp.headers["x-cache"] == "miss" and len(got["data"]) == len(texts)
    assert all(isinstance(d["embedding"], str if encoding == "base64" else list) for d in got["data"])
    truth = await direct(infinity[0], {**body, "model": SERVED_NAME})
    assert_same_vectors(vectors(got), vectors(truth))
    assert_same_vectors(vectors(truth), vectors(await direct(infinity[1], {**body, "model": SERVED_NAME})))
    assert len(vectors(got)[0]) == 384 and got["usage"]["prompt_tokens"] == truth["usage"]["prompt_tokens"]
    await settle(proxy)
    resp = await proxy.embed(key, body)  # from the cache: the same bits
    assert resp.headers["x-cache"] == "hit"
    assert_same_vectors(vectors(await resp.json()), vectors(truth))


async def test_whitespace_only_inputs_are_zero_token_200s_and_no_deployment_cools_down(
    make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity]
) -> None:
    proxy = await proxy_for(make_proxy, redis_url, infinity)
    key = await proxy.new_key()
    refused = [refused_by(s) for s in infinity]
    for text in WHITESPACE:
        truth = await direct(infinity[0], {"model": SERVED_NAME, "input": [text]})
        assert truth["usage"]["prompt_tokens"] == 0  # Infinity's own answer
        resp = await proxy.embed(key, {"model": MODEL, "input": text})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["usage"]["prompt_tokens"] == 0
        assert_same_vectors(vectors(body), vectors(truth))
    resp = await proxy.embed(key, {"model": MODEL, "input": [*WHITESPACE, "hello world"]})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["prompt_tokens"] == 2  # "hello world" alone; whitespace counts nothing
    assert [refused_by(s) for s in infinity] == refused
    await assert_all_healthy(proxy)


async def test_an_input_over_infinitys_limit_is_the_clients_400_with_infinitys_message(
    make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity]
) -> None:
    proxy = await proxy_for(make_proxy, redis_url, infinity)
    key = await proxy.new_key()
    refused = sum(refused_by(s) for s in infinity)
    resp = await proxy.embed(key, {"model": MODEL, "input": TOO_LONG})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert INFINITY_SAYS in error["message"], error
    assert sum(refused_by(s) for s in infinity) == refused + 1  # asked once: not tried again on the other
    await assert_all_healthy(proxy)
    resp = await proxy.embed(key, {"model": MODEL, "input": "the next request"})
    assert resp.status == 200, await resp.text()
    await assert_all_healthy(proxy)


async def test_each_requests_usage_is_infinitys_own_count_alone_or_merged(
    make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `count_special_tokens = false` the proxy's local counts are Infinity's (--lengths-via-tokenize: no
    [CLS], no [SEP]), so requests merged into one call are each told their own count and nothing is a mismatch.
    The same model left at the default (`true`, TEI's way) disagrees with the real server on every input."""
    monkeypatch.setattr(batching, "JOIN_WINDOW_S", 1.0)  # concurrent requests meet in one call
    proxy = await proxy_for(make_proxy, redis_url, infinity, model_toml() + model_toml("tei_style", ""))
    key = await proxy.new_key()
    truth = [(await direct(infinity[0], {"model": SERVED_NAME, "input": [t]}))["usage"]["prompt_tokens"]
             for t in TEXTS]
    assert truth == HFTokenizer(f"hf:{tokenizer_json()}").count_many(TEXTS, special_tokens=False)
    assert truth[TEXTS.index("x")] == 1  # 3 with [CLS] and [SEP]
    for model in (MODEL, "tei_style"):
        resps = await asyncio.gather(*(proxy.embed(key, {"model": model, "input": f"{t} {model}"}) for t in TEXTS))
        assert all(r.status == 200 for r in resps)
        counts = [(await r.json())["usage"]["prompt_tokens"] for r in resps]
        own = [(await direct(infinity[0], {"model": SERVED_NAME, "input": [f"{t} {model}"]}))["usage"]
               ["prompt_tokens"] for t in TEXTS]
        if model == MODEL:
            assert counts == own
    for direction in ("over", "under"):
        assert metric(proxy, "embedding_proxy_usage_mismatch_tokens_total", model=MODEL, direction=direction) == 0
    assert metric(proxy, "embedding_proxy_usage_mismatch_tokens_total", model="tei_style", direction="under") > 0


async def test_ready_with_only_self_hosted_upstreams_and_no_openai_key(
    make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity], tmp_path: Path
) -> None:
    path = tmp_path / "self-hosted.toml"
    path.write_text(upstreams_toml(*infinity) + model_toml())
    settings: Settings = load(str(path), env={"REDIS_URL": redis_url})  # no UPSTREAM_API_KEY, no base URL
    proxy: Proxy = await make_proxy(settings)
    resp = await proxy.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["upstream"] == "ok" and body["status"] == "ready", body
    resp = await proxy.embed(await proxy.new_key(), {"model": MODEL, "input": ["ready"]})
    assert resp.status == 200, await resp.text()
    assert_same_vectors(vectors(await resp.json()),
                        vectors(await direct(infinity[0], {"model": SERVED_NAME, "input": ["ready"]})))


async def test_max_input_tokens_254_refuses_what_infinity_would_silently_truncate(
    make_proxy: ProxyFactory, redis_url: str, infinity: tuple[Infinity, Infinity]
) -> None:
    """Measured: all-MiniLM-L6-v2 (max_seq_length 256) embeds only the first 254 tokens of an input ([CLS] and [SEP]
    take the other two) and reports at most 256: a longer input is answered 200 with a vector of its beginning.
    The README's `max_input_tokens = 254` for it makes such an input the client's 400 before any upstream call."""
    words = {n: "word " * n for n in (254, 255, 300)}
    own = {n: await direct(infinity[0], {"model": SERVED_NAME, "input": [w]}) for n, w in words.items()}
    assert [own[n]["usage"]["prompt_tokens"] for n in words] == [254, 255, 256]
    assert_same_vectors(vectors(own[254]), vectors(own[300]))  # the rest was dropped, silently
    proxy = await proxy_for(make_proxy, redis_url, infinity,
                            model_toml(options="count_special_tokens = false\nmax_input_tokens = 254\n"))
    key = await proxy.new_key()
    refused = sum(refused_by(s) for s in infinity)
    resp = await proxy.embed(key, {"model": MODEL, "input": words[255]})
    assert resp.status == 400, await resp.text()
    assert "254" in (await resp.json())["error"]["message"]
    resp = await proxy.embed(key, {"model": MODEL, "input": words[254]})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["usage"]["prompt_tokens"] == 254
    assert_same_vectors(vectors(body), vectors(own[254]))
    assert sum(refused_by(s) for s in infinity) == refused
    await assert_all_healthy(proxy)
