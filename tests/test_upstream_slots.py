"""Issue 15 point 2: the wait for an upstream slot (`max_concurrency`) is inside the request's deadline.

The scenario of the issue against real servers (a mock upstream per deployment, a real redis-server, the proxy
app): one slot, `attempt_timeout_s = 1`, `deadline_s = 1.5`, no retries, six concurrent requests. Before the fix the
slot wait had no bound and each attempt's time limit was taken before it: the 504s came after 1, 2, ... 6 s and the
upstream received six calls, most after their request's deadline. Now every request has its answer by its deadline,
and no call reaches the upstream after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import Settings
from proxy.http.app import create_app
from proxy.mock.upstream import MOCK_SETTINGS, MOCK_STATE, MockSettings, create_mock_app
from tests.conftest import UPSTREAM_KEY, Proxy, ProxyFactory, Upstream
from tests.test_break11 import timed, until, up_toml
from tests.test_fleet import MODEL, fleet_settings, metric

pytestmark = pytest.mark.redis
DEADLINE_S = 1.5
SLACK_S = 0.4  # loopback delivery and a loaded machine; far below the 1 s steps of the old behaviour


class Stamped:
    """A mock upstream as a real server that also notes when each embeddings call arrived (time.monotonic())."""

    def __init__(self, up: Upstream, arrivals: list[float]) -> None:
        self.up, self.arrivals = up, arrivals

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(self.up.server.make_url("/_mock/stats")) as resp:
            stats: dict[str, Any] = await resp.json()
            return stats


@pytest.fixture
async def stamped_mock() -> AsyncIterator[Callable[..., Awaitable[Stamped]]]:
    servers: list[TestServer] = []

    async def start(**options: Any) -> Stamped:
        arrivals: list[float] = []

        @web.middleware
        async def stamp(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path.endswith("/embeddings"):
                arrivals.append(time.monotonic())
            response: web.StreamResponse = await handler(request)
            return response

        app = create_mock_app(MockSettings(api_key=UPSTREAM_KEY, **options))
        app.middlewares.append(stamp)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return Stamped(Upstream(server, app[MOCK_STATE], app[MOCK_SETTINGS]), arrivals)

    yield start
    for server in servers:
        await server.close()


def _settings(up: Upstream, redis_url: str, **options: Any) -> Settings:
    """The issue's settings: one slot, deadline_s = 1.5, no retries; each request's misses in a call of its own."""
    values = {"max_concurrency": 1, "attempt_timeout_s": 1.0, "deadline_s": DEADLINE_S, "max_retries": 0, **options}
    return fleet_settings(
        redis_url, up_toml("a", up, **values),
        f'[models."{MODEL}"]\ndimensions = 1536\nmicro_batching = false\ndeployments = [{{ upstream = "a" }}]\n')


async def six_at_once(proxy: Proxy, key: str, tag: str) -> tuple[float, list[tuple[int, float]], list[int]]:
    """Six concurrent requests; returns when they were sent, (status, seconds) of each, and the largest number of
    calls seen waiting for the slot meanwhile (the queue gauge)."""
    waiting: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            waiting.append(int(metric(proxy, "embedding_proxy_upstream_slot_waiters", model=MODEL, upstream="a")))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    sent = time.monotonic()
    results = await asyncio.gather(*(timed(proxy.embed(key, {"model": MODEL, "input": f"{tag} {i}"}))
                                     for i in range(6)))
    done.set()
    await watcher
    return sent, results, waiting


async def test_a_stalling_upstream_gets_no_call_after_its_deadline_and_every_504_is_on_time(
    make_proxy: ProxyFactory, stamped_mock: Callable[..., Awaitable[Stamped]], redis_url: str
) -> None:
    mock = await stamped_mock()
    proxy = await make_proxy(_settings(mock.up, redis_url))
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    before = (await mock.stats())["requests"]
    mock.arrivals.clear()
    mock.up.state.fail_next("timeout", times=50)  # every call from now on stalls

    sent, results, waiting = await six_at_once(proxy, key, "stall")
    assert [status for status, _ in results] == [504] * 6
    assert max(elapsed for _, elapsed in results) < 2.5, results  # before: 1, 2, ... 6 s
    calls = (await mock.stats())["requests"] - before
    # the first call at once, the next when the first attempt's 1 s ran out, perhaps one more in the last moments:
    # never one per request (before: 6, four of them after their request's deadline)
    assert 1 <= calls <= 3, calls
    assert all(at < sent + DEADLINE_S + SLACK_S for at in mock.arrivals), [at - sent for at in mock.arrivals]
    # the queue and its waits are visible; the calls that never got a slot are counted, and nobody waits any more
    assert 4 <= max(waiting) <= 5, waiting
    assert metric(proxy, "embedding_proxy_upstream_slot_waiters", model=MODEL, upstream="a") == 0
    assert metric(proxy, "embedding_proxy_upstream_calls_dropped_total", model=MODEL, upstream="a",
                  reason="deadline") == 6 - calls
    assert metric(proxy, "embedding_proxy_upstream_slot_wait_seconds_count", model=MODEL, upstream="a") == 1 + 6
    assert metric(proxy, "embedding_proxy_upstream_slot_wait_seconds_bucket", model=MODEL, upstream="a",
                  le="0.5") < 1 + 6  # some waited longer than half a second


async def test_an_upstream_answering_in_a_second_gets_only_calls_that_can_start_before_their_deadline(
    make_proxy: ProxyFactory, stamped_mock: Callable[..., Awaitable[Stamped]], redis_url: str
) -> None:
    mock = await stamped_mock()
    proxy = await make_proxy(_settings(mock.up, redis_url, attempt_timeout_s=2.0))  # the deadline bounds each one
    key = await proxy.new_key()
    # warmed up at once: a first call (a new connection) taking 1 s could miss the 1.5 s deadline on a loaded machine
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    mock.up.settings.latency_ms = 1000
    before = (await mock.stats())["requests"]
    mock.arrivals.clear()

    sent, results, _ = await six_at_once(proxy, key, "slow")
    statuses = sorted(status for status, _ in results)
    # the first holds the slot for 1 s and gets its answer; the second gets the slot with 0.5 s of its deadline
    # left, too little for a 1 s answer; the others never get a slot before their deadline (before: six 200s after
    # up to 6 s, six calls billed)
    assert statuses == [200] + [504] * 5, results
    # well before the 6 s of one queued call after another (loose: a loaded machine stalls this process too)
    assert max(elapsed for _, elapsed in results) < 4.5, results
    calls = (await mock.stats())["requests"] - before
    assert 2 <= calls <= 3, calls
    assert all(at < sent + DEADLINE_S + SLACK_S for at in mock.arrivals), [at - sent for at in mock.arrivals]


async def test_inputs_sent_again_after_a_shared_call_failed_keep_the_first_deadline(
    make_proxy: ProxyFactory, stamped_mock: Callable[..., Awaitable[Stamped]], redis_url: str
) -> None:
    """B asks for an input A's call is already fetching; A's call times out, so B sends the input again itself. Its
    deadline counts from when B asked, not from the re-send (before: a fresh deadline_s, ~1.9 s more here)."""
    mock = await stamped_mock()
    proxy = await make_proxy(_settings(mock.up, redis_url, max_concurrency=8, attempt_timeout_s=1.9,
                                       deadline_s=2.0))
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    before = mock.up.state.requests
    mock.up.state.fail_next("timeout", times=2)  # A's call and B's re-send both stall
    first = asyncio.create_task(timed(proxy.embed(key, {"model": MODEL, "input": "shared"})))
    await until(lambda: mock.up.state.requests == before + 1)  # A's call is at the upstream
    status, elapsed = await timed(proxy.embed(key, {"model": MODEL, "input": "shared"}))
    assert (await first)[0] == 504  # after its 1.9 s attempt
    assert status == 504
    assert mock.up.state.requests == before + 2  # A's call, then B's re-send with ~0.1 s of its deadline left
    assert elapsed < 2.0 + 0.6, f"B waited {elapsed:.2f}s with deadline_s = 2.0"  # before: about 3.8 s


async def test_a_call_that_waited_for_its_slot_checks_the_pause_it_may_have_got_meanwhile(
    make_proxy: ProxyFactory, stamped_mock: Callable[..., Awaitable[Stamped]], redis_url: str
) -> None:
    """The pacing check is made once the slot is held: B waits behind A for the only slot, A's answer is a 429
    that pauses the deployment for 30 s, so B is answered 429 by the proxy instead of being sent into the pause."""
    mock = await stamped_mock(latency_ms=300)
    proxy = await make_proxy(_settings(mock.up, redis_url, attempt_timeout_s=2.0, deadline_s=5.0))
    key = await proxy.new_key()
    assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
    before = mock.up.state.requests
    mock.up.state.fail_next("status", status=429, retry_after=30)
    first = asyncio.create_task(timed(proxy.embed(key, {"model": MODEL, "input": "A"})))
    await until(lambda: mock.up.state.requests == before + 1)
    status, _ = await timed(proxy.embed(key, {"model": MODEL, "input": "B"}))
    assert (await first)[0] == 429
    assert status == 429  # before: sent once the slot was free (and answered, the upstream's pause unheeded)
    assert mock.up.state.requests == before + 1


async def test_a_call_whose_request_gave_up_while_it_waited_for_a_slot_is_never_sent(
    stamped_mock: Callable[..., Awaitable[Stamped]], redis_url: str
) -> None:
    """A client that hangs up has its handler cancelled here (handler_cancellation, as at shutdown): its call,
    queued behind a stalled one for the only slot, is dropped when the slot frees, not sent."""
    mock = await stamped_mock()
    app = create_app(_settings(mock.up, redis_url, attempt_timeout_s=1.0, deadline_s=5.0))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1", handler_cancellation=True))
    await client.start_server()
    try:
        proxy = Proxy(client, app)
        key = await proxy.new_key()
        assert (await proxy.embed(key, {"model": MODEL, "input": "warm up"})).status == 200
        before = mock.up.state.requests
        mock.up.state.fail_next("timeout", times=5)
        stalled = asyncio.create_task(timed(proxy.embed(key, {"model": MODEL, "input": "holds the slot"})))
        await until(lambda: mock.up.state.requests == before + 1)
        url = client.make_url("/v1/embeddings")
        async with aiohttp.ClientSession() as session:
            queued = session.post(url, json={"model": MODEL, "input": "hangs up"},
                                  headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=0.3))
            with pytest.raises(TimeoutError):
                await queued
        assert (await stalled)[0] == 504  # after its 1 s attempt: the slot is free

        def dropped() -> float:
            return metric(proxy, "embedding_proxy_upstream_calls_dropped_total", model=MODEL, upstream="a",
                          reason="abandoned")

        await until(lambda: mock.up.state.requests > before + 1 or dropped() == 1)
        await asyncio.sleep(0.2)
        assert mock.up.state.requests == before + 1  # the hung-up request's call never went (before: it did)
        assert dropped() == 1
    finally:
        await client.close()

