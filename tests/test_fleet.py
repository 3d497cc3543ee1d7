"""The upstream fleet end to end: real mock upstreams (one per deployment), a real redis-server, the proxy app."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cli.main import main
from proxy.config import Settings
from proxy.http.accesslog import AccessLog
from proxy.http.admin import FLEET
from proxy.http.app import ACCESS_LOG, METRICS, SERVICE
from proxy.mock.upstream import MOCK_SETTINGS, MOCK_STATE, MockModel, MockSettings, create_mock_app
from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, Upstream, make_settings
from tests.helpers import assert_same_vectors, direct, vectors
from tests.test_fleet_units import make_tokenizer_file

MODEL = "text-embedding-3-small"
ADMIN = "admin-secret-for-fleet-tests"
Mocks = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def mocks() -> AsyncIterator[Mocks]:
    servers: list[TestServer] = []

    async def start(**options: Any) -> Upstream:
        options.setdefault("api_key", UPSTREAM_KEY)
        app = create_mock_app(MockSettings(**options))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Upstream(server, app[MOCK_STATE], app[MOCK_SETTINGS])

    yield start
    for server in servers:
        await server.close()


def upstream_toml(name: str, up: Upstream, **options: Any) -> str:
    lines = [f"[upstreams.{name}]", f'base_url = "{up.base_url}"', 'api_key_env = "FLEET_KEY"', "deadline_s = 5.0",
             "attempt_timeout_s = 2.0", "backoff_base_s = 0.01"]
    lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


def fleet_settings(redis_url: str, upstreams: str, models: str) -> Settings:
    # patient Redis calls: on a loaded test machine a slow one must not turn into a bypass or a 503 here
    return make_settings("http://127.0.0.1:9/v1", redis_url, upstreams + models + "[redis]\nsocket_timeout_s = 5.0\n",
                         FLEET_KEY=UPSTREAM_KEY, PROXY_ADMIN_KEY=ADMIN)


async def logged_proxy(make_proxy: ProxyFactory, settings: Settings) -> Proxy:
    proxy: Proxy = await make_proxy(settings, access_log=AccessLog(io.BytesIO(), flush_interval_s=3600))
    return proxy


def access_lines(proxy: Proxy) -> list[dict[str, Any]]:
    log = proxy.app[ACCESS_LOG]
    log.flush()
    stream = log.stream
    assert isinstance(stream, io.BytesIO)
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def admin_upstreams(proxy: Proxy) -> dict[str, dict[str, Any]]:
    resp = await proxy.client.get("/admin/upstreams", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == 200
    return {f"{r['model']}/{r['upstream']}": r for r in (await resp.json())["data"]}


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    m = proxy.app[METRICS]
    m.flush()
    return m.registry.get_sample_value(name, labels) or 0.0


async def settle(proxy: Proxy) -> None:
    await proxy.app[SERVICE].drain()


# --- routing and failover -------------------------------------------------------------------------------------


async def test_failover_while_a_deployment_is_down_then_it_returns(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    a, b = await mocks(), await mocks()
    settings = fleet_settings(
        redis_url, upstream_toml("a", a, allowed_fails=2, cooldown_s=5) + upstream_toml("b", b),
        f'[models."{MODEL}"]\ndimensions = 1536\nsupports_dimensions = true\n'
        'deployments = [{ upstream = "a", weight = 3 }, { upstream = "b", weight = 1 }]\n')
    proxy = await logged_proxy(make_proxy, settings)  # a cooldown longer than 30 requests take on a loaded machine
    key = await proxy.new_key()
    a.state.fail_next("status", times=10_000, status=500)  # a is down
    statuses = []
    for i in range(30):
        resp = await proxy.embed(key, {"model": MODEL, "input": f"down {i}"})
        statuses.append(resp.status)
    assert statuses == [200] * 30  # no client failure while b is healthy
    assert a.state.requests == 2  # allowed_fails = 2, then out of rotation
    assert b.state.requests == 30
    state = (await admin_upstreams(proxy))[f"{MODEL}/a"]
    assert state["state"] == "cooling_down" and state["last_error"] == "bad_gateway"
    assert state["cooling_down_until"] > time.time()
    assert metric(proxy, "embedding_proxy_upstream_failovers_total", model=MODEL, upstream="a") == 2
    assert metric(proxy, "embedding_proxy_deployment_calls_total", model=MODEL, upstream="a",
                  outcome="bad_gateway") == 2
    assert metric(proxy, "embedding_proxy_deployment_cooling_down", model=MODEL, upstream="a") == 1

    a.state.reset()  # a is back: after its cooldown, its first call finds it healthy
    await asyncio.sleep(max(0.0, state["cooling_down_until"] - time.time()) + 0.1)
    served_by_a = 0
    for i in range(200):
        resp = await proxy.embed(key, {"model": MODEL, "input": f"back {i}"})
        assert resp.status == 200
        if access_lines(proxy)[-1]["upstreams"] == ["a"]:
            served_by_a += 1
            if served_by_a == 3:
                break
        await asyncio.sleep(0.02)
    assert served_by_a == 3 and a.state.requests == 3
    assert (await admin_upstreams(proxy))[f"{MODEL}/a"]["state"] == "healthy"
    assert access_lines(proxy)[0]["upstreams"] in (["b"], ["a", "b"])


async def test_priorities_and_all_down_then_one_back(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> None:
    a, b, spare = await mocks(), await mocks(), await mocks()
    settings = fleet_settings(
        redis_url,
        upstream_toml("a", a, allowed_fails=1, cooldown_s=0.4) + upstream_toml("b", b, allowed_fails=1, cooldown_s=30)
        + upstream_toml("spare", spare, allowed_fails=1, cooldown_s=0.8),
        f'[models."{MODEL}"]\ndimensions = 1536\n'
        'deployments = [{ upstream = "a" }, { upstream = "b" }, { upstream = "spare", priority = 1 }]\n')
    proxy = await logged_proxy(make_proxy, settings)
    key = await proxy.new_key()
    for i in range(6):
        assert (await proxy.embed(key, {"model": MODEL, "input": f"p{i}"})).status == 200
    assert spare.state.requests == 0 and a.state.requests + b.state.requests == 6

    for up in (a, b, spare):
        up.state.reset()
        up.state.fail_next("status", times=1, status=502)  # one failure each: every deployment cools down
    resp = await proxy.embed(key, {"model": MODEL, "input": "all down"})
    assert resp.status == 200, await resp.text()  # waited for a (0.4 s) instead of failing at once
    assert (a.state.requests, b.state.requests, spare.state.requests) == (2, 1, 1)
    assert access_lines(proxy)[-1]["upstreams"] == ["a"]
    assert metric(proxy, "embedding_proxy_upstream_queue_wait_seconds_count", model=MODEL) == 1


async def test_every_deployment_cooling_down_beyond_the_deadline_is_503_at_once(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    a, b = await mocks(), await mocks()
    settings = fleet_settings(
        redis_url, upstream_toml("a", a, allowed_fails=1, cooldown_s=60) + upstream_toml("b", b, allowed_fails=1,
                                                                                       cooldown_s=60),
        f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}, {{ upstream = "b" }}]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    a.state.fail_next("status", times=5, status=500)
    b.state.fail_next("timeout", times=5)
    b.settings.latency_ms = 0
    resp = await proxy.embed(key, {"model": MODEL, "input": "x"})
    assert resp.status in (503, 504)
    before = a.state.requests + b.state.requests
    resp = await proxy.embed(key, {"model": MODEL, "input": "y"})
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["code"] == "service_unavailable" and "cooling down" in body["error"]["message"]
    assert int(resp.headers["Retry-After"]) >= 50
    assert a.state.requests + b.state.requests == before  # refused without an upstream call


async def test_upstream_400_is_relayed_and_not_a_deployment_failure(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    a, b = await mocks(), await mocks()
    settings = fleet_settings(
        redis_url, upstream_toml("a", a, allowed_fails=1) + upstream_toml("b", b, allowed_fails=1),
        f'[models."{MODEL}"]\ndimensions = 1536\n'
        'deployments = [{ upstream = "a" }, { upstream = "b", priority = 1 }]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    a.state.fail_next("status", times=1, status=400)
    resp = await proxy.embed(key, {"model": MODEL, "input": "refused"})
    assert resp.status == 400 and b.state.requests == 0
    state = (await admin_upstreams(proxy))[f"{MODEL}/a"]
    assert state["state"] == "healthy" and state["consecutive_failures"] == 0


# --- Azure ------------------------------------------------------------------------------------------------------


async def test_azure_deployment(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> None:
    az = await mocks(azure_deployments={"emb-small": MODEL})
    root = str(az.server.make_url("")).rstrip("/")
    settings = fleet_settings(
        redis_url,
        f'[upstreams.az]\nkind = "azure"\nbase_url = "{root}"\napi_key_env = "FLEET_KEY"\n'
        'api_version = "2024-10-21"\n',
        f'[models."{MODEL}"]\ndimensions = 1536\nsupports_dimensions = true\n'
        'deployments = [{ upstream = "az", upstream_model = "emb-small" }]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    body = {"model": MODEL, "input": ["azure one", "azure two"], "dimensions": 256}
    resp = await proxy.embed(key, body)
    assert resp.status == 200, await resp.text()
    assert az.state.last_path == "/openai/deployments/emb-small/embeddings?api-version=2024-10-21"
    assert az.state.last_api_key == UPSTREAM_KEY and az.state.last_authorization is None
    assert_same_vectors(vectors(await resp.json()), vectors(await direct(az.base_url, body)))


# --- self-hosted ------------------------------------------------------------------------------------------------


async def test_self_hosted_model_with_a_tokenizer_file(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, tmp_path: Path
) -> None:
    path = make_tokenizer_file(tmp_path)
    tei = await mocks(api_key=None, floats_only=True, models={"bge-small": MockModel(384, False, str(path))})
    model = ('[models."bge-small"]\ndimensions = 384\nsupports_dimensions = false\n'
             f'tokenizer = "hf:{path}"\nupstream_base64 = false\nmax_input_tokens = 8\n'
             'deployments = [{ upstream = "tei" }]\n')
    tei_toml = f'[upstreams.tei]\nbase_url = "{tei.base_url}"\napi_key_env = ""\n'
    proxy = await make_proxy(fleet_settings(redis_url, tei_toml, model + 'cache_revision = "r1"\n'))
    key = await proxy.new_key()
    body = {"model": "bge-small", "input": ["hello world", "the quick brown fox"]}
    resp = await proxy.embed(key, body)
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    assert doc["usage"]["prompt_tokens"] == 4 + 6  # [CLS] and [SEP] counted, as the server counts them
    assert_same_vectors(vectors(doc), vectors(await direct(tei.base_url, body)))
    await settle(proxy)
    resp = await proxy.embed(key, body)
    assert resp.headers["x-cache"] == "hit"

    too_long = "the quick brown fox jumps over the lazy dog"  # 9 words + 2 special tokens > 8
    resp = await proxy.embed(key, {"model": "bge-small", "input": too_long})
    assert resp.status == 400 and "11 tokens" in (await resp.json())["error"]["message"]
    resp = await proxy.embed(key, {"model": "bge-small", "input": [[5, 6, 7]]})
    assert resp.status == 400
    assert "check_embedding_ctx_length=False" in (await resp.json())["error"]["message"]

    # the model behind the name changed: a new revision serves no old vector
    requests = tei.state.requests
    proxy2 = await make_proxy(fleet_settings(redis_url, tei_toml, model + 'cache_revision = "r2"\n'))
    resp = await proxy2.embed(await proxy2.new_key(), body)
    assert resp.status == 200 and resp.headers["x-cache"] == "miss"
    assert tei.state.requests == requests + 1


# --- pacing -------------------------------------------------------------------------------------------------------


async def test_pacing_keeps_a_rate_limited_upstream_from_answering_429(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    limited = await mocks(rpm=3, rate_window_s=1.0)
    settings = fleet_settings(redis_url, upstream_toml("lim", limited, max_queue_wait_s=5.0),
                              f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "lim" }}]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    for i in range(7):
        resp = await proxy.embed(key, {"model": MODEL, "input": f"paced {i}"})
        assert resp.status == 200, await resp.text()
    assert limited.state.requests == 7 and limited.state.rate_limited == 0  # waited for the resets instead
    assert metric(proxy, "embedding_proxy_upstream_queue_wait_seconds_count", model=MODEL) == 2


async def test_a_calls_waits_for_rate_limits_add_up_to_at_most_max_queue_wait_s(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    limited = await mocks(rpm=1, rate_window_s=1.0)
    settings = fleet_settings(redis_url, upstream_toml("lim", limited, max_queue_wait_s=1.2),
                              f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "lim" }}]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200  # no request left for ~1 s
    # distinct users: two calls; both wait for the reset, then one of them for the next window, ~1 s more: 1.2 s
    # of waiting for it in all is spent before that one ends, so the proxy answers it 429 at once
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": f"w{i}", "user": f"u{i}"})
                                   for i in range(2)))
    assert sorted(r.status for r in resps) == [200, 429]
    assert limited.state.requests == 2 and limited.state.rate_limited == 0


async def test_pacing_answers_429_itself_or_uses_a_deployment_with_room(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    limited, roomy = await mocks(rpm=2, rate_window_s=60.0), await mocks()
    settings = fleet_settings(redis_url, upstream_toml("lim", limited, max_queue_wait_s=0.5),
                              f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "lim" }}]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    for i in range(2):
        assert (await proxy.embed(key, {"model": MODEL, "input": f"r{i}"})).status == 200
    resp = await proxy.embed(key, {"model": MODEL, "input": "one too many"})
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    assert int(resp.headers["Retry-After"]) >= 50
    assert limited.state.requests == 2 and limited.state.rate_limited == 0  # no upstream call for it

    limited.state.reset()
    limited.state.window_start = float("-inf")
    # a fresh upstream: the fleet's record of its announced budget goes too (issue 19: the fleet shares it)
    await proxy.app[FLEET].limiter.settle()
    flush = redis.Redis.from_url(redis_url)
    flush.flushall()
    flush.close()
    settings = fleet_settings(
        redis_url, upstream_toml("lim", limited, max_queue_wait_s=0.5) + upstream_toml("roomy", roomy),
        f'[models."{MODEL}"]\ndimensions = 1536\n'
        'deployments = [{ upstream = "lim", weight = 100 }, { upstream = "roomy", weight = 1 }]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    for i in range(12):
        assert (await proxy.embed(key, {"model": MODEL, "input": f"s{i}"})).status == 200
    assert limited.state.requests == 2 and limited.state.rate_limited == 0
    assert roomy.state.requests == 10
    state = (await admin_upstreams(proxy))[f"{MODEL}/lim"]
    assert state["remaining_requests"] == 0 and state["requests_reset_at"] > time.time()


# --- micro-batching -----------------------------------------------------------------------------------------------


async def test_micro_batching_64_concurrent_misses(make_proxy: ProxyFactory, mocks: Mocks, redis_url: str) -> None:
    up = await mocks(latency_ms=30)
    settings = fleet_settings(redis_url, upstream_toml("a", up),
                              f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}]\n')
    proxy = await logged_proxy(make_proxy, settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200  # the key is verified
    up.state.reset()
    texts = [f"concurrent miss number {i} " + "word " * (i % 5) for i in range(64)]
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": t}) for t in texts))
    assert [r.status for r in resps] == [200] * 64
    assert up.state.requests <= 16  # one call per request before micro-batching
    assert up.state.inputs == 64
    expected = await direct(up.base_url, {"model": MODEL, "input": texts})
    want = vectors(expected)
    reported = expected["usage"]["prompt_tokens"]
    total = 0
    for text, resp, vec in zip(texts, resps, want, strict=True):
        doc = await resp.json()
        assert_same_vectors(vectors(doc), [vec])
        own = (await direct(up.base_url, {"model": MODEL, "input": text}))["usage"]["prompt_tokens"]
        assert doc["usage"]["prompt_tokens"] == own  # each request's usage is its own input's count
        total += own
    assert total == reported
    calls = metric(proxy, "embedding_proxy_upstream_call_requests_count", model=MODEL)
    assert calls <= 17 and metric(proxy, "embedding_proxy_upstream_call_requests_sum", model=MODEL) == 65


async def test_micro_batching_false_sends_each_request_on_its_own(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(latency_ms=50)
    settings = fleet_settings(redis_url, upstream_toml("a", up),
                              f'[models."{MODEL}"]\ndimensions = 1536\nmicro_batching = false\n'
                              'deployments = [{ upstream = "a" }]\n')
    assert not settings.models[MODEL].micro_batching
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    texts = [f"unmerged miss {i}" for i in range(8)]
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": t}) for t in texts))
    assert [r.status for r in resps] == [200] * 8
    assert up.state.requests == 8 and up.state.inputs == 8  # merged, these would be 2 calls
    want = vectors(await direct(up.base_url, {"model": MODEL, "input": texts}))
    for resp, vec in zip(resps, want, strict=True):
        assert_same_vectors(vectors(await resp.json()), [vec])
    assert metric(proxy, "embedding_proxy_upstream_call_requests_count", model=MODEL) == 8


async def test_a_failed_merged_call_fails_each_request_it_carried(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    up = await mocks(latency_ms=50)
    settings = fleet_settings(redis_url, upstream_toml("a", up, max_retries=0),
                              f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}]\n')
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    up.state.fail_next("status", times=8, status=500)
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": f"f{i}"}) for i in range(8)))
    # the lone first call and the merged one (more when the requests arrive further apart than the join window on a
    # loaded machine); never one call per request, and no request sent again alone after its merged call failed
    assert 2 <= up.state.requests < 8
    assert [r.status for r in resps] == [502] * 8
    # the client's input refused with a 400 in a merged call: each request is tried alone, so only a bad one fails
    up.state.reset()
    up.state.fail_next("status", times=2, status=400)
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": f"g{i}"}) for i in range(8)))
    assert sorted(r.status for r in resps) == [200] * 7 + [400]  # the lone first call's 400 is its own
    # the lone call (400), the merged one (400), then each of its requests alone (7 when all 7 merged)
    assert up.state.requests >= 2 + 1


# --- visibility ---------------------------------------------------------------------------------------------------


async def test_upstreams_command_shows_each_deployment(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = await mocks(rpm=100), await mocks()
    settings = fleet_settings(
        redis_url, upstream_toml("a", a) + upstream_toml("b", b),
        f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{{ upstream = "a" }}, {{ upstream = "b" }}]\n')
    # its access log kept off stdout: the CLI's output is read from there while the proxy runs in this process
    proxy = await logged_proxy(make_proxy, settings)
    key = await proxy.new_key()
    while a.state.requests == 0:
        assert (await proxy.embed(key, {"model": MODEL, "input": f"c{b.state.requests}"})).status == 200
    url = str(proxy.client.make_url("/"))
    monkeypatch.setenv("PROXY_ADMIN_KEY", ADMIN)
    assert await asyncio.to_thread(main, ["upstreams", "--url", url, "--json"]) == 0
    rows = {r["upstream"]: r for r in orjson.loads(capsys.readouterr().out)}
    assert rows["a"]["state"] == "healthy" and rows["a"]["remaining_requests"] == 99
    assert rows["b"]["remaining_requests"] is None
    assert await asyncio.to_thread(main, ["upstreams", "--url", url]) == 0
    table = capsys.readouterr().out.splitlines()
    rows_only = [line for line in table if not line.startswith(" ")]  # indented: the fleet's instances and events
    assert table[0].split()[:3] == ["MODEL", "UPSTREAM", "KIND"] and len(rows_only) == 3
    monkeypatch.setenv("PROXY_ADMIN_KEY", "wrong")
    assert await asyncio.to_thread(main, ["upstreams", "--url", url]) == 1
    assert "answered 401" in capsys.readouterr().err


@pytest.mark.parametrize(("answer", "admin_key"), [
    ({"ok": True}, ADMIN),  # JSON, but no data
    ({"data": [{"model": "m"}]}, ADMIN),  # rows without the fields
    ({"data": [{f: "x" for f in ("model", "upstream", "kind", "priority", "weight", "state", "cooling_down_until",
                                 "paused_until", "last_error", "remaining_requests", "remaining_tokens")}]}, ADMIN),
    ({"data": []}, "admin-schl\u00fcssel"),  # an admin key that cannot travel in a header
])
async def test_upstreams_command_refuses_what_is_not_the_proxys_answer_in_one_line(
    answer: dict[str, Any], admin_key: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    app = web.Application()

    async def upstreams(_: web.Request) -> web.Response:
        return web.json_response(answer)

    app.router.add_get("/admin/upstreams", upstreams)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        monkeypatch.setenv("PROXY_ADMIN_KEY", admin_key)
        monkeypatch.delenv("PROXY_CONFIG", raising=False)
        assert await asyncio.to_thread(main, ["upstreams", "--url", str(server.make_url("/"))]) in (1, 2)
    finally:
        await server.close()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
