"""Break11: defects found in issue 11's upstream fleet (proxy/upstream/), each reproduced against real servers (the mock
upstream as one real server per deployment, a real redis-server, the proxy app on a real socket). Every test here
fails on the code it was written against."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cli.main import main
from proxy.config import ConfigError, parse
from tests import test_fleet
from tests.conftest import ProxyFactory, Upstream
from tests.test_fleet import MODEL, Mocks, fleet_settings

pytestmark = pytest.mark.redis
mocks = test_fleet.mocks  # the fixture: one real mock upstream per deployment


def up_toml(name: str, up: Upstream, **options: Any) -> str:
    """An [upstreams.NAME] table whose timeouts the test chooses (test_fleet's upstream_toml fixes them)."""
    values: dict[str, Any] = {"deadline_s": 5.0, "attempt_timeout_s": 2.0, "backoff_base_s": 0.01, **options}
    lines = [f"[upstreams.{name}]", f'base_url = "{up.base_url}"', 'api_key_env = "FLEET_KEY"']
    lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def one_model(*deployments: str) -> str:
    return f'[models."{MODEL}"]\ndimensions = 1536\ndeployments = [{", ".join(deployments)}]\n'


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def timed(coro: Any) -> tuple[int, float]:
    started = time.monotonic()
    resp = await coro
    await resp.read()
    return resp.status, time.monotonic() - started


# --- micro-batching: a miss waiting to join the next call waits on the call in flight, without bound ------------------


async def test_a_request_waiting_to_join_a_merged_call_keeps_its_deadline(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """deadline_s: "One client request may wait this long for the upstream in total, retries included; then 504."
    A miss that arrives while its model's call is in flight waits for that call to end (batching.py submit:
    `await part.future`, dispatched only from _run's finally) and then gets a call with a fresh deadline of its own
    (client.py _call), so it waits up to twice deadline_s."""
    a = await mocks()
    settings = fleet_settings(redis_url, up_toml("a", a, attempt_timeout_s=1.5, deadline_s=3.0, max_retries=5),
                              one_model('{ upstream = "a" }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    a.state.fail_next("timeout", times=50)  # the upstream stalls every call from now on
    first = asyncio.create_task(timed(proxy.embed(key, {"model": MODEL, "input": "first"})))
    await until(lambda: a.state.requests == 2)  # the first request's call is at the upstream
    second = await timed(proxy.embed(key, {"model": MODEL, "input": "second"}))
    assert (await first)[0] == 504
    status, elapsed = second
    assert status == 504
    assert elapsed < 3.0 + 1.5, f"waited {elapsed:.1f}s for the upstream with deadline_s = 3.0"


async def test_a_stalled_call_does_not_hold_up_misses_a_deployment_can_answer_at_once(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """One hung upstream connection holds every concurrent miss of the model for up to attempt_timeout_s (10 s by
    default): they wait for the stalled call instead of going to a deployment that answers in milliseconds (here
    the same deployment, which answers every call after the stalled one at once, and a healthy spare)."""
    a, b = await mocks(), await mocks()
    settings = fleet_settings(redis_url, up_toml("a", a, attempt_timeout_s=3.0, deadline_s=8.0) + up_toml("b", b),
                              one_model('{ upstream = "a" }', '{ upstream = "b", priority = 1 }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    a.state.fail_next("timeout", times=1)  # one call stalls; a answers every other one at once
    first = asyncio.create_task(timed(proxy.embed(key, {"model": MODEL, "input": "stalled"})))
    await until(lambda: a.state.requests == 2)
    status, elapsed = await timed(proxy.embed(key, {"model": MODEL, "input": "not stalled"}))
    assert status == 200
    assert elapsed < 1.5, f"a miss waited {elapsed:.1f}s behind another request's stalled call"
    assert (await first)[0] == 200


# --- pacing: the upstream answers 429 although its headers were known ------------------------------------------------


async def test_after_a_rate_limit_reset_concurrent_calls_do_not_overrun_the_upstream(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """Once the reset time of the last headers has passed, every budget check refills the limit (pacing.py
    _Limit.current sets remaining = limit whenever now >= reset_at and never moves reset_at), so all the calls that
    waited for the reset go out together until a new answer's headers arrive."""
    limited = await mocks(rpm=4, rate_window_s=1.0, latency_ms=20)
    settings = fleet_settings(redis_url, up_toml("lim", limited, max_queue_wait_s=5.0, deadline_s=10.0),
                              one_model('{ upstream = "lim" }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200  # the headers are known
    # distinct users: separate upstream calls (no micro-batching), as from different end users
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": f"c{i}", "user": f"u{i}"})
                                   for i in range(12)))
    assert [r.status for r in resps] == [200] * 12
    assert limited.state.rate_limited == 0, f"the upstream answered {limited.state.rate_limited} calls with 429"


async def test_a_retry_after_a_backoff_checks_the_rate_limit_again(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """A retry picks its deployment before the backoff sleep (client.py _call: router.choose, then `await
    self._sleep(wait)`, then _attempt with no new check); calls sent meanwhile use up the room the choice saw."""
    limited = await mocks(rpm=3, rate_window_s=4.0)
    settings = fleet_settings(redis_url, up_toml("lim", limited, max_queue_wait_s=6.0, deadline_s=10.0),
                              one_model('{ upstream = "lim" }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200  # 2 requests left
    limited.state.fail_next("status", status=500, retry_after=1.0)
    retried = asyncio.create_task(proxy.embed(key, {"model": MODEL, "input": "retried", "user": "u0"}))
    await until(lambda: limited.state.requests == 2)  # its first attempt got the 500: it sleeps 1 s
    for i in (1, 2):  # the two requests left in the window go meanwhile
        assert (await proxy.embed(key, {"model": MODEL, "input": f"other {i}", "user": f"u{i}"})).status == 200
    assert (await retried).status == 200
    assert limited.state.rate_limited == 0, "the retry went to an upstream its headers said was out of requests"


async def test_micro_batching_does_not_merge_calls_beyond_the_upstreams_token_limit(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """Concurrent misses are merged up to max_batch_tokens (300 000) whatever the deployment's tokens per minute; a
    merged call larger than the limit "can never fit" (pacing.py _Limit.wait: then the upstream decides), so it is
    sent, answered 429, paused, sent again..., and every request it carried fails with 429, although each of them
    alone fits the limit and all of them fit within max_queue_wait_s."""
    limited = await mocks(tpm=60, rate_window_s=1.5, latency_ms=30)
    settings = fleet_settings(redis_url, up_toml("lim", limited, max_queue_wait_s=5.0, deadline_s=10.0),
                              one_model('{ upstream = "lim" }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200  # the headers are known
    texts = [f"alpha bravo charlie delta {i}" for i in range(20)]  # 8 tokens each: 160 in all, 3 windows of 60
    resps = await asyncio.gather(*(proxy.embed(key, {"model": MODEL, "input": t}) for t in texts))
    assert [r.status for r in resps] == [200] * 20
    assert limited.state.rate_limited == 0


async def test_a_merged_call_does_not_move_billed_tokens_between_teams(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """Misses of different teams (no `user`) share one upstream call, whose usage is then split in proportion to the
    local counts (upstream.py split_usage). When the upstream counts an input differently from the proxy (here 3
    tokens more per input, as a model with special tokens the local tokenizer lacks), one team is told and charged
    the other team's tokens: each request's usage is no longer its own inputs' count (issue 11, item 5)."""
    up = await mocks(token_skew=3, latency_ms=50)
    settings = fleet_settings(redis_url, up_toml("a", up), one_model('{ upstream = "a" }'))
    proxy = await make_proxy(settings)
    red, blue = await proxy.new_key("red"), await proxy.new_key("blue")
    assert (await proxy.embed(red, {"model": MODEL, "input": "warm up"})).status == 200
    first = asyncio.create_task(proxy.embed(red, {"model": MODEL, "input": "in flight"}))
    await until(lambda: up.state.requests == 2)  # the next misses join the next call (of their team)
    long = "word " * 20
    short_resp, long_resp = await asyncio.gather(proxy.embed(red, {"model": MODEL, "input": "hi"}),
                                                 proxy.embed(blue, {"model": MODEL, "input": long}))
    assert (await first).status == 200
    # they were merged (3 calls) before calls merged within a team only; now each team's miss has its own call
    assert up.state.requests == 4
    # alone, the upstream bills "hi" 1 + 3 and the long text 21 + 3; merged, red is told 2 and blue 26
    assert ((await short_resp.json())["usage"]["prompt_tokens"], (await long_resp.json())["usage"]["prompt_tokens"]) \
        == (4, 24)


# --- cooldown: a wait for a deployment to come back that ends in a failure without a call --------------------------


async def test_a_call_that_waited_for_a_deployment_to_come_back_tries_it(
    make_proxy: ProxyFactory, mocks: Mocks, redis_url: str
) -> None:
    """With its retries used up (max_retries = 0 here) and every deployment cooling down after failing this call,
    the call waits for the first to come back (client.py _call: _queue, waited = True), then raises the old error
    at once (`if retries == 0: raise error`) without calling the deployment it waited for."""
    a, b = await mocks(), await mocks()
    settings = fleet_settings(
        redis_url, up_toml("a", a, allowed_fails=1, cooldown_s=1.0, max_retries=0)
        + up_toml("b", b, allowed_fails=1, cooldown_s=1.5, max_retries=0),
        one_model('{ upstream = "a" }', '{ upstream = "b" }'))
    proxy = await make_proxy(settings)
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    a.state.fail_next("status", status=500)
    b.state.fail_next("status", status=500)
    calls = a.state.requests + b.state.requests
    status, elapsed = await timed(proxy.embed(key, {"model": MODEL, "input": "x"}))
    # today: 502 after waiting ~1 s for a, which is never called again (3 calls in all would be 2)
    assert (status, a.state.requests + b.state.requests - calls) == (200, 3), f"{status} after {elapsed:.1f}s"


# --- configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "line", "key"), [
    ("deployment", "weight = inf", "weight"),  # that deployment never gets a call (router.py: inf - inf is nan)
    ("deployment", "weight = nan", "weight"),  # every call goes to the last deployment of the pool
    ("upstream", "cooldown_s = nan", "cooldown_s"),  # the deployment never cools down
    ("upstream", "max_queue_wait_s = nan", "max_queue_wait_s"),  # the wait for a rate limit is unbounded
])
def test_a_fleet_setting_that_is_not_a_finite_number_is_one_clear_error(table: str, line: str, key: str) -> None:
    dep = f"{{ upstream = \"a\", {line} }}" if table == "deployment" else '{ upstream = "a" }'
    up_extra = line + "\n" if table == "upstream" else ""
    text = (f'[upstreams.a]\nbase_url = "http://127.0.0.1:9/v1"\n{up_extra}[upstreams.b]\n'
            f'base_url = "http://127.0.0.1:9/v1"\n[models.m]\ndimensions = 8\n'
            f'deployments = [{dep}, {{ upstream = "b" }}]\n')
    with pytest.raises(ConfigError, match=key):
        parse(text, "/etc/proxy.toml", {})


# --- embedding-proxy upstreams ----------------------------------------------------------------------------------------


@pytest.fixture
async def not_a_proxy() -> AsyncIterator[str]:
    """A server answering GET /admin/upstreams with 200 and an HTML page (a wrong --url: some other service)."""
    app = web.Application()
    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app.router.add_get("/admin/upstreams", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/"))
    await server.close()


@pytest.mark.parametrize("url", ["not a url", "http://[::1"])
def test_upstreams_command_with_a_malformed_url_is_a_clear_error(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROXY_ADMIN_KEY", "admin")
    monkeypatch.delenv("PROXY_CONFIG", raising=False)
    assert main(["upstreams", "--url", url]) in (1, 2)  # today: ValueError escapes (a traceback)
    assert "error" in capsys.readouterr().err


async def test_upstreams_command_against_a_server_that_is_not_the_proxy_is_a_clear_error(
    not_a_proxy: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROXY_ADMIN_KEY", "admin")
    monkeypatch.delenv("PROXY_CONFIG", raising=False)
    assert await asyncio.to_thread(main, ["upstreams", "--url", not_a_proxy]) == 1  # today: JSONDecodeError
    assert "error" in capsys.readouterr().err
